"""The preference pairs: sampled from the base model and ranked by the rater, flipped as the demo flips them, and
their Diffusion-DPO logits outside training (`PairLogits`)."""

from __future__ import annotations

import numpy as np
import torch

from .base_model import encode_prompts, load_or_pretrain_base, sample_images
from .rater import DigitRater, make_rater, split_digits, to_uint8
from .settings import DIGIT_WORDS, PAIR_TEMPLATES, BenchmarkSettings


# ----------------------------------------------------------------------------------------------------------
# Preference pairs
# ----------------------------------------------------------------------------------------------------------


def build_pairs(pipeline, rater: DigitRater, settings: BenchmarkSettings, seed: int):
    """Sample `samples_per_class` images per digit from the base model (alternating pair templates), pair them at
    random within each digit and prompt, let the higher reward win and drop near-ties.

    Returns a TRL-schema `datasets.Dataset` (prompt, chosen, rejected as PIL images) plus per-pair reward gaps.
    """
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(10_000 + seed)
    per_class = settings.samples_per_class
    digits = np.repeat(np.arange(10), per_class)
    templates = np.tile(np.arange(per_class) % len(PAIR_TEMPLATES), 10)
    prompts = [PAIR_TEMPLATES[t].format(DIGIT_WORDS[d]) for d, t in zip(digits, templates)]
    generator = torch.Generator().manual_seed(20_000 + seed)
    noise = torch.randn((len(prompts), 3, 8, 8), generator=generator)
    images = to_uint8(sample_images(pipeline.unet, pipeline.scheduler.config, encode_prompts(pipeline, prompts), noise,
                                    settings.sampling_steps))
    rewards = rater.rewards(images, digits)
    rows, gaps, ties = [], [], 0
    for d in range(10):
        for t in range(len(PAIR_TEMPLATES)):
            members = np.flatnonzero((digits == d) & (templates == t))
            members = rng.permutation(members)
            for a, b in zip(members[0::2], members[1::2]):
                gap = abs(rewards[a] - rewards[b])
                if gap < settings.tie_gap:
                    ties += 1
                    continue
                win, lose = (a, b) if rewards[a] > rewards[b] else (b, a)
                rows.append({
                    "row_index": len(rows),
                    "prompt": prompts[win],
                    "chosen": Image.fromarray(images[win]).convert("RGB"),
                    "rejected": Image.fromarray(images[lose]).convert("RGB"),
                })
                gaps.append(gap)
    info = {"num_pairs": len(rows), "near_ties_dropped": ties, "base_sample_reward": float(rewards.mean()),
            "mean_reward_gap": float(np.mean(gaps))}
    return Dataset.from_list(rows), info


# ----------------------------------------------------------------------------------------------------------
# Scoring pairs outside training (benchmarks/evidence_by_timestep.py, benchmarks/cross_fitted_evidence.py)
# ----------------------------------------------------------------------------------------------------------


def flipped_pair_set(seed: int, flip_rate: float, cache_dir: str, rater: str = "fidelity"):
    """The pairs of `seed` with `flip_rate` of them flipped, as `trl-adaptive demo --rater <rater>` builds them.

    Returns (settings, base pipeline, base folder, dataset, rater)."""
    from ...data import flip_labels

    settings = BenchmarkSettings(rater=rater)
    real_base, real_rater, labels_base, labels_rater = split_digits()
    rater, _ = make_rater(rater, settings, real_rater, labels_rater)
    base, folder = load_or_pretrain_base(cache_dir, settings, real_base, labels_base, progress=False)
    pairs, _ = build_pairs(base, rater, settings, seed)
    return settings, base, folder, flip_labels(pairs, flip_rate, seed=seed), rater


class PairLogits:
    """Diffusion-DPO logits of a dataset's pairs for any fine-tuned UNet against the base UNet as reference, at
    timesteps and noise the caller draws (the trainer's formula: `dpo_logits` of per-image `denoising_error`)."""

    def __init__(self, base, dataset):
        def pixels(images):
            return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for i in images])

        self.chosen, self.rejected = pixels(list(dataset["chosen"])), pixels(list(dataset["rejected"]))
        self.embeds = encode_prompts(base, list(dataset["prompt"]))
        self.reference, self.scheduler = base.unet.eval(), base.scheduler

    @torch.no_grad()
    def __call__(self, policy, rows, timesteps: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
        from ...losses import denoising_error, dpo_logits

        def error(unet, images):
            noisy = self.scheduler.add_noise(images[rows], noise, timesteps)
            return denoising_error(unet(noisy, timesteps, encoder_hidden_states=self.embeds[rows]).sample, noise)

        return dpo_logits(error(policy, self.chosen), error(policy, self.rejected),
                          error(self.reference, self.chosen), error(self.reference, self.rejected)).numpy()

    def sample(self, policy, rows, low: int, high: int, generator: torch.Generator) -> np.ndarray:
        """The logits of `rows` on one draw: a timestep in [low, high) and fresh noise per pair."""
        timesteps = torch.randint(low, high, (len(rows),), generator=generator)
        noise = torch.randn((len(rows), *self.chosen.shape[1:]), generator=generator)
        return self(policy, rows, timesteps, noise)

    def draws(self, policy, rows, low: int, high: int, generator: torch.Generator, count: int) -> np.ndarray:
        """`count` draws of `sample` one after another: shape (count, len(rows))."""
        return np.stack([self.sample(policy, rows, low, high, generator) for _ in range(count)])
