"""The built-in offline example: a few LoRA steps of Adaptive-DPO on a tiny pipeline and a toy preference set.

It exercises the whole public path a real run takes (a pipeline folder loaded with `from_pretrained`, a Pick-a-Pic
style dataset, `AdaptiveDPOConfig`, a `LoraConfig`, `train()`, `save_model()`, `load_lora_weights`) in seconds on a
CPU, with nothing downloaded. The model is random and tiny: the point is the mechanics, not the pictures.
"""

from __future__ import annotations

import os


def run_tiny_example(output_dir: str = "trl-adaptive-example", max_steps: int = 40, seed: int = 0) -> str:
    """Train LoRA adapters on a tiny Stable Diffusion pipeline and return the folder they were saved to.

    Writes ``<output_dir>/base-pipeline`` (the tiny base model) and ``<output_dir>/lora`` (the adapters, a model
    card and the training arguments), then checks that the saved adapters load with ``load_lora_weights``.
    """
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from peft import LoraConfig
    from transformers.utils import logging as transformers_logging

    from .config import AdaptiveDPOConfig
    from .families import StableDiffusionFamily
    from .tiny import tiny_sd_pipeline, toy_preference_dataset
    from .trainer import AdaptiveDiffusionDPOTrainer

    torch.set_flush_denormal(True)  # high beta pushes values into the denormal range, which is slow on CPUs
    # Loading bars and dtype-cast notices about the tiny model are noise here; the training bar stays.
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    base_dir = os.path.join(output_dir, "base-pipeline")
    lora_dir = os.path.join(output_dir, "lora")
    tiny_sd_pipeline(seed=seed).save_pretrained(base_dir)
    pairs = toy_preference_dataset(num_pairs=32, size=32, seed=seed)

    args = AdaptiveDPOConfig(
        output_dir=lora_dir,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        resolution=32,
        learning_rate=1e-3,  # the tiny random model needs a larger step than the 1e-5 used for SD 1.5
        logging_steps=max(1, max_steps // 4),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=False,
        seed=seed,
    )
    peft_config = LoraConfig(
        r=4,
        lora_alpha=4,
        init_lora_weights="gaussian",
        target_modules=list(StableDiffusionFamily.default_lora_target_modules),
    )
    print(f"Training LoRA (rank 4) with Adaptive-DPO for {max_steps} steps on {len(pairs)} toy preference pairs")
    trainer = AdaptiveDiffusionDPOTrainer(model=base_dir, args=args, train_dataset=pairs, peft_config=peft_config)
    trainer.train()
    trainer.save_model()

    # Prove the saved adapters are usable the way a user would load them.
    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    pipe.load_lora_weights(lora_dir)

    logs = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    if logs:
        last = logs[-1]
        print(
            f"Last logged step {last['step']}: loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracies']:.2f}, "
            f"mean minority weight {last.get('minority/weight_mean', float('nan')):.3f}"
        )
    print(f"Base pipeline: {os.path.abspath(base_dir)}")
    print(f"LoRA saved to: {os.path.abspath(lora_dir)}")
    print(
        "Load it with:\n"
        "  from diffusers import StableDiffusionPipeline\n"
        f"  pipe = StableDiffusionPipeline.from_pretrained({os.path.abspath(base_dir)!r})\n"
        f"  pipe.load_lora_weights({os.path.abspath(lora_dir)!r})"
    )
    return lora_dir
