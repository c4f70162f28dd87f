"""Adaptive-DPO (Zhang, Liu et al. 2025): the self-driven minority metric u, its weights W(u) and margins gamma(u).

Exact mode (``annotator_interval=1``): every step, the current model and its EMA copies (the annotators) score each
pair, u = std of their scaled logits + mean (docs/method.md). Amortised mode (``annotator_interval=N``): the
annotators run every N steps; the steps between take each pair's mean u over its earlier scored visits (its
`PairHistory`). The math is in `trl_adaptive.losses`; this class holds the state and the global-batch statistics.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, require
from ..distributed import make_annotators
from ..history import PairHistory
from ..losses import (
    MARGIN_POWERS,
    WEIGHT_FUNCTIONS,
    adaptive_margin,
    minority_score,
    minority_weights,
)
from .base import PairStep, PairTreatment, RobustnessMethod

METRIC_NORMALIZATIONS = ("none", "rms")
#: Smallest RMS a metric normaliser may take: above float32 rounding of denoising errors (~1e-7), below the logits
#: of a model that has started to move (~1e-5 and up).
RMS_NORMALIZER_FLOOR = 1e-6


class AdaptiveDPO(RobustnessMethod):
    """Config: ``adaptive``, ``annotator_decays``, ``annotator_interval``, ``metric_rho``, ``metric_normalize``,
    ``metric_warmup_steps``, ``weight_fn``, ``weight_scale``, ``weight_intercept``, ``margin``, ``margin_scale``."""

    name = "adaptive"

    @classmethod
    def enabled(cls, args) -> bool:
        return args.adaptive

    @classmethod
    def validate(cls, args) -> None:
        for name, allowed in (("weight_fn", WEIGHT_FUNCTIONS), ("margin", MARGIN_POWERS),
                              ("metric_normalize", METRIC_NORMALIZATIONS)):
            check_choice(args, name, allowed)
        args.annotator_decays = [float(d) for d in (args.annotator_decays or [])]
        for decay in args.annotator_decays:
            if not 0.0 <= decay < 1.0:
                raise ValueError(f"AdaptiveDPOConfig.annotator_decays entries must be in [0, 1), got {decay}")
        require(args, "annotator_interval", args.annotator_interval >= 1, ">= 1")
        require(args, "metric_rho", args.metric_rho > 0, "> 0")
        require(args, "metric_warmup_steps", args.metric_warmup_steps >= 0, ">= 0")
        if args.weight_intercept <= 0 and args.weight_fn in ("linear", "quadratic"):
            raise ValueError("AdaptiveDPOConfig.weight_intercept must be > 0 for weight_fn 'linear'/'quadratic'")
        require(args, "weight_scale", args.weight_scale >= 0, ">= 0")

    def __init__(self, args, num_rows, batch, forwards=None, history_decay: float = 0.0):
        super().__init__(args, num_rows, batch, forwards)
        self.annotators = None  # created in setup, once the ZeRO stage is known
        # Each pair's mean u over its scored visits: the amortised steps' scores (and the minority filter's `score`
        # evidence, which then sets `history_decay`).
        self.history = PairHistory(num_rows, decay=history_decay, growable=num_rows == 0) if num_rows is not None else None

    def setup(self, denoiser, accelerator) -> None:
        if self.history is not None:
            self.history.to(accelerator.device)  # recorded and read on the device: no step waits for it
        if len(self.args.annotator_decays) > 0:
            self.annotators = make_annotators(denoiser, self.args.annotator_decays, accelerator).to(accelerator.device)
            self.forwards.register_annotators(self.annotators)

    def active(self, global_step: int) -> bool:
        return global_step >= self.args.metric_warmup_steps

    def wants_annotators(self, global_step: int, training: bool) -> bool:
        """Always in evaluation; every `annotator_interval` steps in training (after the metric's warm-up)."""
        if self.annotators is None or not self.active(global_step):
            return False
        return not training or global_step % self.args.annotator_interval == 0

    def scores(self, annotator_logits: torch.Tensor, rows: torch.Tensor, training: bool,
               global_step: int) -> torch.Tensor:
        """The metric u per pair: exact from the annotators' logits (K, B), or (amortised steps, K = 1) the pairs'
        means from the history. Training scores are recorded in the history."""
        args = self.args
        if annotator_logits.shape[0] == 1 and self.annotators is not None:  # amortised step between refreshes
            return self.history.mean(rows).to(annotator_logits.device)
        if self.annotators is not None and global_step == 0:
            # Before the first optimizer step the EMA annotators are copies of the policy: every pair's spread across
            # annotators is 0, so u is 0 exactly. Set, not computed: the policy's logits come from another forward
            # than the annotators' (with gradient, another batch size) and are rounding error here (~1e-7), which the
            # RMS normalisation scales up to an arbitrary score (0.14 and weights 0.42 on the tiny pipeline).
            u = torch.zeros_like(annotator_logits[0], dtype=torch.float32)
        else:
            normalizers = None
            if args.metric_normalize == "rms":
                # Floored, for logits at rounding level (~1e-8) whose RMS would blow that noise up to an O(1) score.
                normalizers = self.batch.mean(annotator_logits.pow(2)).sqrt().clamp_min(RMS_NORMALIZER_FLOOR)
            u = minority_score(annotator_logits, args.metric_rho, normalizers)
        if training and self.history is not None:
            self.history.record(self.batch.gather(rows), self.batch.gather(u))
        return u

    def treat(self, step: PairStep, metrics) -> PairTreatment | None:
        if not self.active(step.global_step):
            return None
        args = self.args
        u = self.scores(torch.stack([x.detach() for x in step.outputs["logits"]]), step.rows, step.training,
                        step.global_step)
        weights = minority_weights(u, args.weight_fn, args.weight_scale, args.weight_intercept)
        mean_logit = self.batch.mean(step.logits) if args.margin != "none" else 0.0
        margins = adaptive_margin(u, args.margin, mean_logit, args.effective_margin_scale)
        step.outputs["minority_score"] = u.detach()
        self._report(step, u, weights, margins, metrics)
        return PairTreatment(weights, margins)

    def _report(self, step: PairStep, u, weights, margins, metrics) -> None:
        mode = step.mode
        gathered = metrics.add_pair_means(
            mode, {"minority/score_mean": u, "minority/weight_mean": weights, "minority/margin_mean": margins}
        )
        metrics.keep_for_histograms(mode, "minority/score", gathered["minority/score_mean"])
        metrics.keep_for_histograms(mode, "minority/weight", gathered["minority/weight_mean"])
        metrics.add(mode, "minority/weight_min", gathered["minority/weight_mean"].min())
        # Synthetic-minority runs: how well u separates flipped pairs (minority/score_flipped, minority/score_clean).
        metrics.add_group_means(mode, gathered["minority/score_mean"], step.inputs,
                                "minority/score_flipped", "minority/score_clean")

    def on_optimizer_step(self, model) -> None:
        if self.annotators is not None:
            self.forwards.bound_annotators().update(model)

    # The annotators are training state like the optimizer's moments: saved and restored beside them.
    def save(self, folder: str, write: bool) -> None:
        if self.annotators is not None:
            self.forwards.bound_annotators().save(folder, write=write)  # sharded annotators gather (collective)
        if write and self.history is not None:
            self.history.save(folder)

    def load(self, folder: str) -> None:
        if self.annotators is not None:
            self.forwards.bound_annotators().load(folder)
        if self.history is not None:
            self.history.load(folder)
