"""Training from a streamed Pick-a-Pic-format parquet dataset through the latent cache, on 1 or 2 processes.

Launched by tests/test_streaming.py with `accelerate launch --num_processes 2` (or imported, for the one-process
build). Kept out of pytest's collection (no `test_` prefix).

    python tests/streaming_worker.py --data DIR --cache DIR --out DIR [--build-only]

Every process reads the stream; together they build the cache (each its own blocks), then train 4 steps with a
checkpoint at step 2, then a fresh trainer resumes from that checkpoint and trains steps 3-4 again. Each process
writes the rows it was given per step and the error it saw when process 1 failed a build step (``rows-<rank>.json``);
the main process writes ``result.json`` (cache folder, largest difference between the uninterrupted and the resumed
LoRA weights).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_flush_denormal(True)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
BATCH = 2  # per process; also the cache build's batch (the cache's bytes depend on it, not on the process count)
BLOCK_ROWS = 32
FLIP_RATE = 0.2


def stream(data_dir: str):
    """The parquet files of `data_dir` as a `datasets.IterableDataset`, labels of FLIP_RATE of the pairs flipped."""
    from datasets import load_dataset

    from trl_adaptive.data import flip_labels

    files = sorted(glob.glob(os.path.join(data_dir, "*.parquet")))
    return flip_labels(load_dataset("parquet", data_files={"train": files}, split="train", streaming=True), FLIP_RATE, seed=0)


def make_trainer(data_dir: str, cache_dir: str, output_dir: str, max_steps: int = 4):
    from peft import LoraConfig

    from trl_adaptive import AdaptiveDiffusionDPOTrainer, AdaptiveDPOConfig
    from trl_adaptive.tiny import tiny_sd_pipeline

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    args = AdaptiveDPOConfig(
        output_dir=output_dir, resolution=32, per_device_train_batch_size=BATCH, max_steps=max_steps,
        learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=2, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=0, annotator_decays=[0.9, 0.5],
        cache_dir=cache_dir, cache_block_rows=BLOCK_ROWS, use_cpu=True,
        ddp_backend="gloo" if world_size > 1 else None,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights="gaussian")
    return AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=args, train_dataset=stream(data_dir),
                                       peft_config=lora)


class RecordingCollator:
    """The trainer's collator, noting the row ids of every batch it makes."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __call__(self, rows):
        batch = self.inner(rows)
        self.rows.append(batch["row_index"].tolist())
        return batch


def _lora_weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _error_met_by_process_1(rank: int) -> str | None:
    """What each process sees when process 1 meets a bad row during a cache build step (`caching._together`): the
    error, on every process, instead of process 0 waiting for process 1 forever."""
    from trl_adaptive.caching import _together

    def step():
        if rank == 1:
            raise ValueError("row 5, column 'jpg_1': cannot decode image")
        return "fine"

    try:
        _together(step, int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as err:
        return str(err)
    return None


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--build-only", action="store_true")
    options = parser.parse_args()
    rank = int(os.environ.get("RANK", 0))
    runs = {}
    for label, resume in (("uninterrupted", None), ("resumed", os.path.join(options.out, "run", "checkpoint-2"))):
        trainer = make_trainer(options.data, options.cache, os.path.join(options.out, "run"))
        if options.build_only:
            break
        trainer.data_collator = recorder = RecordingCollator(trainer.data_collator)
        trainer.train(resume_from_checkpoint=resume)
        runs[label] = {"weights": _lora_weights(trainer), "rows": recorder.rows}
        cache_folder = trainer.train_dataset.folder
        del trainer
        _reset_accelerate()
    if not options.build_only:
        record = {k: v["rows"] for k, v in runs.items()}
        record["error_from_other_process"] = _error_met_by_process_1(rank)
        Path(options.out, f"rows-{rank}.json").write_text(json.dumps(record))
        if rank == 0:
            a, b = runs["uninterrupted"]["weights"], runs["resumed"]["weights"]
            result = {
                "cache_folder": cache_folder,
                "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                "resumed_vs_uninterrupted": max(float((a[n] - b[n]).abs().max()) for n in a),
            }
            Path(options.out, "result.json").write_text(json.dumps(result))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/distributed_worker.py: torch's CPU teardown of two gloo processes sometimes aborts


if __name__ == "__main__":
    main()
