"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction), and pixel-space pipelines without a VAE."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from .base import DiffusionFamily


class StableDiffusionFamily(DiffusionFamily):
    """One CLIP text encoder (last hidden state), a UNet and a VAE.

    A pipeline whose ``vae`` is ``None`` trains in pixel space: images in [-1, 1] are the denoiser's input
    (used by the built-in digits benchmark).
    """

    pipeline_classes = (StableDiffusionPipeline,)
    convolutional_denoiser = True

    def tokenize(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        encoder = self.pipeline.text_encoder
        # non_blocking: a plain copy of host data waits for the GPU to finish its queue (the ids are not reused).
        ids = self.tokenize(self.pipeline.tokenizer, prompts).to(encoder.device, non_blocking=True)
        return {"encoder_hidden_states": encoder(ids)[0]}

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator=None) -> torch.Tensor:
        return self.draw_latents(*self.image_latent_distribution(pixel_values), generator=generator)
