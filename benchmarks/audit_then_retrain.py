"""Audit the pairs with a Diffusion-DPO model, then train on the pairs it trusts (docs/results.md, eighth round).

For each seed and flip rate of the digits benchmark (the demo's pairs, flips, settings and evaluation):

1. Diffusion-DPO for 300 steps, the demo's run (its state after 150 steps is kept too).
2. An audit of every pair by the 150-step and by the 300-step model: the share of `--draws` noise/timestep draws at
   timesteps >= `--min-timestep` on which the model ranks the pair against its label (`l < 0`), as the minority
   filter's `wrong_sign` evidence. Flagged: share > 0.5, at most 30% of the pairs (`threshold` rule of
   `trl_adaptive.filtering`), or the 30% with the highest share (`top_fraction`).
3. A second Diffusion-DPO run on the pairs not flagged:
   * `restart-150`: 150 steps from the base model, audited at 150 (with stage 1's 150 steps: one 300-step budget);
   * `continue-150`: 150 more steps from the 150-step model, reference still the base model (same budget);
   * `restart-300`: 300 steps from the base model, audited at 300 (twice the budget of one run).

Prints each run's reward gain over the base model (as `trl-adaptive demo` measures it) and the audits' AUROC and
drop shares. `--noise-seeds S ...` instead reruns Diffusion-DPO and the oracle with other training seeds (noise,
timesteps and data order; same pairs, flips and evaluation): the run-to-run noise of the gains.

    python benchmarks/audit_then_retrain.py --seeds 100 101 --flip-rates 0 0.2 0.3      # ~16 minutes on 2 cores
    python benchmarks/audit_then_retrain.py --seeds 100 --flip-rates 0.2 0.3 --noise-seeds 1100 2100   # ~5 minutes
    python benchmarks/audit_then_retrain.py --seeds 0 1 2 3 4 5 6 --flip-rates 0 0.1 0.2 0.3 --variants continue-150 \
        --rules threshold --report out.json    # the reported seeds; then gap_bootstrap.py on docs/results + out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "trl_adaptive")
VARIANTS = ("restart-150", "continue-150", "restart-300")
RULES = {"threshold": dict(method="threshold", threshold=0.5, max_fraction=0.3),
         "top30": dict(method="top_fraction", fraction=0.3)}


def train(folder, dataset, steps, settings, seed, method="dpo", init_unet=None, keep_at=None):
    """`method` of the demo ("dpo" or "oracle") for `steps` steps; returns the trained UNet and its state at step
    `keep_at`."""
    from transformers import TrainerCallback

    from trl_adaptive.benchmarks import digits

    settings = copy.deepcopy(settings)
    settings.train_steps = steps
    kept = {}

    class KeepState(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == keep_at:
                kept["unet"] = copy.deepcopy(model).eval()

    with tempfile.TemporaryDirectory() as work_dir:
        unet, _, _ = digits.train_method(folder, dataset, method, 0.0, settings, seed, work_dir, init_unet=init_unet,
                                         callbacks=[KeepState()])
    return unet, kept.get("unet")


def wrong_sign_share(base, dataset, unet, draws: int, min_timestep: int) -> np.ndarray:
    from trl_adaptive.benchmarks import digits

    pair_logits = digits.PairLogits(base, dataset)
    generator = torch.Generator().manual_seed(1)
    rows = np.arange(len(dataset))
    high = base.scheduler.config.num_train_timesteps
    return (pair_logits.draws(unet, rows, min_timestep, high, generator, draws) < 0).mean(axis=0)


def flagged(share: np.ndarray, rule: str) -> np.ndarray:
    from trl_adaptive.filtering import minority_keep_mask

    share = torch.as_tensor(share, dtype=torch.float64)
    keep = minority_keep_mask(share, torch.ones(len(share)), share, min_visits=1, **RULES[rule])
    return (keep == 0).numpy()


def run(job: dict) -> dict:
    from trl_adaptive.benchmarks import digits

    torch.set_num_threads(1)
    digits._quiet_libraries()
    seed, rate = job["seed"], job["flip_rate"]
    settings, base, folder, dataset, rater = digits.flipped_pair_set(seed, rate, job["cache_dir"])
    evaluation = digits.evaluation_set(base, rater, settings, seed)

    def gain(unet):
        return float(digits.rate_unet(unet, evaluation, settings)[1].mean() - evaluation["base_rewards"].mean())

    flipped = np.asarray(dataset["flipped"], dtype=bool)
    out = {"seed": seed, "flip_rate": rate, "gains": {}, "audits": {}}
    if job["noise_seeds"]:
        for train_seed in job["noise_seeds"]:
            for method in ("dpo", "oracle"):
                out["gains"][f"{method}/{train_seed}"] = gain(train(folder, dataset, 300, settings, train_seed, method)[0])
        return out
    variants = job["variants"]
    auditors = {}
    if "restart-300" in variants:
        auditors[300], auditors[150] = train(folder, dataset, 300, settings, seed, keep_at=150)
        out["gains"]["dpo-300"] = gain(auditors[300])
    else:  # the same first 150 steps, without the 150 after them
        auditors[150] = train(folder, dataset, 150, settings, seed)[0]
    out["gains"]["dpo-150"] = gain(auditors[150])
    for audit_step, auditor in sorted(auditors.items()):
        share = wrong_sign_share(base, dataset, auditor, job["draws"], job["min_timestep"])
        out["audits"][f"auroc@{audit_step}"] = digits.auroc(share, flipped)
        for rule in job["rules"]:
            drop = flagged(share, rule)
            out["audits"][f"{rule}@{audit_step}"] = {
                "dropped": float(drop.mean()), "clean_dropped": float(drop[~flipped].mean()),
                "flipped_dropped": float(drop[flipped].mean()) if flipped.any() else None}
            trusted = dataset.select(np.flatnonzero(~drop).tolist())
            if audit_step == 150 and "restart-150" in variants:
                out["gains"][f"restart-150/{rule}"] = gain(train(folder, trusted, 150, settings, seed)[0])
            if audit_step == 150 and "continue-150" in variants:
                out["gains"][f"continue-150/{rule}"] = gain(train(folder, trusted, 150, settings, seed, init_unet=auditor)[0])
            if audit_step == 300:
                out["gains"][f"restart-300/{rule}"] = gain(train(folder, trusted, 300, settings, seed)[0])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101], help="benchmark seeds (validation: 100..)")
    parser.add_argument("--flip-rates", type=float, nargs="+", default=[0.0, 0.2, 0.3])
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--min-timestep", type=int, default=700)
    parser.add_argument("--noise-seeds", type=int, nargs="*", default=[],
                        help="instead: Diffusion-DPO and the oracle with these training seeds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="second runs to train")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES), help="flagging rules")
    parser.add_argument("--workers", type=int, default=2, help="(seed, flip rate) jobs at a time, one thread each")
    parser.add_argument("--cache-dir", default=CACHE_DIR)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--report", default=None,
                        help="also write the gains as a demo-style report (runs keyed 'variant/rule@flip rate'), which "
                        "benchmarks/gap_bootstrap.py can lay over the demo's reports")
    args = parser.parse_args(argv)
    jobs = [dict(seed=s, flip_rate=r, draws=args.draws, min_timestep=args.min_timestep, noise_seeds=args.noise_seeds,
                 variants=args.variants, rules=args.rules, cache_dir=args.cache_dir)
            for s in args.seeds for r in args.flip_rates]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(run, jobs))
    for result in results:
        print(f"seed {result['seed']}, {result['flip_rate']:.0%} flips")
        for name, value in result["gains"].items():
            print(f"  {name:<22} gain {value:+.4f}")
        for name, value in result["audits"].items():
            print(f"  audit {name:<16} {json.dumps(value)}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    if args.report:
        per_seed = {}
        for result in results:
            runs = per_seed.setdefault(result["seed"], {"seed": result["seed"], "runs": {}})["runs"]
            for name, value in result["gains"].items():
                runs[f"{name}@{result['flip_rate']}"] = {"reward_gain": value}
        with open(args.report, "w") as f:
            json.dump({"per_seed": list(per_seed.values())}, f, indent=1)


if __name__ == "__main__":
    main()
