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
    from trl_adaptive.data import flip_labels

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

    settings = digits.BenchmarkSettings()
    real_base, real_rater, labels_base, labels_rater = digits.split_digits()
    rater = digits.DigitRater(real_rater, labels_rater, settings.rater_c)
    base, folder = digits.load_or_pretrain_base(args.cache_dir, settings, real_base, labels_base, progress=False)
    pairs, _ = digits.build_pairs(base, rater, settings, args.seed)
    dataset = flip_labels(pairs, args.flip_rate, seed=args.seed)
    with tempfile.TemporaryDirectory() as work_dir:
        policy, _, _ = digits.train_method(folder, dataset, args.method, args.flip_rate, settings, args.seed, work_dir)
    reference, scheduler = base.unet.eval(), base.scheduler
    flipped = np.asarray(list(dataset["flipped"]), dtype=bool)

    def pixels(images):
        return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for i in images])

    chosen, rejected = pixels(list(dataset["chosen"])), pixels(list(dataset["rejected"]))
    embeds = digits.encode_prompts(base, list(dataset["prompt"]))
    num_timesteps = scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(1)
    print(f"seed {args.seed}, {args.flip_rate:.0%} flips, {len(flipped)} pairs, policy fine-tuned with {args.method}; "
          f"{args.draws} draws per band")
    print("| timesteps | per-draw AUROC of -l | per-draw AUROC of l < 0 | AUROC of mean -l | AUROC of share l < 0 | rms of l |")
    print("| --- | --- | --- | --- | --- | --- |")
    width = num_timesteps // args.bands
    with torch.no_grad():
        for low in range(0, num_timesteps, width):
            logits = []
            for _ in range(args.draws):
                t = torch.randint(low, low + width, (len(flipped),), generator=generator)
                noise = torch.randn(chosen.shape, generator=generator)

                def error(unet, x):
                    prediction = unet(scheduler.add_noise(x, noise, t), t, encoder_hidden_states=embeds).sample
                    return (prediction - noise).pow(2).mean(dim=(1, 2, 3))

                logits.append(((error(reference, chosen) - error(reference, rejected))
                               - (error(policy, chosen) - error(policy, rejected))).numpy())
            logits = np.stack(logits)
            per_draw = np.mean([roc_auc_score(flipped, -d) for d in logits])
            per_draw_sign = np.mean([roc_auc_score(flipped, d < 0) for d in logits])
            print(f"| [{low}, {low + width}) | {per_draw:.3f} | {per_draw_sign:.3f} | "
                  f"{roc_auc_score(flipped, -logits.mean(0)):.3f} | {roc_auc_score(flipped, (logits < 0).mean(0)):.3f} | "
                  f"{np.sqrt((logits ** 2).mean()):.1e} |", flush=True)


if __name__ == "__main__":
    main()
