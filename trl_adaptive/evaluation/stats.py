"""Paired comparison of a tuned model against its base: means, mean difference, win rate, bootstrap intervals.

Every image of the tuned model is paired with the base model's image of the same prompt and seed. A pair is a
win when the tuned image scores higher, a loss when lower, half a win when equal. Intervals resample *prompts*
(with all their seeds), not single images: the images of one prompt are not independent draws, and resampling them
one by one would give intervals that are too narrow.
"""

from __future__ import annotations

import numpy as np


def win_rate(base: np.ndarray, tuned: np.ndarray) -> float:
    """Share of pairs the tuned image wins (ties count one half)."""
    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    return float(np.mean((tuned > base) + 0.5 * (tuned == base)))


def paired_summary(base, tuned, prompt_ids, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Means, mean paired difference and win rate of `tuned` against `base`, with percentile bootstrap intervals
    over prompts.

    Args:
        base, tuned: scores of the same images' pairs, shape (N,).
        prompt_ids: (N,) which prompt each pair belongs to (the unit resampled).
        resamples: bootstrap resamples; seed: their RNG seed; level: the intervals' coverage.
    """
    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    prompt_ids = np.asarray(prompt_ids)
    if base.shape != tuned.shape or base.shape != prompt_ids.shape or base.ndim != 1 or len(base) == 0:
        raise ValueError(f"paired_summary: base, tuned and prompt_ids need one equal length, got "
                         f"{base.shape}, {tuned.shape}, {prompt_ids.shape}")
    prompts, inverse = np.unique(prompt_ids, return_inverse=True)
    # Per prompt: number of pairs, sum of differences, sum of wins; a resample reweights prompts by their counts.
    count = np.bincount(inverse, minlength=len(prompts)).astype(float)
    difference = np.bincount(inverse, weights=tuned - base, minlength=len(prompts))
    wins = np.bincount(inverse, weights=(tuned > base) + 0.5 * (tuned == base), minlength=len(prompts))
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(prompts), np.full(len(prompts), 1.0 / len(prompts)), size=resamples).astype(float)
    pairs = draws @ count
    low, high = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(values: np.ndarray) -> list[float]:
        return [float(np.percentile(values, low)), float(np.percentile(values, high))]

    return {
        "num_pairs": int(len(base)),
        "num_prompts": int(len(prompts)),
        "base_mean": float(base.mean()),
        "tuned_mean": float(tuned.mean()),
        "mean_difference": float((tuned - base).mean()),
        "mean_difference_ci": interval(draws @ difference / pairs),
        "win_rate": win_rate(base, tuned),
        "win_rate_ci": interval(draws @ wins / pairs),
        "ci_level": level,
        "resamples": resamples,
    }
