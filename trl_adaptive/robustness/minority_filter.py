"""The minority filter (this library's method, docs/minority_filter.md): weight 0 for the pairs whose evidence,
averaged over their visits, says they carry minority labels.

Each training visit of a pair adds evidence to its record (`PairHistory`): the policy's own ranking (``logit``,
``wrong_sign``), Adaptive-DPO's u (``score``, the adaptive method's record), the reference's prompt-fidelity
votes (``prompt_contrast``), from the training draw plus ``minority_evidence_draws`` extra noise draws at noisy
timesteps, or the vote of a judge the user brings (``judge``: a reward model's scores in the data, one fixed vote per
pair). After ``minority_filter_warmup_steps`` the rule (`filtering.minority_keep_mask`) drops pairs. The
evidence functions and rules are pure functions in `trl_adaptive.filtering`.
"""

from __future__ import annotations

import json
import os
import warnings
from functools import partial

import torch

from .. import _checks
from ..data import JUDGE_SCORES_COLUMN
from ..filtering import (
    MINORITY_EVIDENCE,
    MINORITY_FILTERS,
    judge_evidence,
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
JUDGE_CHECK_FILE = "minority_judge_check.json"
#: The evidence kinds that come from a judge other than the policy, checked against the labels (`JudgeCheck`).
JUDGED_EVIDENCE = ("prompt_contrast", "judge")


def report_kept_pairs(keep: torch.Tensor, step: PairStep, batch: GlobalBatch, metrics) -> torch.Tensor:
    """Log what a filter kept and dropped (``minority/kept_fraction``; on benchmark data with a ``flipped`` column,
    ``minority/flipped_dropped`` and ``minority/clean_dropped``); returns the keep weights of the global batch."""
    keep = batch.gather(keep)
    metrics.add("train", "minority/kept_fraction", keep.mean())
    metrics.keep_for_histograms("train", "minority/keep", keep)
    metrics.add_group_means("train", 1 - keep, step.inputs, "minority/flipped_dropped", "minority/clean_dropped")
    return keep


class JudgeCheck:
    """Whether a judge's votes (the reference's `prompt_contrast` votes, or the `judge` scores of the data) agree with
    the labels well enough for the filter to act on them (config ``minority_filter_min_agreement``,
    ``minority_filter_agreement_votes``).

    The votes of the global batch are counted until ``min_votes`` have been cast; at that step the share that agrees
    with the labels is compared with ``min_agreement``, once for the whole run: at or above it the filter may drop
    pairs from then on, below it the filter never drops (the run is plain Diffusion-DPO). Until the decision nothing
    is dropped. A judge that does not know the users' preference (the digits benchmark's style rater) would
    otherwise drop clean and flipped pairs alike and train its own preference instead.

    The state is five numbers on the training device (votes, agreeing votes, decided, passed, step of the decision),
    updated with fixed-shape operations: the step never waits for it. `report` reads it once, at the log that shows
    the decision (``minority/judge_passed``).
    """

    def __init__(self, min_agreement: float, min_votes: int):
        self.min_agreement, self.min_votes = min_agreement, min_votes
        self.state = torch.zeros(5, dtype=torch.float64)
        self.reported = False

    def to(self, device) -> None:
        self.state = self.state.to(device)

    def count(self, votes: torch.Tensor, valid: torch.Tensor, global_step: int) -> None:
        """Add one step's gathered votes (1: the reference prefers the labelled loser) and decide once enough
        have been cast."""
        votes, valid = votes.to(self.state), valid.to(self.state.device)
        counted, decided, passed, step = self.state[0], self.state[2] > 0, self.state[3], self.state[4]
        open_ = ~decided
        counted = counted + torch.where(open_, valid.double().sum(), 0.0)
        agreeing = self.state[1] + torch.where(open_, torch.where(valid, 1.0 - votes, 0.0).sum(), 0.0)
        reached = open_ & (counted >= self.min_votes)
        agreement = agreeing / counted.clamp_min(1.0)
        passed = torch.where(reached, (agreement >= self.min_agreement).double(), passed)
        step = torch.where(reached, float(global_step), step)
        self.state = torch.stack([counted, agreeing, (decided | reached).double(), passed, step])

    def decided(self) -> torch.Tensor:
        """True (a 0-dim device tensor) once enough votes have been counted for the decision."""
        return self.state[2] > 0

    def allows(self) -> torch.Tensor:
        """True (a 0-dim device tensor) once the check has passed; False before the decision and after a failed one."""
        return self.decided() & (self.state[3] > 0)

    def failed(self) -> bool:
        """Whether the check has decided against the judge (a host read: for loading, not for the step)."""
        return bool(self.decided()) and not bool(self.allows())

    def agreement(self) -> torch.Tensor:
        """Share of the counted votes that agree with the labels (so far, or at the decision)."""
        return self.state[1] / self.state[0].clamp_min(1.0)

    def summary(self) -> dict:
        """The state as host values (one read): votes counted, agreeing votes, their share, the decision and its step."""
        votes, agreeing, decided, passed, step = self.state.tolist()
        return {"votes": int(votes), "agreeing": int(agreeing), "agreement": agreeing / max(votes, 1.0),
                "decided": bool(decided), "passed": bool(passed), "step": int(step)}

    def report(self, logs: dict[str, float]) -> dict | None:
        """The `summary`, once: at the first log whose metrics show the decision was made (one read in a run)."""
        if self.reported or "minority/judge_passed" not in logs:
            return None
        self.reported = True
        return self.summary()

    def save(self, folder: str) -> None:
        record = dict(self.summary(), min_agreement=self.min_agreement, min_votes=self.min_votes)
        with open(os.path.join(folder, JUDGE_CHECK_FILE), "w") as f:
            json.dump(record, f, indent=2)

    def load(self, folder: str) -> None:
        path = os.path.join(folder, JUDGE_CHECK_FILE)
        if not os.path.isfile(path):  # a checkpoint written before the check existed: count from here
            warnings.warn(f"{path} is missing (a checkpoint from before the judge check?): the minority filter's judge "
                          "check starts counting the reference's votes again from this step", UserWarning, stacklevel=2)
            return
        with open(path) as f:
            saved = json.load(f)
        values = [saved["votes"], saved["agreeing"], float(saved["decided"]), float(saved["passed"]), float(saved["step"])]
        self.state = torch.tensor(values, dtype=torch.float64, device=self.state.device)
        # A decision made before the checkpoint is not reported by a later log: the loader tells the user instead.
        self.reported = bool(saved["decided"])


class MinorityFilter(RobustnessMethod):
    """Config: ``minority_filter``, ``minority_evidence``, ``minority_evidence_draws``, ``minority_evidence_min_noise``,
    ``minority_evidence_decay``, ``minority_filter_fraction``, ``minority_filter_threshold``,
    ``minority_filter_max_fraction``, ``minority_filter_min_separation``, ``minority_filter_warmup_steps``,
    ``minority_filter_min_visits``, ``minority_filter_min_agreement``, ``minority_filter_agreement_votes``.

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
        require("minority_filter_min_agreement", 0.0 <= args.minority_filter_min_agreement < 1.0,
                "in [0, 1) (0: no judge check)")
        require("minority_filter_agreement_votes", args.minority_filter_agreement_votes >= 1, ">= 1")

    @classmethod
    def check_columns(cls, args, columns: list[str]) -> None:
        if args.minority_evidence == "judge" and JUDGE_SCORES_COLUMN not in columns:
            raise ValueError(
                f"AdaptiveDPOConfig.minority_evidence='judge' reads the judge's scores from a {JUDGE_SCORES_COLUMN!r} "
                f"column, which the training data lacks (its columns: {sorted(columns)}). Add it with "
                "trl_adaptive.data.add_judge_scores(dataset, scorer), e.g. with load_scorer('pickscore')."
            )

    def __init__(self, args, num_rows, batch, forwards=None, scores_history: PairHistory | None = None):
        super().__init__(args, num_rows, batch, forwards)
        self.owns_history = args.minority_evidence != "score"
        if not self.owns_history:
            self.history = scores_history
        else:
            self.history = PairHistory(num_rows, filename=EVIDENCE_FILE, decay=args.minority_evidence_decay,
                                       growable=num_rows == 0) if num_rows is not None else None
        # The reference judges a preference it may not know: its agreement with the labels is checked first.
        self.judge = None
        if args.minority_evidence in JUDGED_EVIDENCE and args.minority_filter_min_agreement > 0:
            self.judge = JudgeCheck(args.minority_filter_min_agreement, args.minority_filter_agreement_votes)
        # Set at the log that reports a failed check: from then on the filter casts no votes (its extra forwards
        # are saved) and drops nothing. Until that log the device-side check already keeps every pair.
        self.switched_off = False
        # With the policy's own evidence the loss's regime is watched instead (`watch_regime`); a judge's votes do not
        # depend on it.
        self._regime_checked = args.minority_evidence in JUDGED_EVIDENCE
        # On the device until a log reads them (`on_log`): whether the filter has dropped a pair, and the median
        # |beta l| at the first step that did.
        self._dropped: torch.Tensor | None = None
        self._regime_at_first_drop: torch.Tensor | None = None

    def setup(self, denoiser, accelerator) -> None:
        if self.history is not None:
            self.history.to(accelerator.device)  # recorded and read on the device: no step waits for it
        if self.judge is not None:
            self.judge.to(accelerator.device)

    def treat(self, step: PairStep, metrics) -> PairTreatment | None:
        if not step.training or self.history is None or self.switched_off:
            return None
        self.record_evidence(step, metrics)
        keep = self.keep_mask(step)
        if keep is None:
            return None
        if self.judge is not None:  # nothing dropped before the check, nor after a failed one
            keep = torch.where(self.judge.allows(), keep, torch.ones_like(keep))
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
        if self.judge is not None:  # votes: 1 where the judge prefers the labelled loser (evidence above one half)
            self.judge.count((evidence > 0.5).float(), valid, step.global_step)
            metrics.add("train", "minority/judge_agreement", self.judge.agreement())
            # Logged once decided (1: the filter may drop, 0: it is off), so the log can see the decision without a read.
            metrics.add("train", "minority/judge_passed", self.judge.allows().double(), present=self.judge.decided())
        counted = valid.sum()
        metrics.add("train", "minority/evidence_mean", torch.where(valid, evidence, 0.0).sum() / counted.clamp_min(1),
                    present=counted > 0)

    def visit_evidence(self, step: PairStep) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This visit's evidence per draw (the training draw, then `minority_evidence_draws` extra ones) and which
        entries count. Only noisy timesteps vote (`minority_evidence_min_noise`): the extra draws sample there, the
        training draw's uniform timestep counts when it falls there."""
        args, forwards, out = self.args, self.forwards, step.outputs
        if args.minority_evidence == "judge":  # fixed scores: one vote per visit, no forward
            if "judge_margin" not in step.inputs:
                raise ValueError(
                    "AdaptiveDPOConfig.minority_evidence='judge' needs a 'judge_scores' column in the training data "
                    "(trl_adaptive.data.add_judge_scores): this batch has none"
                )
            margins = step.inputs["judge_margin"].to(step.logits.device).float()
            valid = torch.isfinite(margins) & (margins != 0)  # the judge abstains on NaN, and a tie says nothing
            margins = torch.where(valid, margins, 0.0)
            # The mean square over the valid margins of the global batch, from one reduction of both sums.
            square_sum, valid_share = self.batch.mean(torch.stack([margins.pow(2), valid.float()]))
            mean_square = square_sum / valid_share.clamp_min(1e-12)
            return [torch.where(valid, judge_evidence(margins, mean_square.sqrt()), 0.0)], [valid]
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
        """With the policy's own evidence, keep on the device the median |beta * l| of the global batch at the first
        step that drops a pair (`on_log` warns about it). A gathered value, so every process agrees."""
        if self._regime_checked:
            return
        regime = (self.args.beta * self.batch.gather(logits)).abs().median().double()
        if self._dropped is None:
            self._dropped = torch.zeros((), dtype=torch.bool, device=global_keep.device)
            self._regime_at_first_drop = torch.zeros((), dtype=torch.float64, device=global_keep.device)
        first = (global_keep < 1).any() & ~self._dropped
        self._regime_at_first_drop = torch.where(first, regime.to(self._regime_at_first_drop), self._regime_at_first_drop)
        self._dropped = self._dropped | first

    def on_log(self, logs: dict[str, float]) -> None:
        """Report the judge check's decision once it is made (a warning if the filter turned itself off), and warn
        once, after the policy-evidence filter first dropped a pair, if the loss is in the logistic regime, where that
        filter was measured to harm (docs/minority_filter.md, "Limits"). Read here, once per log, not in the step (a
        read would make every step wait for the device)."""
        decision = self.judge.report(logs) if self.judge is not None else None
        if decision is not None and not decision["passed"]:
            self._switch_off(decision)
        if self._regime_checked or self._dropped is None:
            return
        dropped, regime = torch.stack([self._dropped.double(), self._regime_at_first_drop]).tolist()
        if not dropped:
            return
        self._regime_checked = True
        if regime < FILTER_HINGE_REGIME_MIN:
            warnings.warn(
                f"minority_filter={self.args.minority_filter!r} starts dropping pairs while the median |beta * l| is "
                f"{regime:.2f} (below {FILTER_HINGE_REGIME_MIN:g}: the logistic regime). The filter helped on the digits "
                "benchmark only with |beta * l| in the tens (a hinge-like loss); with |beta * l| near 1 it did not help "
                "and broke some runs. Consider adaptive=True without the filter (docs/minority_filter.md, 'Limits').",
                UserWarning,
                stacklevel=2,
            )

    def _switch_off(self, decision: dict, resumed: bool = False) -> None:
        """The judge check failed: no more votes, nothing dropped, and the user is told (again in a resumed run, whose
        log would not show the decision a second time)."""
        self.switched_off = True
        judge = "the reference" if self.args.minority_evidence == "prompt_contrast" else "the judge's scores"
        measured = (
            "On the digits benchmark it agreed on 71-75% with clean prompt-fidelity labels (57-61% at 30% flips) and on "
            "47-57% with a style rater's labels" if self.args.minority_evidence == "prompt_contrast" else
            "On the digits benchmark a judge fitted to other pairs of the same raters agreed on 86-92% with clean "
            "style labels (63-68% at 30% flips)"
        )
        warnings.warn(
            f"minority_evidence={self.args.minority_evidence!r}: {judge} agreed with the labels on "
            f"{decision['agreement']:.1%} of the first {decision['votes']} votes (below minority_filter_min_agreement="
            f"{self.judge.min_agreement:g}), so it cannot judge this preference and the minority "
            f"filter is off from step {decision['step']} on"
            + (" (decided before the checkpoint this run resumed from)" if resumed else "")
            + f": the run continues as plain Diffusion-DPO. {measured} (docs/minority_filter.md, 'The judge check').",
            UserWarning,
            stacklevel=3,
        )

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, folder: str, write: bool) -> None:
        if write and self.owns_history and self.history is not None:
            self.history.save(folder)
        if write and self.judge is not None:
            self.judge.save(folder)

    def load(self, folder: str) -> None:
        if self.owns_history and self.history is not None:
            self.history.load(folder)
        if self.judge is not None:
            self.judge.load(folder)
            decision = self.judge.summary()  # read at load: a resumed run skips the votes as the original did
            if decision["decided"] and not decision["passed"]:
                self._switch_off(decision, resumed=True)
