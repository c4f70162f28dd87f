"""Reward models that score generated images, behind one interface.

A `Scorer` turns a batch of PIL images and their prompts into one score per image. Each one loads from its usual
Hub id or from a local folder / file (`path`), so `HF_HUB_OFFLINE=1` is honoured and nothing is downloaded behind
the user's back; preprocessing is each model's own, as its authors run it.

* `pickscore`: PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on Pick-a-Pic preferences: ``logit_scale *
  cos(image, prompt)``, the reference implementation's formula (about 18-23 for SD images).
* `clip`: CLIP score (Hessel et al. 2021) as torchmetrics computes it: ``100 * max(cos(image, prompt), 0)`` with
  OpenAI's CLIP ViT-L/14.
* `aesthetic`: the LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding
  (1-10 scale, prompt ignored); `path` is the CLIP model, `head` the MLP's weights file.
* `hpsv2`, `hpsv2.1`: Human Preference Score v2 / v2.1 (Wu et al. 2023), an OpenCLIP ViT-H/14 fine-tuned on HPDv2:
  ``cos(image, prompt)`` (about 0.2-0.3), images resized by their longer side and padded to a square, as HPSv2's
  evaluation transform does. The two versions' scores are not comparable: name the one reported.
* `imagereward`: ImageReward (Xu et al. 2023), BLIP's ViT-L and a cross-attending BERT with an MLP head, trained
  on ImageRewardDB; normalised like its release (about -2 to 2).

HPSv2 and ImageReward load the authors' released checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``
of ``xswu/HPSv2``; ``ImageReward.pt`` of ``THUDM/ImageReward``) into transformers' CLIP and BLIP modules
(`checkpoints.py`): their own packages pin old dependencies, and OpenCLIP needs a torchvision that does not load
beside this project's CPU torch (``operator torchvision::nms does not exist``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np
import torch
from PIL import Image

#: Where each scorer's weights live by default (overridable by a local folder or file).
DEFAULT_PATHS = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "clip": "openai/clip-vit-large-patch14",
    "aesthetic": "openai/clip-vit-large-patch14",
    "hpsv2": "xswu/HPSv2",
    "hpsv2.1": "xswu/HPSv2",
    "imagereward": "THUDM/ImageReward",
}
#: PickScore's model repository has no processor: its authors use the one of the CLIP-H it was fine-tuned from.
#: HPSv2 fine-tuned the same OpenCLIP ViT-H/14, whose tokenizer (OpenAI's CLIP BPE) this repository also holds.
PICKSCORE_PROCESSOR = VIT_H_14_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: ImageReward's BLIP tokenises with BERT's uncased WordPiece, 35 tokens, padded to that length.
IMAGEREWARD_TOKENIZER, IMAGEREWARD_MAX_LENGTH = "google-bert/bert-base-uncased", 35
#: OpenAI CLIP's normalisation, which PickScore, CLIP score, HPSv2 and ImageReward all use.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
#: The LAION aesthetic head on the Hub (ViT-L/14 embeddings, trained on SAC + LAION-logos + AVA, MSE loss).
AESTHETIC_HEAD = ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")


def _embedding(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features (the projection in `pooler_output`); older ones a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``Resize(size, BICUBIC)`` then ``CenterCrop(size)`` on a PIL image (ImageReward's transform): the
    shorter side to `size` (the longer one truncated to an integer), then the centre, its offset rounded."""
    width, height = image.size
    new = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    if new != image.size:
        image = image.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def resize_longer_side_and_pad(image: Image.Image, size: int) -> Image.Image:
    """HPSv2's evaluation transform (OpenCLIP's ``ResizeMaxSize``): the longer side to `size` (bicubic, the other
    rounded), then black padding to a square, split evenly with the odd pixel after the image."""
    width, height = image.size
    scale = size / max(width, height)
    if scale != 1.0:
        image = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
    canvas = Image.new(image.mode, (size, size), 0)
    canvas.paste(image, ((size - image.size[0]) // 2, (size - image.size[1]) // 2))
    return canvas


def normalized_pixels(images: list, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(N, 3, H, W) float32: RGB scaled to [0, 1], minus `mean`, over `std` (torchvision's ToTensor + Normalize)."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    arrays = (arrays - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy())


def checkpoint_file(path: str, filename: str) -> str:
    """A checkpoint given as a file, a folder holding `filename`, or a Hub repository holding it (downloaded once
    into the Hub cache; under ``HF_HUB_OFFLINE=1`` only the cache is looked in)."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path} has no {filename} (it holds {sorted(os.listdir(path))[:10]})")
        return file
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, filename)


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json"))


class Scorer(ABC):
    """One score per (image, prompt); higher is better."""

    name: str = ""

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype

    @abstractmethod
    def score(self, images: list, prompts: list[str]) -> torch.Tensor:
        """Scores of shape (N,) for N PIL images and their N prompts, on the CPU (float32 for the neural scorers)."""


class _ClipBased(Scorer):
    """A transformers `CLIPModel` with its processor: image and text embeddings, L2-normalised."""

    def __init__(self, path: str, processor_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.model, self.processor = self.load(path, processor_path)
        self.model = self.model.to(self.device, self.dtype).eval()

    def load(self, path: str, processor_path: str | None):
        from transformers import AutoProcessor, CLIPModel

        return CLIPModel.from_pretrained(path), AutoProcessor.from_pretrained(processor_path or path)

    def pixel_values(self, images) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        pixels = self.pixel_values(images).to(self.device, self.dtype)
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


class HPSv2(_ClipBased):
    """HPS v2.0. `path`: the released checkpoint file, a folder or Hub repository holding it (default ``xswu/HPSv2``),
    or a folder the converted model was saved to (``config.json``); the tokenizer is `processor_path`, else the
    folder's own, else OpenCLIP ViT-H/14's."""

    name = "hpsv2"
    filename = "HPS_v2_compressed.pt"

    def __init__(self, path: str | None = None, processor_path: str | None = None, **kwargs):
        super().__init__(path or DEFAULT_PATHS[self.name], processor_path, **kwargs)

    def load(self, path: str, processor_path: str | None):
        from transformers import AutoTokenizer, CLIPModel

        from .checkpoints import clip_from_open_clip

        if os.path.isfile(os.path.join(path, "config.json")):
            model = CLIPModel.from_pretrained(path)
        else:
            file = checkpoint_file(path, self.filename)
            checkpoint = load_state_dict_file(file)
            try:
                model = clip_from_open_clip(checkpoint.get("state_dict", checkpoint))
            except KeyError as missing:
                raise ValueError(f"{file} is not an OpenCLIP ViT checkpoint (no {missing})") from None
        tokenizer = processor_path or (path if _has_tokenizer(path) else VIT_H_14_TOKENIZER)
        return model, AutoTokenizer.from_pretrained(tokenizer)

    def pixel_values(self, images) -> torch.Tensor:
        size = self.model.config.vision_config.image_size
        return normalized_pixels([resize_longer_side_and_pad(image, size) for image in images])

    def score(self, images, prompts):
        return self.cosines(images, prompts).cpu()  # HPSv2 reports the plain cosine, not the logit-scaled one


class HPSv21(HPSv2):
    """HPS v2.1: the same architecture and transform, retrained on more data (``HPS_v2.1_compressed.pt``)."""

    name = "hpsv2.1"
    filename = "HPS_v2.1_compressed.pt"


class ImageReward(Scorer):
    """ImageReward. `path`: ``ImageReward.pt``, a folder or Hub repository holding it (default ``THUDM/ImageReward``);
    the tokenizer is `tokenizer_path`, else the folder's own, else BERT base uncased."""

    name = "imagereward"
    filename = "ImageReward.pt"

    def __init__(self, path: str | None = None, tokenizer_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        from transformers import AutoTokenizer

        from .checkpoints import imagereward_from_checkpoint

        path = path or DEFAULT_PATHS[self.name]
        file = checkpoint_file(path, self.filename)
        try:
            self.model = imagereward_from_checkpoint(load_state_dict_file(file)).to(self.device, self.dtype)
        except KeyError as missing:
            raise ValueError(f"{file} is not an ImageReward checkpoint (no {missing})") from None
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or (path if _has_tokenizer(path) else IMAGEREWARD_TOKENIZER))
        self.image_size = self.model.vision_model.config.image_size

    def pixel_values(self, images) -> torch.Tensor:
        return normalized_pixels([resize_and_center_crop(image, self.image_size) for image in images])

    @torch.no_grad()
    def score(self, images, prompts):
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH,
                                return_tensors="pt")
        pixels = self.pixel_values(images).to(self.device, self.dtype)
        return self.model(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)).float().cpu()


SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (PickScore, ClipScore, AestheticScore, HPSv2, HPSv21, ImageReward)
}


def load_scorer(name: str, path: str | None = None, **kwargs) -> Scorer:
    """A scorer by name (`SCORERS`), from `path` (folder, Hub id) or its default; extra options go to its class."""
    if name not in SCORERS:
        raise ValueError(f"Unknown scorer {name!r}; available: {', '.join(SCORERS)}")
    return SCORERS[name](path=path, **kwargs)
