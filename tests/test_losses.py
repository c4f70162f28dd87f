"""Each pure function of `trl_adaptive.losses` against arithmetic written out by hand (math, not torch)."""

import math
import statistics

import pytest
import torch

from trl_adaptive import losses


def tensor(values):
    return torch.tensor(values, dtype=torch.float64)


def log1pexp(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), the building block of every logistic loss below."""
    return math.log(1.0 + math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def assert_close(actual: torch.Tensor, expected, rel=1e-9, abs=1e-12):
    assert actual.tolist() == pytest.approx(list(expected), rel=rel, abs=abs)


# ---- Diffusion-DPO logits and rewards ------------------------------------------------------------------------


def test_denoising_error_is_per_sample_mean_square():
    prediction = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    # sample 0: squared errors 0, 4, 9, 0 -> 13/4; sample 1: 1, 1, 1, 0 -> 3/4
    assert_close(losses.denoising_error(prediction, target), [13 / 4, 3 / 4])
    assert losses.denoising_error(prediction.half(), target.half()).dtype == torch.float32


def test_dpo_logits():
    m_w, m_l = tensor([0.50, 0.20]), tensor([0.40, 0.30])
    r_w, r_l = tensor([0.60, 0.25]), tensor([0.45, 0.20])
    # pair 0: (0.60 - 0.45) - (0.50 - 0.40) = 0.15 - 0.10 = 0.05
    # pair 1: (0.25 - 0.20) - (0.20 - 0.30) = 0.05 + 0.10 = 0.15
    assert_close(losses.dpo_logits(m_w, m_l, r_w, r_l), [0.05, 0.15])


def test_implicit_rewards():
    # beta * (r - m): 100 * (0.3 - 0.1) = 20 and 100 * (0.2 - 0.5) = -30
    assert_close(losses.implicit_rewards(tensor([0.1, 0.5]), tensor([0.3, 0.2]), beta=100.0), [20.0, -30.0])


# ---- each loss_type ---------------------------------------------------------------------------------------------

BETA = 2.0
LOGITS = [0.5, -0.25, 0.0]  # z = beta * l = 1.0, -0.5, 0.0
Z = [1.0, -0.5, 0.0]


def test_sigmoid_loss_is_diffusion_dpo():
    expected = [log1pexp(-z) for z in Z]  # -log sigmoid(z)
    assert_close(losses.preference_loss(tensor(LOGITS), BETA, "sigmoid"), expected)
    assert expected[2] == pytest.approx(math.log(2.0))


def test_sigmoid_with_label_smoothing_is_cdpo():
    eps = 0.1
    expected = [(1 - eps) * log1pexp(-z) + eps * log1pexp(z) for z in Z]
    assert_close(losses.preference_loss(tensor(LOGITS), BETA, "sigmoid", label_smoothing=eps), expected)


def test_robust_loss():
    eps = 0.2
    # (-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps)
    expected = [((1 - eps) * log1pexp(-z) - eps * log1pexp(z)) / (1 - 2 * eps) for z in Z]
    assert_close(losses.preference_loss(tensor(LOGITS), BETA, "robust", label_smoothing=eps), expected)
    # without smoothing it is plain Diffusion-DPO
    assert_close(losses.preference_loss(tensor(LOGITS), BETA, "robust"), [log1pexp(-z) for z in Z])


def test_hinge_loss():
    # relu(1 - z): 1 - 1 = 0, 1 + 0.5 = 1.5, 1 - 0 = 1
    assert_close(losses.preference_loss(tensor(LOGITS), BETA, "hinge"), [0.0, 1.5, 1.0])


def test_capped_sigmoid_loss():
    w = 0.2
    # z >= 0: -log sigmoid(z); z < 0: log 2 - w z (log 2 + 0.2 * 0.5 at z = -0.5)
    expected = [log1pexp(-1.0), math.log(2.0) + w * 0.5, math.log(2.0)]
    z = tensor(Z).requires_grad_()
    actual = losses.preference_loss(z / BETA, BETA, "capped_sigmoid", misranked_weight=w)
    assert_close(actual, expected)
    # the pull d(loss)/dz: sigmoid(-z) for the pair ranked with its label, w for the misranked one, 1/2 at z = 0
    actual.sum().backward()
    assert_close(-z.grad, [sigmoid(-1.0), w, 0.5])
    # unset, the weight is the library default
    default = losses.preference_loss(tensor(LOGITS), BETA, "capped_sigmoid")
    assert default[1].item() == pytest.approx(math.log(2.0) + losses.DEFAULT_MISRANKED_WEIGHT * 0.5)
    # w = 1/2 continues -log sigmoid by its tangent at 0, which lies below it
    tangent = losses.preference_loss(tensor(LOGITS), BETA, "capped_sigmoid", misranked_weight=0.5)
    assert tangent[1].item() == pytest.approx(math.log(2.0) + 0.25) and tangent[1].item() < log1pexp(0.5)


def test_ipo_loss_is_trl_form():
    # TRL's IPO: (l - 1/(2 beta))^2 with beta = 2: target 0.25
    expected = [(0.5 - 0.25) ** 2, (-0.25 - 0.25) ** 2, (0.0 - 0.25) ** 2]
    assert_close(losses.preference_loss(tensor(LOGITS), BETA, "ipo"), expected)


def test_every_registered_loss_is_tested():
    assert set(losses.PREFERENCE_LOSSES) == {"sigmoid", "ipo", "robust", "hinge", "capped_sigmoid"}


# ---- minority score ------------------------------------------------------------------------------------------


def test_minority_score_single_annotator_is_sigmoid_of_minus_rho_l():
    rho, logits = 3.0, [0.5, -0.2, 0.0]
    expected = [sigmoid(-rho * l) for l in logits]  # 1/(1 + e^{1.5}), 1/(1 + e^{-0.6}), 0.5
    # the metric is computed in float32 whatever the input dtype
    assert_close(losses.minority_score(tensor([logits]), rho), expected, rel=1e-6)


def _hand_minority_score(columns, rho):
    """u = (1 - mean_k sigmoid(rho l_k)) * min(std_k(rho l_k), 1), std with Bessel's correction."""
    out = []
    for annotator_logits in columns:
        scaled = [rho * l for l in annotator_logits]
        confidence = 1.0 - statistics.fmean(sigmoid(s) for s in scaled)
        stability = min(statistics.stdev(scaled), 1.0)
        out.append(confidence * stability)
    return out


def test_minority_score_three_annotators():
    rho = 2.0
    # rows: annotators (current model, EMA 1, EMA 2); columns: pairs
    logits = [[0.10, -0.30, 0.20], [0.05, -0.10, 0.20], [-0.05, 0.10, 0.20]]
    columns = list(zip(*logits))
    expected = _hand_minority_score(columns, rho)
    # pair 0 by hand: scaled 0.2, 0.1, -0.1; mean 1/15 -> stdev sqrt(((2/15)^2 + (1/30)^2 + (1/6)^2) / 2)
    stdev0 = math.sqrt(((0.2 - 1 / 15) ** 2 + (0.1 - 1 / 15) ** 2 + (-0.1 - 1 / 15) ** 2) / 2)
    mean_sig0 = (sigmoid(0.2) + sigmoid(0.1) + sigmoid(-0.1)) / 3
    assert expected[0] == pytest.approx((1 - mean_sig0) * stdev0)
    assert expected[2] == 0.0  # annotators agree exactly: no instability, no minority signal
    assert_close(losses.minority_score(tensor(logits), rho), expected, rel=1e-6)


def test_minority_score_clamps_std_at_one():
    rho = 1.0
    logits = [[2.0, -1.0], [-2.0, -1.5], [0.0, -0.5]]  # pair 0 spread (std 2) is clamped; pair 1 (std 0.5) is not
    stability = [min(statistics.stdev(c), 1.0) for c in zip(*logits)]
    assert stability == pytest.approx([1.0, 0.5])
    confidence = [1.0 - statistics.fmean(sigmoid(v) for v in c) for c in zip(*logits)]
    expected = [c * s for c, s in zip(confidence, stability)]
    assert_close(losses.minority_score(tensor(logits), rho), expected, rel=1e-6)


def test_minority_score_normalizers_divide_each_annotator():
    rho = 1.5
    logits = [[0.2, -0.4], [0.1, 0.3], [-0.6, 0.9]]
    normalizers = [0.5, 2.0, 3.0]
    normalized = [[v / n for v in row] for row, n in zip(logits, normalizers)]
    expected = _hand_minority_score(list(zip(*normalized)), rho)
    assert_close(losses.minority_score(tensor(logits), rho, tensor(normalizers)), expected, rel=1e-6)


# ---- weights and margins -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weight_fn, expected",
    [
        ("none", [1.0, 1.0]),
        ("linear", [1 / (10 * 0.2 + 1), 1 / (10 * 0.0 + 1)]),  # 1/3 and 1
        ("quadratic", [1 / (10 * 0.04 + 1), 1.0]),  # 1/1.4
        ("sqrt", [1 / (math.exp(10 * math.sqrt(0.2)) + 1), 1 / (math.exp(0) + 1)]),
        ("sigmoid", [1 / (math.exp(10 * 0.2) + 1), 0.5]),
    ],
)
def test_weight_functions(weight_fn, expected):
    assert_close(losses.minority_weights(tensor([0.2, 0.0]), weight_fn, scale=10.0, intercept=1.0), expected)


def test_weight_functions_use_scale_and_intercept():
    # linear with k = 4, c = 0.5 at u = 0.25: 1 / (1 + 0.5)
    assert_close(losses.minority_weights(tensor([0.25]), "linear", scale=4.0, intercept=0.5), [1 / 1.5])


@pytest.mark.parametrize(
    "margin, expected",
    [
        ("none", [0.0, 0.0]),
        ("linear", [0.3 - 0.5 * 0.2, 0.3 - 0.5 * 0.6]),
        ("quadratic", [0.3 - 0.5 * 0.04, 0.3 - 0.5 * 0.36]),
    ],
)
def test_margins(margin, expected):
    assert_close(losses.adaptive_margin(tensor([0.2, 0.6]), margin, mean_logit=0.3, scale=0.5), expected)


def test_preference_loss_with_weights_and_margins():
    beta, logits = 4.0, [0.5, -0.1]
    weights, margins = [0.5, 2.0], [0.25, -1.0]
    # W * -log sigmoid(beta * l - gamma): z = 2 - 0.25 = 1.75 and -0.4 + 1 = 0.6
    expected = [0.5 * log1pexp(-1.75), 2.0 * log1pexp(-0.6)]
    actual = losses.preference_loss(tensor(logits), beta, "sigmoid", weights=tensor(weights), margins=tensor(margins))
    assert_close(actual, expected)


def test_adaptive_ipo():
    beta, logits = 4.0, [0.5, -0.1]
    weights, margins = [0.5, 2.0], [0.25, -1.0]
    # W * ((beta * l - gamma - 1/2) / beta)^2 = W * (l - gamma / beta - 1 / (2 beta))^2
    expected = [0.5 * (0.5 - 0.25 / 4 - 1 / 8) ** 2, 2.0 * (-0.1 + 1.0 / 4 - 1 / 8) ** 2]
    actual = losses.preference_loss(tensor(logits), beta, "ipo", weights=tensor(weights), margins=tensor(margins))
    assert_close(actual, expected)


def test_authors_margin_scale_is_nearly_inert():
    """gamma = mean(l) - u / beta: at beta 1000 the u-term is at most 1e-3 (docs/method.md explains)."""
    u = tensor([0.0, 0.5, 1.0])
    gamma = losses.adaptive_margin(u, "linear", mean_logit=0.0, scale=1 / 1000.0)
    assert gamma.abs().max().item() == pytest.approx(1e-3)


# ---- the metric carries no gradient --------------------------------------------------------------------------


def test_metric_weights_and_margins_are_detached():
    beta, rho = 3.0, 2.0
    logits = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    ema_logits = torch.tensor([[0.1, 0.2, 0.1], [-0.2, 0.4, 0.0]], dtype=torch.float64)
    stacked = torch.cat([logits.unsqueeze(0), ema_logits])  # carries logits' graph
    u = losses.minority_score(stacked, rho)
    weights = losses.minority_weights(u, "linear", 10.0, 1.0)
    margins = losses.adaptive_margin(u, "linear", logits.mean(), 1.0 / beta)
    assert not (u.requires_grad or weights.requires_grad or margins.requires_grad)

    losses.preference_loss(logits, beta, "sigmoid", weights=weights, margins=margins).sum().backward()
    # With W and gamma constants: d/dl [-W log sigmoid(beta l - gamma)] = -W beta sigmoid(-(beta l - gamma))
    expected = [
        -w * beta * sigmoid(-(beta * l - g)) for w, l, g in zip(weights.tolist(), logits.tolist(), margins.tolist())
    ]
    assert_close(logits.grad, expected)


def test_max_margin_caps_the_push_of_pairs_ranked_beyond_it():
    logits = torch.tensor([0.002, 0.01, -0.01], requires_grad=True)  # beta * l = 2, 10, -10 at beta 1000
    per_pair = losses.preference_loss(logits, 1000.0, max_margin=5.0)
    # -log sigmoid(min(z, 5)): 2 and -10 unchanged, 10 capped at 5.
    expected = -torch.nn.functional.logsigmoid(torch.tensor([2.0, 5.0, -10.0]))
    torch.testing.assert_close(per_pair, expected)
    per_pair.sum().backward()
    assert logits.grad[1] == 0  # beyond the cap: no further push
    assert logits.grad[0] < 0 and logits.grad[2] < 0  # the others still pull l up
