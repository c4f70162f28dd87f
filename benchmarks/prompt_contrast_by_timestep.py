"""Does the reference model know which image of a pair is the better one? (docs/results.md, eleventh round)

Builds the digits benchmark's preference pairs for one seed, flips `--flip-rate` of them, and, *without any
fine-tuning*, lets the base model vote on every pair as `minority_evidence="prompt_contrast"` does: on a shared noise
and timestep, how much does the pair's own prompt lower the base model's denoising error of each image, compared with
a contrast prompt? A vote says the labelled loser fits the prompt better. Printed per timestep band and contrast:
the share of votes that agree with the clean labels, and the AUROC of each pair's vote share against `flipped`.

Contrasts: `other pair` (another pair's prompt, drawn at random; the library's choice, which needs nothing but the
batch), `empty` (the empty prompt, the classifier-free-guidance contrast; the digits base model never saw it) and
`nine digits` (the mean error under the prompts of the nine other digits: the diffusion classifier, which needs a
closed set of classes and so only serves as a reference point here).

    python benchmarks/prompt_contrast_by_timestep.py --seed 100      # ~2 minutes on one CPU core
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch


def main(argv=None):
    from trl_adaptive.benchmarks import digits
    from trl_adaptive.losses import denoising_error

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=100, help="benchmark seed (validation seeds are 100..)")
    parser.add_argument("--flip-rate", type=float, default=0.3)
    parser.add_argument("--draws", type=int, default=8, help="noise/timestep draws per band")
    parser.add_argument("--bands", nargs="+", default=["0-300", "300-700", "700-1000", "0-1000"],
                        help="timestep bands LOW-HIGH")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_adaptive"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    digits._quiet_libraries()

    _, base, _, dataset, _ = digits.flipped_pair_set(args.seed, args.flip_rate, args.cache_dir)
    flipped = np.asarray(list(dataset["flipped"]), dtype=bool)
    prompts = list(dataset["prompt"])
    pairs = digits.PairLogits(base, dataset)  # the pairs' pixels and prompt embeddings as the trainer sees them
    images, own = torch.cat([pairs.chosen, pairs.rejected]), pairs.embeds  # winners first
    num_pairs, unet, scheduler = len(prompts), pairs.reference, pairs.scheduler

    def errors(embeds, noisy, timesteps, noise):
        """The base model's denoising error of every image (winners, then losers) under one prompt per pair."""
        with torch.no_grad():
            prediction = unet(noisy, timesteps, encoder_hidden_states=torch.cat([embeds, embeds])).sample
        return denoising_error(prediction, noise)

    def other_digits(k):
        """Each pair's prompt with its digit replaced by the digit k places further (k = 1..9)."""
        prompts_k = [t.format(digits.DIGIT_WORDS[(d + k) % 10]) for t, d in zip(template, digit_of)]
        return digits.encode_prompts(base, prompts_k)

    empty = digits.encode_prompts(base, [""]).expand_as(own).contiguous()
    digit_of = np.array([digits.DIGIT_WORDS.index(p.split()[-1]) for p in prompts])
    template = ["{}".join(p.rsplit(digits.DIGIT_WORDS[d], 1)) for p, d in zip(prompts, digit_of)]
    generator = torch.Generator().manual_seed(args.seed)
    print(f"seed {args.seed}, {args.flip_rate:.0%} flips, {num_pairs} pairs, base model (no fine-tuning), "
          f"{args.draws} draws per band")
    print("| timesteps | contrast | votes agreeing with the clean labels | AUROC of the vote share vs flipped |")
    print("| --- | --- | --- | --- |")
    for band in args.bands:
        low, high = (int(x) for x in band.split("-"))
        shares = {"other pair": np.zeros(num_pairs), "empty": np.zeros(num_pairs), "nine digits": np.zeros(num_pairs)}
        for _ in range(args.draws):
            timesteps = torch.randint(low, high, (num_pairs,), generator=generator)
            noise = torch.randn((num_pairs, *images.shape[1:]), generator=generator)
            timesteps2, noise2 = torch.cat([timesteps, timesteps]), torch.cat([noise, noise])
            noisy = scheduler.add_noise(images, noise2, timesteps2)
            own_errors = errors(own, noisy, timesteps2, noise2)
            others = [prompts[j] for j in torch.randperm(num_pairs, generator=generator).tolist()]
            contrasts = {
                "other pair": errors(digits.encode_prompts(base, others), noisy, timesteps2, noise2),
                "empty": errors(empty, noisy, timesteps2, noise2),
                "nine digits": torch.stack(
                    [errors(other_digits(k), noisy, timesteps2, noise2) for k in range(1, 10)]
                ).mean(0),
            }
            same = torch.tensor([a == b for a, b in zip(prompts, others)])
            for name, contrast in contrasts.items():
                fidelity = contrast - own_errors  # how much the own prompt helps each image
                vote = (fidelity[:num_pairs] < fidelity[num_pairs:]).double()  # the labelled loser fits better
                if name == "other pair":
                    vote[same] = 0.5  # the same text on both sides says nothing
                shares[name] += vote.numpy() / args.draws
        for name, share in shares.items():
            clean_agreement = 1 - np.where(flipped, 1 - share, share).mean()
            auroc = digits.auroc(share, flipped)
            print(f"| [{low}, {high}) | {name} | {clean_agreement:.3f} | {auroc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
