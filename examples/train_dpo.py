"""Train a diffusers pipeline (SD 1.x/2.x or SDXL) with Adaptive-DPO or Diffusion-DPO; launchable on any number of GPUs.

    # one GPU
    python examples/train_dpo.py --model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --dataset_name yuvalkirstain/pickapic_v2 --output_dir sdxl-dpo --bf16 --lora_rank 8
    # one node, 8 GPUs, SDXL full fine-tune under ZeRO-3 (see docs/distributed.md)
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml examples/train_dpo.py \
        --model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --dataset_name yuvalkirstain/pickapic_v2 \
        --output_dir sdxl-dpo-full --bf16 --activation_checkpointing --per_device_train_batch_size 1

Every `AdaptiveDPOConfig` field is a flag (`--beta`, `--adaptive`, `--annotator_decays`, `--vae_name_or_path` ...).
`--dataset_name` is a Hub dataset, a folder written by `Dataset.save_to_disk` or a json/csv/parquet file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import HfArgumentParser  # noqa: E402

from trl_adaptive import AdaptiveDiffusionDPOTrainer, AdaptiveDPOConfig  # noqa: E402
from trl_adaptive.data import load_preference_data  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "Pipeline folder or Hub id (SD 1.x/2.x or SDXL)."})
    dataset_name: str = field(
        metadata={"help": "Hub dataset, a `save_to_disk` folder or a data file (Pick-a-Pic, TRL or HPDv2 columns)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank; 0 fine-tunes the whole UNet."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)."})


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, AdaptiveDPOConfig)).parse_args_into_dataclasses()
    peft_config = None
    if script_args.lora_rank > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=script_args.lora_rank,
            lora_alpha=script_args.lora_alpha or script_args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    trainer = AdaptiveDiffusionDPOTrainer(
        model=script_args.model_name_or_path,
        args=training_args,
        train_dataset=load_preference_data(script_args.dataset_name, split=script_args.dataset_split),
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        print(f"Saved to {training_args.output_dir}")


if __name__ == "__main__":
    main()
