"""Adaptive-DPO LoRA training of Stable Diffusion 1.5 on Pick-a-Pic-style preference pairs.

    python examples/train_sd15_pickapic.py --dataset kashif/pickascore --split validation
    accelerate launch examples/train_sd15_pickapic.py --dataset /data/pickapic_v2 --max_steps 10000   # several GPUs

Any dataset with Pick-a-Pic's columns works (`caption`, `jpg_0`, `jpg_1`, `label_0`): a Hub name, a folder saved
with `save_to_disk`, or a parquet/json file. Ties (label 0.5) are dropped. TRL-style (`prompt`, `chosen`, `rejected`)
and HPDv2 datasets work the same way. The recipe follows the diffusers LoRA example (rank 8, lr 1e-5, 16 pairs per
device x 2 accumulation steps) with the Adaptive-DPO defaults; `docs/method.md` explains every option.
"""

import argparse

import torch
from peft import LoraConfig

from trl_adaptive import AdaptiveDPOConfig, AdaptiveDiffusionDPOTrainer, flip_labels
from trl_adaptive.data import load_preference_data


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="Pipeline folder or Hub id.")
    parser.add_argument("--dataset", required=True, help="Hub name, save_to_disk folder or data file.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--output_dir", default="sd15-adaptive-dpo-lora")
    parser.add_argument("--max_steps", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16, help="Pairs per device per micro-batch.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank).")
    parser.add_argument("--flip_rate", type=float, default=0.0, help="Flip this share of labels (robustness study).")
    parser.add_argument("--no_adaptive", action="store_true", help="Plain Diffusion-DPO instead of Adaptive-DPO.")
    parser.add_argument("--resume", default=None, help="Checkpoint folder to resume from.")
    parser.add_argument("--report_to", default="none", help="Tracker(s): tensorboard, wandb, trackio, all or none.")
    parser.add_argument("--push_to_hub", action="store_true")
    return parser.parse_args()


def main():
    options = parse_args()
    pairs = load_preference_data(options.dataset, split=options.split)
    if options.flip_rate > 0:
        pairs = flip_labels(pairs, rate=options.flip_rate, seed=0)

    on_gpu = torch.cuda.is_available()
    args = AdaptiveDPOConfig(
        output_dir=options.output_dir,
        # the method: Diffusion-DPO strength (no 0.5 factor) and the Adaptive-DPO minority weighting
        beta=2500.0,
        adaptive=not options.no_adaptive,
        # data
        resolution=options.resolution,
        random_flip=True,
        # optimisation
        max_steps=options.max_steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(200, options.max_steps // 10),
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=on_gpu,
        dataloader_num_workers=4 if on_gpu else 0,
        dataloader_pin_memory=on_gpu,
        # bookkeeping: checkpoints hold the optimizer, scheduler, RNG and EMA annotators, so runs resume exactly
        logging_steps=10,
        save_steps=500,
        save_total_limit=3,
        report_to=options.report_to,
        push_to_hub=options.push_to_hub,
    )
    peft_config = LoraConfig(
        r=options.rank,
        lora_alpha=options.rank,
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    trainer = AdaptiveDiffusionDPOTrainer(model=options.model, args=args, train_dataset=pairs, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=options.resume)
    trainer.save_model()  # pytorch_lora_weights.safetensors + README.md model card
    if options.push_to_hub:
        trainer.push_to_hub(dataset_name=options.dataset)
    print(
        f"LoRA saved to {options.output_dir}. Load it with:\n"
        f"  pipe = StableDiffusionPipeline.from_pretrained({options.model!r})\n"
        f"  pipe.load_lora_weights({options.output_dir!r})"
    )


if __name__ == "__main__":
    main()
