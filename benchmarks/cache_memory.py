"""Host memory of training from a large latent cache: a synthetic cache of N pairs of tiny latents, read in full.

    python benchmarks/cache_memory.py --pairs 50000

Writes a cache in the library's own layout (`trl_adaptive.caching`: blocks of 1024 pairs, 4x8x8 bf16 posterior mean
and std per image (`--latent-side`), one text row per 10 pairs), opens it as training does (`CachedPreferenceDataset`), and reads every
pair once through a `DataLoader` with the Trainer's sampler (`RandomSampler`, shuffled) sharded for `--rank` of
`--world-size` by accelerate's `BatchSamplerShard`, collated by `CachedPreferenceCollator`. Prints the process's
resident memory from /proc/self/status before opening, after opening and at its peak while reading, split into
anonymous memory (the process's own: what stays bounded) and file-backed pages (the memory maps of the shards: page
cache, shared between processes and given back under pressure). `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def memory() -> dict[str, float]:
    """Resident memory of this process in MiB: total, anonymous, file-backed (Linux /proc/self/status)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def write_synthetic_cache(folder: str, pairs: int, block_rows: int = 1024, pairs_per_prompt: int = 10,
                          latent_side: int = 8) -> str:
    """A complete cache of `pairs` pairs (random tiny latents) in the layout `build_cache` writes; returns it."""
    import torch

    from trl_adaptive.caching import _save_json, _save_tensors, commit_cache

    partial = f"{folder}.partial"
    os.makedirs(partial)
    generator = torch.Generator().manual_seed(0)
    records = []
    for k, start in enumerate(range(0, pairs, block_rows)):
        n = min(block_rows, pairs - start)
        tensors = {f"{side}.{stat}": torch.randn(n, 4, latent_side, latent_side, generator=generator).to(torch.bfloat16)
                   for side in ("chosen", "rejected") for stat in ("mean", "std")}
        tensors["row_index"] = torch.arange(start, start + n)
        for name in ("original_size_chosen", "original_size_rejected"):
            tensors[name] = torch.full((n, 2), 512)
        for name in ("crop_top_left_chosen", "crop_top_left_rejected"):
            tensors[name] = torch.zeros(n, 2, dtype=torch.long)
        file = f"rows-{k:05d}.safetensors"
        _save_tensors(tensors, os.path.join(partial, file))
        prompts = [f"synthetic prompt {(start + i) // pairs_per_prompt}" for i in range(n)]
        records.append({"block": k, "rows": n, "file": file, "prompts": prompts})
        _save_json(records[-1], os.path.join(partial, f"rows-{k:05d}.json"))
    unique = list(dict.fromkeys(p for r in records for p in r["prompts"])) + [""]
    for j, start in enumerate(range(0, len(unique), block_rows)):
        n = len(unique[start : start + block_rows])
        _save_tensors({"prompt_embeds": torch.randn(n, 8, 32, generator=generator).to(torch.bfloat16)},
                      os.path.join(partial, f"text-{j:05d}.safetensors"))
    commit_cache(partial, folder, {"synthetic": pairs}, records, unique, num_source_rows=pairs, block_rows=block_rows)
    return folder


def read_everything(folder: str, batch_size: int, rank: int, world_size: int) -> dict:
    import torch
    from accelerate.data_loader import BatchSamplerShard

    from trl_adaptive.caching import CachedPreferenceCollator, CachedPreferenceDataset

    before = memory()
    dataset = CachedPreferenceDataset(folder)
    collator = CachedPreferenceCollator(dataset.empty_prompt_text(), random_flip=False, empty_prompt_probability=0.1)
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    batches = BatchSamplerShard(torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False),
                                num_processes=world_size, process_index=rank)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collator, num_workers=0)
    opened = memory()
    peak = dict(opened)
    pairs, start = 0, time.perf_counter()
    for step, batch in enumerate(loader):
        pairs += len(batch["prompts"])
        if step % 20 == 0:
            now = memory()
            peak = {k: max(peak[k], now[k]) for k in peak}
    seconds = time.perf_counter() - start
    after = memory()
    peak = {k: max(peak[k], after[k]) for k in peak}
    return {
        "pairs_in_cache": len(dataset), "pairs_read": pairs, "seconds": seconds,
        "before_open_mib": before, "after_open_mib": opened, "peak_mib": peak, "end_mib": after,
        "anon_growth_mib": peak["RssAnon"] - before["RssAnon"],
        "file_backed_growth_mib": peak["RssFile"] - before["RssFile"],
        "prompt_index_mib": dataset.prompt_index.numel() * 8 / 2**20,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50000)
    parser.add_argument("--latent-side", type=int, default=8, help="Latents are 4 x SIDE x SIDE (bf16).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args(argv)
    import torch  # noqa: F401  (imported before the baseline, as in a training process)
    import accelerate  # noqa: F401

    work = tempfile.mkdtemp(prefix="cache-memory-")
    try:
        start = time.perf_counter()
        folder = write_synthetic_cache(os.path.join(work, "cache"), options.pairs, latent_side=options.latent_side)
        written = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
        report = read_everything(folder, options.batch_size, options.rank, options.world_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.update(cache_mib=size, write_seconds=written, rank=options.rank, world_size=options.world_size)
    print(f"synthetic cache: {report['pairs_in_cache']} pairs, {size:.0f} MiB on disk, written in {written:.1f} s")
    print(f"process {options.rank} of {options.world_size} read {report['pairs_read']} pairs in {report['seconds']:.1f} s "
          f"(batches of {options.batch_size}, shuffled, RandomSampler sharded by BatchSamplerShard)")
    print("resident memory (MiB)   before open  after open  peak reading   growth")
    for name, label in (("RssAnon", "anonymous"), ("RssFile", "file-backed")):
        print(f"  {label:<20} {report['before_open_mib'][name]:>10.1f} {report['after_open_mib'][name]:>11.1f} "
              f"{report['peak_mib'][name]:>12.1f} {report['peak_mib'][name] - report['before_open_mib'][name]:>8.1f}")
    if options.json:
        options.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
