"""trl-adaptive: Diffusion-DPO and minority-aware Adaptive-DPO for text-to-image diffusion models."""

__version__ = "0.1.0"

from .config import AdaptiveDPOConfig
from .data import flip_labels, prepare_preference_dataset
from .families import family_for, load_pipeline
from .trainer import AdaptiveDiffusionDPOTrainer

__all__ = [
    "AdaptiveDPOConfig",
    "AdaptiveDiffusionDPOTrainer",
    "family_for",
    "flip_labels",
    "load_pipeline",
    "prepare_preference_dataset",
]
