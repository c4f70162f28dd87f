"""Helpers shared by the tests: where the real configs live, a fast training configuration, a LoRA config."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Real model configs and the real CLIP tokenizer live beside the clone (CI) or the worktree.
SHARED_MODEL_CONFIGS = REPO_ROOT.parent / "shared" / "model-configs"

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config(r: int = 4, alpha: float = 8.0):
    from peft import LoraConfig

    # lora_alpha != r, so a round trip that lost the alpha/r scaling would show.
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights="gaussian")


def tiny_args(output_dir, **overrides):
    """An `AdaptiveDPOConfig` for a few CPU steps of the tiny pipeline (32 px images, 8x8x4 latents)."""
    from trl_adaptive import AdaptiveDPOConfig

    values = dict(
        output_dir=str(output_dir),
        resolution=32,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,  # large, so that two steps visibly move every trainable parameter
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    values.update(overrides)
    return AdaptiveDPOConfig(**values)
