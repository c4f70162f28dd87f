"""Rectified-flow models (Stable Diffusion 3 / 3.5, Flux.1): what they share.

Training follows diffusers' SD3 / Flux scripts: a latent x0 (VAE mean/sample, minus the VAE's ``shift_factor``,
times its ``scaling_factor``), a noise level sigma in (0, 1] per pair, the noisy input ``x_t = (1 - sigma) x0 +
sigma eps``, and the velocity target ``eps - x0``; the denoiser is called with ``timestep = sigma * 1000``.
Each image's error is the mean squared error of the predicted velocity, so the Diffusion-DPO logit and every loss
are unchanged (docs/method.md, "Flow-matching models").

Timesteps: sigma is drawn from a density over the schedule's sigmas, as the scripts do (``u`` from
`compute_density_for_timestep_sampling`, index ``u * N`` into the table): logit-normal(0, 1) by default, ``mode`` or
uniform (`AdaptiveDPOConfig.timestep_density`). The table is the scheduler's own (SD3's ships shift 3; Flux's uses
dynamic shifting at inference only, so training sees the unshifted table, as in diffusers' Flux script), or shifted
by `flow_shift`, or by the resolution-dependent shift Flux applies at inference (`flow_resolution_shift`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from .base import DiffusionFamily

#: `AdaptiveDPOConfig.timestep_density` -> diffusers' `weighting_scheme` name for the same density.
TIMESTEP_DENSITIES = {"logit_normal": "logit_normal", "mode": "mode", "uniform": "none"}


class FlowMatchingFamily(DiffusionFamily):
    """Base of the flow-matching families: noise, target, timesteps and saving of a ``transformer`` denoiser."""

    denoiser_component = "transformer"
    upcast_forced_vae = True  # SD3's and Flux's VAE configs set force_upcast, as SDXL's
    frozen_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    #: T5 tokens per prompt in training when `max_sequence_length` is unset (the family's training script).
    default_max_sequence_length = 77

    def __init__(self, pipeline):
        self.pipeline = pipeline
        # A fresh copy: the pipeline's own scheduler is changed by set_timesteps at inference.
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self.timestep_density, self.logit_mean, self.logit_std, self.mode_scale = "logit_normal", 0.0, 1.0, 1.29
        self.max_sequence_length = self.default_max_sequence_length
        self.sigma_table = self.noise_scheduler.sigmas.float().clone()  # descending, from 1 to 1 / N

    def configure(self, args) -> None:
        super().configure(args)
        self.timestep_density = args.timestep_density
        self.logit_mean, self.logit_std, self.mode_scale = args.logit_mean, args.logit_std, args.mode_scale
        self.max_sequence_length = args.max_sequence_length or self.default_max_sequence_length
        # The scheduler's own tables and shift functions (diffusers), built with the requested shift.
        config = self.noise_scheduler.config
        if args.flow_resolution_shift:  # Flux's inference shift: exp(mu), mu linear in the image tokens
            mu = calculate_shift(self.image_tokens(args.resolution), config.base_image_seq_len,
                                 config.max_image_seq_len, config.base_shift, config.max_shift)
            unshifted = FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=True).sigmas
            table = self.noise_scheduler.time_shift(mu, 1.0, unshifted)
        elif args.flow_shift is not None:  # static shift: shift s / (1 + (shift - 1) s)
            table = FlowMatchEulerDiscreteScheduler.from_config(config, shift=args.flow_shift,
                                                                use_dynamic_shifting=False).sigmas
        else:
            table = self.noise_scheduler.sigmas
        self.sigma_table = table.float().clone()

    @property
    def patch_size(self) -> int:
        """Latent pixels per image token along each side."""
        return self.pipeline.transformer.config.patch_size

    def image_tokens(self, resolution: int) -> int:
        """Image tokens of a square `resolution` image: latent side / patch side, squared."""
        side = resolution // self.pipeline.vae_scale_factor // self.patch_size
        return side * side

    # ---- forward process -------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, device, generator=None, min_noise: float = 0.0) -> torch.Tensor:
        """Timesteps ``sigma * N`` with sigma drawn from `timestep_density` over the table; `min_noise` keeps the
        sigmas >= min_noise (the density is then spread over that part of the table)."""
        table = self.sigma_table
        allowed = int((table >= min_noise).sum()) if min_noise > 0 else len(table)
        u = compute_density_for_timestep_sampling(
            TIMESTEP_DENSITIES[self.timestep_density], batch_size, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, device=device, generator=generator,
        )
        indices = (u * allowed).long().clamp(0, allowed - 1)
        return (self._table_on(indices.device)[indices] * self.noise_scheduler.config.num_train_timesteps).to(device)

    def _table_on(self, device: torch.device) -> torch.Tensor:
        """`sigma_table` on `device`, copied once (indexing the host table with device indices would read them back
        to the host at every step)."""
        cached = getattr(self, "_sigma_table_copy", None)
        if cached is None or cached[0] is not self.sigma_table or cached[1].device != device:
            cached = self._sigma_table_copy = (self.sigma_table, self.sigma_table.to(device))
        return cached[1]

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma itself: the share of noise in x_t."""
        return timesteps.float() / self.noise_scheduler.config.num_train_timesteps

    def _sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = self.noise_level(timesteps).to(device=like.device, dtype=like.dtype)
        return sigma.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self._sigmas(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity ``eps - x0`` (d x_t / d sigma)."""
        return noise - latents

    # ---- inputs ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator=None) -> torch.Tensor:
        return self.draw_latents(*self.image_latent_distribution(pixel_values), generator=generator)

    def cache_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        conditioning = self.encode_prompts(prompts)
        return {"prompt_embeds": conditioning["encoder_hidden_states"],
                "pooled_prompt_embeds": conditioning["pooled_projections"]}

    def conditioning_from_cache(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": batch["prompt_embeds"], "pooled_projections": batch["pooled_prompt_embeds"]}

    def lora_layers(self, peft_state_dict: dict) -> dict:
        # diffusers' SD3 / Flux scripts save the transformer's PEFT state dict as it is.
        return peft_state_dict
