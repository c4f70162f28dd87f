"""The held-out evaluation of a seed (prompts of the evaluation template, fixed noise, the base model's images and
rewards) and rating a fine-tuned UNet on it."""

from __future__ import annotations

import numpy as np
import torch

from .base_model import encode_prompts, sample_images
from .rater import DigitRater, to_uint8
from .settings import DIGIT_WORDS, EVAL_TEMPLATE, BenchmarkSettings


def prompt_set(template: str, per_class: int):
    digits = np.repeat(np.arange(10), per_class)
    return digits, [template.format(DIGIT_WORDS[d]) for d in digits]


def evaluation_set(base, rater: DigitRater, settings: BenchmarkSettings, seed: int) -> dict:
    """The held-out evaluation of `seed`, shared by all its runs: prompts of the evaluation template, initial noise
    seeded apart from the pairs', and the base model's images of them with their rewards."""
    digits, prompts = prompt_set(EVAL_TEMPLATE, settings.eval_samples_per_class)
    embeds = encode_prompts(base, prompts)
    noise = torch.randn((len(prompts), 3, 8, 8), generator=torch.Generator().manual_seed(30_000 + seed))
    base_images = to_uint8(sample_images(base.unet, base.scheduler.config, embeds, noise, settings.sampling_steps))
    return dict(embeds=embeds, noise=noise, digits=digits, base_images=base_images,
                base_rewards=rater.rewards(base_images, digits), rater=rater, scheduler_config=dict(base.scheduler.config))


def rate_unet(unet, evaluation: dict, settings: BenchmarkSettings) -> tuple[np.ndarray, np.ndarray]:
    """Sample the evaluation prompts and noise with a (fine-tuned) UNet; returns the images and their rewards."""
    images = to_uint8(sample_images(unet, evaluation["scheduler_config"], evaluation["embeds"], evaluation["noise"],
                                    settings.sampling_steps))
    return images, evaluation["rater"].rewards(images, evaluation["digits"])
