"""The methods grid: each method's AdaptiveDPOConfig overrides, labels, the diagnostic methods and their drop
shares, the (flip rate, method) runs of a grid, and the config of one run (`method_config`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import BenchmarkSettings


#: Diagnostic methods (not in the default grid): Diffusion-DPO whose pairs are dropped by their true labels.
DIAGNOSTIC_METHODS = ("oracle_late", "matched_random", "judge_random", "chosen_flipped", "chosen_clean", "chosen_both")
#: The diagnostics that choose dropped pairs by the minority filter's evidence: the groups in which they choose.
EVIDENCE_CHOSEN_GROUPS = {"chosen_flipped": ("flipped",), "chosen_clean": ("clean",), "chosen_both": ("flipped", "clean")}


#: AdaptiveDPOConfig overrides of each method (the shared ones, beta, lr, steps, batch, come from the settings).
def method_overrides(method: str, flip_rate: float, train_steps: int = 0, filter_overrides: dict | None = None) -> dict:
    if method in EVIDENCE_CHOSEN_GROUPS:  # the filter's evidence is recorded (its own choice of pairs is not used)
        return method_overrides("filter", flip_rate, train_steps)
    if method in ("dpo", "oracle", *DIAGNOSTIC_METHODS):
        return {"adaptive": False}
    if method == "cdpo":
        return {"adaptive": False, "label_smoothing": flip_rate}
    if method == "adaptive":  # the paper's formulation at the library's defaults (authors' README setting)
        return {"adaptive": True}
    if method == "adaptive_amortised":
        return {"adaptive": True, "annotator_interval": 10}
    if method == "capped":  # this library's loss for minority labels, at its default misranked_weight (docs/method.md)
        return {"adaptive": False, "loss_type": "capped_sigmoid"}
    if method == "contrast_filter":  # the minority filter on the reference's prompt-contrast votes (eleventh round)
        return dict(CONTRAST_FILTER_OVERRIDES)
    if method == "judge_filter":  # the minority filter on a reward model's scores (the run adds them: judge.py)
        return dict(JUDGE_FILTER_OVERRIDES)
    if method in ("filter", "filter_free"):  # this library's minority filter (docs/minority_filter.md, docs/results.md)
        overrides = {"minority_filter_warmup_steps": int(FILTER_WARMUP_SHARE * train_steps)}
        overrides.update(FILTER_OVERRIDES if filter_overrides is None else filter_overrides)
        if method == "filter_free":  # votes from the training draw's own logits only: no extra forward pass
            overrides["minority_evidence_draws"] = 0
        return overrides
    raise ValueError(f"unknown method {method!r}")


#: The minority filter's settings, chosen on validation seeds at beta 2500, the regime it was built for (see
#: docs/results.md for the sweep; at the default beta 100 it does not help, docs/minority_filter.md "Limits").
FILTER_OVERRIDES: dict = {
    "adaptive": False,
    "minority_filter": "threshold",
    "minority_filter_threshold": 0.5,
    "minority_filter_max_fraction": 0.3,
    "minority_evidence": "wrong_sign",
    "minority_evidence_draws": 2,
    "minority_evidence_decay": 0.9,
    "minority_evidence_min_noise": 0.7,
    "minority_filter_min_visits": 2,
}
#: The minority filter judging by the reference model's prompt-contrast votes (docs/minority_filter.md), chosen on
#: validation seeds at beta 100 (docs/results.md, eleventh round). The reference does not change: no decay, and no
#: warm-up beyond the visits a pair needs to be judged. Vote threshold 0.6 (was 0.5 until 2026-12-07): it drops about
#: half as many clean pairs (7-9 against 12-15 percent on clean data) and closed more of the gap at 20 percent flips
#: on the validation seeds (docs/results.md, "A stricter vote threshold").
CONTRAST_FILTER_OVERRIDES: dict = {
    "adaptive": False,
    "minority_filter": "threshold",
    "minority_filter_threshold": 0.6,
    "minority_filter_max_fraction": 0.3,
    "minority_evidence": "prompt_contrast",
    "minority_evidence_draws": 2,
    "minority_evidence_decay": 0.0,
    "minority_evidence_min_noise": 0.7,
    "minority_filter_min_visits": 2,
    "minority_filter_warmup_steps": 0,
}
#: The minority filter judging by a reward model's scores of the pair's images (`minority_evidence="judge"`; the
#: judge is fitted on separate pairs of the same raters, judge.py). Pairs are judged from their first visit, after
#: the check has counted 512 votes (about one epoch of the demo's pairs, whose votes repeat on later visits), with no
#: cap on the share dropped (the check has vouched for the judge). Threshold 0.55 (the judge prefers the labelled
#: loser by more than 0.2 of its typical margin), chosen on validation seeds 100-103 over 0.5 and 0.6: at 0.5 it
#: dropped 8-11 percent of the clean pairs and cost 0.23 of the style reward on clean data (docs/results.md, "A judge
#: you bring").
JUDGE_FILTER_OVERRIDES: dict = {
    "adaptive": False,
    "minority_filter": "threshold",
    "minority_filter_threshold": 0.55,
    "minority_filter_max_fraction": 1.0,
    "minority_evidence": "judge",
    "minority_evidence_decay": 0.0,
    "minority_filter_min_visits": 1,
    "minority_filter_warmup_steps": 0,
    "minority_filter_agreement_votes": 512,
}
#: Share of the fine-tuning steps spent gathering evidence before the filter drops anything.
FILTER_WARMUP_SHARE = 1 / 3

METHOD_LABELS = {
    "dpo": "Diffusion-DPO",
    "cdpo": "cDPO (eps = flip rate)",
    "adaptive": "Adaptive-DPO (paper)",
    "adaptive_amortised": "Adaptive-DPO, amortised (interval 10)",
    "capped": "capped sigmoid (ours)",
    "filter": "minority filter (ours)",
    "filter_free": "minority filter, training draw only (ours)",
    "contrast_filter": "minority filter, reference prompt contrast (ours)",
    "judge_filter": "minority filter, a judge fitted to other pairs (ours)",
    "oracle": "oracle (flipped pairs removed)",
    # Diagnostic, not in the default grid: the true labels drop every flipped pair, but only from the step where the
    # minority filter starts dropping (after its warm-up): the ceiling of any filter that starts there.
    "oracle_late": "oracle after the filter's warm-up (diagnostic)",
    # Diagnostic: from the same step, drop a fixed random subset of the flipped pairs and of the clean pairs, by default
    # at the shares the minority filter dropped (MATCHED_DROP_SHARES): the filter's counts, without its choice of pairs.
    "matched_random": "random flipped and clean pairs dropped (diagnostic)",
    # Diagnostic: the judge filter's counts without its choice: from the judge check's decision on, drop a fixed random
    # subset of the flipped and of the clean pairs at the shares the judge filter dropped (JUDGE_MATCHED_DROP_SHARES).
    # Run at 0% flips too, where it measures what leaving out a few random clean pairs alone does to a run.
    "judge_random": "random pairs dropped at the judge filter's shares (diagnostic)",
    # Diagnostics that split the filter's choice in two (docs/results.md, tenth round): from the same step, drop the
    # flipped pairs with the highest minority evidence and random clean pairs, random flipped pairs and the clean
    # pairs with the highest evidence, or both by evidence (shares: --drop-shares). Which choice costs the reward?
    "chosen_flipped": "evidence-chosen flipped, random clean pairs dropped (diagnostic)",
    "chosen_clean": "random flipped, evidence-chosen clean pairs dropped (diagnostic)",
    "chosen_both": "evidence-chosen flipped and clean pairs dropped (diagnostic)",
}
#: Methods whose samples (first seed, highest flip rate) go into the sample grid beside the base model's.
SAMPLED_METHODS = ("dpo", "adaptive", "filter", "contrast_filter")
#: Shares of flipped / clean pairs the minority filter dropped after its warm-up, per flip rate (mean of the reported
#: seeds 0-2 at commit 1e5822d, beta 2500, docs/results.md), used by the `matched_random` diagnostic.
MATCHED_DROP_SHARES = {0.1: (0.78, 0.24), 0.2: (0.62, 0.22), 0.3: (0.54, 0.20)}
#: Shares of flipped / clean pairs the judge filter dropped after its judge check decided, per rater and flip rate
#: (mean of the reported seeds 0-6 at commit 751b77f, docs/results/judge-filter/*-s0-6), used by `judge_random`.
JUDGE_MATCHED_DROP_SHARES = {
    "style": {0.0: (0.0, 0.028), 0.1: (0.64, 0.026), 0.2: (0.68, 0.029), 0.3: (0.67, 0.030)},
    "fidelity": {0.0: (0.0, 0.025), 0.1: (0.79, 0.024), 0.2: (0.81, 0.025), 0.3: (0.80, 0.024)},
}


def diagnostic_drops(method: str, flip_rate: float, settings: BenchmarkSettings) -> tuple[int, tuple[float, float]]:
    """(first step, (flipped share, clean share)) of a truth diagnostic's drops; `--drop-shares` overrides the shares."""
    if method == "judge_random":  # from the step where the judge check has counted its votes and the filter starts
        votes = JUDGE_FILTER_OVERRIDES["minority_filter_agreement_votes"]
        return -(-votes // settings.train_batch), settings.drop_shares or JUDGE_MATCHED_DROP_SHARES[settings.rater][flip_rate]
    shares = (1.0, 0.0) if method == "oracle_late" else settings.drop_shares or MATCHED_DROP_SHARES[flip_rate]
    return int(FILTER_WARMUP_SHARE * settings.train_steps), shares


def runs_for(settings: BenchmarkSettings) -> list[tuple[float, str]]:
    """(flip rate, method) runs of the grid; at 0% flips cDPO, the oracle and the truth diagnostics other than
    `judge_random` are Diffusion-DPO and are not rerun."""
    runs = []
    for rate in settings.flip_rates:
        for method in settings.methods:
            if rate == 0.0 and method in ("cdpo", "oracle", *DIAGNOSTIC_METHODS) and method != "judge_random":
                continue
            runs.append((rate, method))
    return runs


def method_config(method: str, flip_rate: float, settings: BenchmarkSettings, seed: int, work_dir: str):
    """The AdaptiveDPOConfig of one run: the settings shared by every method, then the method's overrides."""
    from ...config import AdaptiveDPOConfig

    fields = dict(beta=settings.beta, learning_rate=settings.learning_rate, max_steps=settings.train_steps,
                  per_device_train_batch_size=settings.train_batch, seed=seed, data_seed=seed)
    fields.update(method_overrides(method, flip_rate, settings.train_steps, settings.filter_overrides))
    fields.update(getattr(settings, "method_overrides", {}).get(method, {}))
    return AdaptiveDPOConfig(
        output_dir=os.path.join(work_dir, f"{method}-{flip_rate}"),
        lr_scheduler_type="constant",
        resolution=8,
        report_to=[],
        save_strategy="no",
        # Logs every 10 steps (the recording trainer keeps them; nothing is printed): a log is where a method reads
        # its device state, e.g. where the contrast filter learns that its judge check failed and stops voting.
        logging_strategy="steps",
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        **fields,
    )
