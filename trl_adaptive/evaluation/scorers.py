"""Reward models that score generated images, behind one interface.

A `Scorer` turns a batch of PIL images and their prompts into one score per image. Each one loads from its usual
Hub id or from a local folder / file (`path`), through `from_pretrained`, so `HF_HUB_OFFLINE=1` is honoured and
nothing is downloaded behind the user's back; preprocessing is the model's own processor (resize of the shorter side
with bicubic resampling, centre crop, CLIP's normalisation constants), as its authors use it.

* `pickscore`: PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on Pick-a-Pic preferences: ``logit_scale *
  cos(image, prompt)``, the reference implementation's formula (about 18-23 for SD images).
* `clip`: CLIP score (Hessel et al. 2021) as torchmetrics computes it: ``100 * max(cos(image, prompt), 0)`` with
  OpenAI's CLIP ViT-L/14.
* `aesthetic`: the LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding
  (1-10 scale, prompt ignored); `path` is the CLIP model, `head` the MLP's weights file.

Not here yet: HPSv2 and ImageReward. Their packages pin old dependencies, and HPSv2 runs on open_clip, whose
required torchvision fails to load beside torch 2.13 on CPU (``operator torchvision::nms does not exist``); both need
their checkpoints converted to a maintained implementation first.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import torch

#: Where each scorer's weights live by default (overridable by a local folder or file).
DEFAULT_PATHS = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "clip": "openai/clip-vit-large-patch14",
    "aesthetic": "openai/clip-vit-large-patch14",
}
#: PickScore's model repository has no processor: its authors use the one of the CLIP-H it was fine-tuned from.
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: The LAION aesthetic head on the Hub (ViT-L/14 embeddings, trained on SAC + LAION-logos + AVA, MSE loss).
AESTHETIC_HEAD = ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")


def _embedding(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features (the projection in `pooler_output`); older ones a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Scorer(ABC):
    """One score per (image, prompt); higher is better."""

    name: str = ""

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype

    @abstractmethod
    def score(self, images: list, prompts: list[str]) -> torch.Tensor:
        """Scores of shape (N,) for N PIL images and their N prompts, on the CPU in float32."""


class _ClipBased(Scorer):
    """A transformers `CLIPModel` with its processor: image and text embeddings, L2-normalised."""

    def __init__(self, path: str, processor_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        from transformers import AutoProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(path).to(self.device, self.dtype).eval()
        self.processor = AutoProcessor.from_pretrained(processor_path or path)

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        embeddings = _embedding(self.model.get_image_features(pixel_values=pixels)).float()
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        max_length = min(77, self.model.config.text_config.max_position_embeddings)
        tokens = self.processor(text=prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        embeddings = _embedding(self.model.get_text_features(**tokens)).float()
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    def cosines(self, images, prompts) -> torch.Tensor:
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


class PickScore(_ClipBased):
    name = "pickscore"

    def __init__(self, path: str | None = None, processor_path: str | None = None, **kwargs):
        path = path or DEFAULT_PATHS["pickscore"]
        has_processor = any(os.path.isfile(os.path.join(path, f)) for f in ("processor_config.json",
                                                                            "preprocessor_config.json"))
        super().__init__(path, processor_path or (path if has_processor else PICKSCORE_PROCESSOR), **kwargs)

    @torch.no_grad()
    def score(self, images, prompts):
        return (self.model.logit_scale.exp().float() * self.cosines(images, prompts)).cpu()


class ClipScore(_ClipBased):
    name = "clip"

    def __init__(self, path: str | None = None, **kwargs):
        super().__init__(path or DEFAULT_PATHS["clip"], **kwargs)

    def score(self, images, prompts):
        return (100.0 * self.cosines(images, prompts).clamp_min(0)).cpu()


class AestheticHead(torch.nn.Module):
    """The LAION improved aesthetic predictor's MLP (its `layers.*` names, so its weights file loads as it is)."""

    def __init__(self, embedding_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embedding_dim, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticScore(_ClipBased):
    name = "aesthetic"

    def __init__(self, path: str | None = None, head: str | None = None, **kwargs):
        super().__init__(path or DEFAULT_PATHS["aesthetic"], **kwargs)
        if head is None:
            from huggingface_hub import hf_hub_download

            head = hf_hub_download(*AESTHETIC_HEAD)  # raises under HF_HUB_OFFLINE=1 unless cached
        self.head = AestheticHead(self.model.config.projection_dim)
        self.head.load_state_dict(load_state_dict_file(head))
        self.head.to(self.device).eval()

    @torch.no_grad()
    def score(self, images, prompts):
        return self.head(self.image_embeddings(images)).float().cpu()


SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (PickScore, ClipScore, AestheticScore)}


def load_scorer(name: str, path: str | None = None, **kwargs) -> Scorer:
    """A scorer by name (`SCORERS`), from `path` (folder, Hub id) or its default; extra options go to its class."""
    if name not in SCORERS:
        raise ValueError(f"Unknown scorer {name!r}; available: {', '.join(SCORERS)}")
    return SCORERS[name](path=path, **kwargs)
