"""Diffusion-DPO and Adaptive-DPO losses as pure functions on tensors.

Notation (shared by every function here and by ``docs/method.md``):

* ``m_w, m_l``: the policy's per-sample denoising errors (mean squared error of its prediction against the
  target) on the preferred ("winner") and rejected ("loser") image, which share noise and timestep.
* ``r_w, r_l``: the same errors for the frozen reference model.
* ``l = (r_w - r_l) - (m_w - m_l)``: the Diffusion-DPO logit, positive when the policy improved on the
  winner relative to the loser.
* ``z = beta * l - gamma``: the scaled logit minus an optional margin ``gamma``. Every preference loss in
  :data:`PREFERENCE_LOSSES` is a function of ``z``.

Nothing here knows about models, trainers or processes: batch statistics that must span several processes
(the mean logit used by the margin, L2 norms used by metric normalisation) are passed in by the caller.
"""

from __future__ import annotations

from typing import Callable

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO logits and rewards
# ----------------------------------------------------------------------------------------------------------


def denoising_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over every non-batch dimension, computed in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def dpo_logits(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
) -> torch.Tensor:
    """The Diffusion-DPO logit ``l = (r_w - r_l) - (m_w - m_l)`` per pair."""
    return (reference_chosen - reference_rejected) - (policy_chosen - policy_rejected)


def implicit_rewards(
    policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float
) -> torch.Tensor:
    """TRL's ``rewards/*`` analogue for one image: ``beta * (r - m)`` (how much the policy improved on it)."""
    return beta * (reference_errors - policy_errors)


# ----------------------------------------------------------------------------------------------------------
# Preference losses, each a function of z = beta * l - gamma
# ----------------------------------------------------------------------------------------------------------


def sigmoid_loss(
    z: torch.Tensor, beta: float, label_smoothing: float = 0.0, misranked_weight: float = 0.0
) -> torch.Tensor:
    """Diffusion-DPO: ``-log sigmoid(z)``; with ``label_smoothing`` eps, conservative DPO (cDPO):
    ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``."""
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def robust_loss(
    z: torch.Tensor, beta: float, label_smoothing: float = 0.0, misranked_weight: float = 0.0
) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024), an unbiased loss under a known flip rate eps = ``label_smoothing``:
    ``(-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps)``."""
    return (-(1.0 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
        1.0 - 2.0 * label_smoothing
    )


def hinge_loss(
    z: torch.Tensor, beta: float, label_smoothing: float = 0.0, misranked_weight: float = 0.0
) -> torch.Tensor:
    """SLiC-style hinge: ``relu(1 - z)``."""
    return torch.relu(1.0 - z)


#: ``misranked_weight`` of ``capped_sigmoid`` when the config leaves it unset (chosen on validation seeds of the digits
#: benchmark, docs/results.md "Ninth round").
DEFAULT_MISRANKED_WEIGHT = 0.2


def capped_sigmoid_loss(
    z: torch.Tensor, beta: float, label_smoothing: float = 0.0, misranked_weight: float = DEFAULT_MISRANKED_WEIGHT
) -> torch.Tensor:
    """Diffusion-DPO's ``-log sigmoid(z)`` for pairs ranked with their label (``z >= 0``) and, below zero, the
    straight line ``log 2 - misranked_weight * z``: a pair ranked against its label pulls with the fixed weight
    ``misranked_weight`` (the gradient's size in ``z``) instead of ``sigmoid(-z)``.

    Why: under ``-log sigmoid`` the weight of a misranked pair grows towards 1 while that of a pair ranked correctly
    falls towards 0, so once the model ranks the majority correctly by ``z*``, a share ``eps`` of flipped pairs
    balances the rest at ``exp(z*) = (1 - eps) / eps``, and learning stalls at a small margin. With the weight capped
    at ``w`` the balance moves to ``sigmoid(-z*) = eps * w / (1 - eps)``. A continuous loss with a kink at 0 (its
    slope jumps from -1/2 to ``-misranked_weight``); ``misranked_weight=0.5`` is the logistic loss continued by its
    tangent."""
    return torch.where(z >= 0, -F.logsigmoid(z), math.log(2.0) - misranked_weight * z)


def ipo_loss(
    z: torch.Tensor, beta: float, label_smoothing: float = 0.0, misranked_weight: float = 0.0
) -> torch.Tensor:
    """IPO (Azar et al. 2023) in TRL's convention ``(l - 1/(2 beta))^2``, written in ``z``:
    ``((z - 1/2) / beta)^2``. With ``gamma = 0`` this is exactly TRL's form; a margin shifts the target."""
    return ((z - 0.5) / beta).pow(2)


#: ``(z, beta, label_smoothing, misranked_weight) -> per-pair losses``; each loss ignores the parameters it has no use for.
PreferenceLoss = Callable[[torch.Tensor, float, float, float], torch.Tensor]

#: The one registry of loss names accepted by ``AdaptiveDPOConfig.loss_type``.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "capped_sigmoid": capped_sigmoid_loss,
}


# ----------------------------------------------------------------------------------------------------------
# Adaptive-DPO: minority score, weights, margins
# ----------------------------------------------------------------------------------------------------------


def minority_score(
    annotator_logits: torch.Tensor, rho: float, normalizers: torch.Tensor | None = None
) -> torch.Tensor:
    """The self-driven minority metric ``u`` of Adaptive-DPO, one value per pair.

    Args:
        annotator_logits: ``(K, B)`` Diffusion-DPO logits of the same pairs seen by K annotators (the current
            model first, then its EMA copies), all on the same noise and timestep.
        rho: scale applied to the logits before the metric (``metric_rho``).
        normalizers: optional ``(K,)`` positive scales, one per annotator, computed by the caller over the *global*
            batch (the root mean square of that annotator's logits, say); each annotator's logits are divided by
            its scale first. The authors divide by the L2 norm over a micro-batch, which makes ``u`` depend on the
            batch size; dividing by the RMS is the same up to a factor sqrt(batch size) and does not.

    With K >= 2: ``u = (1 - mean_k sigmoid(rho l_k)) * min(std_k(rho l_k), 1)`` (unbiased std over
    annotators). With K == 1 there is no spread to measure and ``u = sigmoid(-rho l)``. The result is
    detached: the metric never carries gradient.
    """
    logits = annotator_logits.detach().float()
    if normalizers is not None:
        logits = logits / normalizers.detach().float().clamp_min(1e-12).unsqueeze(1)
    scaled = rho * logits
    if scaled.shape[0] == 1:
        return torch.sigmoid(-scaled[0])
    confidence = 1.0 - torch.sigmoid(scaled).mean(dim=0)
    stability = scaled.std(dim=0, unbiased=True).clamp(max=1.0)
    return confidence * stability


def _weight_none(u, k, c):
    return torch.ones_like(u)


def _weight_linear(u, k, c):
    return 1.0 / (k * u + c)


def _weight_quadratic(u, k, c):
    return 1.0 / (k * u.pow(2) + c)


def _weight_sqrt(u, k, c):
    return 1.0 / (torch.exp(k * u.clamp_min(0).sqrt()) + c)


def _weight_sigmoid(u, k, c):
    return 1.0 / (torch.exp(k * u) + c)


#: Weight functions ``W(u)`` accepted by ``AdaptiveDPOConfig.weight_fn``; k = ``weight_scale``,
#: c = ``weight_intercept``.
WEIGHT_FUNCTIONS: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "none": _weight_none,
    "linear": _weight_linear,
    "quadratic": _weight_quadratic,
    "sqrt": _weight_sqrt,
    "sigmoid": _weight_sigmoid,
}


def minority_weights(u: torch.Tensor, weight_fn: str, scale: float, intercept: float) -> torch.Tensor:
    """Per-pair loss weights ``W(u)`` (detached)."""
    return WEIGHT_FUNCTIONS[weight_fn](u.detach(), scale, intercept)


#: Margin shapes accepted by ``AdaptiveDPOConfig.margin``: the power of ``u`` in ``gamma = c2 - k2 u^p``.
MARGIN_POWERS: dict[str, int | None] = {"none": None, "linear": 1, "quadratic": 2}


def adaptive_margin(u: torch.Tensor, margin: str, mean_logit: torch.Tensor | float, scale: float) -> torch.Tensor:
    """The adaptive margin ``gamma = c2 - k2 * u^p`` subtracted from ``beta * l`` (detached).

    ``mean_logit`` is c2, the detached mean Diffusion-DPO logit of the global batch; ``scale`` is k2.
    ``margin="none"`` gives zeros.
    """
    power = MARGIN_POWERS[margin]
    if power is None:
        return torch.zeros_like(u)
    mean_logit = torch.as_tensor(mean_logit, dtype=u.dtype, device=u.device).detach()
    return (mean_logit - scale * u.detach().pow(power)).detach()


def preference_loss(
    logits: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    weights: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    misranked_weight: float | None = None,
    max_margin: float | None = None,
) -> torch.Tensor:
    """Per-pair loss ``W * loss_type(min(beta * l - gamma, max_margin))``; plain Diffusion-DPO when weights and
    margins are None. ``max_margin`` caps the margin a pair is pushed to: beyond it the pair gets no gradient.

    Returns the unreduced ``(B,)`` losses: the caller takes the mean *outside* the loss (a known bug of some
    implementations is ``logsigmoid(mean(...))``).
    """
    z = beta * logits
    if margins is not None:
        z = z - margins
    if max_margin is not None:
        z = z.clamp(max=max_margin)
    if misranked_weight is None:
        misranked_weight = DEFAULT_MISRANKED_WEIGHT
    losses = PREFERENCE_LOSSES[loss_type](z, beta, label_smoothing, misranked_weight)
    if weights is not None:
        losses = weights * losses
    return losses
