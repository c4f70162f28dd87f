"""DeepSpeed ZeRO-2/3 and multi-process runs on CPU, in subprocesses (see `distributed_worker.py`).

The first DeepSpeed start compiles a small C++ communication op (~30-90 s, cached under ~/.cache/torch_extensions);
the one-process DeepSpeed test runs first so that the two-process launches reuse the build.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_worker import COMPARED_PREFIXES

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKER = str(TESTS / "distributed_worker.py")
CONFIGS = REPO / "examples" / "accelerate_configs"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def _run(command: list[str], env: dict[str, str], timeout: int = 600) -> None:
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


def _launch(config: str, out: Path, batch: int, num_processes: int, **env) -> dict:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / config),
        "--num_processes", str(num_processes),
        "--mixed_precision", "no",
        "--main_process_port", str(_free_port()),
        WORKER, "run", "--out", str(out), "--batch", str(batch),
    ]  # fmt: skip
    _run(command, _environment(**env))
    return json.loads((out / "result.json").read_text())


def test_example_configs_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    zero2 = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    zero3 = load_config_from_file(str(CONFIGS / "deepspeed_zero3.yaml"))
    ddp = load_config_from_file(str(CONFIGS / "multi_gpu.yaml"))
    assert (zero2.distributed_type, zero2.deepspeed_config["zero_stage"]) == ("DEEPSPEED", 2)
    assert (zero3.distributed_type, zero3.deepspeed_config["zero_stage"]) == ("DEEPSPEED", 3)
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is True  # save_model() needs the gathered weights
    assert zero3.deepspeed_config["zero3_init_flag"] is False  # no zero.Init for models a script builds
    assert ddp.distributed_type == "MULTI_GPU"
    for config in (zero2, zero3):  # no DeepSpeed optimizer: the Trainer builds AdamW (no fused-Adam build)
        assert "deepspeed_config_file" not in config.deepspeed_config
    # The JSONs for the `deepspeed` launcher / `--deepspeed` (used by the one-process tests below).
    for stage in (2, 3):
        ds = json.loads((CONFIGS / f"ds_zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert "optimizer" not in ds and "scheduler" not in ds
        # "auto" bucket sizes would need model.config.hidden_size, which a UNet does not have.
        assert not any(v == "auto" for v in ds["zero_optimization"].values())
    assert json.loads((CONFIGS / "ds_zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ]


@pytest.fixture(scope="module")
def deepspeed_report(tmp_path_factory) -> dict:
    """ZeRO-2 and ZeRO-3 checks run once in one process (DeepSpeed's CPU accelerator, one-process rendezvous)."""
    out = tmp_path_factory.mktemp("deepspeed")
    env = _environment(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))  # fmt: skip
    _run([sys.executable, WORKER, "deepspeed", "--out", str(out)], env, timeout=900)
    return json.loads((out / "deepspeed.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_deepspeed_trains_and_saves(deepspeed_report, stage, kind):
    entry = deepspeed_report[f"zero{stage}_{kind}"]
    assert entry["zero_stage"] == stage
    # The annotators are sharded exactly when the weights are (ZeRO-3), replicated otherwise.
    assert entry["annotators"] == ("ShardedEMAAnnotators" if stage == 3 else "EMAAnnotators")
    if kind == "full":  # the frozen reference is a sharded inference engine under ZeRO-3, a plain module otherwise
        assert entry["reference"] == ("DeepSpeedEngine" if stage == 3 else "UNet2DConditionModel")
    else:  # LoRA: the reference is the UNet with its adapters disabled
        assert entry["reference"] == "NoneType"
    # Text encoders and VAE: never given to DeepSpeed or the optimizer; the optimizer holds exactly the trainable set.
    assert entry["frozen_in_optimizer"] == 0 and entry["frozen_partitioned"] == 0
    assert entry["optimized_numel"] == entry["trainable_numel"] > 0
    assert all(m["loss"] == m["loss"] for m in entry["metrics"]) and len(entry["metrics"]) == 2
    # Step 0: policy == reference, so the reference (a ZeRO-3 engine, or the adapters-off UNet) reproduces it exactly.
    assert entry["metrics"][0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert entry["eval_loss"] == entry["eval_loss"] and entry["eval_minority_score"] is not None  # evaluate() works
    # save_model() wrote diffusers-format weights that compute what the trained model computes.
    assert entry["saved_vs_trained_output_diff"] < 1e-5
    assert entry["trained_vs_initial_output_diff"] > 1e-4  # ... and training changed the model
    expected = "pytorch_lora_weights.safetensors" if kind == "lora" else "model_index.json"
    assert expected in entry["saved_files"]


@pytest.mark.parametrize("entry_name", ["zero3_from_folder", "zero3_flux_from_folder"])
def test_zero3_from_a_folder_keeps_frozen_encoders_whole(deepspeed_report, entry_name):
    """Regression: a model given by folder/Hub id under ZeRO-3 crashed at the first step (partitioned encoders).
    For Flux: the T5 and CLIP encoders stay whole, the transformer, its reference and annotators are sharded."""
    entry = deepspeed_report[entry_name]
    assert entry["zero_stage"] == 3
    assert entry["frozen_partitioned"] == 0 and entry["frozen_numel"] > 0  # text encoders and VAE whole
    assert entry["denoiser_partitioned"]  # the UNet is sharded, the reference and annotators with it
    assert (entry["reference"], entry["annotators"]) == ("DeepSpeedEngine", "ShardedEMAAnnotators")
    assert len(entry["metrics"]) == 2 and entry["metrics"][0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    # A pipeline the user loaded after the config is refused with the way out, before training.
    assert "text_encoder is partitioned by DeepSpeed ZeRO-3" in entry["own_pipeline_error"]
    assert "load_pipeline" in entry["own_pipeline_error"]


def test_zero3_annotator_forward_matches_unsharded(deepspeed_report):
    check = deepspeed_report["zero3_full"]["annotator_forward"]
    assert check["annotator_vs_policy"] > 1e-4  # the annotator's weights differ from the model's ...
    assert check["max_abs_diff"] < 1e-5  # ... and ZeRO-3 ran exactly the annotator's weights


def test_zero3_resume_restores_weights_and_annotators(deepspeed_report):
    resume = deepspeed_report["zero3_resume"]
    assert "annotators.safetensors" in resume["checkpoint_files"] and "global_step2" in resume["checkpoint_files"]
    assert resume["weights_moved"] > 1e-4
    assert resume["weights_max_diff"] < 1e-6
    assert resume["annotators_max_diff"] < 1e-6
    assert resume["num_updates"] == [3, 3]


def _assert_same_metrics(single: list[dict], multi: list[dict], rtol: float) -> None:
    assert len(single) == len(multi) == 3
    compared = 0
    for step, (a, b) in enumerate(zip(single, multi)):
        assert a.keys() == b.keys(), step
        for name in a:
            assert name.startswith(COMPARED_PREFIXES)
            scale = max(abs(a[name]), abs(b[name]), 1e-3)
            assert abs(a[name] - b[name]) <= rtol * scale, (step, name, a[name], b[name])
            compared += 1
    assert any(k.startswith("minority/") for k in single[-1]) and compared > 30


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory) -> list[dict]:
    """One process, batch 4 (in a subprocess: no accelerate state leaks into or out of pytest)."""
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, WORKER, "run", "--out", str(out), "--batch", "4"], _environment())
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 1
    return result["metrics"]


# Tolerance: float32 rounding that depends on batch shapes (kernel blocking, thread count) moves these metrics by
# ~1e-4 relative in this set-up (see EQUAL_RESULTS_OPTIMIZER); per-process instead of global statistics (the bug
# these tests guard against) moved minority/score_mean from 0.116 to 0.007 and the loss from 5.8 to 17 when tried.
def test_two_processes_ddp_equal_one_process(single_process_reference, tmp_path):
    result = _launch("multi_gpu.yaml", tmp_path, batch=2, num_processes=2, ACCELERATE_USE_CPU="true")
    assert result["world_size"] == 2 and result["zero_stage"] is None
    _assert_same_metrics(single_process_reference, result["metrics"], rtol=2e-3)


def test_two_processes_zero3_equal_one_process(single_process_reference, tmp_path):
    result = _launch("deepspeed_zero3.yaml", tmp_path, batch=2, num_processes=2)
    assert result["world_size"] == 2 and result["zero_stage"] == 3
    _assert_same_metrics(single_process_reference, result["metrics"], rtol=2e-3)
    # Real partitions (two shards per parameter): the annotator forward still runs exactly the annotator's weights.
    check = json.loads((tmp_path / "annotator_forward.json").read_text())
    assert check["annotator_vs_policy"] > 1e-4 and check["max_abs_diff"] < 1e-5
