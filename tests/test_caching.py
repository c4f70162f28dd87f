"""Latent cache: round trip, key sensitivity, stale caches refused, training from cache equals training from pixels."""

import os

import pytest
import torch
from peft import LoraConfig

from trl_adaptive import AdaptiveDPOConfig, AdaptiveDiffusionDPOTrainer, family_for
from trl_adaptive.caching import (
    CachedPreferenceCollator,
    CachedPreferenceDataset,
    build_cache,
    cache_key,
    cache_settings,
    open_or_build_cache,
)
from trl_adaptive.data import PreferenceCollator, detect_schema, flip_labels, prepare_preference_dataset
from trl_adaptive.tiny import tiny_sd_pipeline, toy_preference_dataset

RESOLUTION = 32
LORA = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


@pytest.fixture(scope="module")
def dataset():
    data, _ = prepare_preference_dataset(toy_preference_dataset(num_pairs=6, size=40, seed=3))
    return data


def _family(seed=0, sample_latents=True):
    family = family_for(tiny_sd_pipeline(seed=seed))
    family.sample_latents = sample_latents
    return family


def _settings(family, dataset, **overrides):
    kwargs = dict(model_name="tiny", resolution=RESOLUTION, random_flip=False)
    kwargs.update(overrides)
    return cache_settings(family, dataset, **kwargs)


def test_round_trip_matches_direct_encoding(dataset, tmp_path):
    family = _family()
    cache = open_or_build_cache(family, dataset, str(tmp_path), model_name="tiny", resolution=RESOLUTION,
                                random_flip=True, batch_size=4)
    assert len(cache) == len(dataset)
    pixels = PreferenceCollator(detect_schema(dataset.column_names), RESOLUTION)([dataset[i] for i in range(len(dataset))])
    for side in ("chosen", "rejected"):
        expected = family.cache_images(pixels[f"pixel_values_{side}"])
        mirrored = family.cache_images(pixels[f"pixel_values_{side}"].flip(-1))
        for i in range(len(dataset)):
            row = cache[i]
            for stat in ("mean", "std"):
                torch.testing.assert_close(row[f"{side}.{stat}"], expected[stat][i], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(row[f"{side}_flipped.{stat}"], mirrored[stat][i], rtol=1e-5, atol=1e-5)
    text = family.cache_text(pixels["prompts"])["prompt_embeds"]
    for i in range(len(dataset)):
        assert cache[i]["prompt"] == pixels["prompts"][i]
        torch.testing.assert_close(cache[i]["text"]["prompt_embeds"], text[i])
        assert int(cache[i]["row_index"]) == int(pixels["row_index"][i])
    torch.testing.assert_close(cache.empty_prompt_text()["prompt_embeds"], family.cache_text([""])["prompt_embeds"][0])
    # A second open with the same inputs reuses the folder instead of rebuilding it.
    mtime = os.path.getmtime(os.path.join(cache.folder, "manifest.json"))
    again = open_or_build_cache(family, dataset, str(tmp_path), model_name="tiny", resolution=RESOLUTION,
                                random_flip=True, batch_size=4)
    assert again.folder == cache.folder and os.path.getmtime(os.path.join(again.folder, "manifest.json")) == mtime


def test_collator_and_family_replay_sampling_flip_and_empty_prompts(dataset, tmp_path):
    family = _family()
    cache = open_or_build_cache(family, dataset, str(tmp_path), model_name="tiny", resolution=RESOLUTION,
                                random_flip=True)
    rows = [cache[i] for i in range(4)]
    batch = CachedPreferenceCollator(cache.empty_prompt_text())(rows)
    means = torch.stack([r["chosen.mean"] for r in rows])
    torch.testing.assert_close(batch["latents_chosen"], means)
    torch.testing.assert_close(batch["latents_chosen_std"], torch.stack([r["chosen.std"] for r in rows]))
    # The family draws mean + std * noise from the cached posterior, with the generator it would use on pixels.
    draw = family.latents(batch, "chosen", generator=torch.Generator().manual_seed(0))
    again = family.latents(batch, "chosen", generator=torch.Generator().manual_seed(0))
    other = family.latents(batch, "chosen", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(draw, again)
    assert not torch.equal(draw, other)
    z = (draw - means) / batch["latents_chosen_std"]
    assert z.abs().max() < 6 and 0.5 < z.std() < 1.5

    dropout_and_mirror = CachedPreferenceCollator(cache.empty_prompt_text(), random_flip=True,
                                                  empty_prompt_probability=1.0, seed=0)
    batch = dropout_and_mirror(rows)
    assert batch["prompts"] == [""] * 4
    torch.testing.assert_close(batch["prompt_embeds"][0], cache.empty_prompt_text()["prompt_embeds"])
    flipped_means = torch.stack([r["chosen_flipped.mean"] for r in rows])
    picks = []
    for epoch in range(8):  # each pair is mirrored with p = 1/2, decided by (seed, epoch, row): 32 draws
        dropout_and_mirror.set_epoch(epoch)
        latents = dropout_and_mirror(rows)["latents_chosen"]
        picks += [torch.equal(latents[i], flipped_means[i]) for i in range(4)]
        assert all(torch.equal(latents[i], flipped_means[i]) or torch.equal(latents[i], means[i]) for i in range(4))
    assert 0 < sum(picks) < len(picks)
    dropout_and_mirror.set_epoch(3)
    torch.testing.assert_close(dropout_and_mirror(rows)["latents_chosen"], dropout_and_mirror(rows)["latents_chosen"])

    # Mean mode stores no std, so latents are exactly the means.
    mean_family = _family(sample_latents=False)
    mean_cache = open_or_build_cache(mean_family, dataset, str(tmp_path), model_name="tiny", resolution=RESOLUTION,
                                     random_flip=False)
    assert mean_cache.folder != cache.folder and "chosen.std" not in mean_cache[0]
    batch = CachedPreferenceCollator(mean_cache.empty_prompt_text())([mean_cache[i] for i in range(2)])
    assert "latents_chosen_std" not in batch
    torch.testing.assert_close(mean_family.latents(batch, "chosen"), torch.stack([mean_cache[i]["chosen.mean"] for i in range(2)]))


def test_key_changes_with_everything_the_tensors_depend_on(dataset):
    family = _family()
    base = cache_key(_settings(family, dataset))
    assert cache_key(_settings(_family(), dataset)) == base  # same model, same data: same key
    assert cache_key(_settings(family, dataset, resolution=48)) != base
    assert cache_key(_settings(family, dataset, random_flip=True)) != base
    assert cache_key(_settings(family, dataset, model_name="other")) != base
    assert cache_key(_settings(_family(seed=1), dataset)) != base  # same configs, different weights
    assert cache_key(_settings(_family(sample_latents=False), dataset)) != base
    flipped, _ = prepare_preference_dataset(flip_labels(toy_preference_dataset(num_pairs=6, size=40, seed=3), 0.5, seed=0))
    assert cache_key(_settings(family, flipped)) != base  # labels changed: winners changed
    assert cache_key(_settings(family, dataset.select(range(5)))) != base


def test_stale_or_incomplete_cache_refused(dataset, tmp_path):
    family = _family()
    settings = _settings(family, dataset)
    folder = str(tmp_path / "cache")
    build_cache(family, dataset, folder, settings)
    CachedPreferenceDataset(folder, expected_key=cache_key(settings))  # opens
    new_key = cache_key(_settings(family, dataset, resolution=48))
    with pytest.raises(ValueError, match="Stale latent cache"):
        CachedPreferenceDataset(folder, expected_key=new_key)
    os.remove(os.path.join(folder, "manifest.json"))  # as if the build had been interrupted
    with pytest.raises(ValueError, match="not a complete latent cache"):
        CachedPreferenceDataset(folder)


def test_random_crop_with_cache_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="random_crop"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), random_crop=True)


def _trainer(tmp_path, name, cache_dir, dataset, latent_sampling):
    args = AdaptiveDPOConfig(
        output_dir=str(tmp_path / name), resolution=RESOLUTION, cache_dir=cache_dir, latent_sampling=latent_sampling,
        per_device_train_batch_size=4, max_steps=2, report_to=[], save_strategy="no", use_cpu=True,
        annotator_decays=[0.9, 0.5],
    )
    return AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=args, train_dataset=dataset,
                                       peft_config=LoraConfig(**LORA))


@pytest.mark.parametrize("latent_sampling", ["mean", "sample"])
def test_training_from_cache_equals_training_from_pixels(dataset, tmp_path, latent_sampling):
    from_pixels = _trainer(tmp_path, "pixels", None, dataset, latent_sampling)
    from_cache = _trainer(tmp_path, "cached", str(tmp_path / "cache"), dataset, latent_sampling)
    assert isinstance(from_cache.train_dataset, CachedPreferenceDataset)
    pixel_batch = from_pixels.data_collator([from_pixels.train_dataset[i] for i in range(4)])
    cached_batch = from_cache.data_collator([from_cache.train_dataset[i] for i in range(4)])
    assert "pixel_values_chosen" not in cached_batch and "latents_chosen" in cached_batch
    losses = []
    for trainer, batch in ((from_pixels, pixel_batch), (from_cache, cached_batch)):
        # Move the policy and the annotators away from the reference, identically in both trainers: at the initial
        # weights every logit is 0 up to rounding, which the RMS-normalised metric would amplify into noise.
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in (p for p in trainer.model.parameters() if p.requires_grad):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
            for shadow in trainer.robustness["adaptive"].annotators.shadows:
                for tensor in shadow.values():
                    tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
        torch.manual_seed(123)  # the same posterior draws, noise and timesteps for both
        losses.append(trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)))
    # Equal up to float rounding (the cache encodes prompts in other batches), which beta = 2500 amplifies to ~1e-4.
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-3, atol=1e-6)
    assert losses[0] > 0.01  # so the relative tolerance above is meaningful
    if latent_sampling == "mean":
        return
    # And the cached trainer trains: its LoRA weights move.
    before = {n: p.detach().clone() for n, p in from_cache.model.named_parameters() if p.requires_grad}
    from_cache.train()
    after = dict(from_cache.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


# ---- blocks: parallel builds, interrupted builds, streams -----------------------------------------------------------


def _folder_bytes(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_interrupted_build_resumes_from_its_finished_blocks(tmp_path):
    """Process 0 of a two-process build finished its blocks (0, 2, 4) and the run stopped; a one-process build then
    encodes only the other blocks and gives the bytes of an uninterrupted build."""
    from trl_adaptive.caching import encode_row_blocks

    data, _ = prepare_preference_dataset(toy_preference_dataset(num_pairs=20, size=40, seed=3))
    family = _family()
    settings = _settings(family, data)
    folder = tmp_path / "resumed" / cache_key(settings)
    partial = f"{folder}.partial"
    os.makedirs(partial)
    build = dict(batch_size=2, block_rows=4)
    from trl_adaptive.caching import _save_json

    _save_json({"block_rows": 4, "batch_size": 2}, os.path.join(partial, "build.json"))  # as build_cache writes
    encode_row_blocks(family, data, partial, settings, rank=0, world_size=2, **build)
    assert sorted(f for f in os.listdir(partial) if f.endswith(".json")) == [
        "build.json", "rows-00000.json", "rows-00002.json", "rows-00004.json"]
    encoded = []
    cache_images = family.cache_images
    family.cache_images = lambda pixels: encoded.append(len(pixels)) or cache_images(pixels)
    resumed = open_or_build_cache(family, data, str(tmp_path / "resumed"), model_name="tiny", resolution=RESOLUTION,
                                  random_flip=False, batch_size=5, block_rows=99)  # the started build's sizes win
    assert sum(encoded) == 2 * 8  # blocks 1 and 3: 8 pairs, both images each
    assert not os.path.exists(partial) and resumed.manifest["block_rows"] == 4
    family.cache_images = cache_images
    fresh = open_or_build_cache(family, data, str(tmp_path / "fresh"), model_name="tiny", resolution=RESOLUTION,
                                random_flip=False, **build)
    assert _folder_bytes(resumed.folder) == _folder_bytes(fresh.folder)
    assert [int(fresh[i]["row_index"]) for i in range(len(fresh))] == data["row_index"]


def test_bad_image_met_by_the_build_is_named_before_training(tmp_path):
    import datasets

    rows = toy_preference_dataset(num_pairs=6, size=40, seed=3).to_list()
    rows[4]["jpg_1"] = b"not an image"
    data, _ = prepare_preference_dataset(datasets.Dataset.from_list(rows))  # labels fine; images checked at encoding
    family = _family()
    with pytest.raises(ValueError, match=r"row 4, column 'jpg_1': cannot decode image"):
        open_or_build_cache(family, data, str(tmp_path), model_name="tiny", resolution=RESOLUTION, random_flip=False,
                            batch_size=2, block_rows=4)
    cache = open_or_build_cache(family, data, str(tmp_path), model_name="tiny", resolution=RESOLUTION,
                                random_flip=False, batch_size=2, block_rows=4, skip_bad_rows=True)
    assert [int(cache[i]["row_index"]) for i in range(len(cache))] == [0, 1, 2, 3, 5]


def test_stream_and_map_style_dataset_give_the_same_tensors(tmp_path):
    from datasets import load_dataset

    from trl_adaptive.tiny import write_pickapic_parquet

    files = write_pickapic_parquet(str(tmp_path / "data"), num_rows=30, num_files=2, seed=0)
    family = _family()
    caches = []
    for streaming in (True, False):
        data = load_dataset("parquet", data_files={"train": files}, split="train", streaming=streaming)
        data, _ = prepare_preference_dataset(data)
        caches.append(open_or_build_cache(family, data, str(tmp_path / f"cache-{streaming}"), model_name="tiny",
                                          resolution=RESOLUTION, random_flip=False, batch_size=4, block_rows=8))
    streamed, mapped = (_folder_bytes(c.folder) for c in caches)
    assert caches[0].key != caches[1].key  # different fingerprints ...
    tensors = [name for name in streamed if name.endswith(".safetensors")]
    assert len(tensors) >= 5 and all(streamed[n] == mapped[n] for n in tensors)  # ... the same rows and text
    assert len(caches[0]) == 30 - 3 and caches[0].num_source_rows == 30


def test_build_progress_counts_finished_blocks_with_images_per_second(dataset, tmp_path, capsys):
    open_or_build_cache(_family(), dataset, str(tmp_path), model_name="tiny", resolution=RESOLUTION, random_flip=True,
                        batch_size=2, block_rows=2, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    # 6 source rows in 3 blocks of 2, a known total (map-style): rows counted, encode rate with both flips
    assert bar.startswith("Caching latents") and "6/6" in bar and "images/s" in bar and "row" in bar
