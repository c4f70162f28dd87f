"""The held-out evaluation of a seed (prompts of the evaluation template, fixed noise, the base model's images and
rewards) and rating a fine-tuned UNet on it, through `trl_adaptive.evaluation` with the rater as its scorer."""

from __future__ import annotations

import numpy as np
import torch

from .base_model import encode_prompts, sample_images
from ...evaluation import compare, score_images
from .rater import DigitRater, DigitRaterScorer, to_uint8
from .settings import DIGIT_WORDS, EVAL_TEMPLATE, BenchmarkSettings


def prompt_set(template: str, per_class: int):
    digits = np.repeat(np.arange(10), per_class)
    return digits, [template.format(DIGIT_WORDS[d]) for d in digits]


def as_pil(images_uint8: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(image, mode="L") for image in images_uint8]


def evaluation_set(base, rater: DigitRater, settings: BenchmarkSettings, seed: int, scorer=None,
                   extra_scorers: tuple = ()) -> dict:
    """The held-out evaluation of `seed`, shared by all its runs: prompts of the evaluation template, initial noise
    seeded apart from the pairs', and the base model's images of them with their rewards.

    `scorer`: the scorer the runs are rated by (default: the fidelity rater `rater` as a `DigitRaterScorer`);
    `extra_scorers`: scorers reported beside it (the style rater's runs report their prompt fidelity)."""
    digits, prompts = prompt_set(EVAL_TEMPLATE, settings.eval_samples_per_class)
    embeds = encode_prompts(base, prompts)
    noise = torch.randn((len(prompts), 3, 8, 8), generator=torch.Generator().manual_seed(30_000 + seed))
    base_images = to_uint8(sample_images(base.unet, base.scheduler.config, embeds, noise, settings.sampling_steps))
    scorer = scorer if scorer is not None else DigitRaterScorer(rater)
    return dict(embeds=embeds, noise=noise, digits=digits, prompts=prompts, base_images=base_images, scorer=scorer,
                extra_scorers=tuple(extra_scorers),
                base_rewards=score_images(scorer, as_pil(base_images), prompts, len(prompts), progress=False),
                rater=rater, scheduler_config=dict(base.scheduler.config))


def sample_unet(unet, evaluation: dict, settings: BenchmarkSettings) -> np.ndarray:
    """The evaluation prompts and noise sampled with a (fine-tuned) UNet, as grey uint8 images."""
    return to_uint8(sample_images(unet, evaluation["scheduler_config"], evaluation["embeds"], evaluation["noise"],
                                  settings.sampling_steps))


def rate_unet(unet, evaluation: dict, settings: BenchmarkSettings) -> tuple[np.ndarray, np.ndarray]:
    """Sample the evaluation prompts and noise with a (fine-tuned) UNet; returns the images and their rewards."""
    images = sample_unet(unet, evaluation, settings)
    return images, score_images(evaluation["scorer"], as_pil(images), evaluation["prompts"], len(images), progress=False)


def compare_to_base(images: np.ndarray, evaluation: dict) -> dict:
    """A run's images against the base model's, as `trl-adaptive evaluate` compares a tuned model to its base: the
    rater's paired summary (means, win rate, prompt-level bootstrap intervals)."""
    scorer, extra = evaluation["scorer"], evaluation.get("extra_scorers", ())
    summaries, _ = compare([scorer, *extra], as_pil(evaluation["base_images"]), as_pil(images),
                           evaluation["prompts"], evaluation["digits"], batch_size=len(images), progress=False)
    summary = summaries[scorer.name]
    if extra:  # the other raters' means, e.g. the prompt fidelity of a style-rated run (reward hacking shows there)
        summary = {**summary, "other_rewards": {s.name: {"base": summaries[s.name]["base_mean"],
                                                         "tuned": summaries[s.name]["tuned_mean"]} for s in extra}}
    return summary
