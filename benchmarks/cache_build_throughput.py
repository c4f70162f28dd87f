"""Latent-cache build throughput on 1 vs N processes, and whether the caches are byte-identical.

    python benchmarks/cache_build_throughput.py --rows 2000 --repeats 3 --configs 1x1 2x1 1x2

Writes a Pick-a-Pic-format parquet dataset (`trl_adaptive.tiny.write_pickapic_parquet`: JPEG pairs, a tie every
8th row), then for each configuration PROCESSESxTHREADS starts that many processes with `torch.distributed.run`
(gloo; OMP_NUM_THREADS=THREADS each), every one streaming the parquet and building the cache of the tiny random
SD pipeline together (`trl_adaptive.caching.open_or_build_cache`, each process its own blocks). Measured, inside the
processes, between two barriers: the build's wall time and the CPU time of all processes (so process start-up and
model construction are not counted; they are printed apart as "launch"). Every cache is compared file by file with
the first build of the first configuration. Prints one line per run and a table of medians; `--json` writes them.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(options) -> None:
    """One process of a build (started by torch.distributed.run)."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist
    from datasets import load_dataset

    from trl_adaptive import family_for
    from trl_adaptive.caching import open_or_build_cache
    from trl_adaptive.data import prepare_preference_dataset
    from trl_adaptive.tiny import tiny_sd_pipeline

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    family = family_for(tiny_sd_pipeline(seed=0))
    files = sorted(str(p) for p in Path(options.data).glob("*.parquet"))
    stream, _ = prepare_preference_dataset(load_dataset("parquet", data_files={"train": files}, split="train",
                                                        streaming=True))
    if world_size > 1:
        dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    cache = open_or_build_cache(family, stream, options.cache, model_name="tiny", resolution=options.resolution,
                                random_flip=False, batch_size=options.batch, block_rows=options.block_rows,
                                rank=rank, world_size=world_size)
    cpu = time.process_time() - cpu_start
    if world_size > 1:
        dist.barrier()
    wall = time.perf_counter() - start
    cpus = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(cpus, cpu)
    else:
        cpus = [cpu]
    if rank == 0:
        Path(options.report).write_text(json.dumps({
            "wall_s": wall, "cpu_s": sum(cpus), "cpu_s_per_process": cpus, "pairs": len(cache),
            "source_rows": cache.num_source_rows, "folder": cache.folder,
        }))
    if world_size > 1:
        dist.destroy_process_group()


def _identical(a: str, b: str) -> bool:
    files = sorted(os.listdir(a))
    if files != sorted(os.listdir(b)):
        return False
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    return not mismatch and not errors


def run_build(options, processes: int, threads: int, cache: Path, report: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker",
        "--data", str(options.work / "data"), "--cache", str(cache), "--report", str(report),
        "--resolution", str(options.resolution), "--batch", str(options.batch), "--block-rows", str(options.block_rows),
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    measured = json.loads(report.read_text())
    measured["launch_s"] = time.perf_counter() - start - measured["wall_s"]
    return measured


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="Source rows of the parquet dataset (ties included).")
    parser.add_argument("--image-size", type=int, default=64, help="Side of the stored JPEGs (pixels).")
    parser.add_argument("--resolution", type=int, default=32, help="Training resolution the cache is built for.")
    parser.add_argument("--batch", type=int, default=8, help="Encode batch (pairs).")
    parser.add_argument("--block-rows", type=int, default=128, help="Source rows per cache block.")
    parser.add_argument("--configs", nargs="+", default=["1x1", "2x1"], help="PROCESSESxTHREADS to measure.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one, removed).")
    parser.add_argument("--json", type=Path, default=None, help="Write the runs and medians here.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        worker(options)
        return {}
    import tempfile

    sys.path.insert(0, str(REPO))
    from trl_adaptive.tiny import write_pickapic_parquet

    own_work = options.work is None
    options.work = Path(tempfile.mkdtemp(prefix="cache-build-")) if own_work else options.work
    write_pickapic_parquet(str(options.work / "data"), num_rows=options.rows, num_files=4, size=options.image_size)
    print(f"{datetime.date.today()}  {platform.node()}  {os.cpu_count()} CPUs  load average at start "
          f"{os.getloadavg()[0]:.2f}  python {platform.python_version()}")
    print(f"command: python benchmarks/cache_build_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"data: {options.rows} Pick-a-Pic-format rows ({options.image_size}-px JPEG pairs, 1 tie in 8), tiny SD "
          f"pipeline, resolution {options.resolution}, encode batch {options.batch}, blocks of {options.block_rows} rows")
    runs, reference = [], None
    try:
        for repeat in range(options.repeats):
            for config in options.configs:
                processes, threads = (int(v) for v in config.split("x"))
                cache = options.work / f"cache-{config}-{repeat}"
                measured = run_build(options, processes, threads, cache, options.work / "report.json")
                reference = reference or measured["folder"]
                measured.update(config=config, repeat=repeat, identical=_identical(reference, measured["folder"]),
                                pairs_per_s=measured["pairs"] / measured["wall_s"])
                runs.append(measured)
                print(f"  {config:>4} run {repeat}: {measured['pairs']} pairs in {measured['wall_s']:.2f} s = "
                      f"{measured['pairs_per_s']:.1f} pairs/s, CPU {measured['cpu_s']:.2f} s, launch "
                      f"{measured['launch_s']:.1f} s, identical to the first build: {measured['identical']}")
                if measured["folder"] != reference:
                    shutil.rmtree(cache)
    finally:
        if own_work:
            shutil.rmtree(options.work, ignore_errors=True)
    medians = {}
    for config in options.configs:
        mine = [r for r in runs if r["config"] == config]
        medians[config] = {
            "wall_s": statistics.median(r["wall_s"] for r in mine),
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in mine),
            "cpu_s": statistics.median(r["cpu_s"] for r in mine),
            "identical": all(r["identical"] for r in mine),
        }
    base = medians[options.configs[0]]["pairs_per_s"]
    print("\n| processes x threads | median build (s) | pairs/s | speed-up | CPU s (all processes) | byte-identical |")
    print("|---|---|---|---|---|---|")
    for config, m in medians.items():
        print(f"| {config} | {m['wall_s']:.2f} | {m['pairs_per_s']:.1f} | {m['pairs_per_s'] / base:.2f}x | "
              f"{m['cpu_s']:.2f} | {'yes' if m['identical'] else 'NO'} |")
    report = {"runs": runs, "medians": medians, "rows": options.rows}
    if options.json:
        options.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
