"""Latent cache: VAE latents and text embeddings computed once, stored on disk, and trained from.

The reference Diffusion-DPO scripts run the VAE encoder on both images and the text encoder on the prompt at every
step. With ``AdaptiveDPOConfig.cache_dir`` set, the trainer instead encodes the whole preference dataset once and
trains from the stored tensors (see docs/caching.md for what augmentation survives).

Layout of one cache (a sub-folder of ``cache_dir`` named by its key)::

    manifest.json             key, the settings that made it, tensor names, shard list, "complete": true
    rows-00000.safetensors    per pair, in dataset order: posterior mean/std of the chosen and rejected latents (and
                              of their mirror images with random_flip), prompt_index, row_index, original sizes and
                              crops (SDXL conditions on them), flipped (when the dataset has that column)
    text-00000.safetensors    per unique prompt: whatever `family.cache_text` returns (``prompt_embeds`` for SD)
    prompts.json              the unique prompts, in the order of the text rows ("" always included)

The key is a SHA-256 of everything the tensors depend on: the family and pipeline class, the model name, the config
*and weights* of every frozen module (VAE, text encoders) and the tokenizers' vocabularies, the resolution, crop and
flip settings, the latent sampling mode and the dataset's fingerprint (``datasets.Dataset._fingerprint``, which
changes with any `map`/`select`, so dropped ties or flipped labels give a new key). A cache is only ever opened
through its key, so a stale one is never used: a changed setting gives a new folder, and opening a folder whose
manifest has another key raises. A cache is written to a temporary folder and renamed into place when complete,
so an interrupted build is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import ROW_INDEX_LIST, PreferenceCollator, PreferenceSchema, detect_schema

#: Bump when the preprocessing of images or prompts changes, so that older caches are not reused.
CACHE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROMPTS_FILE = "prompts.json"
SIDES = ("chosen", "rejected")
#: Per-pair tensors the collator copies through unchanged (besides latents and text).
PASSTHROUGH_FIELDS = (
    "row_index",
    "original_size_chosen",
    "original_size_rejected",
    "crop_top_left_chosen",
    "crop_top_left_rejected",
    "flipped",
)


# ----------------------------------------------------------------------------------------------------------
# The key
# ----------------------------------------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().contiguous()
    return tensor.view(torch.uint8).cpu().numpy().tobytes() if tensor.numel() else b""


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every parameter and buffer)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _config_dict(module) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Paths and versions describe where a model came from, not what it computes; the weights hash covers identity.
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "_diffusers_version", "transformers_version")}


def _tokenizer_identity(tokenizer) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "model_max_length": tokenizer.model_max_length,
        "padding_side": getattr(tokenizer, "padding_side", None),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def cache_settings(family, dataset, *, model_name: str | None, resolution: int, random_flip: bool) -> dict:
    """Everything the cached tensors depend on, as a JSON-able dict (stored in the manifest)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        raise ValueError(
            "cache_dir needs a datasets.Dataset: its fingerprint is part of the cache key, and "
            f"{type(dataset).__name__} has none"
        )
    modules = {
        name: {"class": type(module).__name__, "config": _config_dict(module), "weights_sha256": module_fingerprint(module)}
        for name, module in sorted(family.frozen_modules().items())
    }
    tokenizers = {
        name: _tokenizer_identity(component)
        for name, component in sorted(family.pipeline.components.items())
        if name.startswith("tokenizer") and component is not None
    }
    return {
        "format": CACHE_FORMAT_VERSION,
        "family": type(family).__name__,
        "pipeline": type(family.pipeline).__name__,
        "model": model_name,
        "frozen_modules": modules,
        "tokenizers": tokenizers,
        "resolution": resolution,
        "crop": "center",
        "flip_variants": bool(random_flip),
        "latent_sampling": "sample" if family.sample_latents else "mean",
        "dataset_fingerprint": fingerprint,
        "num_rows": len(dataset),
    }


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------
# Sharded tensor storage
# ----------------------------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends batches of named tensors (same leading dimension) and writes a safetensors file every `shard_rows`."""

    def __init__(self, folder: str, prefix: str, shard_rows: int):
        self.folder, self.prefix, self.shard_rows = folder, prefix, shard_rows
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.rows = 0

    def append(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {t.shape[0] for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"cache tensors of one batch have different lengths: { {k: t.shape for k, t in tensors.items()} }")
        if self.pending and set(tensors) != set(self.pending):
            raise ValueError(f"cache tensor names changed from {sorted(self.pending)} to {sorted(tensors)}")
        for name, tensor in tensors.items():
            self.pending.setdefault(name, []).append(tensor.detach().cpu())
        self.pending_rows += lengths.pop()
        if self.pending_rows >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.pending_rows:
            return
        tensors = {name: torch.cat(parts).contiguous() for name, parts in self.pending.items()}
        file = f"{self.prefix}-{len(self.shards):05d}.safetensors"
        save_file(tensors, os.path.join(self.folder, file))
        self.shards.append({"file": file, "start": self.rows, "stop": self.rows + self.pending_rows})
        self.rows += self.pending_rows
        self.pending, self.pending_rows = {}, 0

    def close(self) -> list[dict]:
        self._flush()
        return self.shards


class _ShardReader:
    """Reads rows of sharded safetensors files through memory maps, opened lazily (DataLoader workers re-open)."""

    def __init__(self, folder: str, shards: list[dict]):
        self.folder, self.shards = folder, shards
        self.starts = [s["start"] for s in shards]
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.shards[-1]["stop"] if self.shards else 0

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def _locate(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"cache row {index} out of range [0, {len(self)})")
        shard = max(i for i, start in enumerate(self.starts) if start <= index)
        if shard not in self._handles:
            path = os.path.join(self.folder, self.shards[shard]["file"])
            self._handles[shard] = safe_open(path, framework="pt")
        return self._handles[shard], index - self.starts[shard]

    def row(self, index: int) -> dict[str, torch.Tensor]:
        handle, local = self._locate(index)
        return {name: handle.get_slice(name)[local : local + 1][0] for name in handle.keys()}


# ----------------------------------------------------------------------------------------------------------
# Building and opening
# ----------------------------------------------------------------------------------------------------------


def _unique_prompts(prompts: list[str]) -> list[str]:
    unique = list(dict.fromkeys(prompts))
    return unique if "" in unique else unique + [""]


@torch.no_grad()
def build_cache(
    family,
    dataset,
    folder: str,
    settings: dict,
    *,
    schema: PreferenceSchema | None = None,
    batch_size: int = 8,
    shard_rows: int = 1024,
    progress: bool = False,
) -> str:
    """Encode every pair of a prepared preference dataset (ties already dropped) into a cache at `folder`."""
    schema = schema or detect_schema(dataset.column_names)
    resolution, with_flips = settings["resolution"], settings["flip_variants"]
    collator = PreferenceCollator(schema, resolution)  # centre crop, no flip, no prompt dropout: deterministic
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rows_writer = _ShardWriter(tmp, "rows", shard_rows)
    prompts: list[str] = []
    batches = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="Caching latents", unit="batch")
    for start in batches:
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        tensors: dict[str, torch.Tensor] = {}
        for side in SIDES:
            pixels = batch[f"pixel_values_{side}"]
            variants = {side: pixels, f"{side}_flipped": pixels.flip(-1)} if with_flips else {side: pixels}
            for variant, images in variants.items():
                for stat, value in family.cache_images(images).items():
                    tensors[f"{variant}.{stat}"] = value
        for name in PASSTHROUGH_FIELDS:
            if name in batch:
                tensors[name] = batch[name]
        tensors["prompt_index"] = torch.arange(len(prompts), len(prompts) + len(batch["prompts"]))
        prompts.extend(batch["prompts"])
        rows_writer.append(tensors)
    row_shards = rows_writer.close()

    # Text: one row per unique prompt; each pair's prompt_index is rewritten to point at its prompt's row.
    unique = _unique_prompts(prompts)
    position = {p: i for i, p in enumerate(unique)}
    remap = torch.tensor([position[p] for p in prompts], dtype=torch.long)
    for shard in row_shards:
        path = os.path.join(tmp, shard["file"])
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        tensors["prompt_index"] = remap[tensors["prompt_index"]]
        save_file(tensors, path)
    text_writer = _ShardWriter(tmp, "text", shard_rows)
    for start in range(0, len(unique), batch_size):
        text_writer.append(family.cache_text(unique[start : start + batch_size]))
    text_shards = text_writer.close()

    with open(os.path.join(tmp, PROMPTS_FILE), "w") as f:
        json.dump(unique, f)
    manifest = {
        "key": cache_key(settings),
        "settings": settings,
        "num_rows": len(dataset),
        "num_prompts": len(unique),
        "row_shards": row_shards,
        "text_shards": text_shards,
        "complete": True,
    }
    with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1, default=str)
    existing = read_manifest(folder)
    if existing is not None and existing.get("complete") and existing.get("key") == manifest["key"]:
        shutil.rmtree(tmp)  # another process finished the same cache first
    else:
        if os.path.isdir(folder):  # an incomplete or foreign folder under our key's name: replace it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class CachedPreferenceDataset(torch.utils.data.Dataset):
    """A built cache, opened for training: item i is pair i of the dataset it was built from.

    Raises ``ValueError`` when the folder is incomplete or was built for another key (a stale cache).
    """

    def __init__(self, folder: str, expected_key: str | None = None):
        manifest = read_manifest(folder)
        if manifest is None or not manifest.get("complete"):
            raise ValueError(f"{folder} is not a complete latent cache (no finished {MANIFEST_FILE})")
        if expected_key is not None and manifest["key"] != expected_key:
            raise ValueError(
                f"Stale latent cache in {folder}: it was built for key {manifest['key']}, but the current model, "
                f"transforms and dataset give key {expected_key}. Delete it or point cache_dir elsewhere."
            )
        self.folder, self.manifest = folder, manifest
        self.rows = _ShardReader(folder, manifest["row_shards"])
        self.text = _ShardReader(folder, manifest["text_shards"])
        with open(os.path.join(folder, PROMPTS_FILE)) as f:
            self.prompts = json.load(f)
        self.empty_prompt_index = self.prompts.index("")

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def column_names(self) -> list[str]:  # what a datasets.Dataset user would look for
        return sorted(self.rows.row(0)) if len(self) else []

    def __len__(self) -> int:
        return self.manifest["num_rows"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows.row(int(index))
        row["text"] = self.text.row(int(row["prompt_index"]))
        row["prompt"] = self.prompts[int(row["prompt_index"])]
        return row

    def empty_prompt_text(self) -> dict[str, torch.Tensor]:
        return self.text.row(self.empty_prompt_index)


class CachedPreferenceCollator:
    """Batches cached rows into what `pair_forward` reads: ``latents_{chosen,rejected}`` (posterior means) with
    ``latents_{chosen,rejected}_std`` when the cache has them (the family draws ``mean + std * noise`` with the
    pair's generator, as it would from pixels), the text tensors (``prompt_embeds``, ...), ``prompts`` and the
    pass-through fields (``row_index``, sizes, crops, ``flipped``).

    Augmentation decided here, like `PreferenceCollator` and with the same draws from a generator seeded with
    ``(seed, epoch, row_index)``: a mirror image with `random_flip` (the cache must hold mirrored latents), and the
    prompt replaced by "" with `empty_prompt_probability`. Rows that are not cached rows (an uncached dataset
    passed to `evaluate`) go to `fallback`, the pixel collator.
    """

    def __init__(
        self,
        empty_prompt_text: dict[str, torch.Tensor],
        random_flip: bool = False,
        empty_prompt_probability: float = 0.0,
        seed: int = 0,
        fallback=None,
    ):
        self.empty_prompt_text = empty_prompt_text
        self.random_flip = random_flip
        self.empty_prompt_probability = empty_prompt_probability
        self.seed = seed
        self.epoch = 0
        self.fallback = fallback

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.fallback, "set_epoch"):
            self.fallback.set_epoch(epoch)

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        if rows and "prompt_index" not in rows[0]:
            if self.fallback is None:
                raise ValueError("CachedPreferenceCollator got rows that are not from a latent cache")
            return self.fallback(rows)
        batch: dict[str, list] = {}
        prompts = []
        for position, row in enumerate(rows):
            row_index = int(row["row_index"])
            rng = np.random.default_rng([self.seed, self.epoch, row_index if row_index >= 0 else position])
            flip = bool(self.random_flip and rng.random() < 0.5)
            for side in SIDES:
                variant = f"{side}_flipped" if flip else side
                if f"{variant}.mean" not in row:
                    raise ValueError(f"row {row_index}: the latent cache has no mirrored latents; rebuild it with random_flip")
                batch.setdefault(f"latents_{side}", []).append(row[f"{variant}.mean"])
                if f"{variant}.std" in row:
                    batch.setdefault(f"latents_{side}_std", []).append(row[f"{variant}.std"])
            text, prompt = row["text"], row["prompt"]
            if self.empty_prompt_probability and rng.random() < self.empty_prompt_probability:
                text, prompt = self.empty_prompt_text, ""
            for name, value in text.items():
                batch.setdefault(name, []).append(value)
            prompts.append(prompt)
            for name in PASSTHROUGH_FIELDS:
                if name in row:
                    batch.setdefault(name, []).append(row[name])
        out: dict[str, Any] = {name: torch.stack(values) for name, values in batch.items()}
        out["prompts"] = prompts
        if "row_index" in out:
            out[ROW_INDEX_LIST] = out["row_index"].tolist()
        return out


def open_or_build_cache(
    family, dataset, cache_dir: str, *, model_name: str | None, resolution: int, random_flip: bool,
    batch_size: int = 8, progress: bool = False,
) -> CachedPreferenceDataset:
    """The cache of `dataset` under `cache_dir`: opened if one with the same key exists, built otherwise."""
    settings = cache_settings(family, dataset, model_name=model_name, resolution=resolution, random_flip=random_flip)
    key = cache_key(settings)
    folder = os.path.join(cache_dir, key)
    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete") or manifest.get("key") != key:
        os.makedirs(cache_dir, exist_ok=True)
        build_cache(family, dataset, folder, settings, batch_size=batch_size, progress=progress)
    return CachedPreferenceDataset(folder, expected_key=key)


def use_latent_cache(trainer) -> None:
    """Replace the trainer's datasets by their caches and its collator by `CachedPreferenceCollator`.

    The main process builds (or finds) each cache first; the others then open it by the same key.
    """
    args = trainer.args
    pixel_collator = trainer.data_collator

    def cached(dataset):
        with args.main_process_first(desc="latent cache"):
            return open_or_build_cache(
                trainer.family, dataset, args.cache_dir, model_name=trainer.base_model_name,
                resolution=args.resolution, random_flip=args.random_flip,
                batch_size=args.per_device_train_batch_size, progress=trainer.is_world_process_zero(),
            )

    empty_text = None
    if trainer.train_dataset is not None:
        trainer.train_dataset = cached(trainer.train_dataset)
        empty_text = trainer.train_dataset.empty_prompt_text()
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {name: cached(ds) for name, ds in trainer.eval_dataset.items()}
        empty_text = empty_text or next(iter(trainer.eval_dataset.values())).empty_prompt_text()
    elif trainer.eval_dataset is not None:
        trainer.eval_dataset = cached(trainer.eval_dataset)
        empty_text = empty_text or trainer.eval_dataset.empty_prompt_text()
    trainer.data_collator = CachedPreferenceCollator(
        empty_text,
        random_flip=args.random_flip,
        empty_prompt_probability=args.empty_prompt_probability,
        seed=args.seed,
        fallback=pixel_collator,
    )
