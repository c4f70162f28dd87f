"""The one interface behind which model-family differences live.

A `DiffusionFamily` wraps a diffusers pipeline and answers every family-specific question the trainer asks:
how prompts and images become denoiser inputs, how noise is added and what the prediction target is, and how
trained weights are saved so that the family's own pipeline loads them. The trainer never branches on the family.
New families (SDXL, flow-matching models) subclass this and register themselves in `trl_adaptive.families`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from huggingface_hub import load_torch_model, save_torch_state_dict
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils._pytree import tree_map

#: File names of a diffusers model's weights (`{suffix}` is empty, or a shard's number when sharded).
DENOISER_WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"


def repeat_for_pairs(conditioning):
    """Conditioning of B prompts -> 2B rows (winners first, then losers), for any nesting of tensors."""
    return tree_map(lambda x: torch.cat([x, x]) if isinstance(x, torch.Tensor) else x, conditioning)


class DiffusionFamily(ABC):
    #: diffusers pipeline classes this family handles (checked with isinstance, most specific family first).
    pipeline_classes: tuple[type, ...] = ()
    #: Default LoRA target modules of the denoiser (diffusers' attention projections).
    default_lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: Draw latents from the VAE posterior (the diffusers scripts) or use its mean; set from
    #: `AdaptiveDPOConfig.latent_sampling` by `configure`.
    sample_latents: bool = True
    #: The pipeline component that is trained.
    denoiser_component: str = "unet"
    #: Keep a VAE whose config sets `force_upcast` in float32 (SDXL's, SD3's and Flux's overflow in float16).
    upcast_forced_vae: bool = False
    #: Pipeline components that only run for inference (frozen); those the pipeline lacks or sets to None are skipped.
    frozen_components: tuple[str, ...] = ("text_encoder", "vae")
    #: A denoiser made mostly of convolutions (a UNet), for which `AdaptiveDPOConfig.channels_last` matters.
    convolutional_denoiser: bool = False

    def __init__(self, pipeline):
        self.pipeline = pipeline
        # Training always uses the DDPM forward process of the pipeline's own schedule, whatever sampler it ships.
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    def configure(self, args) -> None:
        """Take the training options that concern the family from an `AdaptiveDPOConfig` (the trainer calls this)."""
        self.sample_latents = args.latent_sampling == "sample"

    # ---- modules ---------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that is trained (the UNet, or the transformer of flow-matching models)."""
        return getattr(self.pipeline, self.denoiser_component)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Modules that are only run for inference (text encoders, VAE), by pipeline component name."""
        modules = {name: getattr(self.pipeline, name, None) for name in self.frozen_components}
        return {name: module for name, module in modules.items() if module is not None}

    def attention_processors(self) -> dict[str, int]:
        """How many attention layers of the denoiser use each diffusers attention processor class."""
        return dict(Counter(type(p).__name__ for p in getattr(self.denoiser, "attn_processors", {}).values()))

    def uses_sdpa(self) -> bool:
        """Whether every attention layer goes through torch's `scaled_dot_product_attention` (flash / memory-efficient
        kernels on a GPU): diffusers' default processors do; only its legacy `AttnProcessor` computes attention by
        hand (tests/test_performance_options.py also counts the SDPA calls of a forward)."""
        return "AttnProcessor" not in self.attention_processors()

    def check_not_partitioned(self) -> None:
        """Raise if a frozen module was built under DeepSpeed's `zero.Init` (its weights are empty placeholders): a
        pipeline loaded after a ZeRO-3 config was created, outside `trl_adaptive.load_pipeline`."""
        for name, module in self.frozen_modules().items():
            if any(hasattr(p, "ds_id") for p in module.parameters()):
                raise ValueError(
                    f"The pipeline's {name} is partitioned by DeepSpeed ZeRO-3 (it was loaded after a ZeRO-3 config "
                    "existed, so transformers built it under zero.Init). Pass the model as a folder or Hub id, or "
                    "load it with trl_adaptive.load_pipeline(...), which keeps every component whole."
                )

    def place_frozen_modules(self, device: torch.device, dtype: torch.dtype) -> None:
        """Freeze the non-trained modules and move them to the training device in the given dtype."""
        for module in self.frozen_modules().values():
            module.requires_grad_(False).eval().to(device=device, dtype=dtype)
        vae = getattr(self.pipeline, "vae", None)
        if self.upcast_forced_vae and vae is not None and vae.config.get("force_upcast", False):
            vae.to(dtype=torch.float32)

    # ---- inputs ----------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        """Text conditioning for the denoiser, as keyword arguments of its forward (one row per prompt)."""

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, generator=None) -> torch.Tensor:
        """Images in [-1, 1], shape (N, 3, H, W), to the denoiser's (scaled) input space.

        `generator` (one `torch.Generator`, or a list with one per image) drives the VAE posterior sample.
        """

    @torch.no_grad()
    def image_latent_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and standard deviation of the VAE posterior of images in [-1, 1], shape (N, 3, H, W), shifted and
        scaled into the denoiser's input space (a latent is ``mean + std * noise``). Pixel-space pipelines (``vae``
        None) return the pixels and ``None``."""
        vae = getattr(self.pipeline, "vae", None)
        if vae is None:
            return pixel_values, None
        posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scale = vae.config.scaling_factor
        return (posterior.mean - shift) * scale, posterior.std * scale

    def draw_latents(self, mean: torch.Tensor, std: torch.Tensor | None, generator=None) -> torch.Tensor:
        """A latent from a posterior given by `mean` and `std` (`std` None, or `sample_latents` False: the mean)."""
        if std is None or not self.sample_latents:
            return mean
        return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    # ---- what a latent cache stores (see trl_adaptive.caching) ----------------------------------------
    def cache_images(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image tensors a latent cache keeps so that `latents` can replay `encode_images` without the VAE:
        the posterior ``mean``, plus its ``std`` when latents are sampled."""
        mean, std = self.image_latent_distribution(pixel_values)
        return {"mean": mean} if std is None or not self.sample_latents else {"mean": mean, "std": std}

    def cache_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-prompt tensors a latent cache keeps, read back by `conditioning_from_cache` (one row per prompt).
        Must contain ``prompt_embeds``, whose presence marks a cached batch; families with more text conditioning
        (SDXL's ``pooled_prompt_embeds``) override both methods."""
        return {"prompt_embeds": self.encode_prompts(prompts)["encoder_hidden_states"]}

    def extra_conditioning(self, batch: dict[str, Any], conditioning: dict[str, Any]) -> dict[str, Any]:
        """Hook for conditioning that depends on the images, not the prompt (SDXL's size/crop time ids).

        `conditioning` already has 2B rows (winners first, then losers): a family adds per-image entries here.
        """
        return conditioning

    def condition(self, batch: dict[str, Any], prompt_shift: int = 0) -> dict[str, Any]:
        """Denoiser keyword arguments for the 2B images of a collated batch of B pairs (winners first, then losers):
        cached embeddings when present, else encoded prompts, repeated for both images of each pair, plus any
        per-image conditioning from `extra_conditioning`.

        `prompt_shift` k != 0 gives pair i the text conditioning of pair (i - k) mod B instead of its own (the image
        conditioning stays each image's): the contrast prompts of `minority_evidence="prompt_contrast"`."""
        if "prompt_embeds" in batch:
            conditioning = self.conditioning_from_cache(batch)
        else:
            conditioning = self.encode_prompts(batch["prompts"])
        if prompt_shift:
            conditioning = tree_map(lambda x: x.roll(prompt_shift, 0) if isinstance(x, torch.Tensor) else x, conditioning)
        return self.extra_conditioning(batch, repeat_for_pairs(conditioning))

    def conditioning_from_cache(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Denoiser keyword arguments from cached text embeddings (see `trl_adaptive.caching`)."""
        return {"encoder_hidden_states": batch["prompt_embeds"]}

    def latents(self, batch: dict[str, Any], key: str, generator=None) -> torch.Tensor:
        """Latents of `chosen` or `rejected` images: cached ones when the batch has them, else encoded pixels
        (`generator`: see `encode_images`). A latent cache gives ``latents_{key}`` as the posterior mean with
        ``latents_{key}_std`` beside it: the draw is made here, with the same generator the pixels would use."""
        if f"latents_{key}" in batch:
            return self.draw_latents(batch[f"latents_{key}"], batch.get(f"latents_{key}_std"), generator)
        return self.encode_images(batch[f"pixel_values_{key}"], generator=generator)

    def pair_latents(self, batch: dict[str, Any], generator=None) -> torch.Tensor:
        """Latents of the 2B images of a batch, winners first, then losers: `latents` of both sides, with the pixels
        of both encoded in one VAE call (the same draws from `generator` as two calls: chosen rows, then rejected)."""
        if "pixel_values_chosen" not in batch or "latents_chosen" in batch:
            return torch.cat([self.latents(batch, "chosen", generator), self.latents(batch, "rejected", generator)])
        pixels = torch.cat([batch["pixel_values_chosen"], batch["pixel_values_rejected"]])
        return self.encode_images(pixels, generator=generator + generator if isinstance(generator, list) else generator)

    # ---- forward process -------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, device: torch.device, generator=None, min_noise: float = 0.0) -> torch.Tensor:
        """Uniform training timesteps; `min_noise` in [0, 1) keeps only the noisiest (1 - min_noise) share of them."""
        num = self.noise_scheduler.config.num_train_timesteps
        low = min(int(min_noise * num), num - 1)
        return torch.randint(low, num, (batch_size,), device=device, generator=generator).long()

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Where each timestep lies in the noise schedule, as a fraction in [0, 1) (0: clean), the scale of `min_noise`."""
        return timesteps.float() / self.noise_scheduler.config.num_train_timesteps

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict, by the scheduler's `prediction_type`."""
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if prediction_type == "sample":
            return latents
        raise ValueError(f"Unsupported scheduler prediction_type {prediction_type!r}")

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, Any]):
        return denoiser(noisy, timesteps, **conditioning, return_dict=False)[0]

    # ---- saving and loading ----------------------------------------------------------------------------
    def save_lora(self, output_dir: str, denoiser: torch.nn.Module, lora_config=None, state_dict=None) -> None:
        """Write the denoiser's LoRA weights so that `<Pipeline>.load_lora_weights(output_dir)` reads them.

        `state_dict` is a full state dict gathered elsewhere (DeepSpeed ZeRO-3); by default the module's own.
        """
        layers = self.lora_layers(get_peft_model_state_dict(denoiser, state_dict=state_dict))
        metadata = lora_config.to_dict() if lora_config is not None else None
        component = self.denoiser_component
        type(self.pipeline).save_lora_weights(
            output_dir, safe_serialization=True,
            **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": metadata},
        )

    def lora_layers(self, peft_state_dict: dict) -> dict:
        """The denoiser's LoRA weights in the key format its pipeline's `save_lora_weights` expects."""
        return convert_state_dict_to_diffusers(peft_state_dict)

    def load_lora_into(self, denoiser: torch.nn.Module, folder: str) -> None:
        """Load LoRA weights written by `save_lora` into the denoiser's active adapter (used to resume)."""
        state_dict = type(self.pipeline).lora_state_dict(folder)
        state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict
        prefix = f"{self.denoiser_component}."
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(own), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA checkpoint in {folder} has keys the model lacks: {result.unexpected_keys[:5]}")

    def save_pipeline(self, output_dir: str, denoiser_state_dict: dict | None = None) -> None:
        """Write the whole pipeline so that `from_pretrained(output_dir)` loads it; with `denoiser_state_dict` (gathered
        by DeepSpeed), those weights replace the in-memory denoiser's."""
        self.pipeline.save_pretrained(output_dir, safe_serialization=True)
        if denoiser_state_dict is not None:
            # Under ZeRO-3 the in-memory denoiser holds only empty placeholders: its files are replaced by the
            # gathered weights, sharded (with an index) the way diffusers writes and reads large models.
            folder = os.path.join(output_dir, self.denoiser_component)
            for name in os.listdir(folder):
                if name.startswith("diffusion_pytorch_model"):
                    os.remove(os.path.join(folder, name))
            # Own storage per tensor: DeepSpeed gathers into views of one flat buffer, which safetensors refuses.
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in denoiser_state_dict.items()}
            save_torch_state_dict(tensors, folder, filename_pattern=DENOISER_WEIGHTS_PATTERN, max_shard_size="10GB")

    def load_denoiser_into(self, denoiser: torch.nn.Module, folder: str) -> None:
        """Load denoiser weights written by `save_pipeline`, sharded or not (used to resume a full fine-tune)."""
        load_torch_model(denoiser, os.path.join(folder, self.denoiser_component), strict=True,
                         filename_pattern=DENOISER_WEIGHTS_PATTERN)
