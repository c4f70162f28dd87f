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
    from trl_adaptive.data import flip_labels

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=100, help="benchmark seed (validation seeds are 100..)")
    parser.add_argument("--flip-rate", type=float, default=0.3)
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--min-timestep", type=int, default=700)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_adaptive"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    digits._quiet_libraries()

    settings = digits.BenchmarkSettings()
    real_base, real_rater, labels_base, labels_rater = digits.split_digits()
    rater = digits.DigitRater(real_rater, labels_rater, settings.rater_c)
    base, folder = digits.load_or_pretrain_base(args.cache_dir, settings, real_base, labels_base, progress=False)
    pairs, _ = digits.build_pairs(base, rater, settings, args.seed)
    dataset = flip_labels(pairs, args.flip_rate, seed=args.seed)
    flipped = np.asarray(list(dataset["flipped"]), dtype=bool)
    half = np.arange(len(dataset)) % 2

    def pixels(images):
        return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for i in images])

    chosen, rejected = pixels(list(dataset["chosen"])), pixels(list(dataset["rejected"]))
    embeds = digits.encode_prompts(base, list(dataset["prompt"]))
    reference, scheduler = base.unet.eval(), base.scheduler
    generator = torch.Generator().manual_seed(1)

    def logits(policy, rows):
        draws = []
        with torch.no_grad():
            for _ in range(args.draws):
                t = torch.randint(args.min_timestep, scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
                noise = torch.randn((len(rows), *chosen.shape[1:]), generator=generator)

                def error(unet, x):
                    prediction = unet(scheduler.add_noise(x[rows], noise, t), t, encoder_hidden_states=embeds[rows]).sample
                    return (prediction - noise).pow(2).mean(dim=(1, 2, 3))

                draws.append(((error(reference, chosen) - error(reference, rejected))
                              - (error(policy, chosen) - error(policy, rejected))).numpy())
        return np.stack(draws)

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
