"""Flux.1 (dev, schnell and their fine-tunes): CLIP pooled + T5 embeddings, packed 2x2 latent patches, rotary
position ids, and the guidance embedding of guidance-distilled checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline

from .flow_matching import FlowMatchingFamily


class FluxFamily(FlowMatchingFamily):
    """`FluxPipeline`: CLIP-L's pooled embedding and T5-XXL's hidden states condition a transformer that sees the
    latent as a sequence of 2x2 patches (`_pack_latents`), with 3-axis rotary position ids for image patches
    (row, column) and text tokens (zeros).

    * ``max_sequence_length``: 512 T5 tokens when unset (diffusers' Flux scripts; schnell was trained with 256).
    * Guidance: Flux.1-dev is guidance-distilled, its transformer embeds a guidance value
      (``guidance_embeds=True``). Training feeds a fixed value, `flow_guidance_scale` (3.5 by default, diffusers'
      Flux training scripts); schnell has no guidance embedding and gets none.
    * The scheduler's dynamic shifting applies at inference only: training samples the unshifted table, as
      diffusers' Flux script does, unless `flow_shift` or `flow_resolution_shift` is set.
    """

    pipeline_classes = (FluxPipeline,)
    default_max_sequence_length = 512
    guidance_scale = 3.5

    def configure(self, args) -> None:
        super().configure(args)
        self.guidance_scale = args.flow_guidance_scale

    @property
    def patch_size(self) -> int:
        return 2  # the pipeline packs 2x2 latent patches into one token

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        device = self.pipeline.text_encoder.device
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        # The text position ids are zeros of the sequence length: rebuilt in `predict`, not carried per row.
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, Any]):
        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if self.pipeline.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), float(self.guidance_scale), device=noisy.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=packed, timestep=self.noise_level(timesteps).to(noisy.dtype), guidance=guidance,
            pooled_projections=conditioning["pooled_projections"], encoder_hidden_states=text, txt_ids=text_ids,
            img_ids=image_ids, return_dict=False,
        )[0]
        scale = self.pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height * scale, width * scale, scale)
