"""Streamed datasets (`datasets.IterableDataset`): preparation, label checks, flips, training with and without the
latent cache, and the two-process cache build (tests/streaming_worker.py)."""

from __future__ import annotations

import filecmp
import json
import logging
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import load_dataset

from streaming_worker import RecordingCollator
from tiny_setup import lora_config, tiny_args
from trl_adaptive import AdaptiveDiffusionDPOTrainer
from trl_adaptive.caching import stream_fingerprint
from trl_adaptive.data import flip_labels, prepare_preference_dataset
from trl_adaptive.tiny import tiny_sd_pipeline, write_pickapic_parquet

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> str:
    """60 Pick-a-Pic-format rows in two parquet files, every 8th row a tie."""
    folder = tmp_path_factory.mktemp("pickapic")
    write_pickapic_parquet(str(folder), num_rows=60, num_files=2, seed=0)
    return str(folder)


def _files(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).glob("*.parquet"))


def _stream(folder: str):
    return load_dataset("parquet", data_files={"train": _files(folder)}, split="train", streaming=True)


def _map_style(folder: str):
    return load_dataset("parquet", data_files={"train": _files(folder)}, split="train")


def test_stream_prepared_like_the_map_style_dataset(parquet_dir):
    streamed, info = prepare_preference_dataset(_stream(parquet_dir))
    assert info["schema"] == "pickapic" and info["streamed"] and info["num_rows"] is None
    mapped, mapped_info = prepare_preference_dataset(_map_style(parquet_dir))
    rows = list(streamed)
    # The same pairs with the same ids (positions in the source, ties dropped), in source order.
    assert [r["row_index"] for r in rows] == mapped["row_index"]
    assert len(rows) == 60 - mapped_info["num_ties"] and mapped_info["num_ties"] == 7
    assert all(r["label_0"] != 0.5 for r in rows)
    assert [r["caption"] for r in rows] == mapped["caption"]
    # Read again: the same ids (what per-pair records and resumed runs rely on).
    assert [r["row_index"] for r in streamed] == [r["row_index"] for r in rows]
    kept, _ = prepare_preference_dataset(_stream(parquet_dir), drop_ties=False)
    assert [r["row_index"] for r in kept] == list(range(60))


def _write_rows(folder: Path, changes: dict[int, dict]) -> str:
    """The 60-row parquet with some rows' values changed (one file)."""
    source = folder / "source"
    write_pickapic_parquet(str(source), num_rows=60, num_files=1, seed=0)
    rows = pq.read_table(_files(str(source))[0]).to_pylist()
    for row, values in changes.items():
        rows[row].update(values)
    out = folder / "changed"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), out / "train.parquet")
    return str(out)


def test_stream_bad_rows_named_by_row_and_column(tmp_path, caplog):
    folder = _write_rows(tmp_path, {7: {"label_0": 2.0}, 12: {"caption": None}})
    streamed, _ = prepare_preference_dataset(_stream(folder))
    with pytest.raises(ValueError, match=r"row 7, column 'label_0': label 2.0 not in \{0, 0.5, 1\}.*skip_bad_rows"):
        list(streamed)
    skipped, _ = prepare_preference_dataset(_stream(folder), skip_bad_rows=True)
    with caplog.at_level(logging.WARNING, logger="trl_adaptive.data"):
        ids = [r["row_index"] for r in skipped]
    assert 7 not in ids and 12 not in ids and 8 in ids and 13 in ids
    assert "row 7, column 'label_0'" in caplog.text and "row 12, column 'caption'" in caplog.text


def test_flip_labels_on_a_stream(tmp_path):
    folder = tmp_path / "data"
    write_pickapic_parquet(str(folder), num_rows=200, num_files=2, seed=1)
    plain = list(_stream(str(folder)))
    flipped = list(flip_labels(_stream(str(folder)), 0.25, seed=0))
    again = list(flip_labels(_stream(str(folder)), 0.25, seed=0))
    assert [r["flipped"] for r in flipped] == [r["flipped"] for r in again]  # keyed by (seed, position): stable
    other = [r["flipped"] for r in flip_labels(_stream(str(folder)), 0.25, seed=1)]
    assert other != [r["flipped"] for r in flipped]
    decided = [i for i, r in enumerate(plain) if r["label_0"] != 0.5]
    share = sum(flipped[i]["flipped"] for i in decided) / len(decided)
    assert 0.15 < share < 0.35  # Bernoulli(0.25) over 175 decided pairs
    for before, after in zip(plain, flipped):
        if before["label_0"] == 0.5:
            assert not after["flipped"] and after["label_0"] == 0.5  # ties are never flipped
        elif after["flipped"]:
            assert (after["label_0"], after["label_1"]) == (1.0 - before["label_0"], 1.0 - before["label_1"])
        else:
            assert after["label_0"] == before["label_0"]
    # A flipped stream is another dataset for the latent cache.
    fingerprints = {stream_fingerprint(prepare_preference_dataset(d)[0]) for d in (
        _stream(str(folder)), flip_labels(_stream(str(folder)), 0.25, seed=0), flip_labels(_stream(str(folder)), 0.25, seed=1))}
    assert len(fingerprints) == 3


def test_stream_fingerprint_follows_the_source_files(tmp_path):
    folder = tmp_path / "data"
    write_pickapic_parquet(str(folder), num_rows=20, num_files=1, seed=0)
    first = stream_fingerprint(prepare_preference_dataset(_stream(str(folder)))[0])
    assert stream_fingerprint(prepare_preference_dataset(_stream(str(folder)))[0]) == first
    assert stream_fingerprint(prepare_preference_dataset(_stream(str(folder)), drop_ties=False)[0]) != first
    write_pickapic_parquet(str(folder), num_rows=20, num_files=1, seed=1)  # same name, other content
    assert stream_fingerprint(prepare_preference_dataset(_stream(str(folder)))[0]) != first


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_training_from_a_stream_without_cache_resumes_exactly(parquet_dir, tmp_path):
    """One pass over the stream in source order; a resumed run neither repeats nor skips rows and ends with the
    uninterrupted run's weights. The per-pair history grows with the rows it meets."""
    runs = {}
    for label, resume in (("uninterrupted", None), ("resumed", str(tmp_path / "run" / "checkpoint-2"))):
        args = tiny_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2,
                         annotator_decays=[0.9, 0.5], check_images=False)
        trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=args, train_dataset=_stream(parquet_dir),
                                              peft_config=lora_config())
        trainer.data_collator = recorder = RecordingCollator(trainer.data_collator)
        initial = _weights(trainer)
        trainer.train(resume_from_checkpoint=resume)
        runs[label] = {"weights": _weights(trainer), "rows": recorder.rows, "initial": initial,
                       "history": trainer.robustness["adaptive"].history}
    uninterrupted, resumed = runs["uninterrupted"], runs["resumed"]
    mapped, _ = prepare_preference_dataset(_map_style(parquet_dir))
    trained = [row for batch in uninterrupted["rows"][:4] for row in batch]
    assert trained == mapped["row_index"][:8]  # in source order, ties skipped
    # The Trainer skips the first two batches of a stream by reading (and collating) them, then trains on the next.
    assert resumed["rows"][:4] == uninterrupted["rows"][:4]
    moved = max(float((uninterrupted["weights"][n] - v).abs().max()) for n, v in uninterrupted["initial"].items())
    assert moved > 1e-4
    for name, value in uninterrupted["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=0, atol=1e-6)
    history = uninterrupted["history"]
    assert history.growable and history.total.shape[0] == max(trained) + 1 and int(history.visits.sum()) > 0
    torch.testing.assert_close(resumed["history"].total, history.total)


def test_stream_without_cache_on_several_processes_or_workers_is_refused_before_training(parquet_dir, tmp_path, monkeypatch):
    from trl_adaptive import AdaptiveDPOConfig

    args = tiny_args(tmp_path / "run", max_steps=2)
    with pytest.raises(ValueError, match="without cache_dir needs dataloader_num_workers=0 \\(got 2\\)"):
        AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=tiny_args(tmp_path / "run", dataloader_num_workers=2),
                                    train_dataset=_stream(parquet_dir), peft_config=lora_config())
    # The machine-sized default (-1: on a GPU machine several workers) is lowered to one reader instead of refused.
    sized = tiny_args(tmp_path / "sized", max_steps=2, dataloader_num_workers=-1)
    assert sized.workers_sized_to_machine
    sized.dataloader_num_workers = 3  # what -1 gives on a GPU machine with a few cores
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=sized, train_dataset=_stream(parquet_dir),
                                          peft_config=lora_config())
    assert trainer.args.dataloader_num_workers == 0
    monkeypatch.setattr(AdaptiveDPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="streamed train_dataset trains on 2 processes only through the latent cache"):
        AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=args, train_dataset=_stream(parquet_dir),
                                    peft_config=lora_config())


# ---- two processes -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_build_the_stream_cache_train_and_resume_matching_one_process(tmp_path):
    """Done-when of issue 20: a few hundred streamed Pick-a-Pic-format rows, cached by two processes (each its own
    blocks), trained under two processes with a checkpoint, resumed; the cache is byte-identical to a one-process
    build, the resumed run ends with the uninterrupted run's weights, the two processes got disjoint rows; an error
    of one process in a build step is raised on both."""
    from test_distributed import _environment, _free_port, _run
    from streaming_worker import make_trainer

    data = tmp_path / "data"
    write_pickapic_parquet(str(data), num_rows=240, num_files=3, seed=0)
    one = make_trainer(str(data), str(tmp_path / "cache-1"), str(tmp_path / "out-1"))  # builds in this process
    one_folder = one.train_dataset.folder
    del one
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "examples" / "accelerate_configs" / "multi_gpu.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
        str(TESTS / "streaming_worker.py"), "--data", str(data), "--cache", str(tmp_path / "cache-2"),
        "--out", str(tmp_path / "out-2"),
    ]  # fmt: skip
    _run(command, _environment(ACCELERATE_USE_CPU="true"))
    result = json.loads((tmp_path / "out-2" / "result.json").read_text())
    assert result["world_size"] == 2
    two_folder = result["cache_folder"]
    assert os.path.basename(two_folder) == os.path.basename(one_folder)  # same key
    files = sorted(os.listdir(one_folder))
    assert files == sorted(os.listdir(two_folder)) and sum(f.startswith("rows-") for f in files) == 2 * 8  # 8 blocks
    match, mismatch, errors = filecmp.cmpfiles(one_folder, two_folder, files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files)
    assert result["resumed_vs_uninterrupted"] < 1e-6
    ranks = [json.loads((tmp_path / "out-2" / f"rows-{r}.json").read_text()) for r in (0, 1)]
    rows = [{row for batch in r["uninterrupted"][:4] for row in batch} for r in ranks]
    assert not rows[0] & rows[1] and len(rows[0]) == len(rows[1]) == 8  # each process its own share of the batch
    for r in ranks:  # the resumed run got exactly the batches the uninterrupted one had from step 3 on
        assert r["resumed"][:2] == r["uninterrupted"][2:4]
    # A bad row met by one process during a build stops both, with its row and column (no process left waiting).
    assert ranks[0]["error_from_other_process"] == "latent cache build failed on process 1: row 5, column 'jpg_1': cannot decode image"
    assert ranks[1]["error_from_other_process"] == "row 5, column 'jpg_1': cannot decode image"
