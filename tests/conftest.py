"""Shared fixtures: a tiny offline pipeline (saved to a folder) and a small preference set.

Everything here is built from configs in `trl_adaptive.tiny`; nothing is downloaded.
"""

from __future__ import annotations

import os

import pytest
import torch

# High beta drives sigmoid arguments far from zero; denormal floats then make CPU steps ~2x slower.
torch.set_flush_denormal(True)
# The tiny models gain nothing from intra-op threads, and on a CPU shared with other jobs OpenMP threads waiting on
# each other made a 0.35 s run take 10 s. Set OMP_NUM_THREADS to choose otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def benchmark_script():
    """Loads `benchmarks/<name>.py` as a module (the benchmarks are scripts, not a package), registered in
    `sys.modules` because dataclasses resolve string annotations through it."""
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "benchmarks", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def toy_pairs():
    """Eight Pick-a-Pic-style pairs (PNG bytes, half with the winner second)."""
    from trl_adaptive.tiny import toy_preference_dataset

    return toy_preference_dataset(num_pairs=8, size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    """A tiny epsilon-prediction StableDiffusionPipeline saved with `save_pretrained` (loaded by path in tests)."""
    from trl_adaptive.tiny import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(seed=0).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory) -> str:
    """A tiny StableDiffusionXLPipeline saved with `save_pretrained` (loaded by path, as a Hub id would be)."""
    from trl_adaptive.tiny import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return str(folder)
