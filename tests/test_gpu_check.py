"""The GPU check script: its CPU smoke test runs end to end, and it builds the real architectures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
MODEL_CONFIGS = REPO.parent / "shared" / "model-configs"


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_case(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = tmp_path / "check.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--json", str(out), "--output-dir", str(tmp_path / "runs")]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    cases = {(r["case"], r["adaptive"]) for r in report["results"]}
    expected = {"sd15-lora", "sd15-full", "sdxl-lora", "sdxl-full-zero2", "sd35-lora", "flux-lora"}
    assert cases == {(name, adaptive) for name in expected for adaptive in (False, True)}
    for row in report["results"]:
        assert row["timed_steps"] == 2 and row["step_s"] > 0 and row["pairs_per_s"] > 0
    # The printed table has one row per case.
    assert sum(line.startswith(("| sd", "| flux")) for line in result.stdout.splitlines()) == 12


@pytest.mark.skipif(not MODEL_CONFIGS.is_dir(), reason="real model configs not beside the checkout")
@pytest.mark.parametrize("model, resolution, params_m, tflop", [("sd15", 512, 860, 0.80), ("sdxl", 1024, 2567, 6.76)])
def test_gpu_check_builds_real_architectures_and_counts_their_flops(model, resolution, params_m, tflop):
    """On the meta device (no memory, no GPU): the builder reads the real configs and tokenizers, and the FLOP count
    of one UNet forward matches the figures used for MFU."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_check import unet_forward_tflop

    from trl_adaptive.tiny import random_pipeline

    pipeline = random_pipeline(str(MODEL_CONFIGS / model), "meta")
    assert round(sum(p.numel() for p in pipeline.unet.parameters()) / 1e6) == params_m
    assert pipeline.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert unet_forward_tflop(pipeline, resolution, "meta", torch.bfloat16) == pytest.approx(tflop, rel=0.01)


@pytest.mark.parametrize("model, params_m, tflop", [("sd35-medium", 2243, 10.78), ("flux1-dev", 11901, 74.38)])
def test_gpu_check_builds_the_flow_matching_architectures(model, params_m, tflop):
    """The SD3.5 / Flux configs shipped in benchmarks/model-configs, built on the meta device with stand-in
    tokenizers: parameter count, and the transformer forward counted through the family's own call."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_check import unet_forward_tflop

    from trl_adaptive.tiny import random_pipeline

    pipeline = random_pipeline(str(REPO / "benchmarks" / "model-configs" / model), "meta")
    assert round(sum(p.numel() for p in pipeline.transformer.parameters()) / 1e6) == params_m
    assert unet_forward_tflop(pipeline, 1024, "meta", torch.bfloat16) == pytest.approx(tflop, rel=0.01)
