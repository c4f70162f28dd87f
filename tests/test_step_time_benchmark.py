"""Smoke test of benchmarks/step_time.py: every case runs on the tiny architecture, FLOPs add up, the report prints."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CONFIGS = os.path.join(os.path.dirname(ROOT), "shared", "model-configs")


@pytest.fixture(scope="module")
def step_time(benchmark_script):
    return benchmark_script("step_time")


def test_tiny_benchmark_runs_every_case(step_time, capsys):
    results = step_time.main(
        ["--batch", "2", "--steps", "2", "--warmup", "1", "--interval", "2", "--rounds", "1", "--rank", "4",
         "--cases", "a,b,b+cache,c+cache,c/seq,d+cache,f,p"]
    )
    assert set(results) == {"a", "b", "b+cache", "c+cache", "c/seq", "d+cache", "f", "p"}
    for r in results.values():
        assert r["num_timed_steps"] == 2 and r["seconds_used"] > 0 and r["flops_per_step"] > 0
    flops = {name: r["flops_per_step"] for name, r in results.items()}
    # Same work, same FLOPs: the reference loop and our uncached plain DPO; batched or sequential annotators.
    assert flops["a"] == pytest.approx(flops["b"], rel=1e-6)
    assert flops["c/seq"] == pytest.approx(flops["c+cache"], rel=1e-6)
    # The minority filter on the training draw's logits adds no UNet pass.
    assert flops["f"] == pytest.approx(flops["b"], rel=1e-6)
    # The contrast filter's training-draw vote adds one reference forward of both images to LoRA's 6 image-passes
    # (policy forward and backward, reference forward), and re-encodes the prompts for the contrast.
    assert 1.3 < flops["p"] / flops["b"] < 1.4
    # Caching removes the VAE and text encoder; two annotators add 4 image-forwards to LoRA's 6 (plus the small
    # LoRA weight-gradient FLOPs of the policy): anything recomputed twice would push the ratio well above 5/3.
    assert flops["b+cache"] < flops["b"]
    assert 1.6 < flops["c+cache"] / flops["b+cache"] < 1.72
    # Interval 2: one refresh step and one cheap step.
    assert flops["d+cache"] == pytest.approx((flops["c+cache"] + flops["b+cache"]) / 2, rel=0.02)
    assert results["c+cache"]["annotator_state_bytes"] == 2 * results["c+cache"]["trainable_param_bytes"]
    out = capsys.readouterr().out
    assert "| case | what |" in out and "(c+cache)/(b+cache)" in out and "reference loop (a)" in out


@pytest.mark.skipif(not os.path.isdir(os.path.join(MODEL_CONFIGS, "sd15")), reason="needs ../shared/model-configs")
def test_flop_arithmetic_of_real_architectures(step_time):
    sd15 = step_time.meta_flops(os.path.join(MODEL_CONFIGS, "sd15"), None)
    assert sd15["resolution"] == 512
    assert sd15["unet_forward"] / 1e12 == pytest.approx(0.80, rel=0.02)  # the figure for SD 1.5 at 512 px
    sdxl = step_time.meta_flops(os.path.join(MODEL_CONFIGS, "sdxl"), None)
    assert sdxl["resolution"] == 1024
    assert sdxl["unet_forward"] / 1e12 == pytest.approx(6.76, rel=0.02)


def test_flop_arithmetic_of_flow_matching_architectures(step_time):
    """The SD3.5 medium and Flux.1-dev configs of benchmarks/model-configs, counted on the meta device."""
    configs = os.path.join(ROOT, "benchmarks", "model-configs")
    sd35 = step_time.meta_flops(os.path.join(configs, "sd35-medium"), None)
    assert sd35["resolution"] == 1024 and sd35["denoiser_parameters"] / 1e9 == pytest.approx(2.24, rel=0.01)
    assert sd35["denoiser_forward"] / 1e12 == pytest.approx(10.78, rel=0.01)
    flux = step_time.meta_flops(os.path.join(configs, "flux1-dev"), 512)
    assert flux["denoiser_parameters"] / 1e9 == pytest.approx(11.90, rel=0.01)  # "12 B"
    assert flux["denoiser_forward"] / 1e12 == pytest.approx(21.50, rel=0.01)
    assert flux["text_encoders"] > 10 * sd35["text_encoders"] / 2  # T5-XXL at 512 tokens dominates the text cost


def test_levers_and_batch_sweep(step_time, tmp_path, capsys, benchmark_script):
    """Each --levers override is timed as its own case beside its base; --batches runs every size and the JSON keeps
    the sweep (what benchmarks/gpu_step_time.sh and gpu_summary.py read)."""
    import json

    path = tmp_path / "sweep.json"
    results = step_time.main(
        ["--batch", "1", "--steps", "2", "--warmup", "1", "--interval", "2", "--rounds", "1", "--rank", "4",
         "--cases", "b", "--levers", "optim='adamw_torch'", "--batches", "1,2",
         "--json", str(path)]
    )
    assert set(results) == {"b", "b[optim='adamw_torch']"}
    assert results["b[optim='adamw_torch']"]["flops_per_step"] == pytest.approx(results["b"]["flops_per_step"])
    saved = json.loads(path.read_text())
    assert set(saved["sweep"]) == {"1", "2"} and saved["settings"]["batch"] == "2"
    out = capsys.readouterr().out
    assert "lever [optim='adamw_torch']" in out and "Batch sweep" in out
    summary_dir = tmp_path / "out"
    summary_dir.mkdir()
    (summary_dir / "sweep-tiny.json").write_text(path.read_text())
    summary = benchmark_script("gpu_summary")
    summary.main([str(summary_dir), "--commit", "abc123"])
    printed = capsys.readouterr().out
    assert "commit abc123" in printed and "best: " in printed


def test_gpu_script_lists_every_part(tmp_path):
    """The one-command GPU run, dry: every part's step_time.py command, in the order and form it would run."""
    import subprocess

    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_step_time.sh"), str(tmp_path)],
                         env={**os.environ, "DRY_RUN": "1", "COMMIT": "test"}, capture_output=True, text=True, check=True)
    commands = [line for line in out.stdout.splitlines() if line.startswith("== ")]
    assert [c.split()[1] for c in commands] == ["sd15-lora", "sd15-full", "sdxl-lora", "sdxl-full", "levers",
                                                "sweep-sd15-lora", "sweep-sd15-full"]
    assert all("--dtype bf16" in c for c in commands) and "torch_compile=True" in commands[4]
    assert "commit test" in out.stdout
