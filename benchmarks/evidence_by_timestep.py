"""Which timesteps carry the minority signal? (docs/results.md, "Where the minority signal lives")

Builds the digits benchmark's preference pairs for one seed, flips `--flip-rate` of them, fine-tunes the base model
with Diffusion-DPO exactly as `trl-adaptive demo` does, then scores every pair with the trained model on a grid of
timestep bands (`--draws` noise/timestep draws per band) and prints, per band, how well the Diffusion-DPO logit `l`
finds the flipped pairs: AUROC of -l and of the wrong-sign vote (l < 0), per draw and averaged over the band's draws.

    python benchmarks/evidence_by_timestep.py --seed 100        # ~2 minutes on one CPU core
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
    parser.add_argument("--method", default="dpo", help="the demo's method to fine-tune with (default dpo)")
    parser.add_argument("--draws", type=int, default=4, help="noise/timestep draws per band")
    parser.add_argument("--bands", type=int, default=10, help="equal timestep bands")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_adaptive"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    digits._quiet_libraries()

    settings, base, folder, dataset, _ = digits.flipped_pair_set(args.seed, args.flip_rate, args.cache_dir)
    with tempfile.TemporaryDirectory() as work_dir:
        policy, _, _ = digits.train_method(folder, dataset, args.method, args.flip_rate, settings, args.seed, work_dir)
    flipped = np.asarray(list(dataset["flipped"]), dtype=bool)
    pair_logits = digits.PairLogits(base, dataset)
    rows = np.arange(len(flipped))
    num_timesteps = base.scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(1)
    print(f"seed {args.seed}, {args.flip_rate:.0%} flips, {len(flipped)} pairs, policy fine-tuned with {args.method}; "
          f"{args.draws} draws per band")
    print("| timesteps | per-draw AUROC of -l | per-draw AUROC of l < 0 | AUROC of mean -l | AUROC of share l < 0 | rms of l |")
    print("| --- | --- | --- | --- | --- | --- |")
    width = num_timesteps // args.bands
    for low in range(0, num_timesteps, width):
        logits = pair_logits.draws(policy, rows, low, low + width, generator, args.draws)
        per_draw = np.mean([roc_auc_score(flipped, -d) for d in logits])
        per_draw_sign = np.mean([roc_auc_score(flipped, d < 0) for d in logits])
        print(f"| [{low}, {low + width}) | {per_draw:.3f} | {per_draw_sign:.3f} | "
              f"{roc_auc_score(flipped, -logits.mean(0)):.3f} | {roc_auc_score(flipped, (logits < 0).mean(0)):.3f} | "
              f"{np.sqrt((logits ** 2).mean()):.1e} |", flush=True)


if __name__ == "__main__":
    main()
