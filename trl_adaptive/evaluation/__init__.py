"""Did preference tuning help? Generate with the tuned model and its base on the same prompts and seeds, score both
with the field's reward models, and report each scorer's means, mean paired difference and win rate against the
base with bootstrap 95% intervals (docs/evaluation.md).

    from trl_adaptive.evaluation import evaluate
    report = evaluate("sd15-adaptive-dpo", base="stable-diffusion-v1-5/stable-diffusion-v1-5",
                      prompts=["a red bicycle", ...], scorers=["pickscore", "clip"], output_dir="eval")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .generation import GenerationSettings, base_model_from_card, comparison_grid, generate, load_for_generation
from .scorers import SCORERS, Scorer, load_scorer
from .stats import paired_summary, win_rate

__all__ = ["BUILTIN_PROMPT_SETS", "GenerationSettings", "SCORERS", "Scorer", "compare", "default_device", "evaluate",
           "load_prompts", "load_scorer", "markdown_table", "paired_summary", "score_images", "win_rate"]


def default_device() -> str:
    """CUDA when available (generation in bf16 there), else the CPU (float32)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


#: Prompt sets shipped with the library (trl_adaptive/evaluation/prompts/README.md: sources and licences).
BUILTIN_PROMPT_SETS = {"parti": ("PartiPrompts.tsv", "Prompt")}


def _builtin_prompts(name: str) -> list[str]:
    import csv

    filename, column = BUILTIN_PROMPT_SETS[name]
    with open(Path(__file__).parent / "prompts" / filename, newline="", encoding="utf-8") as f:
        return [row[column] for row in csv.DictReader(f, delimiter="\t")]


def load_prompts(source, column: str | None = None, split: str = "train", max_prompts: int | None = None,
                 sample: int | None = None, sample_seed: int = 0) -> list[str]:
    """Prompts from a list, a built-in set (`BUILTIN_PROMPT_SETS`: ``parti``), a text file (one per line), or a
    dataset (Hub name, `save_to_disk` folder or data file) column (`column`, default ``caption`` or ``prompt``);
    unique, in first-seen order; the first `max_prompts`, or a random `sample` of that many (seeded by `sample_seed`,
    kept in the set's order: PartiPrompts is sorted by category, so its first N are all of one kind)."""
    if isinstance(source, (list, tuple)):
        prompts = list(source)
    elif str(source) in BUILTIN_PROMPT_SETS:
        prompts = _builtin_prompts(str(source))
    elif str(source).endswith(".txt"):
        prompts = [line.strip() for line in Path(source).read_text().splitlines() if line.strip()]
    else:
        from ..data import load_preference_data

        data = load_preference_data(str(source), split=split)
        column = column or next((c for c in ("caption", "prompt") if c in data.column_names), None)
        if column is None or column not in data.column_names:
            raise ValueError(f"prompt column {column!r} not in {source} (columns: {data.column_names}); pass column=")
        prompts = [p for p in data[column] if isinstance(p, str) and p.strip()]
    prompts = list(dict.fromkeys(prompts))
    if sample is not None:
        keep = np.random.default_rng(sample_seed).choice(len(prompts), size=min(sample, len(prompts)), replace=False)
        prompts = [prompts[i] for i in sorted(keep)]
    prompts = prompts[:max_prompts]
    if not prompts:
        raise ValueError(f"no prompts in {source!r}")
    return prompts


def score_images(scorer: Scorer, images: list, prompts: list[str], batch_size: int, desc: str = "Scoring",
                 progress: bool = True) -> np.ndarray:
    """`scorer`'s score of every image (PIL images or paths of image files) against its prompt, in batches."""
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
        batch = [Image.open(i).convert("RGB") if isinstance(i, (str, Path)) else i for i in images[start : start + batch_size]]
        scores.append(scorer.score(batch, prompts[start : start + batch_size]))
    return torch.cat(scores).numpy()


def compare(scorers: list[Scorer], base_images: list, tuned_images: list, prompts: list[str], prompt_ids,
            batch_size: int = 4, resamples: int = 2000, progress: bool = True) -> tuple[dict, dict]:
    """Score the base and tuned images of the same prompts and seeds (image i of each is a pair) with every scorer:
    ``({scorer: paired_summary}, {scorer: {"base": scores, "tuned": scores}})``. `prompt_ids` groups the pairs by
    prompt for the bootstrap. The digits benchmark rates its runs through this too, its rater as the scorer."""
    summaries, per_image = {}, {}
    for scorer in scorers:
        scores = {role: score_images(scorer, images, prompts, batch_size, f"Scoring ({scorer.name}, {role})", progress)
                  for role, images in (("base", base_images), ("tuned", tuned_images))}  # fmt: skip
        summaries[scorer.name] = paired_summary(scores["base"], scores["tuned"], prompt_ids, resamples=resamples)
        per_image[scorer.name] = scores
    return summaries, per_image


def markdown_table(summaries: dict[str, dict]) -> str:
    level = next(iter(summaries.values()))["ci_level"]
    lines = [
        f"| scorer | base mean | tuned mean | tuned - base [{level:.0%} CI] | win rate vs base [{level:.0%} CI] | pairs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summaries.items():
        low, high = s["mean_difference_ci"]
        wlow, whigh = s["win_rate_ci"]
        lines.append(
            f"| {name} | {s['base_mean']:.4f} | {s['tuned_mean']:.4f} | {s['mean_difference']:+.4f} [{low:+.4f}, "
            f"{high:+.4f}] | {s['win_rate']:.1%} [{wlow:.1%}, {whigh:.1%}] | {s['num_pairs']} ({s['num_prompts']} prompts) |"
        )
    return "\n".join(lines) + "\n"


def evaluate(
    model: str,
    base: str | None = None,
    prompts=None,
    scorers=("pickscore", "clip"),
    output_dir: str = "trl-adaptive-eval",
    settings: GenerationSettings | None = None,
    batch_size: int = 4,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    resamples: int = 2000,
    progress: bool = True,
) -> dict:
    """Generate with `model` (a LoRA folder, a full pipeline folder or a Hub id) and `base` (default: the base model
    its model card names), score both, and write ``results.json``, ``results.md`` and ``grid.png`` to `output_dir`.

    `scorers`: names (`SCORERS`) or `Scorer` objects, or a dict name -> local path / Hub id. `device` and `dtype`
    default to CUDA in bf16 when available, else CPU in float32. Returns what results.json holds.
    """
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    settings = settings or GenerationSettings()
    base = base or base_model_from_card(model)
    if base is None:
        raise ValueError(f"no base model given and none named in {model}/README.md: pass base=")
    prompts = load_prompts(prompts if prompts is not None else [])
    out = Path(output_dir)
    if isinstance(scorers, dict):
        scorers = [load_scorer(name, path, device=device) for name, path in scorers.items()]
    else:
        scorers = [s if isinstance(s, Scorer) else load_scorer(s, device=device) for s in scorers]

    images, scheduler_config = {}, None
    for role, name in (("base", base), ("tuned", model)):
        pipeline = load_for_generation(name, base if role == "tuned" else None, device, dtype)
        scheduler_config = scheduler_config or pipeline.scheduler.config
        images[role] = generate(pipeline, prompts, out / "images" / role, settings, batch_size, scheduler_config,
                                desc=f"Generating ({role})", progress=progress)
        del pipeline
    image_prompts = [p for p in prompts for _ in range(settings.seeds_per_prompt)]
    prompt_ids = np.repeat(np.arange(len(prompts)), settings.seeds_per_prompt)

    summaries, scores = compare(scorers, images["base"], images["tuned"], image_prompts, prompt_ids, batch_size,
                                resamples, progress)
    per_image = {name: {role: s.tolist() for role, s in by_role.items()} for name, by_role in scores.items()}

    report = {
        "model": model, "base": base, "settings": settings.__dict__, "num_prompts": len(prompts),
        "scorers": summaries, "per_image": per_image, "prompts": prompts,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(
        f"# {model} against {base}\n\n{len(prompts)} prompts x {settings.seeds_per_prompt} seeds, "
        f"{settings.num_inference_steps} steps, guidance {settings.guidance_scale}\n\n" + markdown_table(summaries)
    )
    comparison_grid(images["base"], images["tuned"]).save(out / "grid.png")
    return report
