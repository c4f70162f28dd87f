"""The cache benchmarks in tiny form: build throughput on 1 vs 2 processes (byte-identical caches) and the host
memory of reading a large cache (benchmarks/cache_build_throughput.py, benchmarks/cache_memory.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny_setup import REPO_ROOT

pytestmark = pytest.mark.slow


def test_cache_build_benchmark_measures_one_and_two_processes(tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from cache_build_throughput import main

    report = main(["--rows", "64", "--repeats", "1", "--configs", "1x1", "2x1", "--block-rows", "16",
                   "--json", str(tmp_path / "report.json")])
    printed = capsys.readouterr().out
    assert "| 2x1 |" in printed and "command: python benchmarks/cache_build_throughput.py" in printed
    one, two = (next(r for r in report["runs"] if r["config"] == c) for c in ("1x1", "2x1"))
    assert one["pairs"] == two["pairs"] == 64 - 8  # a tie every 8th row, dropped
    assert len(two["cpu_s_per_process"]) == 2 and all(cpu > 0 for cpu in two["cpu_s_per_process"])
    assert two["identical"] and report["medians"]["2x1"]["identical"]  # the 2-process cache has the same bytes
    assert one["pairs_per_s"] > 0 and two["pairs_per_s"] > 0
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == 64


def test_reading_a_large_cache_keeps_host_memory_bounded(tmp_path):
    """10k pairs of 4x16x16 latents (80 MiB of latents read): the process's own (anonymous) memory grows by far less
    than what it read; the memory maps' pages are file-backed. benchmarks/cache_memory.py --pairs 50000 is the
    measurement in docs/caching.md."""
    out = tmp_path / "memory.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "cache_memory.py"), "--pairs", "10000",
                    "--latent-side", "16", "--json", str(out)], env=env, check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["pairs_in_cache"] == 10000 and report["pairs_read"] >= 10000
    latents_read_mib = report["pairs_read"] * 4 * (4 * 16 * 16 * 2) / 2**20
    assert latents_read_mib > 75
    assert report["anon_growth_mib"] < 40, report  # a reader that kept what it read would exceed 75
    assert report["cache_mib"] > latents_read_mib * 0.9
