"""The command line (`trl-adaptive demo` / `python -m trl_adaptive.demo`): arguments, settings from them, `main`."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from .base_model import load_or_pretrain_base
from .methods import METHOD_LABELS
from .rater import RATERS, DigitRater, DigitRaterScorer, InkOffsetScorer, make_rater, split_digits
from .report import merge_reports, write_report
from .runner import _quiet_libraries, run_seed
from .settings import BenchmarkSettings, quick_settings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="trl-adaptive demo",
        description="Reproduce Adaptive-DPO's flipped-label experiment offline on scikit-learn's 8x8 digits.",
    )
    parser.add_argument("--seeds", type=int, default=1, help="Number of seeds of the whole grid (default 1).")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="First seed (reported seeds are 0..; validation seeds for tuning were 100..).")
    parser.add_argument("--quick", action="store_true", help="Reduced grid for a smoke test (a few minutes at most).")
    parser.add_argument("--output-dir", default="outputs/digits-demo", help="Where the table, JSON and plots go.")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_adaptive"),
                        help="Folder of the cached pretrained base model.")
    parser.add_argument("--flip-rates", type=float, nargs="+", default=None, help="Override the flip rates.")
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(METHOD_LABELS), help="Override the methods.")
    parser.add_argument("--train-steps", type=int, default=None, help="Override the fine-tuning steps per run.")
    parser.add_argument("--learning-rate", type=float, default=None, help="Override the fine-tuning learning rate.")
    parser.add_argument("--beta", type=float, default=None, help="Override beta, the DPO strength, for every method (default 100; the earlier study used 2500).")
    parser.add_argument("--drop-shares", type=float, nargs=2, default=None, metavar=("FLIPPED", "CLEAN"),
                        help="Shares of the flipped and of the clean pairs that the drop diagnostics (matched_random, "
                        "chosen_flipped, chosen_clean, chosen_both) remove after the filter's warm-up (default: the "
                        "filter's shares at beta 2500).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="Extra AdaptiveDPOConfig field for the two filter methods, 'filter' and 'filter_free' "
                        "(repeatable), for sweeps; it overrides the shared settings too (e.g. beta).")
    parser.add_argument("--rater", choices=RATERS, default="fidelity",
                        help="Which rater ranks the pairs and rates the runs: 'fidelity' (default), the probability of "
                        "the prompted digit, or 'style', stroke weight: the ink mass standardised within the prompted "
                        "digit's class, scored against the class's typical weight (a property the prompt does not "
                        "determine; the fidelity reward and the ink offset, ink_z and ink_abs_z, are reported beside it).")
    parser.add_argument("--set-method", dest="method_overrides", action="append", default=[],
                        metavar="METHOD:FIELD=VALUE",
                        help="Extra AdaptiveDPOConfig field for one method of the grid (repeatable), for sweeps of "
                        "methods other than the two filters (e.g. 'capped:misranked_weight=0.3').")
    parser.add_argument("--judge-seeds", type=int, default=None,
                        help="judge_filter: pair sets (of about 470 pairs, seeds 200..) its judge is fitted to (default 16).")
    parser.add_argument("--judge-flip-rate", type=float, default=None,
                        help="judge_filter: share of the judge's own training labels flipped (default 0: the rater's "
                        "labels; the run's flips are only in the pairs it judges).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="Runs trained at a time, each in its own process with --threads (default cpus / workers) threads (default "
                        "2, or 1 on a one-core machine): two one-thread runs use two cores better than one two-thread "
                        "run of this small model. 1 runs everything in this process.")
    parser.add_argument("--save-visits", action="store_true",
                        help="Also save every training visit's logit and score per run (npz) for diagnostics.")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="Do not train: merge the results.json of earlier runs (parts of a grid, other seeds) "
                        "into one table, JSON and plots in --output-dir.")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    return parser.parse_args(argv)


def _parse_override(text: str):
    name, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return name, cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    return name, value


def settings_from_args(args) -> BenchmarkSettings:
    settings = quick_settings() if args.quick else BenchmarkSettings()
    if args.flip_rates:
        settings.flip_rates = tuple(args.flip_rates)
    if args.methods:
        settings.methods = tuple(args.methods)
    if args.train_steps:
        settings.train_steps = args.train_steps
    if args.learning_rate:
        settings.learning_rate = args.learning_rate
    if args.beta is not None:  # not `if args.beta`: --beta 0 must reach AdaptiveDPOConfig's check, not be ignored
        settings.beta = args.beta
    if args.drop_shares is not None:
        if not all(0.0 <= share <= 1.0 for share in args.drop_shares):
            raise ValueError(f"--drop-shares must be two shares in [0, 1], got {args.drop_shares}")
        settings.drop_shares = tuple(args.drop_shares)
    settings.filter_overrides.update(_parse_override(o) for o in args.overrides)
    settings.rater = args.rater
    if args.judge_seeds is not None:
        if args.judge_seeds < 1:
            raise ValueError(f"--judge-seeds must be >= 1, got {args.judge_seeds}")
        settings.judge_seeds = args.judge_seeds
    if args.judge_flip_rate is not None:
        if not 0.0 <= args.judge_flip_rate < 0.5:
            raise ValueError(f"--judge-flip-rate must be in [0, 0.5), got {args.judge_flip_rate}")
        settings.judge_flip_rate = args.judge_flip_rate
    for text in args.method_overrides:
        method, sep, override = text.partition(":")
        if not sep or method not in METHOD_LABELS:
            raise ValueError(f"--set-method wants METHOD:FIELD=VALUE with a known method, got {text!r}")
        settings.method_overrides.setdefault(method, {}).update([_parse_override(override)])
    return settings


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_libraries()
    settings = settings_from_args(args)
    progress = not args.no_progress
    os.makedirs(args.output_dir, exist_ok=True)
    if args.merge:
        return merge_reports(args, argv)

    real_base, real_rater, labels_base, labels_rater = split_digits()
    fidelity = DigitRater(real_rater, labels_rater, settings.rater_c)
    print(f"Rater: logistic regression C={settings.rater_c} on {len(real_rater)} real digits held out from the base "
          f"model; held-out accuracy {fidelity.held_out_accuracy:.3f}")
    if settings.rater == "fidelity":
        rater, scorer, extra_scorers = fidelity, DigitRaterScorer(fidelity), ()
    else:
        rater, scorer = make_rater(settings.rater, settings, real_rater, labels_rater)
        # prompt fidelity (reward hacking shows there) and where the stroke weight went (drift or spread)
        extra_scorers = (DigitRaterScorer(fidelity), InkOffsetScorer(rater, "signed"), InkOffsetScorer(rater, "abs"))
        real_rewards = rater.rewards(np.round(real_rater * 255).astype(np.uint8), labels_rater)
        print(f"Style rater (ranks the pairs, rates the runs): exp(-(z - {settings.style_target})^2 / "
              f"(2 * {settings.style_width}^2)), z = ink mass standardised within the prompted digit's class on the "
              f"same real digits (real digits score {real_rewards.mean():.3f}); the fidelity reward and the ink offset "
              "(ink_z, ink_abs_z) are reported beside it")
    base, base_folder = load_or_pretrain_base(args.cache_dir, settings, real_base, labels_base, progress)
    print(f"Base model: {base_folder}")

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    seed_results = []
    with tempfile.TemporaryDirectory(prefix="trl-adaptive-demo-") as work_dir:
        for i, seed in enumerate(seeds):
            seed_results.append(run_seed(seed, settings, base, base_folder, rater, work_dir, progress, keep_samples=i == 0,
                                         visits_dir=args.output_dir if args.save_visits else None, workers=args.workers,
                                         worker_threads=args.threads, scorer=scorer, extra_scorers=extra_scorers))
    if seed_results and seed_results[0]["samples"]:
        np.savez(os.path.join(args.output_dir, "samples.npz"), eval_digits=seed_results[0]["eval_digits"],
                 **seed_results[0]["samples"])
    return write_report(args, argv, settings, seeds, seed_results, fidelity.held_out_accuracy, base_folder, start)
