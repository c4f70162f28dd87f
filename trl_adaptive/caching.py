"""Latent cache: VAE latents and text embeddings computed once, stored on disk, and trained from.

The reference Diffusion-DPO scripts run the VAE encoder on both images and the text encoder on the prompt at every
step. With ``AdaptiveDPOConfig.cache_dir`` set, the trainer instead encodes the whole preference dataset once and
trains from the stored tensors (see docs/caching.md for what augmentation survives).

Layout of one cache (a sub-folder of ``cache_dir`` named by its key)::

    manifest.json             key, the settings that made it, shard lists, "complete": true
    rows-00000.safetensors    block 0 (source rows 0 .. block_rows - 1), its kept pairs in order: posterior mean/std
                              of the chosen and rejected latents (and of their mirror images with random_flip),
                              row_index, original sizes and crops (SDXL conditions on them), flipped (when the
                              dataset has that column)
    rows-00000.json           block 0's record: its number of pairs and their prompts (written last: "block done")
    text-00000.safetensors    per unique prompt: whatever `family.cache_text` returns (``prompt_embeds`` for SD)
    prompt_index.safetensors  per pair, the row of its prompt in the text shards
    prompts.json              the unique prompts, in the order of the text rows ("" always included)

The rows are cut into blocks of ``block_rows`` consecutive *source* rows (by ``row_index``), and block k is encoded by
process ``k % world_size``: every process of every node encodes its own blocks at once, and the blocks (encoded in
the same batches whatever the number of processes) make the same files on 1 or N processes. The text shards are
split the same way once all blocks are done. Everything is written into ``<key>.partial``, each file by an atomic
rename, so an interrupted build resumes from its finished blocks; the main process writes the manifest and renames
the folder to ``<key>`` only when every block and text shard exists.

The key is a SHA-256 of everything the tensors depend on: the family and pipeline class, the model name, the config
*and weights* of every frozen module (VAE, text encoders) and the tokenizers' vocabularies, the resolution, crop and
flip settings, the latent sampling mode and the dataset's fingerprint (``datasets.Dataset._fingerprint``, which
changes with any `map`/`select`, so dropped ties or flipped labels give a new key; for a stream, `stream_fingerprint`).
A cache is only ever opened through its key, so a stale one is never used: a changed setting gives a new folder, and
opening a folder whose manifest has another key raises.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transformers.utils import logging

from .data import ROW_INDEX_LIST, PreferenceCollator, PreferenceSchema, dataset_columns, detect_schema, is_streamed

logger = logging.get_logger(__name__)

#: Bump when the preprocessing of images or prompts, or the layout, changes, so that older caches are not reused.
CACHE_FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
PROMPTS_FILE = "prompts.json"
PROMPT_INDEX_FILE = "prompt_index.safetensors"
BUILD_FILE = "build.json"
#: Source rows per block (the unit of work of a parallel build, and of resuming one).
DEFAULT_BLOCK_ROWS = 1024
SIDES = ("chosen", "rejected")
#: Per-pair tensors the collator copies through unchanged (besides latents and text).
PASSTHROUGH_FIELDS = (
    "row_index",
    "original_size_chosen",
    "original_size_rejected",
    "crop_top_left_chosen",
    "crop_top_left_rejected",
    "flipped",
    "judge_margin",
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
    # `_use_default_values` is a list made from a set: its order changes with the process's hash seed, so two
    # processes of one run would compute different keys.
    dropped = ("_name_or_path", "_diffusers_version", "transformers_version", "_use_default_values")
    return {k: v for k, v in config.items() if k not in dropped}


def _tokenizer_identity(tokenizer) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "model_max_length": tokenizer.model_max_length,
        "padding_side": getattr(tokenizer, "padding_side", None),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }



def _file_identity(path) -> Any:
    """A source file as the key sees it: local files by path, size and modification time; anything else (a URL,
    which on the Hub names the revision) by its text."""
    path = str(path)
    if os.path.isfile(path):
        stat = os.stat(path)
        return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
    return path


def _source_identity(value) -> Any:
    """What a stream's source is made of: files (`_file_identity`), map-style datasets (`to_iterable_dataset`) by
    their fingerprint, anything else by its text."""
    if isinstance(value, (list, tuple)):
        return [_source_identity(v) for v in value]
    if hasattr(value, "_fingerprint"):
        return value._fingerprint
    if isinstance(value, (str, os.PathLike)):
        return _file_identity(value)
    return repr(value)


def stream_fingerprint(dataset) -> str:
    """An identity of a `datasets.IterableDataset` (which has no `_fingerprint`), for the cache key: its source files
    (`_file_identity`), its features, and every step applied to it: the step's type, its function hashed by
    `datasets.fingerprint.Hasher` (as `datasets` hashes the functions of `map`) and its arguments. A changed file, a
    different `map`/`filter` (flipped labels, ties kept) or another order gives another fingerprint."""
    from datasets.fingerprint import Hasher

    def describe(node) -> Any:
        if node is None:
            return None
        part: dict[str, Any] = {"type": type(node).__name__}
        for name in ("function", "mask_function", "fn_kwargs", "batched", "batch_size", "with_indices",
                     "input_columns", "remove_columns", "n", "generator"):
            if hasattr(node, name):
                value = getattr(node, name)
                if isinstance(value, np.random.Generator):
                    value = value.bit_generator.state
                part[name] = Hasher.hash(value)
        kwargs = getattr(node, "kwargs", None)
        if isinstance(kwargs, dict):
            part["source"] = {k: _source_identity(v) for k, v in kwargs.items()}
        if hasattr(node, "ex_iterables"):
            part["inputs"] = [describe(child) for child in node.ex_iterables]
        part["input"] = describe(getattr(node, "ex_iterable", None))
        return part

    shuffling = getattr(dataset, "_shuffling", None)
    description = {
        "steps": describe(dataset._ex_iterable),
        "features": repr(dataset.features),
        "shuffling": None if shuffling is None else Hasher.hash(shuffling.generator.bit_generator.state),
        "distributed": repr(getattr(dataset, "_distributed", None)),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def dataset_fingerprint(dataset) -> str:
    """`datasets.Dataset._fingerprint`, or `stream_fingerprint` for a `datasets.IterableDataset`."""
    if is_streamed(dataset):
        return stream_fingerprint(dataset)
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        raise ValueError(
            "cache_dir needs a datasets.Dataset or datasets.IterableDataset: its fingerprint is part of the cache key, "
            f"and {type(dataset).__name__} has none"
        )
    return fingerprint


def cache_settings(family, dataset, *, model_name: str | None, resolution: int, random_flip: bool) -> dict:
    """Everything the cached tensors depend on, as a JSON-able dict (stored in the manifest)."""
    fingerprint = dataset_fingerprint(dataset)
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
        "num_rows": None if is_streamed(dataset) else len(dataset),
    }


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def _replace_into(path: str, write: Callable[[str], None]) -> None:
    """Write a file through a temporary name and rename it into place: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    _replace_into(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


def _save_json(value, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1, default=str)

    _replace_into(path, write)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


class _ShardReader:
    """Reads rows of sharded safetensors files through memory maps, opened lazily (DataLoader workers re-open).

    Host memory per reader: the shard list and one open handle per shard touched; the tensors are read from the
    memory map row by row (the page cache holds what was read, not the process)."""

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
        shard = bisect.bisect_right(self.starts, index) - 1
        if shard not in self._handles:
            path = os.path.join(self.folder, self.shards[shard]["file"])
            self._handles[shard] = safe_open(path, framework="pt")
        return self._handles[shard], index - self.starts[shard]

    def row(self, index: int) -> dict[str, torch.Tensor]:
        handle, local = self._locate(index)
        return {name: handle.get_slice(name)[local : local + 1][0] for name in handle.keys()}


# ----------------------------------------------------------------------------------------------------------
# Building: every process encodes its own blocks
# ----------------------------------------------------------------------------------------------------------


def _unique_prompts(prompts: list[str]) -> list[str]:
    unique = list(dict.fromkeys(prompts))
    return unique if "" in unique else unique + [""]


def _block_name(block: int) -> str:
    return f"rows-{block:05d}"


def _together(step: Callable[[], Any], world_size: int) -> list[Any]:
    """Run `step` on every process and gather the results; if it raised on any process, raise on all of them (a
    bad row met by one process must not leave the others waiting for it)."""
    try:
        outcome = (step(), None)
    except Exception as err:  # reported to the other processes, then raised here unchanged
        if world_size == 1:
            raise
        outcome, own_error = (None, (type(err).__name__, str(err))), err
    else:
        own_error = None
    outcomes = [outcome]
    if world_size > 1:
        import torch.distributed as dist

        outcomes = [None] * world_size
        dist.all_gather_object(outcomes, outcome)
    if own_error is not None:
        raise own_error
    for rank, (_, error) in enumerate(outcomes):
        if error is not None:
            kind = ValueError if error[0] == "ValueError" else RuntimeError
            raise kind(f"latent cache build failed on process {rank}: {error[1]}")
    return [result for result, _ in outcomes]


def _rows_of_blocks(dataset, block_rows: int, wanted: Callable[[int], bool], seen: list[int]) -> Iterator[tuple[int, dict]]:
    """``(block, row)`` for every row whose block `wanted` accepts, in order; ``seen[0]`` ends as 1 + the largest
    ``row_index`` (so every process learns the number of blocks). A stream is read whole by every process (rows of
    other blocks are skipped before their images are decoded); a map-style dataset is indexed directly."""
    if is_streamed(dataset):
        for row in dataset:
            index = int(row["row_index"])
            seen[0] = max(seen[0], index + 1)
            if wanted(index // block_rows):
                yield index // block_rows, row
        return
    indices = dataset["row_index"]
    seen[0] = max(seen[0], max(indices) + 1 if len(indices) else 0)
    for position, index in enumerate(indices):
        if wanted(index // block_rows):
            yield index // block_rows, dataset[position]


def _collate(collator: PreferenceCollator, rows: list[dict], skip_bad_rows: bool) -> dict | None:
    """The batch of `rows`; with `skip_bad_rows`, rows whose images cannot be decoded are dropped with a warning."""
    try:
        return collator(rows)
    except ValueError:
        if not skip_bad_rows:
            raise
    kept = []
    for row in rows:
        try:
            collator([row])
            kept.append(row)
        except ValueError as err:
            logger.warning(f"skip_bad_rows: dropped {err}")
    return collator(kept) if kept else None


def _encode_batch(family, batch: dict, with_flips: bool) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for side in SIDES:
        pixels = batch[f"pixel_values_{side}"]
        variants = {side: pixels, f"{side}_flipped": pixels.flip(-1)} if with_flips else {side: pixels}
        for variant, images in variants.items():
            for stat, value in family.cache_images(images).items():
                tensors[f"{variant}.{stat}"] = value.detach().cpu()
    for name in PASSTHROUGH_FIELDS:
        if name in batch:
            tensors[name] = batch[name]
    return tensors


class _BuildProgress:
    """The main process's progress bar over source rows, counted from the blocks every process has finished (each
    block record read once), with the encode rate in images/s; the ETA comes with a known total."""

    def __init__(self, folder: str, total_rows: int | None, block_rows: int, images_per_pair: int, enabled: bool):
        self.folder, self.block_rows, self.images_per_pair = folder, block_rows, images_per_pair
        self.counted: set[str] = set(glob.glob(os.path.join(folder, "rows-*.json")))  # finished before this run
        self.rows = self.pairs = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_rows, desc="Caching latents", unit="row", initial=len(self.counted) * block_rows)

    def poll(self, force: bool = False) -> None:
        if self.bar is None or (not force and time.monotonic() - self.last < 2.0):
            return
        self.last = time.monotonic()
        new = sorted(set(glob.glob(os.path.join(self.folder, "rows-*.json"))) - self.counted)
        for path in new:
            self.counted.add(path)
            self.pairs += _read_json(path)["rows"]
        self.bar.update(len(new) * self.block_rows)
        elapsed = max(self.last - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.pairs * self.images_per_pair / elapsed:.1f} images/s")

    def close(self) -> None:
        if self.bar is not None:
            self.poll(force=True)
            self.bar.close()


def encode_row_blocks(
    family, dataset, partial: str, settings: dict, *, rank: int = 0, world_size: int = 1, batch_size: int = 8,
    block_rows: int = DEFAULT_BLOCK_ROWS, skip_bad_rows: bool = False, progress: bool = False,
) -> int:
    """Encode this process's blocks (block k belongs to process ``k % world_size``) that are not finished yet into
    `partial`; returns 1 + the largest ``row_index`` of the dataset (every process sees it).

    A block's rows are batched from the block's start, so a block's bytes do not depend on the number of processes.
    Host memory: one batch of rows and one block of latents."""
    schema = detect_schema(dataset_columns(dataset))
    collator = PreferenceCollator(schema, settings["resolution"])  # centre crop, no flip, no prompt dropout
    with_flips = settings["flip_variants"]
    done = {int(os.path.basename(p)[len("rows-"):-len(".json")]) for p in glob.glob(os.path.join(partial, "rows-*.json"))}
    total = None if is_streamed(dataset) else (max(dataset["row_index"]) + 1 if len(dataset) else 0)
    if total is None:
        splits = getattr(getattr(dataset, "info", None), "splits", None) or {}
        split = splits.get(str(getattr(dataset, "split", None))) if hasattr(splits, "get") else None
        total = getattr(split, "num_examples", None) or None
    bar = _BuildProgress(partial, total, block_rows, 2 * (1 + with_flips), progress)
    seen = [0]
    block, pending, parts, prompts = None, [], [], []

    def encode_pending():
        batch = _collate(collator, pending, skip_bad_rows) if pending else None
        if batch is not None:
            parts.append(_encode_batch(family, batch, with_flips))
            prompts.extend(batch["prompts"])
        pending.clear()

    def finish_block():
        encode_pending()
        file = None
        if parts:
            file = f"{_block_name(block)}.safetensors"
            _save_tensors({name: torch.cat([p[name] for p in parts]) for name in parts[0]}, os.path.join(partial, file))
        _save_json({"block": block, "rows": len(prompts), "file": file, "prompts": prompts},
                   os.path.join(partial, f"{_block_name(block)}.json"))
        parts.clear()
        prompts.clear()
        bar.poll(force=True)

    def mine(k: int) -> bool:
        return k % world_size == rank and k not in done

    with torch.no_grad():
        for k, row in _rows_of_blocks(dataset, block_rows, mine, seen):
            if k != block:
                if block is not None:
                    finish_block()
                block = k
            pending.append(row)
            if len(pending) == batch_size:
                encode_pending()
            bar.poll()
        if block is not None:
            finish_block()
    # Blocks of this process with no kept row (all ties, or past the data's end of another process's view) get an
    # empty record, so that the commit finds every block.
    for k in range(math.ceil(seen[0] / block_rows)):
        if mine(k) and not os.path.isfile(os.path.join(partial, f"{_block_name(k)}.json")):
            _save_json({"block": k, "rows": 0, "file": None, "prompts": []}, os.path.join(partial, f"{_block_name(k)}.json"))
    bar.close()
    return seen[0]


def _block_records(partial: str, num_blocks: int) -> list[dict]:
    records = []
    for k in range(num_blocks):
        path = os.path.join(partial, f"{_block_name(k)}.json")
        if not os.path.isfile(path):
            raise RuntimeError(f"latent cache build: block {k} ({path}) is missing after every process finished")
        records.append(_read_json(path))
    return records


def encode_text_shards(family, unique: list[str], partial: str, *, rank: int = 0, world_size: int = 1,
                       batch_size: int = 8, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
    """Encode this process's text shards (shard j: unique prompts ``j * block_rows ...``, process ``j % world_size``)."""
    with torch.no_grad():
        for j, start in enumerate(range(0, len(unique), block_rows)):
            path = os.path.join(partial, f"text-{j:05d}.safetensors")
            if j % world_size != rank or os.path.isfile(path):
                continue
            chunk = unique[start : start + block_rows]
            parts = [family.cache_text(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
            _save_tensors({name: torch.cat([p[name].detach().cpu() for p in parts]) for name in parts[0]}, path)


def _shard_list(files_and_rows: list[tuple[str, int]]) -> list[dict]:
    shards, start = [], 0
    for file, rows in files_and_rows:
        if rows:
            shards.append({"file": file, "start": start, "stop": start + rows})
            start += rows
    return shards


def commit_cache(partial: str, folder: str, settings: dict, records: list[dict], unique: list[str], *,
                 num_source_rows: int, block_rows: int) -> None:
    """Write the prompt index, prompts and manifest of a build whose blocks (`records`, in block order) and text
    shards are all in `partial`, then rename `partial` to `folder` (the main process, once)."""
    prompts = [p for record in records for p in record["prompts"]]
    if not prompts:
        raise ValueError("The preference dataset is empty (after dropping ties and bad rows)")
    position = {p: i for i, p in enumerate(unique)}
    _save_tensors({"prompt_index": torch.tensor([position[p] for p in prompts], dtype=torch.long)},
                  os.path.join(partial, PROMPT_INDEX_FILE))
    _save_json(unique, os.path.join(partial, PROMPTS_FILE))
    text_files = [(f"text-{j:05d}.safetensors", len(unique[s : s + block_rows]))
                  for j, s in enumerate(range(0, len(unique), block_rows))]
    manifest = {
        "key": cache_key(settings),
        "settings": settings,
        "num_rows": len(prompts),
        "num_source_rows": num_source_rows,
        "num_prompts": len(unique),
        "block_rows": block_rows,
        "row_shards": _shard_list([(r["file"], r["rows"]) for r in records]),
        "text_shards": _shard_list(text_files),
        "complete": True,
    }
    _save_json(manifest, os.path.join(partial, MANIFEST_FILE))
    existing = read_manifest(folder)
    if existing is not None and existing.get("complete") and existing.get("key") == manifest["key"]:
        shutil.rmtree(partial)  # another run finished the same cache first
    else:
        if os.path.isdir(folder):  # an incomplete or foreign folder under our key's name: replace it
            shutil.rmtree(folder)
        os.replace(partial, folder)


def build_cache(
    family,
    dataset,
    folder: str,
    settings: dict,
    *,
    schema: PreferenceSchema | None = None,
    batch_size: int = 8,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    skip_bad_rows: bool = False,
) -> str:
    """Encode every pair of a prepared preference dataset (ties already dropped) into a cache at `folder`, with
    `world_size` processes (all of them call this; `torch.distributed` must be initialised when there are several).

    Work goes into ``folder + ".partial"``, kept across interruptions: a build started again (on any number of
    processes) encodes only the blocks that are not finished. `schema` is accepted for compatibility (the schema is
    detected from the dataset's columns)."""
    partial = f"{folder}.partial"
    if rank == 0:
        os.makedirs(partial, exist_ok=True)
        build_file = os.path.join(partial, BUILD_FILE)
        if os.path.isfile(build_file):  # resuming: blocks keep the size and batches they were started with
            started = _read_json(build_file)
            block_rows, batch_size = started["block_rows"], started["batch_size"]
        else:
            _save_json({"block_rows": block_rows, "batch_size": batch_size}, build_file)
    block_rows, batch_size = _together(lambda: (block_rows, batch_size) if rank == 0 else None, world_size)[0]
    os.makedirs(partial, exist_ok=True)

    seen = _together(lambda: encode_row_blocks(
        family, dataset, partial, settings, rank=rank, world_size=world_size, batch_size=batch_size,
        block_rows=block_rows, skip_bad_rows=skip_bad_rows, progress=progress,
    ), world_size)
    records = _block_records(partial, math.ceil(max(seen) / block_rows))
    prompts = [p for record in records for p in record["prompts"]]
    unique = _unique_prompts(prompts)
    _together(lambda: encode_text_shards(family, unique, partial, rank=rank, world_size=world_size,
                                         batch_size=batch_size, block_rows=block_rows), world_size)

    def commit():
        if rank == 0:
            commit_cache(partial, folder, settings, records, unique, num_source_rows=max(seen), block_rows=block_rows)

    _together(commit, world_size)
    return folder


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    return _read_json(path)


class CachedPreferenceDataset(torch.utils.data.Dataset):
    """A built cache, opened for training: item i is pair i of the dataset it was built from.

    Raises ``ValueError`` when the folder is incomplete or was built for another key (a stale cache). Host memory:
    the manifest, the prompts, one int64 per pair (its prompt's row) and the shard handles; the latents and text
    embeddings are read from memory-mapped files row by row.
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
        with safe_open(os.path.join(folder, PROMPT_INDEX_FILE), framework="pt") as f:
            self.prompt_index = f.get_tensor("prompt_index")
        self.prompts = _read_json(os.path.join(folder, PROMPTS_FILE))
        self.empty_prompt_index = self.prompts.index("")

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def num_source_rows(self) -> int:
        """1 + the largest ``row_index`` of the dataset it was built from (the size of per-pair records)."""
        return self.manifest["num_source_rows"]

    @property
    def column_names(self) -> list[str]:  # what a datasets.Dataset user would look for
        return sorted([*self.rows.row(0), "prompt_index"]) if len(self) else []

    def __len__(self) -> int:
        return self.manifest["num_rows"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows.row(int(index))
        row["prompt_index"] = self.prompt_index[int(index)]
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
    batch_size: int = 8, progress: bool = False, rank: int = 0, world_size: int = 1, skip_bad_rows: bool = False,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> CachedPreferenceDataset:
    """The cache of `dataset` under `cache_dir`: opened if one with the same key exists, built otherwise (by all
    `world_size` processes, each calling this with its `rank`)."""
    settings = cache_settings(family, dataset, model_name=model_name, resolution=resolution, random_flip=random_flip)
    key = cache_key(settings)
    folder = os.path.join(cache_dir, key)
    manifest = read_manifest(folder)
    # Every process decides from the same files; a process that saw the finished cache (while another had just
    # renamed it) would not join the build's collectives, so the decision is taken by the main process.
    missing = manifest is None or not manifest.get("complete") or manifest.get("key") != key
    missing = _together(lambda: missing if rank == 0 else None, world_size)[0]
    if missing:
        os.makedirs(cache_dir, exist_ok=True)
        build_cache(family, dataset, folder, settings, batch_size=batch_size, progress=progress, rank=rank,
                    world_size=world_size, skip_bad_rows=skip_bad_rows, block_rows=block_rows)
    return CachedPreferenceDataset(folder, expected_key=key)


def use_latent_cache(trainer) -> None:
    """Replace the trainer's datasets by their caches and its collator by `CachedPreferenceCollator`.

    Every process encodes its share of the rows (`build_cache`), or all of them find the cache by its key. The
    cache folder must be one that every process can read and write (a shared file system across nodes).
    """
    args = trainer.args
    pixel_collator = trainer.data_collator

    def cached(dataset):
        return open_or_build_cache(
            trainer.family, dataset, args.cache_dir, model_name=trainer.base_model_name,
            resolution=args.resolution, random_flip=args.random_flip,
            batch_size=args.per_device_train_batch_size, progress=trainer.is_world_process_zero() and not args.disable_tqdm,
            rank=args.process_index, world_size=args.world_size, skip_bad_rows=args.skip_bad_rows,
            block_rows=args.cache_block_rows,
        )

    empty_text = None
    if trainer.train_dataset is not None:
        trainer.train_dataset = cached(trainer.train_dataset)
        empty_text = trainer.train_dataset.empty_prompt_text()
        if trainer.dataset_info is not None and trainer.dataset_info.get("num_rows") is None:  # a stream, now counted
            trainer.dataset_info["num_rows"] = len(trainer.train_dataset)
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
