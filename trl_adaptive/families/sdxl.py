"""Stable Diffusion XL: two text encoders, pooled text embedding and size/crop micro-conditioning."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from transformers.utils import logging

from .base import DiffusionFamily

logger = logging.get_logger(__name__)


class StableDiffusionXLFamily(DiffusionFamily):
    """SDXL base: CLIP ViT-L and OpenCLIP bigG text encoders, a UNet with "text_time" added conditioning, a VAE.

    Conditioning of one image (what `StableDiffusionXLPipeline` builds at inference, made per image here):

    * ``encoder_hidden_states``: the penultimate hidden states of both encoders, concatenated (768 + 1280 = 2048);
    * ``added_cond_kwargs["text_embeds"]``: the pooled, projected embedding of the second encoder;
    * ``added_cond_kwargs["time_ids"]``: (original height, original width, crop top, crop left, target height,
      target width), from the image's true size before resizing and the crop the collator took, so that the
      winner and the loser of a pair, which can differ in size, each get their own.

    The SDXL VAE overflows in float16, so a VAE whose config says ``force_upcast`` stays in float32 while the text
    encoders run in the training dtype; an fp16-safe VAE (``AdaptiveDPOConfig.vae_name_or_path``) without that flag
    runs in the training dtype.
    """

    pipeline_classes = (StableDiffusionXLPipeline,)
    convolutional_denoiser = True
    upcast_forced_vae = True
    frozen_components = ("text_encoder", "text_encoder_2", "vae")

    # ---- inputs ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        # The pipeline's own encoder: penultimate states of both encoders, pooled embedding of the second.
        encoder = self.pipeline.text_encoder_2
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, device=encoder.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": prompt_embeds, "added_cond_kwargs": {"text_embeds": pooled}}

    def cache_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        conditioning = self.encode_prompts(prompts)
        return {
            "prompt_embeds": conditioning["encoder_hidden_states"],
            "pooled_prompt_embeds": conditioning["added_cond_kwargs"]["text_embeds"],
        }

    def conditioning_from_cache(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            "encoder_hidden_states": batch["prompt_embeds"],
            "added_cond_kwargs": {"text_embeds": batch["pooled_prompt_embeds"]},
        }

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator=None) -> torch.Tensor:
        # The VAE runs in its own dtype (float32 when force_upcast, see place_frozen_modules).
        return self.draw_latents(*self.image_latent_distribution(pixel_values), generator=generator)

    def extra_conditioning(self, batch: dict[str, Any], conditioning: dict[str, Any]) -> dict[str, Any]:
        """Adds each image's time ids to the pair conditioning (winners' rows first, then losers')."""
        hidden = conditioning["encoder_hidden_states"]
        num_pairs, device = hidden.shape[0] // 2, hidden.device
        # Made on the host and copied without waiting (torch.tensor(..., device=cuda) would wait for the GPU's queue).
        target = torch.tensor([self._target_size(batch)]).to(device, non_blocking=True).expand(num_pairs, 2)
        rows = []
        for key in ("chosen", "rejected"):
            size, crop = batch.get(f"original_size_{key}"), batch.get(f"crop_top_left_{key}")
            if size is None or crop is None:
                self._warn_missing_sizes()
                size, crop = target, torch.zeros_like(target)
            rows.append(torch.cat([size.to(device), crop.to(device), target], dim=1))
        time_ids = torch.cat(rows).to(hidden.dtype)
        added = dict(conditioning.get("added_cond_kwargs", {}), time_ids=time_ids)
        return {**conditioning, "added_cond_kwargs": added}

    def _target_size(self, batch: dict[str, Any]) -> list[int]:
        """The (height, width) the model generates at: the training crop's size."""
        if "pixel_values_chosen" in batch:
            return list(batch["pixel_values_chosen"].shape[-2:])
        return [side * self.pipeline.vae_scale_factor for side in batch["latents_chosen"].shape[-2:]]

    _warned_missing_sizes = False

    def _warn_missing_sizes(self) -> None:
        if not StableDiffusionXLFamily._warned_missing_sizes:
            logger.warning(
                "The batch has no original_size_*/crop_top_left_* entries (a custom collator?): SDXL time ids fall "
                "back to (target, target, 0, 0, target, target), the original Diffusion-DPO SDXL convention."
            )
            StableDiffusionXLFamily._warned_missing_sizes = True
