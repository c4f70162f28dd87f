"""The `trl-adaptive` command line.

    trl-adaptive train --config run.yaml [--any_field value ...]   train on preference pairs
    trl-adaptive example [--output_dir DIR]                        the built-in offline example
    trl-adaptive evaluate --model OUT --prompts FILE [--scorers ...]  the tuned model against its base, scored
    trl-adaptive demo [--quick] [--seeds N]                        the flipped-label reproduction on real digits

`train` takes every `AdaptiveDPOConfig` (and so `transformers.TrainingArguments`) field plus the model and dataset
arguments below. Values come from the YAML file given with `--config` and are overridden by flags, through TRL's
`TrlParser`, so a config written for a TRL script reads the same way (an `env:` mapping in the YAML sets
environment variables). Booleans take `true`/`false` as values (`--adaptive false`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Pipeline to train: a local folder or a Hub id loaded with DiffusionPipeline.from_pretrained."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the model."})
    model_variant: str | None = field(default=None, metadata={"help": "Weight variant to load, e.g. `fp16`."})
    lora_rank: int | None = field(
        default=None, metadata={"help": "Train LoRA adapters of this rank on the UNet. Unset: full UNet fine-tuning."}
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (scale alpha / rank). Default: the rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "UNet modules that get adapters. Default: the attention projections to_q to_k to_v to_out.0."},
    )


@dataclass
class DatasetArguments:
    dataset_name: str = field(
        metadata={
            "help": "Preference data: a Hub dataset name, a folder written by Dataset(Dict).save_to_disk, or a "
            "json/jsonl/csv/parquet file. Pick-a-Pic, TRL (prompt/chosen/rejected) and HPDv2 columns are recognised."
        }
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (with --eval_strategy steps/epoch). Unset: no evaluation."}
    )
    dataset_streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the training split as a stream (`datasets.IterableDataset`, `load_dataset(..., streaming=True)`) "
            "instead of downloading and preparing it first. Set max_steps. With cache_dir the stream is read once into "
            "the latent cache (by all processes at once) and training reads the cache; without, training reads the "
            "stream in order (one pass; a resumed run skips the rows already trained on)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})
    flip_rate: float = field(
        default=0.0,
        metadata={"help": "Flip this share of the training labels (synthetic minority, as in the Adaptive-DPO paper)."},
    )
    flip_seed: int | None = field(default=None, metadata={"help": "Seed of the label flips. Default: --seed."})
    judge_scorer: str | None = field(
        default=None,
        metadata={
            "help": "Score both images of every training pair with this reward model before training (a scorer of "
            "trl-adaptive evaluate: pickscore, hpsv2, hpsv2.1, imagereward, aesthetic, clip) into the judge_scores "
            "column that --minority_evidence judge reads; after --flip_rate, so the scores follow their images. Each "
            "process scores the data itself (a stream as it is read): for large datasets, score once with "
            "trl_adaptive.data.add_judge_scores and save_to_disk."
        },
    )
    judge_scorer_path: str | None = field(
        default=None, metadata={"help": "Folder or Hub id of --judge_scorer's weights. Default: the scorer's own."}
    )


def make_train_parser():
    from trl import TrlParser

    from .config import AdaptiveDPOConfig

    return TrlParser((ModelArguments, DatasetArguments, AdaptiveDPOConfig), prog="trl-adaptive train")


def parse_train_args(argv: list[str]):
    """(model_args, dataset_args, AdaptiveDPOConfig) from `--config FILE` and flags (flags win)."""
    return make_train_parser().parse_args_and_config(argv)


def _leave_process_group() -> None:
    """End a multi-process run cleanly: wait for every process, then destroy the process group. A gloo (CPU) process
    then leaves at once: torch's teardown of gloo's threads at interpreter exit sometimes aborts after everything was
    saved ("terminate called without an active exception", about one two-process CPU run in six, even with the group
    destroyed), which would turn a finished run into a failed launch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gloo = dist.get_backend() == "gloo"
    dist.barrier()
    dist.destroy_process_group()
    if gloo:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def train(argv: list[str]):
    """Run `trl-adaptive train` with the given arguments; returns the trainer."""
    from .data import flip_labels, load_preference_data
    from .families import family_for, load_pipeline
    from .trainer import AdaptiveDiffusionDPOTrainer

    model_args, data_args, config = parse_train_args(argv)

    train_dataset = load_preference_data(data_args.dataset_name, data_args.dataset_config, data_args.dataset_train_split,
                                         streaming=data_args.dataset_streaming)
    if data_args.max_train_samples is not None:
        if data_args.dataset_streaming:
            train_dataset = train_dataset.take(data_args.max_train_samples)
        else:
            train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if data_args.flip_rate > 0:
        seed = data_args.flip_seed if data_args.flip_seed is not None else config.seed
        train_dataset = flip_labels(train_dataset, data_args.flip_rate, seed)
    if data_args.judge_scorer:
        from .data import add_judge_scores
        from .evaluation import load_scorer

        judge = load_scorer(data_args.judge_scorer, data_args.judge_scorer_path, device=config.device)
        train_dataset = add_judge_scores(train_dataset, judge, progress=not config.disable_tqdm)
    eval_dataset = None
    if data_args.dataset_test_split:
        eval_dataset = load_preference_data(data_args.dataset_name, data_args.dataset_config, data_args.dataset_test_split)

    load_kwargs = {k: v for k, v in (("revision", model_args.model_revision), ("variant", model_args.model_variant)) if v}
    pipeline = load_pipeline(model_args.model_name_or_path, **load_kwargs)
    peft_config = None
    if model_args.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=model_args.lora_rank,
            lora_alpha=model_args.lora_alpha if model_args.lora_alpha is not None else model_args.lora_rank,
            lora_dropout=model_args.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=model_args.lora_target_modules or list(family_for(pipeline).default_lora_target_modules),
        )

    trainer = AdaptiveDiffusionDPOTrainer(
        model=pipeline, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config
    )
    trainer.base_model_name = model_args.model_name_or_path
    trainer.dataset_name = data_args.dataset_name
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "latest"):
        resume = True  # the newest checkpoint-* folder in output_dir
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model()
    if config.push_to_hub:
        trainer.push_to_hub(dataset_name=data_args.dataset_name)
    if trainer.is_world_process_zero():
        kind = "LoRA weights" if peft_config is not None else "pipeline"
        print(f"Saved the trained {kind} to {config.output_dir}")
    _leave_process_group()
    return trainer


def example(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(
        prog="trl-adaptive example",
        description="Built-in offline example: LoRA Adaptive-DPO on a tiny random pipeline and toy preference pairs.",
    )
    parser.add_argument("--output_dir", "--output-dir", default="trl-adaptive-example", help="Where to write the results.")
    parser.add_argument("--max_steps", "--max-steps", type=int, default=40, help="Optimizer steps.")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    from .examples_builtin import run_tiny_example

    return run_tiny_example(options.output_dir, max_steps=options.max_steps, seed=options.seed)


def evaluate(argv: list[str]) -> dict:
    """`trl-adaptive evaluate`: the tuned model against its base, scored by reward models (docs/evaluation.md)."""
    parser = argparse.ArgumentParser(
        prog="trl-adaptive evaluate",
        description="Generate with a trained model and its base on the same prompts and seeds, score both, and report "
        "each scorer's means, mean difference and win rate against the base with bootstrap 95%% intervals.",
    )
    parser.add_argument("--model", required=True, help="Trained output: a LoRA folder, a pipeline folder or a Hub id.")
    parser.add_argument("--base", help="The base pipeline (folder or Hub id). Default: the one the model card names.")
    parser.add_argument("--prompts", required=True,
                        help="A built-in set (parti: PartiPrompts, 1,632 prompts), a text file (one prompt per line), or a "
                        "dataset (Hub name, save_to_disk folder, data file).")
    parser.add_argument("--prompt-column", help="Dataset column of the prompts (default: caption or prompt).")
    parser.add_argument("--split", default="train", help="Dataset split of the prompts.")
    parser.add_argument("--max-prompts", type=int, default=None, help="Use the first N unique prompts.")
    parser.add_argument("--sample-prompts", type=int, default=None, metavar="N",
                        help="Use N unique prompts drawn at random (seed --first-seed), in the set's order.")
    parser.add_argument("--scorers", default="pickscore,clip",
                        help="Comma-separated: pickscore, clip, aesthetic, hpsv2, hpsv2.1, imagereward.")
    parser.add_argument("--scorer-path", action="append", default=[], metavar="NAME=PATH",
                        help="Local folder, file or Hub id of a scorer's weights (repeatable), e.g. pickscore=/models/pickscore, "
                        "hpsv2=/models/HPS_v2_compressed.pt, imagereward=/models/ImageReward (a folder with ImageReward.pt).")
    parser.add_argument("--aesthetic-head", help="Weights file of the aesthetic MLP head (.pth or .safetensors).")
    parser.add_argument("--seeds-per-prompt", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30, help="Sampling steps.")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="Image size (default: the pipeline's).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resamples", type=int, default=2000, help="Bootstrap resamples of the intervals.")
    parser.add_argument("--output-dir", default="trl-adaptive-eval")
    parser.add_argument("--device", default=None, help="Default: cuda (bf16) when available, else cpu (fp32).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    options = parser.parse_args(argv)
    from .evaluation import GenerationSettings, default_device, load_prompts, load_scorer, markdown_table
    from .evaluation import evaluate as run_evaluation

    paths = dict(item.split("=", 1) for item in options.scorer_path)
    names = [n.strip() for n in options.scorers.split(",") if n.strip()]
    unknown = sorted(set(paths) - set(names))
    if unknown:
        parser.error(f"--scorer-path for scorer(s) not in --scorers: {unknown}")
    device = options.device or default_device()
    scorers = [
        load_scorer(name, paths.get(name), device=device, **({"head": options.aesthetic_head} if name == "aesthetic" else {}))
        for name in names
    ]
    settings = GenerationSettings(options.steps, options.guidance_scale, options.resolution, options.seeds_per_prompt,
                                  options.first_seed)
    prompts = load_prompts(options.prompts, options.prompt_column, options.split, options.max_prompts,
                           options.sample_prompts, options.first_seed)
    report = run_evaluation(options.model, options.base, prompts, scorers, options.output_dir, settings,
                            options.batch_size, device=device, resamples=options.resamples,
                            progress=not options.no_progress)
    print(markdown_table(report["scorers"]))
    print(f"Wrote results.md, results.json and grid.png to {options.output_dir}")
    return report


def demo(argv: list[str]):
    """The README's first command: the paper's flipped-label experiment on scikit-learn's digits (docs/results.md)."""
    from .benchmarks.digits import main as run_digits_benchmark

    return run_digits_benchmark(argv)


COMMANDS = {
    "train": (train, "train a pipeline on preference pairs: trl-adaptive train --config run.yaml [--field value ...]"),
    "example": (example, "built-in offline example: a few LoRA steps on a tiny pipeline, prints where it saved"),
    "evaluate": (evaluate, "score a trained model against its base with reward models: win rates with 95% intervals"),
    "demo": (demo, "the flipped-label reproduction on real digits, offline (--quick: ~1 minute; docs/results.md)"),
}


def usage() -> str:
    lines = ["usage: trl-adaptive <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`trl-adaptive <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # DeepSpeed's launcher puts `--local_rank=N` before the script's own arguments (`deepspeed --module
    # trl_adaptive.cli train ...`); the process's rank is in LOCAL_RANK anyway.
    while argv and argv[0].startswith("--local_rank"):
        argv = argv[2:] if argv[0] == "--local_rank" else argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trl-adaptive: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    COMMANDS[command][0](rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
