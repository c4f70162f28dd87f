"""The minority filter (this library's method, docs/minority_filter.md): weight 0 for the pairs whose evidence,
averaged over their visits, says they carry minority labels.

Each training visit of a pair adds evidence to its record (`PairHistory`): the policy's own ranking (``logit``,
``wrong_sign``), Adaptive-DPO's u (``score``, the adaptive method's record) or the reference's prompt-fidelity
votes (``prompt_contrast``), from the training draw plus ``minority_evidence_draws`` extra noise draws at noisy
timesteps. After ``minority_filter_warmup_steps`` the rule (`filtering.minority_keep_mask`) drops pairs. The
evidence functions and rules are pure functions in `trl_adaptive.filtering`.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch

from .. import _checks
from ..filtering import (
    MINORITY_EVIDENCE,
    MINORITY_FILTERS,
    logit_evidence,
    minority_keep_mask,
    wrong_sign_evidence,
)
from ..history import PairHistory
from .base import GlobalBatch, PairStep, PairTreatment, RobustnessMethod

EVIDENCE_FILE = "pair_logit_evidence.safetensors"
#: Median |beta * l| below which the minority filter warns: under 4, -log sigmoid is still far from a hinge
#: (sigmoid(-4) = 0.018 of the largest gradient), the logistic regime in which the filter was measured to harm.
FILTER_HINGE_REGIME_MIN = 4.0
#: Below this share of `prompt_contrast` votes agreeing with the labels the filter warns that the reference's
#: judgement is close to chance for this data (on the digits benchmark: 0.71-0.73 clean, 0.59 at 30% flips).
PROMPT_CONTRAST_MIN_AGREEMENT = 0.55


def report_kept_pairs(keep: torch.Tensor, step: PairStep, batch: GlobalBatch, metrics) -> torch.Tensor:
    """Log what a filter kept and dropped (``minority/kept_fraction``; on benchmark data with a ``flipped`` column,
    ``minority/flipped_dropped`` and ``minority/clean_dropped``); returns the keep weights of the global batch."""
    keep = batch.gather(keep)
    metrics.add("train", "minority/kept_fraction", keep.mean())
    metrics.keep_for_histograms("train", "minority/keep", keep)
    metrics.add_group_means("train", 1 - keep, step.inputs, "minority/flipped_dropped", "minority/clean_dropped")
    return keep


class MinorityFilter(RobustnessMethod):
    """Config: ``minority_filter``, ``minority_evidence``, ``minority_evidence_draws``, ``minority_evidence_min_noise``,
    ``minority_evidence_decay``, ``minority_filter_fraction``, ``minority_filter_threshold``,
    ``minority_filter_max_fraction``, ``minority_filter_min_separation``, ``minority_filter_warmup_steps``,
    ``minority_filter_min_visits``.

    Args (beyond the base class's): scores_history: with ``minority_evidence="score"``, Adaptive-DPO's record of u
        (`AdaptiveDPO.history`), which is then this filter's evidence (and saved by that method).
    """

    name = "minority_filter"

    @classmethod
    def enabled(cls, args) -> bool:
        return args.minority_filter != "none"

    @classmethod
    def validate(cls, args) -> None:
        require = partial(_checks.require, args)
        _checks.check_choice(args, "minority_filter", MINORITY_FILTERS)
        _checks.check_choice(args, "minority_evidence", MINORITY_EVIDENCE)
        if cls.enabled(args) and args.minority_evidence == "score" and not args.adaptive:
            raise ValueError("AdaptiveDPOConfig.minority_evidence='score' needs adaptive=True (u comes from the annotators)")
        if cls.enabled(args) and args.minority_evidence == "prompt_contrast" and args.per_device_train_batch_size < 2:
            raise ValueError(
                "AdaptiveDPOConfig.minority_evidence='prompt_contrast' needs per_device_train_batch_size >= 2, got "
                f"{args.per_device_train_batch_size}: each pair's contrast prompt is another pair's in the same batch"
            )
        require("minority_evidence_decay", 0.0 <= args.minority_evidence_decay < 1.0, "in [0, 1) (0: plain mean)")
        require("minority_evidence_min_noise", 0.0 <= args.minority_evidence_min_noise < 1.0, "in [0, 1) (0: every timestep)")
        require("minority_filter_fraction", 0.0 <= args.minority_filter_fraction < 1.0, "in [0, 1)")
        require("minority_filter_max_fraction", 0.0 < args.minority_filter_max_fraction <= 1.0, "in (0, 1]")
        require("minority_filter_min_separation", args.minority_filter_min_separation >= 0, ">= 0")
        for name in ("minority_filter_warmup_steps", "minority_filter_min_visits", "minority_evidence_draws"):
            require(name, getattr(args, name) >= 0, ">= 0")

    def __init__(self, args, num_rows, batch, forwards=None, scores_history: PairHistory | None = None):
        super().__init__(args, num_rows, batch, forwards)
        self.owns_history = args.minority_evidence != "score"
        if not self.owns_history:
            self.history = scores_history
        else:
            self.history = PairHistory(num_rows, filename=EVIDENCE_FILE, decay=args.minority_evidence_decay,
                                       growable=num_rows == 0) if num_rows is not None else None
        self._regime_checked = False
        # On the device until a log reads them (`on_log`): whether the filter has dropped a pair, and the evidence's
        # regime (median |beta l|, or the reference's agreement with the labels) at the first step that did.
        self._dropped: torch.Tensor | None = None
        self._regime_at_first_drop: torch.Tensor | None = None

    def setup(self, denoiser, accelerator) -> None:
        if self.history is not None:
            self.history.to(accelerator.device)  # recorded and read on the device: no step waits for it

    def treat(self, step: PairStep, metrics) -> PairTreatment | None:
        if not step.training or self.history is None:
            return None
        self.record_evidence(step, metrics)
        keep = self.keep_mask(step)
        if keep is None:
            return None
        self.watch_regime(report_kept_pairs(keep, step, self.batch, metrics), step.logits)
        return PairTreatment(weights=keep)

    # ---- evidence ------------------------------------------------------------------------------------------
    def record_evidence(self, step: PairStep, metrics) -> None:
        """Add this visit's evidence to the history (`score` is recorded by Adaptive-DPO into the same history)."""
        if self.args.minority_evidence == "score":
            return
        draws, valid = self.visit_evidence(step)
        evidence, valid = self.batch.gather(torch.cat(draws)), self.batch.gather(torch.cat(valid)).bool()
        # One visit: all its draws in one record (one decay step, one visit counted).
        self.history.record(self.batch.gather(step.rows.repeat(len(draws))), evidence, valid)
        counted = valid.sum()
        metrics.add("train", "minority/evidence_mean", torch.where(valid, evidence, 0.0).sum() / counted.clamp_min(1),
                    present=counted > 0)

    def visit_evidence(self, step: PairStep) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This visit's evidence per draw (the training draw, then `minority_evidence_draws` extra ones) and which
        entries count. Only noisy timesteps vote (`minority_evidence_min_noise`): the extra draws sample there, the
        training draw's uniform timestep counts when it falls there."""
        args, forwards, out = self.args, self.forwards, step.outputs
        min_noise = args.minority_evidence_min_noise
        contrast = args.minority_evidence == "prompt_contrast"
        noisy_enough = forwards.family.noise_level(out["timesteps"]) >= min_noise
        if contrast:  # the contrast prompts are encoded once per visit and shared by its draws
            contrast_conditioning = forwards.contrast_conditioning(step.inputs)
            votes, differs = forwards.prompt_contrast_votes(
                step.policy, step.inputs, out["noised"], out["reference_errors"], contrast_conditioning
            )
            evidence, valid = [votes], [noisy_enough & differs]
        else:
            evidence, valid = [step.logits.detach()], [noisy_enough]
        with torch.no_grad():
            for d in range(1, args.minority_evidence_draws + 1):  # extra noise/timestep draws: a less noisy vote
                if contrast:  # the reference alone: no policy forward
                    noised = forwards.noised_pairs(step.policy, step.inputs, step.global_step, draw=d, min_noise=min_noise)
                    votes, differs = forwards.prompt_contrast_votes(
                        step.policy, step.inputs, noised, contrast_conditioning=contrast_conditioning
                    )
                    evidence.append(votes)
                    valid.append(differs)
                else:
                    # With the step's annotators, as the training draw: batched LoRA forwards round alike.
                    extra = forwards.pair_forward(step.policy, step.inputs, step.global_step, step.with_annotators,
                                                  draw=d, min_noise=min_noise)
                    evidence.append(extra["logits"][0])
                    valid.append(torch.ones_like(valid[0]))
        if args.minority_evidence == "logit":
            evidence = [logit_evidence(draw, self.batch.mean(draw.pow(2)).sqrt()) for draw in evidence]
        elif args.minority_evidence == "wrong_sign":
            evidence = [wrong_sign_evidence(draw) for draw in evidence]
        return evidence, valid

    # ---- the rule ------------------------------------------------------------------------------------------
    def keep_mask(self, step: PairStep) -> torch.Tensor | None:
        """1 for pairs kept, 0 for pairs judged minority (None during the warm-up)."""
        args, history = self.args, self.history
        if step.global_step < args.minority_filter_warmup_steps:
            return None
        keep = minority_keep_mask(
            history.mean(step.rows),
            history.visit_counts(step.rows),
            history.means_or_nan(args.minority_filter_min_visits).float(),
            args.minority_filter,
            fraction=args.minority_filter_fraction,
            threshold=args.minority_filter_threshold,
            min_visits=args.minority_filter_min_visits,
            max_fraction=args.minority_filter_max_fraction,
            min_separation=args.minority_filter_min_separation,
        )
        return keep.to(step.logits.device)

    def watch_regime(self, global_keep: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep, on the device, the evidence's regime at the first step that drops a pair (`on_log` warns about it):
        with the policy's own evidence the median |beta * l| of the global batch, with the reference's
        `prompt_contrast` votes their agreement with the labels. Gathered values, so every process agrees."""
        if self._regime_checked:
            return
        if self.args.minority_evidence == "prompt_contrast":
            history = self.history
            regime = 1.0 - history.total.sum() / history.weight.sum().clamp_min(1e-12)
        else:
            regime = (self.args.beta * self.batch.gather(logits)).abs().median().double()
        if self._dropped is None:
            self._dropped = torch.zeros((), dtype=torch.bool, device=global_keep.device)
            self._regime_at_first_drop = torch.zeros((), dtype=torch.float64, device=global_keep.device)
        first = (global_keep < 1).any() & ~self._dropped
        self._regime_at_first_drop = torch.where(first, regime.to(self._regime_at_first_drop), self._regime_at_first_drop)
        self._dropped = self._dropped | first

    def on_log(self) -> None:
        """Warn once, after the filter first dropped a pair, if its evidence is unlikely to help: with the policy's own
        evidence, if the loss is in the logistic regime, where that filter was measured to harm; with the reference's
        `prompt_contrast` votes, if they barely agree with the labels (docs/minority_filter.md, "Limits"). Read here,
        once per log, not in the step (a read would make every step wait for the device)."""
        if self._regime_checked or self._dropped is None:
            return
        dropped, regime = torch.stack([self._dropped.double(), self._regime_at_first_drop]).tolist()
        if not dropped:
            return
        self._regime_checked = True
        if self.args.minority_evidence == "prompt_contrast":  # the reference's votes work in either regime
            if regime < PROMPT_CONTRAST_MIN_AGREEMENT:
                warnings.warn(
                    f"minority_evidence='prompt_contrast' starts dropping pairs while the reference agrees with the "
                    f"labels on only {regime:.0%} of its votes (below {PROMPT_CONTRAST_MIN_AGREEMENT:.0%}): its "
                    "judgement of prompt fidelity says little about this preference, and the filter would drop pairs "
                    "nearly at random. On the digits benchmark it agreed on 71-73% of the votes with clean labels and "
                    "59% at 30% flips (docs/minority_filter.md).",
                    UserWarning,
                    stacklevel=2,
                )
            return
        if regime < FILTER_HINGE_REGIME_MIN:
            warnings.warn(
                f"minority_filter={self.args.minority_filter!r} starts dropping pairs while the median |beta * l| is "
                f"{regime:.2f} (below {FILTER_HINGE_REGIME_MIN:g}: the logistic regime). The filter helped on the digits "
                "benchmark only with |beta * l| in the tens (a hinge-like loss); with |beta * l| near 1 it did not help "
                "and broke some runs. Consider adaptive=True without the filter (docs/minority_filter.md, 'Limits').",
                UserWarning,
                stacklevel=2,
            )

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, folder: str, write: bool) -> None:
        if write and self.owns_history and self.history is not None:
            self.history.save(folder)

    def load(self, folder: str) -> None:
        if self.owns_history and self.history is not None:
            self.history.load(folder)
