"""Does a model that never trained on a pair detect its flipped label better than the model that did?

Builds the digits benchmark's pairs for one seed, flips `--flip-rate` of them, splits the pairs by row parity into
two halves, fine-tunes one Diffusion-DPO model per half (the demo's settings), and scores every pair at noisy
timesteps (`--draws` draws from `--min-timestep` up) with the model trained on it ("self") and with the other one
("cross-fitted"). Prints the AUROC against `flipped` of the share of wrong-sign votes and of the mean -l.

    python benchmarks/cross_fitted_evidence.py --seed 100      # ~3 minutes on one CPU core
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch


def main(argv=None):
    from sklearn.metrics import roc_auc_score

    from trl_adaptive.benchmarks import digits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=100, help="benchmark seed (validation seeds are 100..)")
    parser.add_argument("--flip-rate", type=float, default=0.3)
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--min-timestep", type=int, default=700)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_adaptive"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    digits._quiet_libraries()

    settings, base, folder, dataset, _ = digits.flipped_pair_set(args.seed, args.flip_rate, args.cache_dir)
    flipped = np.asarray(list(dataset["flipped"]), dtype=bool)
    half = np.arange(len(dataset)) % 2
    pair_logits = digits.PairLogits(base, dataset)
    num_timesteps = base.scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(1)

    def logits(policy, rows):
        return pair_logits.draws(policy, rows, args.min_timestep, num_timesteps, generator, args.draws)

    policies = {}
    for h in (0, 1):
        subset = dataset.select(np.flatnonzero(half == h).tolist())
        with tempfile.TemporaryDirectory() as work_dir:
            policies[h], _, _ = digits.train_method(folder, subset, "dpo", args.flip_rate, settings, args.seed, work_dir)
    print(f"seed {args.seed}, {args.flip_rate:.0%} flips, {len(flipped)} pairs in two halves; {args.draws} draws at "
          f"timesteps >= {args.min_timestep}; AUROC against flipped: share of l < 0 / mean of -l")
    for h in (0, 1):
        rows = np.flatnonzero(half == h)
        own, other = logits(policies[h], rows), logits(policies[1 - h], rows)
        print(f"half {h}: self {roc_auc_score(flipped[rows], (own < 0).mean(0)):.3f} / "
              f"{roc_auc_score(flipped[rows], -own.mean(0)):.3f}; cross-fitted "
              f"{roc_auc_score(flipped[rows], (other < 0).mean(0)):.3f} / {roc_auc_score(flipped[rows], -other.mean(0)):.3f}")


if __name__ == "__main__":
    main()
