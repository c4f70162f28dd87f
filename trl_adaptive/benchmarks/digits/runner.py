"""Running the benchmark: one method's fine-tune (`train_method`), one (flip rate, method) run with its evaluation
(`run_one`, also in worker processes), every run of a seed (`run_seed`), and the process setup."""

from __future__ import annotations

import copy
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import numpy as np
import torch

from .base_model import load_base
from .evaluation import compare_to_base, evaluation_set, sample_unet
from .methods import (
    DIAGNOSTIC_METHODS,
    EVIDENCE_CHOSEN_GROUPS,
    METHOD_LABELS,
    SAMPLED_METHODS,
    diagnostic_drops,
    method_config,
    runs_for,
)
from .pairs import build_pairs
from .rater import DigitRater
from .recording import _recording_trainer_class
from .settings import BenchmarkSettings
from .statistics import detection_metrics


# ----------------------------------------------------------------------------------------------------------
# Training one method
# ----------------------------------------------------------------------------------------------------------


def train_method(base_folder: str, dataset, method: str, flip_rate: float, settings: BenchmarkSettings, seed: int,
                 work_dir: str, init_unet=None, callbacks=None):
    """Fine-tune the base UNet with one method; returns (trained UNet, per-visit diagnostics, wall seconds).

    `init_unet`: start from these weights instead (the reference stays the base UNet); `callbacks`: extra
    `TrainerCallback`s (benchmarks/audit_then_retrain.py uses both)."""
    from transformers import PrinterCallback

    if method == "oracle":
        dataset = dataset.filter(lambda flipped: not flipped, input_columns="flipped")
    args = method_config(method, flip_rate, settings, seed, work_dir)
    pipeline = load_base(base_folder)
    reference = None
    if init_unet is not None:
        reference = copy.deepcopy(pipeline.unet)
        pipeline.unet.load_state_dict(init_unet.state_dict())
    diagnostic = {}
    if method in DIAGNOSTIC_METHODS:
        diagnostic["truth_filter_from"], diagnostic["truth_drop_shares"] = diagnostic_drops(method, flip_rate, settings)
        diagnostic["evidence_chosen_groups"] = EVIDENCE_CHOSEN_GROUPS.get(method, ())
    trainer = _recording_trainer_class()(model=pipeline, ref_model=reference, args=args, train_dataset=dataset,
                                         callbacks=callbacks, **diagnostic)
    trainer.remove_callback(PrinterCallback)  # the benchmark prints its own one-line summary per run
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    visits = trainer.visit_table()
    if "flipped" in dataset.column_names:
        flipped_by_row = np.zeros(max(dataset["row_index"]) + 1, dtype=bool)
        flipped_by_row[np.asarray(dataset["row_index"])] = np.asarray(dataset["flipped"], dtype=bool)
        visits["flipped"] = flipped_by_row[visits["row"]]
    # Mean filter statistics over the steps where the filter was active.
    visits["filter_stats"] = {
        name: float(np.mean(values)) for name, values in trainer.metric_history.items()
        if name in ("minority/kept_fraction", "minority/flipped_dropped", "minority/clean_dropped") and values
    }
    judge = getattr(trainer.robustness.get("minority_filter"), "judge", None)
    if judge is not None:  # the contrast filter's judge check: its decision (or the votes counted so far)
        summary = judge.summary()
        visits["filter_stats"].update({f"judge_{name}": summary[name]
                                       for name in ("agreement", "votes", "decided", "passed", "step")})
    unet = trainer.accelerator.unwrap_model(trainer.model).eval()
    return unet, visits, seconds


# ----------------------------------------------------------------------------------------------------------
# The whole benchmark
# ----------------------------------------------------------------------------------------------------------


def run_seed(seed: int, settings: BenchmarkSettings, base, base_folder: str, rater: DigitRater, work_dir: str,
             progress: bool, keep_samples: bool, log=print, visits_dir: str | None = None, workers: int = 1,
             worker_threads: int | None = None, scorer=None, extra_scorers: tuple = ()) -> dict:
    """Pairs, every (flip rate, method) run and their evaluation, for one seed; `workers` > 1 runs that many
    (flip rate, method) runs at a time in worker processes (the runs are independent: each seeds itself).

    `rater` ranks the pairs (anything with `rewards(images_uint8, digits)`); `scorer` rates the runs (default: the
    fidelity rater's `DigitRaterScorer`), `extra_scorers` are reported beside it."""
    from tqdm.auto import tqdm

    from ...data import flip_labels

    pairs, pair_info = build_pairs(base, rater, settings, seed)
    evaluation = evaluation_set(base, rater, settings, seed, scorer=scorer, extra_scorers=extra_scorers)
    result = {"seed": seed, "pairs": pair_info, "base_reward": float(evaluation["base_rewards"].mean(dtype=np.float64)), "runs": {}}
    samples = {"base": evaluation["base_images"]} if keep_samples else {}
    flipped_sets = {rate: flip_labels(pairs, rate, seed=seed) for rate in settings.flip_rates}
    judged_sets = judged_pair_sets(flipped_sets, base, base_folder, rater, settings, seed) \
        if "judge_filter" in settings.methods else {}
    jobs = [
        dict(base_folder=base_folder, dataset=judged_sets[rate] if method == "judge_filter" else flipped_sets[rate],
             method=method, flip_rate=rate, settings=settings,
             seed=seed, work_dir=work_dir, evaluation=evaluation, save_visits=visits_dir is not None)
        for rate, method in runs_for(settings)
    ]
    bar = tqdm(total=len(jobs), desc=f"seed {seed}: training", disable=not progress)
    finished = {}

    def collect(run: dict) -> None:
        key = f"{run['method']}@{run['flip_rate']}"
        images, visits = run.pop("images"), run.pop("visits", None)
        if visits is not None:
            np.savez(os.path.join(visits_dir, f"visits-seed{seed}-{key.replace('@', '-')}.npz"), **visits)
        finished[key] = run
        log(f"  seed {seed} {METHOD_LABELS[run['method']]:<40} flips {run['flip_rate']:.0%}: reward {run['reward']:.4f} "
            f"(gain {run['reward_gain']:+.4f}), win rate {run['win_rate']:.3f}, {run['train_seconds']:.0f}s"
            + "".join(f", {name} {r['tuned']:.4f}" for name, r in run.get("other_rewards", {}).items()))
        if keep_samples and run["flip_rate"] == max(settings.flip_rates) and run["method"] in SAMPLED_METHODS:
            samples[key] = images
        bar.update(1)

    if workers > 1:
        threads = worker_threads or max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_quiet_worker,
                                 initargs=(threads,)) as pool:
            for future in as_completed([pool.submit(run_one, job) for job in jobs]):
                collect(future.result())
    else:
        for job in jobs:
            bar.set_postfix_str(f"{job['method']} @ {job['flip_rate']:.0%} flips")
            collect(run_one(job))
    bar.close()
    for rate, method in runs_for(settings):  # the grid's order, whatever order the workers finished in
        result["runs"][f"{method}@{rate}"] = finished[f"{method}@{rate}"]
    result["samples"] = samples
    result["eval_digits"] = evaluation["digits"]
    return result


def judged_pair_sets(flipped_sets: dict, base, base_folder: str, rater, settings: BenchmarkSettings, seed: int) -> dict:
    """The `judge_filter` runs' data: each flip rate's pairs with a judge's scores (`add_judge_scores`, as a user
    adds a reward model's), the judge fitted to separate pairs of the same rater (judge.py; its pairs are sampled once
    and cached beside the base model), one judge per seed for every flip rate."""
    from ...data import add_judge_scores
    from .judge import fit_judge, judge_pairs

    pairs = judge_pairs(base, base_folder, rater, settings)
    judge = fit_judge(pairs, settings.judge_flip_rate, seed=seed)
    return {rate: add_judge_scores(dataset, judge, batch_size=256, progress=False) for rate, dataset in flipped_sets.items()}


def run_one(job: dict) -> dict:
    """One (flip rate, method) run: fine-tune, sample the held-out evaluation prompts and noise, rate the images."""
    evaluation = job["evaluation"]
    settings = job["settings"]
    unet, visits, seconds = train_method(job["base_folder"], job["dataset"], job["method"], job["flip_rate"], settings,
                                         job["seed"], job["work_dir"])
    filter_stats = visits.pop("filter_stats")
    images = sample_unet(unet, evaluation, settings)
    summary = compare_to_base(images, evaluation)  # `trl-adaptive evaluate`'s scoring and statistics
    return {
        "flip_rate": job["flip_rate"], "method": job["method"], "train_seconds": seconds,
        "reward": summary["tuned_mean"], "reward_gain": summary["tuned_mean"] - summary["base_mean"],
        "win_rate": summary["win_rate"], "win_rate_ci_prompts": summary["win_rate_ci"],
        "detection": detection_metrics(visits), "filter_stats": filter_stats,
        "images": images, **({"visits": visits} if job["save_visits"] else {}),
        **({"other_rewards": summary["other_rewards"]} if "other_rewards" in summary else {}),
    }


def _quiet_worker(threads: int) -> None:
    """Set up a worker process of the demo as main() sets up its own process."""
    _quiet_libraries()
    torch.set_num_threads(threads)


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")  # scheduler config nags
    torch.set_flush_denormal(True)  # with --beta 2500 saturated sigmoids give denormal gradients: 2x slower steps
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers 5's "Loading weights" bar, once per run and worker
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
