"""The minority filter: drop the pairs whose evidence, accumulated over their visits, says they are minority labels.

Why it exists (docs/results.md has the measurements): at the beta that works for Diffusion-DPO, ``beta * |l|`` is in
the tens, so the sigmoid loss acts like a hinge and gradient comes almost only from pairs the model currently ranks
wrongly. Adaptive-DPO's per-step score ``u`` is high for all of those, clean or flipped, so its per-step weights
mostly rescale the whole gradient, which Adam undoes. What separates flipped from clean pairs is *persistence*:
a clean pair is ranked correctly most of the time once the model has learned the majority preference, a flipped
pair keeps being ranked "wrongly". One step's logit is too noisy to show that (a random timestep and noise draw),
the mean over a pair's visits is not. This is the small-loss trick of noisy-label learning (Co-teaching, DivideMix)
applied to Diffusion-DPO's logit.

The policy's own evidence cannot tell a flipped pair from a clean pair the model has not learned yet (both are ranked
against their label); ``prompt_contrast_evidence`` asks the fixed reference model instead, which judges how well each
image fits its prompt (docs/minority_filter.md, "The reference as a judge"), and ``judge_evidence`` asks a judge the
user brings, a reward model's scores of the pair's images (docs/minority_filter.md, "A judge you bring").

Convention: *evidence* is larger for pairs that look more like minority labels (as ``u`` is).

Everything here is a pure function of tensors; the trainer keeps the per-pair sums (``trl_adaptive.history``).
"""

from __future__ import annotations

import torch

#: Values of ``AdaptiveDPOConfig.minority_filter``.
MINORITY_FILTERS = ("none", "top_fraction", "threshold", "mixture")
#: Values of ``AdaptiveDPOConfig.minority_evidence``.
MINORITY_EVIDENCE = ("logit", "wrong_sign", "score", "prompt_contrast", "judge")


def logit_evidence(logits: torch.Tensor, rms: torch.Tensor | float) -> torch.Tensor:
    """Minority evidence of one visit from the Diffusion-DPO logit: ``-l / rms``, detached.

    ``rms`` is the root mean square of the logits over the *global* batch (computed by the caller), which puts
    visits at different training stages on the same scale; the sign (the model ranks the pair wrongly) is kept.
    """
    rms = torch.as_tensor(rms, dtype=torch.float32, device=logits.device).clamp_min(1e-12)
    return (-logits.detach().float() / rms).detach()


def wrong_sign_evidence(logits: torch.Tensor) -> torch.Tensor:
    """Minority evidence of one visit as a 0/1 vote: 1 when the model ranks the pair against its label (``l < 0``).

    Its mean over visits is the share of visits on which the pair was ranked wrongly; scale-free, so visits at
    timesteps with large logits do not dominate it (they do dominate the mean of ``-l / rms``).
    """
    return (logits.detach() < 0).float()


def judge_evidence(margins: torch.Tensor, rms: torch.Tensor | float) -> torch.Tensor:
    """Minority evidence from a judge's scores of the pair's images: ``sigmoid(-margin / rms)``, detached, where
    ``margin`` (``judge_margin``) is the labelled winner's score minus the loser's and ``rms`` their root mean square
    over the *global* batch (computed by the caller).

    Above 0.5 exactly where the judge prefers the labelled loser (its vote), the further the larger the judge's lead.
    For a Bradley-Terry reward model it is the model's probability that the label is wrong, with the margin put in
    units of its typical size, so any judge's scale (PickScore's, an aesthetic score's) gives the same rule. The same
    on every visit up to the batch's scale: the judge does not change while the model trains. NaN margins (the judge
    abstains) give NaN.
    """
    rms = torch.as_tensor(rms, dtype=torch.float32, device=margins.device).clamp_min(1e-12)
    return torch.sigmoid(-margins.detach().float() / rms)


def implied_flip_rate(agreement: float, judge_accuracy: float) -> float:
    """The share of flipped labels implied by a judge's agreement with them, given its accuracy on clean labels.

    A judge that is right on a share ``a`` of clean pairs agrees with labels of which a share ``f`` is flipped on
    ``g = a (1 - f) + (1 - a) f`` of them, so ``f = (a - g) / (2a - 1)``, clipped to [0, 1/2]. The judge check sees only
    ``g``: a weak judge on clean labels and a strong one on noisy labels can agree alike (0.75: ``a`` = 0.75, ``f`` = 0;
    or ``a`` = 0.9, ``f`` = 0.19), and only ``a``, measured on pairs you trust, tells them apart.
    """
    if not 0.5 < judge_accuracy <= 1.0:
        raise ValueError(f"implied_flip_rate: judge_accuracy must be in (0.5, 1], got {judge_accuracy} (a judge at or "
                         "below chance says nothing about the labels)")
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"implied_flip_rate: agreement must be in [0, 1], got {agreement}")
    return min(max((judge_accuracy - agreement) / (2 * judge_accuracy - 1), 0.0), 0.5)


def prompt_contrast_evidence(own_errors: torch.Tensor, contrast_errors: torch.Tensor) -> torch.Tensor:
    """Minority evidence of one draw from the *reference* model: 1 when it finds the labelled loser more faithful to
    the pair's prompt than the labelled winner.

    ``own_errors`` and ``contrast_errors`` (2B,), winners first: the reference's denoising errors of each image on the
    same noise and timestep, conditioned on the pair's own prompt and on another pair's prompt. How much the own
    prompt lowers an image's error, ``contrast - own``, is a zero-shot score of how well the image matches its prompt
    (the diffusion-classifier idea); the vote says the label contradicts it. Detached.
    """
    fidelity = (contrast_errors.detach() - own_errors.detach()).float()
    winners, losers = fidelity.chunk(2)
    return (winners < losers).float()


def upper_quantile(evidence_means: torch.Tensor, fraction: float) -> torch.Tensor:
    """`top_fraction_threshold` as a 0-dim float64 tensor on the values' device, ignoring NaN entries (rows not yet
    judged); NaN when no entry is judged (every comparison with it is False: nothing lies above it)."""
    if fraction <= 0 or evidence_means.numel() == 0:  # numel: a shape, known without reading the values
        value = float("inf") if fraction <= 0 else float("nan")
        return torch.full((), value, dtype=torch.float64, device=evidence_means.device)
    return torch.nanquantile(evidence_means.double(), 1.0 - fraction)


def top_fraction_threshold(evidence_means: torch.Tensor, fraction: float) -> float:
    """Evidence value above which the ``fraction`` of pairs with the highest mean evidence lie (+inf for 0)."""
    if fraction <= 0 or evidence_means.numel() == 0:
        return float("inf")
    return float(upper_quantile(evidence_means, fraction))


def two_gaussian_mixture(values: torch.Tensor, iterations: int = 50) -> dict[str, torch.Tensor]:
    """Fit a two-component 1-D Gaussian mixture by EM; component 1 is the one with the larger mean. NaN entries (rows
    not yet judged) are left out, by masks: the arithmetic has the same shapes whatever their number.

    Deterministic: the components start at the 25% and 75% quantiles with the overall variance. Returns the
    ``weights``, ``means`` and ``variances`` (each of shape (2,)).
    """
    x = values.double().flatten()
    judged = ~x.isnan()
    count = judged.sum()
    x, member = torch.where(judged, x, 0.0), judged.double()[:, None]
    mean = x.sum() / count
    var = ((x - mean).pow(2) * member[:, 0]).sum().div(count).clamp_min(1e-12)
    means = torch.nanquantile(torch.where(judged, x, torch.nan), torch.tensor([0.25, 0.75], dtype=torch.float64,
                                                                              device=x.device))
    variances = torch.stack([var, var])
    weights = torch.full((2,), 0.5, dtype=torch.float64, device=x.device)
    for _ in range(iterations):
        log_density = (
            -0.5 * (x[:, None] - means).pow(2) / variances - 0.5 * torch.log(2 * torch.pi * variances) + weights.log()
        )
        resp = torch.softmax(log_density, dim=1) * member
        mass = resp.sum(dim=0).clamp_min(1e-12)
        weights = mass / count
        means = (resp * x[:, None]).sum(dim=0) / mass
        variances = ((resp * (x[:, None] - means).pow(2)).sum(dim=0) / mass).clamp_min(var * 1e-4)
    order = torch.argsort(means)
    return {"weights": weights[order], "means": means[order], "variances": variances[order]}


def ashman_d(mixture: dict[str, torch.Tensor]) -> torch.Tensor:
    """`mixture_separation` as a 0-dim tensor (no read to the host)."""
    means, variances = mixture["means"], mixture["variances"]
    return (means[1] - means[0]).abs() / ((variances[0] + variances[1]) / 2).sqrt()


def mixture_separation(mixture: dict[str, torch.Tensor]) -> float:
    """Ashman's D of a two-component mixture, ``|mu_1 - mu_0| / sqrt((var_0 + var_1) / 2)``: above ~2 the two
    components are clearly separated; a unimodal sample (no minority) gives a small D."""
    return float(ashman_d(mixture))


def mixture_minority_posterior(values: torch.Tensor, mixture: dict[str, torch.Tensor]) -> torch.Tensor:
    """Posterior probability that each value belongs to the upper (minority-looking) component of the mixture."""
    x = values.double()[..., None]
    log_density = (
        -0.5 * (x - mixture["means"]).pow(2) / mixture["variances"]
        - 0.5 * torch.log(2 * torch.pi * mixture["variances"])
        + mixture["weights"].log()
    )
    return torch.softmax(log_density, dim=-1)[..., 1].float()


def minority_keep_mask(
    evidence_means: torch.Tensor,
    visits: torch.Tensor,
    all_evidence_means: torch.Tensor,
    method: str,
    fraction: float = 0.0,
    threshold: float = 0.5,
    min_visits: int = 1,
    max_fraction: float = 0.5,
    min_separation: float = 2.0,
) -> torch.Tensor:
    """1.0 for pairs to keep, 0.0 for pairs judged minority; one value per pair of the batch.

    Args:
        evidence_means, visits: each batch pair's mean evidence and number of recorded visits.
        all_evidence_means: mean evidence of every pair judged so far (>= ``min_visits`` visits), NaN entries for
            rows not judged yet being ignored (`PairHistory.means_or_nan`: one entry per row, a fixed shape). It sets
            the threshold: the top ``fraction`` (``top_fraction``) or the pairs whose posterior under the upper component
            of a two-Gaussian mixture exceeds 1/2 (``mixture``; the flip rate need not be known).
        threshold: ``threshold`` drops the pairs whose mean evidence exceeds it (with ``wrong_sign`` evidence, 0.5:
            ranked against their label on most of their recent votes); the flip rate need not be known.
        min_separation: ``mixture`` drops nothing unless the components' Ashman's D reaches this (a unimodal
            evidence distribution, as with no minority, is split by any mixture fit; this keeps it whole).
        max_fraction: ``mixture`` and ``threshold`` never drop more than this share of pairs (their threshold is
            raised to that quantile).
    Pairs with fewer than ``min_visits`` visits are always kept. Only fixed-shape tensor operations, no branch
    on a value: on a GPU the mask is computed without waiting for the device.
    """
    if method == "none":
        return torch.ones_like(evidence_means, dtype=torch.float32)
    means = evidence_means.double()
    if method == "top_fraction":
        drop = means > upper_quantile(all_evidence_means, fraction)
    elif method == "threshold":
        drop = means > threshold
    elif method == "mixture":
        mixture = two_gaussian_mixture(all_evidence_means)
        drop = (mixture_minority_posterior(evidence_means, mixture) > 0.5) & (ashman_d(mixture) >= min_separation)
    else:
        raise ValueError(f"unknown minority filter {method!r}; allowed: {list(MINORITY_FILTERS)}")
    if method != "top_fraction":  # the rules that do not fix the share themselves are capped at max_fraction
        drop &= means > upper_quantile(all_evidence_means, max_fraction)
    drop &= visits.to(drop.device) >= min_visits
    drop &= (~all_evidence_means.isnan()).sum().to(drop.device) >= 2  # fewer than 2 pairs judged: nothing to compare
    return (~drop).float()
