"""Model families: `family_for(pipeline)` returns the `DiffusionFamily` that knows the pipeline's quirks."""

from __future__ import annotations

from .base import DiffusionFamily
from .flux import FluxFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily
from .stable_diffusion import StableDiffusionFamily

#: Registered families, most specific first (a subclass pipeline must match its own family before its parent's).
FAMILIES: list[type[DiffusionFamily]] = [FluxFamily, StableDiffusion3Family, StableDiffusionXLFamily, StableDiffusionFamily]


def register_family(family: type[DiffusionFamily]) -> type[DiffusionFamily]:
    """Add a family in front of the registry (usable as a class decorator)."""
    FAMILIES.insert(0, family)
    return family


def family_for(pipeline) -> DiffusionFamily:
    for family in FAMILIES:
        if isinstance(pipeline, family.pipeline_classes):
            return family(pipeline)
    supported = ", ".join(cls.__name__ for f in FAMILIES for cls in f.pipeline_classes)
    raise ValueError(f"Unsupported pipeline {type(pipeline).__name__}; supported: {supported}")


def replace_vae(pipeline, vae_name_or_path: str) -> None:
    """Swap the pipeline's VAE for another one (e.g. an fp16-safe SDXL VAE): a folder or Hub id holding an
    `AutoencoderKL`, either at its top level or in a `vae/` subfolder (a whole pipeline)."""
    import os

    from diffusers import AutoencoderKL

    if getattr(pipeline, "vae", None) is None:
        raise ValueError(f"vae_name_or_path={vae_name_or_path!r} given, but {type(pipeline).__name__} has no VAE")
    subfolder = "vae" if os.path.isdir(os.path.join(vae_name_or_path, "vae")) else None
    try:
        vae = AutoencoderKL.from_pretrained(vae_name_or_path, subfolder=subfolder)
    except Exception as err:  # missing folder, bad Hub id, wrong model class: name the option
        raise ValueError(f"vae_name_or_path={vae_name_or_path!r}: cannot load an AutoencoderKL from it ({err})") from err
    pipeline.register_modules(vae=vae)


def load_pipeline(model_name_or_path: str, **kwargs):
    """Load any supported pipeline from a folder or Hub id (the class is read from its model_index.json).

    Every component is loaded whole, also after a DeepSpeed ZeRO-3 config exists (`zero3_init_disabled`): the frozen
    encoders must never be partitioned, and DeepSpeed shards the trained denoiser itself when the Trainer prepares it."""
    from diffusers import DiffusionPipeline

    from ..distributed import zero3_init_disabled

    with zero3_init_disabled():
        return DiffusionPipeline.from_pretrained(model_name_or_path, **kwargs)


__all__ = ["DiffusionFamily", "FluxFamily", "StableDiffusion3Family", "StableDiffusionFamily", "StableDiffusionXLFamily", "FAMILIES", "family_for", "load_pipeline", "register_family", "replace_vae"]
