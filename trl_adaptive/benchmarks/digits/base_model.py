"""The base model: the pixel-space pipeline, its pretraining on real digits (cached in a folder), prompt
encoding and deterministic DDIM sampling."""

from __future__ import annotations

import os

import numpy as np
import torch

from .settings import BASE_MODEL_VERSION, DIGIT_WORDS, PRETRAIN_TEMPLATES, BenchmarkSettings


def build_base_pipeline(seed: int = 0, unet_overrides: dict | None = None):
    """Untrained pixel-space pipeline: UNet on 3x8x8 pixels, a 2-layer CLIP text encoder, the tiny tokenizer."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ...tiny import tiny_clip_tokenizer, tiny_text_encoder, tiny_unet_config

    max_length = 32
    torch.manual_seed(seed)
    # Two 32-channel levels (8x8 -> 4x4): the fastest of the small configurations timed on 2 CPU cores.
    unet = UNet2DConditionModel(
        **tiny_unet_config(sample_size=8, in_channels=3, cross_attention_dim=32, block_out_channels=(32, 32),
                           **(unet_overrides or {}))
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=None,
        text_encoder=tiny_text_encoder(hidden_size=32, max_positions=max_length, seed=seed),
        tokenizer=tiny_clip_tokenizer(model_max_length=max_length),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def encode_prompts(pipeline, prompts: list[str]) -> torch.Tensor:
    from ...families import family_for

    return family_for(pipeline).encode_prompts(prompts)["encoder_hidden_states"]


def pretrain_base(images: np.ndarray, labels: np.ndarray, steps: int, batch: int, seed: int, progress: bool,
                  train_text_encoder: bool = False, token_embedding_std: float | None = None, unet_overrides=None,
                  pipeline=None):
    """Denoising pretraining of the UNet (and optionally the text encoder) on the real digits with their prompts.

    The default keeps the text encoder frozen at random weights with N(0, 1) token embeddings: measured here, a jointly
    trained encoder (lr 2e-3, 800 steps) collapsed to nearly prompt-independent states (samples at chance for the
    rater), while distinct frozen embeddings let the UNet's cross-attention pick up the digit word.
    """
    from tqdm.auto import tqdm

    pipeline = pipeline if pipeline is not None else build_base_pipeline(seed, unet_overrides)
    if token_embedding_std:
        with torch.no_grad():
            pipeline.text_encoder.embeddings.token_embedding.weight.normal_(0.0, token_embedding_std)
    unet, encoder, scheduler = pipeline.unet, pipeline.text_encoder, pipeline.scheduler
    pixels = torch.from_numpy(images * 2.0 - 1.0).unsqueeze(1).repeat(1, 3, 1, 1)
    token_ids = {
        (d, t): pipeline.tokenizer(
            template.format(DIGIT_WORDS[d]), padding="max_length", max_length=pipeline.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids[0]
        for d in range(10)
        for t, template in enumerate(PRETRAIN_TEMPLATES)
    }
    params = list(unet.parameters()) + (list(encoder.parameters()) if train_text_encoder else [])
    encoder.requires_grad_(train_text_encoder)
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    unet.train(), encoder.train(train_text_encoder)
    for _ in tqdm(range(steps), desc="Pretraining the base model on real digits", disable=not progress):
        idx = torch.randint(0, len(pixels), (batch,), generator=generator)
        templates = torch.randint(0, len(PRETRAIN_TEMPLATES), (batch,), generator=generator)
        ids = torch.stack([token_ids[(int(labels[i]), int(t))] for i, t in zip(idx, templates)])
        x0 = pixels[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
    unet.eval(), encoder.eval()
    return pipeline


def load_base(folder: str):
    """Load the cached pixel-space pipeline (diffusers does not record None components, so name them)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        folder, vae=None, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False
    )


def load_or_pretrain_base(cache_dir: str, settings: BenchmarkSettings, real_images, real_labels, progress: bool):
    """The cached base pipeline for these pretraining settings, pretraining (and caching) it when missing."""
    phases = "-".join(f"{steps}x{batch}" for steps, batch in settings.pretrain_phases)
    folder = os.path.join(cache_dir, f"{BASE_MODEL_VERSION}-{phases}")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return load_base(folder), folder
    pipeline = None
    for index, (steps, batch) in enumerate(settings.pretrain_phases):
        pipeline = pretrain_base(real_images, real_labels, steps, batch, index, progress, pipeline=pipeline,
                                 token_embedding_std=1.0 if pipeline is None else None)
    tmp = folder + f".tmp{os.getpid()}"
    pipeline.save_pretrained(tmp)
    os.replace(tmp, folder) if not os.path.exists(folder) else None
    return pipeline, folder


@torch.no_grad()
def sample_images(unet, scheduler_config, prompt_embeds: torch.Tensor, noise: torch.Tensor, steps: int, chunk=1024):
    """Deterministic DDIM sampling (eta 0) in pixel space from the given initial noise; returns (N, 3, 8, 8)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    outputs = []
    for start in range(0, len(noise), chunk):
        x = noise[start : start + chunk].clone()
        embeds = prompt_embeds[start : start + chunk]
        for t in scheduler.timesteps:
            eps = unet(x, t, encoder_hidden_states=embeds).sample
            x = scheduler.step(eps, t, x).prev_sample
        outputs.append(x)
    return torch.cat(outputs)
