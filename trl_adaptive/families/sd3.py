"""Stable Diffusion 3 / 3.5: two CLIP encoders and T5, pooled projections, an MMDiT transformer, flow matching."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from .flow_matching import FlowMatchingFamily


class StableDiffusion3Family(FlowMatchingFamily):
    """SD3 / SD3.5 (medium, large, large turbo): `StableDiffusion3Pipeline`'s three text encoders and its transformer.

    Conditioning of one image, as the pipeline builds it:

    * ``encoder_hidden_states``: the penultimate hidden states of CLIP-L and CLIP-G side by side, zero-padded to
      T5's width, followed along the sequence by T5-XXL's hidden states (``max_sequence_length`` tokens; 77 when
      unset, diffusers' SD3 training scripts; zeros when the pipeline has no T5, as SD3 allows);
    * ``pooled_projections``: both CLIP encoders' pooled, projected embeddings side by side (768 + 1280).

    The denoiser is called with ``timestep = sigma * 1000``; the scheduler's static shift (3.0 in SD3's config)
    is part of the training table unless `flow_shift` overrides it.
    """

    pipeline_classes = (StableDiffusion3Pipeline,)
    default_lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        device = self.pipeline.text_encoder.device
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, Any]):
        return denoiser(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"], return_dict=False,
        )[0]
