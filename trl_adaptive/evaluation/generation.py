"""Images of a trained model and of its base on the same prompts, seeds, scheduler, steps and guidance.

Generated images are written as PNGs under ``<output_dir>/images/<role>/`` as they are made, so an interrupted
evaluation resumes where it stopped and a second scoring pass costs no generation; the settings that made them are
stored beside them and a run with other settings refuses to mix its images with theirs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..trainer import LORA_WEIGHTS_NAME


@dataclass(frozen=True)
class GenerationSettings:
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    resolution: int | None = None  # None: the pipeline's default size
    seeds_per_prompt: int = 1
    first_seed: int = 0


def base_model_from_card(folder: str) -> str | None:
    """The `base_model` a trl-adaptive model card names (its metadata, or the card's text for a local base)."""
    card = Path(folder, "README.md")
    if not card.is_file():
        return None
    text = card.read_text()
    match = re.search(r"^base_model:\s*(\S+)\s*$", text, re.M) or re.search(r"from_pretrained\('([^']+)'\)", text)
    return match.group(1).strip("'\"") if match else None


def load_for_generation(model: str, base: str | None, device, dtype):
    """A pipeline ready to generate: a LoRA folder is loaded onto its base; anything else (a full pipeline folder or a
    Hub id) by `from_pretrained`."""
    from ..families import load_pipeline

    if os.path.isfile(os.path.join(model, LORA_WEIGHTS_NAME)):
        if base is None:
            raise ValueError(f"{model} holds LoRA weights: give the pipeline they were trained on (--base)")
        pipeline = load_pipeline(base)
        pipeline.load_lora_weights(model)
    else:
        pipeline = load_pipeline(model)
    pipeline.to(device=device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image_path(folder: Path, prompt_index: int, seed: int) -> Path:
    return folder / f"{prompt_index:05d}-seed{seed}.png"


def generate(pipeline, prompts: list[str], folder: Path, settings: GenerationSettings, batch_size: int = 4,
             scheduler_config=None, desc: str = "Generating", progress: bool = True) -> list[Path]:
    """Images for every (prompt, seed), generated in batches with one seeded generator per image; files already in
    `folder` from the same settings are kept. Returns the paths in (prompt, seed) order."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = folder / "settings.json"
    wanted = {**asdict(settings), "prompts": prompts}
    if stored.is_file() and json.loads(stored.read_text()) != wanted:
        raise ValueError(f"{folder} holds images generated with other settings or prompts; use another output_dir")
    if not stored.is_file():
        stored.write_text(json.dumps(wanted, indent=1))
    if scheduler_config is not None:  # the same sampler for both models
        pipeline.scheduler = type(pipeline.scheduler).from_config(scheduler_config)
    jobs = [(i, settings.first_seed + s) for i in range(len(prompts)) for s in range(settings.seeds_per_prompt)]
    todo = [job for job in jobs if not image_path(folder, *job).is_file()]
    size = {} if settings.resolution is None else {"height": settings.resolution, "width": settings.resolution}
    device = pipeline.device
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not progress or not todo):
        batch = todo[start : start + batch_size]
        generators = [torch.Generator(device=device).manual_seed(seed) for _, seed in batch]
        images = pipeline(
            [prompts[i] for i, _ in batch], generator=generators, num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale, **size,
        ).images  # fmt: skip
        for (i, seed), image in zip(batch, images):
            image.save(image_path(folder, i, seed))
    return [image_path(folder, *job) for job in jobs]


def comparison_grid(base: list[Path], tuned: list[Path], columns: int = 8) -> Image.Image:
    """The first `columns` images of each model side by side: base on top, tuned below (same prompt and seed)."""
    pairs = list(zip(base, tuned))[:columns]
    first = Image.open(pairs[0][0])
    width, height = first.size
    grid = Image.new("RGB", (width * len(pairs), height * 2), "white")
    for k, (b, t) in enumerate(pairs):
        grid.paste(Image.open(b).convert("RGB"), (k * width, 0))
        grid.paste(Image.open(t).convert("RGB"), (k * width, height))
    return grid
