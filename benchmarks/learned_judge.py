"""Can a judge learned from the labels themselves find the flipped pairs? (docs/results.md, "A judge learned from
the labels")

The field's reward models (PickScore, HPS, ImageReward) are Bradley-Terry models fitted to preference pairs. Fitted
to the training pairs and asked about the same pairs, such a model has memorised their labels, flipped ones included;
fitted on the other folds (cross-fitting, as confident learning does for classifiers), its margin on a held-out pair
is an independent judgement of that pair's label. This builds the digits benchmark's pairs for one seed and rater,
flips `--flip-rates` of them, fits a small Bradley-Terry MLP on image features (`--features`: grey pixels, or the
reference UNet's own block outputs) plus the prompt (one-hot over the distinct prompt texts) on all folds but one,
scores the held-out fold, and prints the out-of-fold agreement with the given labels and the AUROC of the out-of-fold
margin against `flipped`. No diffusion model is trained.

    python benchmarks/learned_judge.py --rater style --seed 100      # about a minute on one CPU core
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from trl_adaptive.benchmarks.digits.judge import bradley_terry_margin, fit_bradley_terry, grey_pixels, prompt_one_hot


def cross_fitted_margins(winners: torch.Tensor, losers: torch.Tensor, context: torch.Tensor, folds: int = 5,
                         seed: int = 0, **fit_options) -> np.ndarray:
    """Each pair's margin r(winner) - r(loser) under a judge fitted on the other `folds - 1` folds (random folds of
    equal size): > 0 where the judge agrees with the pair's label."""
    fold_of = np.random.default_rng(seed).permutation(np.arange(len(winners)) % folds)
    margins = np.zeros(len(winners))
    for fold in range(folds):
        held_out = torch.from_numpy(fold_of == fold)
        net = fit_bradley_terry(winners[~held_out], losers[~held_out], context[~held_out], seed=seed + fold,
                                **fit_options)
        with torch.no_grad():
            score = bradley_terry_margin(net, winners[held_out], losers[held_out], context[held_out])
        margins[held_out.numpy()] = score.squeeze(1).numpy()
    return margins


def reference_features(base, dataset, timesteps=(200, 500, 800), draws: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference UNet's own representation of every winner and loser under the pair's prompt: the outputs of its
    down blocks and mid block, averaged over space and over `draws` noise draws at each of `timesteps`, concatenated
    and standardised over all images. Needs nothing but the model being tuned."""
    from trl_adaptive.benchmarks import digits

    pairs = digits.PairLogits(base, dataset)
    unet, outputs = pairs.reference, {}
    blocks = {f"down{k}": block for k, block in enumerate(unet.down_blocks)} | {"mid": unet.mid_block}
    hooks = [block.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(
        name, out[0] if isinstance(out, tuple) else out)) for name, block in blocks.items()]
    generator = torch.Generator().manual_seed(0)

    def represent(images):
        per_timestep = []
        for t in timesteps:
            total = 0
            for _ in range(draws):
                noise, steps = torch.randn(images.shape, generator=generator), torch.full((len(images),), t)
                with torch.no_grad():
                    unet(pairs.scheduler.add_noise(images, noise, steps), steps, encoder_hidden_states=pairs.embeds)
                total = total + torch.cat([outputs[name].mean((2, 3)) for name in blocks], 1)
            per_timestep.append(total / draws)
        return torch.cat(per_timestep, 1)

    try:
        winners, losers = represent(pairs.chosen), represent(pairs.rejected)
    finally:
        for hook in hooks:
            hook.remove()
    both = torch.cat([winners, losers])
    mean, sd = both.mean(0), both.std(0) + 1e-6
    return (winners - mean) / sd, (losers - mean) / sd


def pair_features(dataset, features: str = "pixels", base=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image features of the labelled winners and losers, and a one-hot of each pair's prompt text. `features`:
    "pixels" (grey levels in [0, 1]), "unet" (`reference_features` of the base pipeline `base`) or "ink" (the
    image's mean grey level alone: the quantity the style rater scores; a diagnostic of what a judge with the right
    representation could do, not a judge a user has)."""
    prompts = list(dataset["prompt"])
    context = prompt_one_hot(prompts, {p: k for k, p in enumerate(sorted(set(prompts)))})
    if features == "unet":
        return (*reference_features(base, dataset), context)
    winners, losers = grey_pixels(dataset["chosen"]), grey_pixels(dataset["rejected"])
    if features == "ink":  # scaled to about unit spread (ink mass is 0.1-0.4)
        winners, losers = winners.mean(1, keepdim=True) * 10, losers.mean(1, keepdim=True) * 10
    elif features != "pixels":
        raise ValueError(f"features must be 'pixels', 'unet' or 'ink', got {features!r}")
    return winners, losers, context


def main(argv=None):
    from trl_adaptive.benchmarks import digits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rater", choices=("fidelity", "style"), default="fidelity")
    parser.add_argument("--seed", type=int, default=100, help="benchmark seed (validation seeds are 100..)")
    parser.add_argument("--flip-rates", type=float, nargs="+", default=[0.0, 0.2, 0.3])
    parser.add_argument("--features", choices=("pixels", "unet", "ink"), default="pixels",
                        help="what the judge sees of an image besides the prompt: grey pixels, the reference UNet's "
                             "block outputs, or (a diagnostic) the style rater's own quantity, the ink mass")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=32, help="hidden units of the judge's MLP")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_adaptive"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    digits._quiet_libraries()

    print(f"{args.rater} rater, seed {args.seed}: Bradley-Terry MLP ({args.hidden} hidden, weight decay "
          f"{args.weight_decay}) on {args.features} + prompt, {args.folds}-fold cross-fitted")
    print("| flips | out-of-fold agreement with the given labels | AUROC against flipped | judged wrong: flipped / clean |")
    print("| --- | --- | --- | --- |")
    for rate in args.flip_rates:
        _, base, _, dataset, _ = digits.flipped_pair_set(args.seed, rate, args.cache_dir, rater=args.rater)
        flipped = np.asarray(list(dataset["flipped"]), dtype=bool)
        margins = cross_fitted_margins(*pair_features(dataset, args.features, base), folds=args.folds,
                                       hidden=args.hidden, weight_decay=args.weight_decay)
        wrong = margins < 0
        if flipped.any():
            detection = (f"{digits.auroc(-margins, flipped):.3f} | {wrong[flipped].mean():.2f} / "
                         f"{wrong[~flipped].mean():.2f}")
        else:
            detection = f"- | - / {wrong.mean():.2f}"
        print(f"| {rate:.0%} | {1 - wrong.mean():.3f} | {detection} |", flush=True)


if __name__ == "__main__":
    main()
