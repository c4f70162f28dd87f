"""Same seed, same model: trains one tiny case from a pipeline folder and prints fingerprints of its weights.

    python tests/seed_worker.py --model DIR --case lora|full [--seed S]   # prints one JSON line

Imported by `test_reproducibility.py` for in-process runs and run as a fresh process to compare across processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def fingerprint(module: torch.nn.Module, trainable_only: bool) -> str:
    """SHA-256 of the names and exact bytes of a module's (trainable) parameters."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        if trainable_only and not param.requires_grad:
            continue
        digest.update(name.encode())
        digest.update(param.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_case(model: str, case: str, seed: int = 0, output_dir: str | None = None, steps: int = 2) -> dict[str, str]:
    """Train `case` ("lora" or "full", Adaptive-DPO on) from the pipeline folder `model`; fingerprints before/after."""
    from tiny_setup import lora_config, tiny_args

    from trl_adaptive import AdaptiveDiffusionDPOTrainer
    from trl_adaptive.tiny import toy_preference_dataset

    torch.set_flush_denormal(True)
    output_dir = output_dir or tempfile.mkdtemp(prefix="seed-worker-")
    lora = case == "lora"
    args = tiny_args(output_dir, seed=seed, max_steps=steps, annotator_decays=[0.9, 0.5], random_flip=True,
                     empty_prompt_probability=0.25)  # augmentation on: its draws must repeat too
    trainer = AdaptiveDiffusionDPOTrainer(
        model=model, args=args, train_dataset=toy_preference_dataset(num_pairs=8, size=32, seed=0),
        peft_config=lora_config() if lora else None,
    )
    initial = fingerprint(trainer.model, trainable_only=lora)
    trainer.train()
    return {
        "initial": initial,
        "final": fingerprint(trainer.model, trainable_only=lora),
        "annotators": hashlib.sha256(
            b"".join(t.float().numpy().tobytes() for _, t in sorted(trainer.robustness["adaptive"].annotators.state_dict().items()))
        ).hexdigest(),
        "loss": repr(trainer.state.log_history[-1]["train_loss"]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--case", choices=["lora", "full"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(run_case(options.model, options.case, options.seed)))
