"""Preference datasets: schema detection, label checks, tie filtering, label flipping and the collator.

Three schemas are accepted (detected from the column names):

* ``pickapic`` (Pick-a-Pic v2): ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes), ``label_0`` in {0, 0.5, 1}
  (1 means ``jpg_0`` is preferred, 0.5 is a tie).
* ``trl`` (TRL-style image preference): ``prompt``, ``chosen``, ``rejected`` (PIL images, bytes or file paths).
* ``hpdv2`` (HPDv2 train): ``prompt``, a two-image column (``image``, ``images`` or ``file_path``) and
  ``human_preference``, a pair of labels where 1 marks the preferred image.

Any schema may carry ``judge_scores``, a reward model's scores of the row's two images (`add_judge_scores`), which the
minority filter's ``judge`` evidence reads.

The dataset is never rewritten: ties are removed with an index mapping and each row's winner is decided in the
collator, so preparing Pick-a-Pic (hundreds of GB) costs one pass over its label column.

A `datasets.IterableDataset` (``load_dataset(..., streaming=True)``) is prepared lazily instead: ``row_index`` (the
row's position in the stream as given), the label and prompt checks and the tie filter become steps of the stream,
run as rows are read (`prepare_streamed_preference_dataset`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: Batch key of the rows' ``row_index`` as a Python list, which the collators add beside the tensor: the per-pair noise
#: generators are seeded on the host (`trl_adaptive.noise`), and by the time the step runs the tensor is on the GPU.
ROW_INDEX_LIST = "row_index_list"

VALID_LABELS = (0.0, 0.5, 1.0)
#: Optional column of a judge's scores of each row's two images, in the schema's image order (`add_judge_scores`):
#: the minority filter's ``judge`` evidence (docs/minority_filter.md, "A judge you bring").
JUDGE_SCORES_COLUMN = "judge_scores"


# ----------------------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceSchema:
    name: str
    prompt_column: str
    image_columns: tuple[str, ...]  # two columns, or one column holding a pair of images
    label_column: str | None  # None: the first image column is always the preferred one

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.prompt_column, *self.image_columns) + ((self.label_column,) if self.label_column else ())

    def first_wins(self, label: Any, row: int) -> float:
        """1.0 if the first image is preferred, 0.0 if the second, 0.5 for a tie; ValueError otherwise."""
        if self.label_column is None:
            return 1.0
        if self.name == "hpdv2":
            try:
                a, b = (float(v) for v in label)
            except (TypeError, ValueError):
                raise ValueError(
                    f"row {row}, column {self.label_column!r}: expected a pair of labels like [1, 0], got {label!r}"
                ) from None
            for v in (a, b):
                if v not in VALID_LABELS:
                    raise ValueError(f"row {row}, column {self.label_column!r}: label {v!r} not in {{0, 0.5, 1}}")
            return 0.5 if a == b else float(a > b)
        try:
            value = float(label)
        except (TypeError, ValueError):
            value = None
        if value not in VALID_LABELS:
            raise ValueError(f"row {row}, column {self.label_column!r}: label {label!r} not in {{0, 0.5, 1}}")
        return value

    def images(self, example: dict) -> tuple[Any, Any]:
        if len(self.image_columns) == 2:
            return example[self.image_columns[0]], example[self.image_columns[1]]
        pair = example[self.image_columns[0]]
        if pair is None or len(pair) != 2:
            raise ValueError(
                f"row {example.get('row_index')}, column {self.image_columns[0]!r}: expected two images, got {pair!r:.80}"
            )
        return pair[0], pair[1]


PICKAPIC = PreferenceSchema("pickapic", "caption", ("jpg_0", "jpg_1"), "label_0")
TRL_PREFERENCE = PreferenceSchema("trl", "prompt", ("chosen", "rejected"), None)
HPDV2_IMAGE_COLUMNS = ("image", "images", "file_path")


def detect_schema(column_names: list[str]) -> PreferenceSchema:
    columns = set(column_names)
    if {"jpg_0", "jpg_1"} & columns or "caption" in columns:
        schema = PICKAPIC
    elif "human_preference" in columns:
        image_column = next((c for c in HPDV2_IMAGE_COLUMNS if c in columns), "image")
        schema = PreferenceSchema("hpdv2", "prompt", (image_column,), "human_preference")
    elif {"chosen", "rejected"} & columns:
        schema = TRL_PREFERENCE
    else:
        raise ValueError(
            f"Cannot recognise the preference dataset from its columns {sorted(columns)}. Expected one of: "
            "Pick-a-Pic (caption, jpg_0, jpg_1, label_0); TRL (prompt, chosen, rejected); "
            "HPDv2 (prompt, image, human_preference)"
        )
    missing = [c for c in schema.columns if c not in columns]
    if missing:
        raise ValueError(f"Preference dataset ({schema.name} schema) is missing column(s) {missing}")
    return schema


# ----------------------------------------------------------------------------------------------------------
# Preparing a dataset
# ----------------------------------------------------------------------------------------------------------


def is_streamed(dataset) -> bool:
    """Whether `dataset` is a `datasets.IterableDataset` (read as a stream: no length, no random access)."""
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def dataset_columns(dataset) -> list[str]:
    """Column names of a map-style or streamed dataset (a stream whose features are unknown is asked for its first
    row)."""
    names = getattr(dataset, "column_names", None)
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    if names is None:
        names = list(next(iter(dataset.take(1)), {}).keys())
    return list(names)


def prepare_preference_dataset(
    dataset,
    drop_ties: bool = True,
    *,
    check_images: bool = False,
    skip_bad_rows: bool = False,
    num_proc: int | None = None,
    progress: bool = True,
):
    """Check the schema and every row, add ``row_index`` (position in the given dataset), drop ties.

    Every label and prompt is checked (a label outside {0, 0.5, 1}, a prompt that is not a string); with
    `check_images` every image is decoded once too (`find_undecodable_images`, a progress bar, `num_proc`
    processes), so that a bad image stops the run now rather than at the step that meets it. A bad row raises a
    ``ValueError`` naming its row and column (and counting the others), or with `skip_bad_rows` is dropped.

    Returns ``(dataset, info)`` with ``info = {"schema", "num_rows", "num_ties", "ties_dropped", "num_bad_rows",
    "bad_rows"}``; ``bad_rows`` lists ``{"row", "column", "error"}`` of every dropped bad row.

    A `datasets.IterableDataset` goes to `prepare_streamed_preference_dataset` (the counts are then None).
    """
    if is_streamed(dataset):
        return prepare_streamed_preference_dataset(dataset, drop_ties, skip_bad_rows=skip_bad_rows)
    schema = detect_schema(dataset.column_names)
    if "row_index" not in dataset.column_names:
        dataset = dataset.add_column("row_index", list(range(len(dataset))))
    rows = dataset["row_index"]
    bad: dict[int, tuple[str, str]] = {}  # position -> (column, message)
    ties = set()
    if schema.label_column is not None:
        for i, label in enumerate(dataset[schema.label_column]):
            try:
                if schema.first_wins(label, row=rows[i]) == 0.5:
                    ties.add(i)
            except ValueError as err:
                bad[i] = (schema.label_column, str(err))
    for i, prompt in enumerate(dataset[schema.prompt_column]):
        if not isinstance(prompt, str) and i not in bad:
            bad[i] = (schema.prompt_column, f"row {rows[i]}, column {schema.prompt_column!r}: expected a string, got {prompt!r:.80}")
    if JUDGE_SCORES_COLUMN in dataset.column_names:
        for i, value in enumerate(dataset[JUDGE_SCORES_COLUMN]):
            try:
                judge_scores(value, rows[i])
            except ValueError as err:
                bad.setdefault(i, (JUDGE_SCORES_COLUMN, str(err)))
    if check_images:
        bad.update(find_undecodable_images(dataset, schema, skip=set(bad), num_proc=num_proc, progress=progress))
    if bad and not skip_bad_rows:
        first = [bad[i][1] for i in sorted(bad)[:5]]
        more = f" (and {len(bad) - len(first)} more)" if len(bad) > len(first) else ""
        raise ValueError(
            f"{len(bad)} bad row(s) in the preference dataset{more}: " + "; ".join(first)
            + ". Fix them, or pass skip_bad_rows=True to drop such rows (they are counted and listed in the output folder)."
        )
    keep = [i for i in range(len(dataset)) if i not in bad and not (drop_ties and i in ties)]
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    if len(dataset) == 0:
        raise ValueError("The preference dataset is empty (after dropping ties and bad rows)")
    bad_rows = [{"row": rows[i], "column": bad[i][0], "error": bad[i][1]} for i in sorted(bad)]
    info = {"schema": schema.name, "num_rows": len(dataset), "num_ties": len(ties), "ties_dropped": drop_ties,
            "num_bad_rows": len(bad_rows), "bad_rows": bad_rows}
    return dataset, info


def row_problem(schema: PreferenceSchema, row: dict) -> tuple[str, str] | None:
    """``(column, message)`` when a row's label or prompt is bad (the checks `prepare_preference_dataset` makes on
    every row), else None. Images are not decoded here."""
    if schema.label_column is not None:
        try:
            schema.first_wins(row[schema.label_column], row=row["row_index"])
        except ValueError as err:
            return schema.label_column, str(err)
    prompt = row[schema.prompt_column]
    if not isinstance(prompt, str):
        return schema.prompt_column, f"row {row['row_index']}, column {schema.prompt_column!r}: expected a string, got {prompt!r:.80}"
    if JUDGE_SCORES_COLUMN in row:
        try:
            judge_scores(row[JUDGE_SCORES_COLUMN], row["row_index"])
        except ValueError as err:
            return JUDGE_SCORES_COLUMN, str(err)
    return None


def judge_scores(value: Any, row: Any) -> tuple[float, float]:
    """A row's ``judge_scores``: the judge's scores of its first and second image as two finite floats, or two NaNs
    where the judge abstains (``None``); ValueError naming the row and column otherwise."""
    if value is None:
        return float("nan"), float("nan")
    try:
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"row {row}, column {JUDGE_SCORES_COLUMN!r}: expected the judge's scores of the two images, like "
            f"[0.21, 0.19], got {value!r:.80}"
        ) from None
    if not (np.isfinite(first) and np.isfinite(second)):
        raise ValueError(f"row {row}, column {JUDGE_SCORES_COLUMN!r}: scores must be finite, got {value!r:.80} (None: no judgement)")
    return first, second


def labelled_judge_margin(value: Any, first_wins: float, row: Any) -> float:
    """The judge's score of the labelled winner minus the loser's (NaN where it abstains); a kept tie trains with the
    first image as the winner, so its margin is the first image's lead."""
    first, second = judge_scores(value, row)
    return first - second if first_wins != 0.0 else second - first


def _keep_streamed_row(row: dict, schema: PreferenceSchema, drop_ties: bool, skip_bad_rows: bool) -> bool:
    problem = row_problem(schema, row)
    if problem is not None:
        if not skip_bad_rows:
            raise ValueError(
                f"bad row in the streamed preference dataset: {problem[1]}. Fix it, or pass skip_bad_rows=True to drop "
                "such rows (each is then named in a warning)."
            )
        logger.warning(f"skip_bad_rows: dropped {problem[1]}")
        return False
    return not (drop_ties and schema.label_column is not None and schema.first_wins(row[schema.label_column], row["row_index"]) == 0.5)


def prepare_streamed_preference_dataset(dataset, drop_ties: bool = True, *, skip_bad_rows: bool = False):
    """`prepare_preference_dataset` for a `datasets.IterableDataset`, as steps of the stream run while it is read.

    ``row_index`` is the row's position in the stream as given (a stream read again gives every row the same id, so
    per-pair records and resumed runs line up); a row whose label or prompt is bad raises a ``ValueError`` naming its
    row and column when it is read (with a latent cache: while the cache is built, before training), or with
    `skip_bad_rows` is dropped with a warning naming it; ties are dropped with `drop_ties`. Images are decoded (and a
    bad one reported with its row and column) when the rows are encoded into the cache or collated. Image columns
    are read undecoded (bytes), so rows that a process skips cost no decoding.

    Returns ``(stream, info)`` with the keys of `prepare_preference_dataset`; the counts are None (unknown before
    the stream has been read) and ``info["streamed"]`` is True.
    """
    from functools import partial

    columns = dataset_columns(dataset)
    schema = detect_schema(columns)
    if dataset.features is not None:
        for column in schema.image_columns:
            feature = dataset.features[column]
            if _undecoded(feature) != feature:
                dataset = dataset.cast_column(column, _undecoded(feature))
    if "row_index" not in columns:
        dataset = dataset.map(_with_row_index, with_indices=True)
    dataset = dataset.filter(partial(_keep_streamed_row, schema=schema, drop_ties=drop_ties, skip_bad_rows=skip_bad_rows))
    info = {"schema": schema.name, "num_rows": None, "num_ties": None, "ties_dropped": drop_ties,
            "num_bad_rows": None, "bad_rows": [], "streamed": True}
    return dataset, info


def _with_row_index(row: dict, index: int) -> dict:
    return {"row_index": index}


def _undecoded(feature):
    """A `datasets` feature with every `Image` in it set to `decode=False` (bytes/path dicts instead of PIL images)."""
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return type(feature)(_undecoded(feature.feature))
    return feature


def find_undecodable_images(dataset, schema: PreferenceSchema, skip: set[int] = frozenset(), num_proc: int | None = None,
                            progress: bool = True) -> dict[int, tuple[str, str]]:
    """Decode every image of the dataset once (as the collator will) and return ``{position: (column, message)}`` for
    the rows where one cannot be decoded or the pair is malformed. Runs as a `datasets.map` (cached for datasets
    read from disk, `num_proc` processes); images of `datasets.Image` columns are read undecoded and decoded here,
    so a bad one is reported with its row instead of failing inside `datasets`."""
    import datasets

    columns = [*schema.image_columns, "row_index"]
    images = dataset.select_columns(columns)
    for column in schema.image_columns:
        feature = images.features[column]
        if _undecoded(feature) != feature:
            images = images.cast_column(column, _undecoded(feature))
    names = schema.image_columns * (2 // len(schema.image_columns))

    def check(batch):
        problems, bad_columns = [], []
        for k, row in enumerate(batch["row_index"]):
            column, problem = names[0], ""  # a malformed pair is reported on its (first) image column
            try:
                pair = schema.images({c: batch[c][k] for c in columns})
                for value, column in zip(pair, names):
                    decode_image(value, row, column)
            except ValueError as err:
                problem = str(err)
            problems.append(problem)
            bad_columns.append(column if problem else "")
        return {"problem": problems, "column": bad_columns}

    hide = not progress and datasets.is_progress_bar_enabled()
    if hide:
        datasets.disable_progress_bars()
    try:
        checked = images.map(check, batched=True, batch_size=64, num_proc=num_proc, remove_columns=columns,
                             desc="Checking images")
    finally:
        if hide:
            datasets.enable_progress_bars()
    return {
        i: (column, problem)
        for i, (column, problem) in enumerate(zip(checked["column"], checked["problem"]))
        if problem and i not in skip
    }


def _decided(schema: PreferenceSchema, label: Any, row: int) -> bool:
    """Whether a row's label names a winner (False for ties and for invalid labels, which the trainer reports)."""
    try:
        return schema.first_wins(label, row=row) != 0.5
    except ValueError:
        return False


def flip_labels(dataset, rate: float, seed: int = 0):
    """Flip the preference of a random ``rate`` share of the non-tied pairs (the paper's synthetic minority).

    Returns the dataset with its labels flipped where ``flipped`` is True (a new boolean column), in the dataset's
    own schema, so every consumer sees the flipped preference.

    A stream (`datasets.IterableDataset`) cannot be counted before it is read: each non-tied row is flipped with
    probability `rate` instead, drawn from a generator seeded with ``(seed, position of the row in the stream)``, so
    a stream read again flips the same rows.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"flip_labels: rate must be in [0, 1], got {rate}")
    if is_streamed(dataset):
        return _flip_streamed_labels(dataset, rate, seed)
    schema = detect_schema(dataset.column_names)
    if schema.label_column is None:
        candidates = np.arange(len(dataset))
    else:
        labels = dataset[schema.label_column]
        candidates = np.array([i for i, v in enumerate(labels) if _decided(schema, v, i)], dtype=int)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(candidates, size=int(round(rate * len(candidates))), replace=False)
    flipped = np.zeros(len(dataset), dtype=bool)
    flipped[chosen] = True

    def flip(batch, indices):
        rows = [k for k, i in enumerate(indices) if flipped[i]]
        if schema.name == "pickapic":
            batch["label_0"] = [1.0 - float(v) if k in rows else v for k, v in enumerate(batch["label_0"])]
            if "label_1" in batch:
                batch["label_1"] = [1.0 - float(v) if k in rows else v for k, v in enumerate(batch["label_1"])]
        elif schema.name == "hpdv2":
            batch["human_preference"] = [list(v)[::-1] if k in rows else v for k, v in enumerate(batch["human_preference"])]
        else:
            for k in rows:
                batch["chosen"][k], batch["rejected"][k] = batch["rejected"][k], batch["chosen"][k]
                if JUDGE_SCORES_COLUMN in batch and batch[JUDGE_SCORES_COLUMN][k] is not None:
                    batch[JUDGE_SCORES_COLUMN][k] = list(batch[JUDGE_SCORES_COLUMN][k])[::-1]  # scores follow images
        batch["flipped"] = [bool(flipped[i]) for i in indices]
        return batch

    return dataset.map(flip, batched=True, with_indices=True, desc=f"Flipping {rate:.0%} of labels")


def _flip_row(example: dict, index: int, schema: PreferenceSchema, rate: float, seed: int) -> dict:
    label = example[schema.label_column] if schema.label_column else None
    decided = schema.label_column is None or _decided(schema, label, index)
    flip = bool(decided and np.random.default_rng([seed, index]).random() < rate)
    out = {"flipped": flip}
    if flip and schema.name == "pickapic":
        out["label_0"] = 1.0 - float(label)
        if example.get("label_1") is not None:
            out["label_1"] = 1.0 - float(example["label_1"])
    elif flip and schema.name == "hpdv2":
        out["human_preference"] = list(label)[::-1]
    elif flip:
        out["chosen"], out["rejected"] = example["rejected"], example["chosen"]
        if example.get(JUDGE_SCORES_COLUMN) is not None:  # the scores follow their images
            out[JUDGE_SCORES_COLUMN] = list(example[JUDGE_SCORES_COLUMN])[::-1]
    return out


def _flip_streamed_labels(dataset, rate: float, seed: int):
    from functools import partial

    schema = detect_schema(dataset_columns(dataset))
    return dataset.map(partial(_flip_row, schema=schema, rate=rate, seed=seed), with_indices=True)


# ----------------------------------------------------------------------------------------------------------
# Images and collation
# ----------------------------------------------------------------------------------------------------------


def decode_image(value: Any, row: Any, column: str) -> Image.Image:
    """PIL image from a PIL image, encoded bytes, a datasets ``{"bytes", "path"}`` dict, a path or an array."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        elif isinstance(value, (np.ndarray, list)):
            array = np.asarray(value)
            if array.dtype != np.uint8:
                array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
            image = Image.fromarray(array)
        else:
            raise TypeError(f"unsupported image value of type {type(value).__name__}")
        image.load()
        return image.convert("RGB")
    except Exception as err:  # PIL raises many types; the caller needs the row and column
        raise ValueError(f"row {row}, column {column!r}: cannot decode image: {err}") from err


def image_to_tensor(
    image: Image.Image, resolution: int, crop_fraction: tuple[float, float], flip: bool
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to `resolution`, crop a square at `crop_fraction` of the free room, scale to [-1, 1].

    Returns the tensor, the original (height, width) and the crop's (top, left), which SDXL conditions on.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - resolution) * crop_fraction[0]))
    left = int(round((new_w - resolution) * crop_fraction[1]))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (height, width), (top, left)


class PreferenceCollator:
    """Turns dataset rows into a training batch: winner/loser pixels in [-1, 1], prompts, sizes and crops.

    Output keys: ``pixel_values_chosen``, ``pixel_values_rejected`` (B, 3, R, R); ``prompts`` (list of str);
    ``row_index`` (B,); ``original_size_{chosen,rejected}`` and ``crop_top_left_{chosen,rejected}`` (B, 2); and
    ``flipped`` (B,) when the dataset has that column; ``judge_margin`` (B,), the judge's score of the labelled winner
    minus that of the loser (NaN where it abstains), when the dataset has a ``judge_scores`` column.

    Random crops, flips and empty prompts are drawn from a generator seeded with ``(seed, epoch, row_index)``, not
    from torch's global RNG: the Trainer collates a batch *before* it restores the RNG state of a checkpoint, so
    global-RNG draws would differ after a resume. The trainer calls `set_epoch` at each epoch start (workers kept
    alive with `dataloader_persistent_workers` keep the epoch they started with, so their draws repeat each epoch).
    """

    def __init__(
        self,
        schema: PreferenceSchema,
        resolution: int,
        random_crop: bool = False,
        random_flip: bool = False,
        empty_prompt_probability: float = 0.0,
        seed: int = 0,
    ):
        self.schema = schema
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.empty_prompt_probability = empty_prompt_probability
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch: dict[str, list] = {k: [] for k in ("chosen", "rejected", "size_c", "size_r", "crop_c", "crop_r")}
        prompts, row_index, judge_margins = [], [], []
        for position, example in enumerate(rows):
            row = example.get("row_index")
            rng = np.random.default_rng([self.seed, self.epoch, row if row is not None else position])
            first, second = self.schema.images(example)
            first_wins = self.schema.first_wins(example[self.schema.label_column], row) if self.schema.label_column else 1.0
            # A tie kept with drop_ties=False trains with the first image as the winner, as the diffusers scripts and
            # the Adaptive-DPO authors' code do.
            columns = self.schema.image_columns * (2 // len(self.schema.image_columns))
            images = [decode_image(first, row, columns[0]), decode_image(second, row, columns[1])]
            if first_wins == 0.0:
                images.reverse()
            if JUDGE_SCORES_COLUMN in example:
                judge_margins.append(labelled_judge_margin(example[JUDGE_SCORES_COLUMN], first_wins, row))
            crop = tuple(rng.random(2).tolist()) if self.random_crop else (0.5, 0.5)
            flip = bool(self.random_flip and rng.random() < 0.5)
            for image, key, size_key, crop_key in zip(images, ("chosen", "rejected"), ("size_c", "size_r"), ("crop_c", "crop_r")):
                tensor, size, top_left = image_to_tensor(image, self.resolution, crop, flip)
                batch[key].append(tensor)
                batch[size_key].append(size)
                batch[crop_key].append(top_left)
            prompt = example[self.schema.prompt_column]
            if not isinstance(prompt, str):
                raise ValueError(f"row {row}, column {self.schema.prompt_column!r}: expected a string, got {prompt!r:.80}")
            if self.empty_prompt_probability and rng.random() < self.empty_prompt_probability:
                prompt = ""
            prompts.append(prompt)
            row_index.append(row if row is not None else -1)
        out = {
            "pixel_values_chosen": torch.stack(batch["chosen"]),
            "pixel_values_rejected": torch.stack(batch["rejected"]),
            "prompts": prompts,
            "row_index": torch.tensor(row_index, dtype=torch.long),
            ROW_INDEX_LIST: row_index,
            "original_size_chosen": torch.tensor(batch["size_c"], dtype=torch.long),
            "original_size_rejected": torch.tensor(batch["size_r"], dtype=torch.long),
            "crop_top_left_chosen": torch.tensor(batch["crop_c"], dtype=torch.long),
            "crop_top_left_rejected": torch.tensor(batch["crop_r"], dtype=torch.long),
        }
        if rows and "flipped" in rows[0]:
            out["flipped"] = torch.tensor([bool(r["flipped"]) for r in rows])
        if judge_margins:
            out["judge_margin"] = torch.tensor(judge_margins, dtype=torch.float32)
        return out


def add_judge_scores(dataset, scorer, batch_size: int = 16, progress: bool = True):
    """The dataset with a ``judge_scores`` column: a judge's scores of each row's two images under the row's prompt,
    in the schema's image order, for the minority filter's ``judge`` evidence.

    `scorer` is anything with ``score(images, prompts) -> (N,) tensor``: a `trl_adaptive.evaluation` scorer (PickScore,
    HPSv2, ImageReward, an aesthetic head; `load_scorer`) or your own reward model. Score the data you will train on:
    the scores belong to the images of their row (`flip_labels` keeps them with their images). A map-style dataset
    is scored now (a progress bar); a stream is scored as it is read. An existing ``judge_scores`` column is replaced.
    """
    schema = detect_schema(dataset_columns(dataset))
    columns = schema.image_columns * (2 // len(schema.image_columns))

    def score_batch(batch: dict) -> dict:
        size = len(batch[schema.prompt_column])
        firsts, seconds = [], []
        for k in range(size):
            row = {name: values[k] for name, values in batch.items()}
            first, second = schema.images(row)
            label = row.get("row_index", k)
            firsts.append(decode_image(first, label, columns[0]))
            seconds.append(decode_image(second, label, columns[1]))
        prompts = [str(p) for p in batch[schema.prompt_column]]
        with torch.no_grad():
            scores = torch.as_tensor(scorer.score(firsts + seconds, prompts + prompts)).detach().float().cpu().reshape(-1)
        return {JUDGE_SCORES_COLUMN: [[a, b] for a, b in zip(scores[:size].tolist(), scores[size:].tolist())]}

    if JUDGE_SCORES_COLUMN in dataset_columns(dataset):
        dataset = dataset.remove_columns(JUDGE_SCORES_COLUMN)
    if is_streamed(dataset):
        return dataset.map(score_batch, batched=True, batch_size=batch_size)
    from tqdm.auto import tqdm

    scores = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Scoring pairs with the judge", disable=not progress):
        scores.extend(score_batch(dataset[start:start + batch_size])[JUDGE_SCORES_COLUMN])
    return dataset.add_column(JUDGE_SCORES_COLUMN, scores)


def judge_label_agreement(dataset) -> dict[str, float]:
    """How often a judge's scores (the ``judge_scores`` column, `add_judge_scores`) agree with the labels: the share
    of the decided pairs where the judge scores the labelled winner higher, the number of pairs counted, and those
    where the judge abstains (``None``) or scores both images alike, which do not count. Tied labels do not count.

    This is what the minority filter's judge check measures during training, computed over a whole map-style dataset
    before it. Run it on pairs whose labels you trust (re-annotated, or with unanimous votes) to learn the judge's
    accuracy on your raters, and on your training data: `trl_adaptive.filtering.implied_flip_rate` turns the two into
    the share of flipped labels they imply (docs/minority_filter.md, "A judge you bring"). Images are not decoded.
    """
    if is_streamed(dataset):
        raise ValueError("judge_label_agreement counts a whole dataset: pass a map-style one (e.g. stream.take(n) "
                         "materialised with datasets.Dataset.from_generator)")
    columns = dataset_columns(dataset)
    if JUDGE_SCORES_COLUMN not in columns:
        raise ValueError(f"judge_label_agreement needs a {JUDGE_SCORES_COLUMN!r} column (add_judge_scores); the data has "
                         f"{sorted(columns)}")
    schema = detect_schema(columns)
    kept = [c for c in (schema.label_column, JUDGE_SCORES_COLUMN, "row_index") if c in columns]
    agreeing = counted = abstained = 0
    for position, row in enumerate(dataset.select_columns(kept)):  # no image column: nothing decoded
        label_row = row.get("row_index", position)
        first_wins = schema.first_wins(row[schema.label_column], label_row) if schema.label_column else 1.0
        if first_wins == 0.5:
            continue
        margin = labelled_judge_margin(row[JUDGE_SCORES_COLUMN], first_wins, label_row)
        if not np.isfinite(margin) or margin == 0:
            abstained += 1
            continue
        counted += 1
        agreeing += int(margin > 0)
    return {"agreement": agreeing / counted if counted else float("nan"), "pairs": counted, "abstained": abstained}


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def load_preference_data(name_or_path: str, config: str | None = None, split: str = "train", streaming: bool = False):
    """One split of a preference dataset from a Hub name, a folder written by `save_to_disk`, or a data file/folder.

    Pick-a-Pic has moved between Hub repositories, so any name or local copy with the same columns works. With
    `streaming`, a `datasets.IterableDataset` (`load_dataset(..., streaming=True)`; a `save_to_disk` folder through
    `to_iterable_dataset`, in order).
    """
    import datasets

    if streaming:
        data = load_preference_data(name_or_path, config, split) if _is_saved_dataset(name_or_path) else None
        if data is not None:
            return data.to_iterable_dataset()
        path = os.path.expanduser(name_or_path)
        if os.path.isfile(path):
            builder = DATA_FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
            if builder is None:
                raise ValueError(f"dataset {path!r}: unsupported file type; use {sorted(DATA_FILE_BUILDERS)}")
            return datasets.load_dataset(builder, data_files={split: path}, split=split, streaming=True)
        return datasets.load_dataset(name_or_path, config, split=split, streaming=True)

    path = os.path.expanduser(name_or_path)
    if _is_saved_dataset(path):
        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"dataset_train_split/test_split {split!r} is not in {path}; it has {list(data)}")
            data = data[split]
        return data
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(f"dataset {path!r}: unsupported file type {extension!r}; use {sorted(DATA_FILE_BUILDERS)}")
        return datasets.load_dataset(DATA_FILE_BUILDERS[extension], data_files={split: path}, split=split)
    return datasets.load_dataset(name_or_path, config, split=split)


def _is_saved_dataset(name_or_path: str) -> bool:
    """Whether a path is a folder written by `Dataset(Dict).save_to_disk`."""
    path = os.path.expanduser(name_or_path)
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, marker)) for marker in ("dataset_dict.json", "dataset_info.json", "state.json")
    )
