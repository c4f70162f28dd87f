"""Conformance of every model family to the `DiffusionFamily` interface the trainer relies on.

Each registered family must have a tiny pipeline builder in FAMILY_CASES (a new family without one fails
`test_every_registered_family_has_a_case`), and then gets every check below for free.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig

from trl_adaptive.data import PreferenceCollator, detect_schema, prepare_preference_dataset
from trl_adaptive.families import FAMILIES, family_for
from trl_adaptive.tiny import (
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    toy_preference_dataset,
)

torch.set_flush_denormal(True)

RESOLUTION = 32
#: name -> (builder of a tiny pipeline, expected family class name, expected prediction type; "flow": the velocity)
FAMILY_CASES = {
    "sd-epsilon": (lambda: tiny_sd_pipeline(seed=0, prediction_type="epsilon"), "StableDiffusionFamily", "epsilon"),
    "sd-v": (lambda: tiny_sd_pipeline(seed=0, prediction_type="v_prediction"), "StableDiffusionFamily", "v_prediction"),
    "sdxl": (lambda: tiny_sdxl_pipeline(seed=0), "StableDiffusionXLFamily", "epsilon"),
    "sd3": (lambda: tiny_sd3_pipeline(seed=0), "StableDiffusion3Family", "flow"),
    "flux-dev": (lambda: tiny_flux_pipeline(seed=0, guidance_embeds=True), "FluxFamily", "flow"),
    "flux-schnell": (lambda: tiny_flux_pipeline(seed=0, guidance_embeds=False), "FluxFamily", "flow"),
}
LORA = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])  # alpha != r: scaling must survive


def test_every_registered_family_has_a_case():
    covered = {expected for _, expected, _ in FAMILY_CASES.values()}
    assert {family.__name__ for family in FAMILIES} <= covered


@pytest.fixture(params=list(FAMILY_CASES), scope="module")
def case(request):
    build, family_name, prediction_type = FAMILY_CASES[request.param]
    built = build()
    return (lambda: copy.deepcopy(built)), family_name, prediction_type  # fresh, identical copies, built once


@pytest.fixture(scope="module")
def batch():
    """Four pairs collated as the trainer collates them; images of different sizes so size conditioning varies."""
    dataset, _ = prepare_preference_dataset(toy_preference_dataset(num_pairs=4, size=40, seed=0))
    collator = PreferenceCollator(detect_schema(dataset.column_names), RESOLUTION)
    rows = [dataset[i] for i in range(4)]
    out = collator(rows)
    # Give the losers a different original size than the winners: their conditioning must differ where a family
    # conditions on image size (SDXL), and the pair must still line up row by row.
    out["original_size_rejected"] = out["original_size_rejected"] * 2
    return out


def _forward_inputs(family, batch):
    conditioning = family.condition(batch)
    latents = torch.cat([family.latents(batch, "chosen"), family.latents(batch, "rejected")])
    timesteps = torch.tensor([10, 200, 500, 999] * 2)
    return latents, timesteps, conditioning


def test_family_is_selected_by_pipeline_class(case):
    build, family_name, _ = case
    assert type(family_for(build())).__name__ == family_name


def test_encode_prompts_and_images_shapes(case):
    build, _, _ = case
    family = family_for(build())
    conditioning = family.encode_prompts(["a red square", "a blue square", ""])
    rows = [x.shape[0] for x in torch.utils._pytree.tree_leaves(conditioning) if isinstance(x, torch.Tensor)]
    assert rows and all(n == 3 for n in rows)
    pixels = torch.rand(3, 3, RESOLUTION, RESOLUTION) * 2 - 1
    latents = family.encode_images(pixels)
    factor = family.pipeline.vae_scale_factor
    channels = family.pipeline.vae.config.latent_channels
    assert latents.shape == (3, channels, RESOLUTION // factor, RESOLUTION // factor)
    # A list of per-image generators makes the VAE sample a function of each image's own generator.
    make = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    first = family.encode_images(pixels, generator=make([1, 2, 3]))
    again = family.encode_images(pixels[1:], generator=make([2, 3]))
    torch.testing.assert_close(first[1:], again)


def test_condition_gives_pair_rows_a_real_forward_accepts(case, batch):
    build, family_name, _ = case
    family = family_for(build())
    latents, timesteps, conditioning = _forward_inputs(family, batch)
    leaves = [x for x in torch.utils._pytree.tree_leaves(conditioning) if isinstance(x, torch.Tensor)]
    assert leaves and all(x.shape[0] == 8 for x in leaves)  # 2B rows: winners, then losers
    noise = torch.randn_like(latents)
    noisy = family.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        prediction = family.predict(family.denoiser, noisy, timesteps, conditioning)
    assert prediction.shape == latents.shape and torch.isfinite(prediction).all()
    if family_name == "StableDiffusionXLFamily":
        time_ids = conditioning["added_cond_kwargs"]["time_ids"]
        assert time_ids.shape == (8, 6)
        winners, losers = time_ids[:4], time_ids[4:]
        expected = torch.cat([batch["original_size_chosen"], batch["crop_top_left_chosen"]], dim=1).float()
        torch.testing.assert_close(winners[:, :4], expected)
        torch.testing.assert_close(losers[:, :2], batch["original_size_rejected"].float())
        assert (time_ids[:, 4:] == RESOLUTION).all()  # target size = training resolution
        # The two images of a pair differ in size here, so their predictions must differ too.
        swapped = dict(conditioning, added_cond_kwargs=dict(conditioning["added_cond_kwargs"], time_ids=time_ids.roll(4, 0)))
        with torch.no_grad():
            other = family.predict(family.denoiser, noisy, timesteps, swapped)
        assert not torch.allclose(other, prediction)


def test_prompt_shift_gives_each_pair_another_pairs_text_and_keeps_image_conditioning(case, batch):
    build, _, _ = case
    family = family_for(build())
    own, shifted = family.condition(batch), family.condition(batch, prompt_shift=1)
    text_leaves = [("encoder_hidden_states",)]
    if "pooled_projections" in own:  # SD3, Flux
        text_leaves.append(("pooled_projections",))
    if "added_cond_kwargs" in own:
        text_leaves.append(("added_cond_kwargs", "text_embeds"))
        # SDXL's time ids describe each image, not its prompt: they stay with the image.
        torch.testing.assert_close(shifted["added_cond_kwargs"]["time_ids"], own["added_cond_kwargs"]["time_ids"])
    for path in text_leaves:
        a, b = own, shifted
        for key in path:
            a, b = a[key], b[key]
        for half in (slice(0, 4), slice(4, 8)):  # winners' rows, then losers': pair i now has pair i - 1's text
            torch.testing.assert_close(b[half], a[half].roll(1, 0))
    # The toy prompts cycle through three colours, so pair 0 and pair 3 have the same text and the others differ.
    hidden, other = own["encoder_hidden_states"][:4], shifted["encoder_hidden_states"][:4]
    assert (hidden != other).flatten(1).any(dim=1).tolist() == [False, True, True, True]


def test_sampled_timesteps_respect_min_noise_and_noise_level_is_their_fraction(case):
    build, _, _ = case
    family = family_for(build())
    generator = torch.Generator().manual_seed(0)
    everywhere = family.sample_timesteps(4000, "cpu", generator=generator)
    noisy = family.sample_timesteps(4000, "cpu", generator=generator, min_noise=0.75)
    # Both ends of the schedule are reached (flow families draw from a logit-normal density: fewer draws at the ends).
    assert family.noise_level(everywhere).min() < 0.2 and family.noise_level(everywhere).max() > 0.8
    assert family.noise_level(noisy).min() >= 0.75 and family.noise_level(noisy).max() <= 1.0


def test_target_follows_prediction_type(case):
    build, _, prediction_type = case
    family = family_for(build())
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([100, 900])
    target = family.target(latents, noise, timesteps)
    if prediction_type == "flow":  # x_t = (1 - sigma) x0 + sigma eps, sigma = t / 1000; the velocity eps - x0
        sigma = torch.tensor([0.1, 0.9]).view(-1, 1, 1, 1)
        torch.testing.assert_close(family.add_noise(latents, noise, timesteps), (1 - sigma) * latents + sigma * noise)
        torch.testing.assert_close(target, noise - latents)
        return
    assert family.noise_scheduler.config.prediction_type == prediction_type
    if prediction_type == "epsilon":
        torch.testing.assert_close(target, noise)
    else:  # v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0
        alpha_bar = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        torch.testing.assert_close(target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)


def test_lora_round_trip_through_the_family_pipeline(case, batch, tmp_path):
    build, _, _ = case
    trained = build()
    family = family_for(trained)
    family.denoiser.add_adapter(LoraConfig(**LORA))
    torch.manual_seed(0)
    for name, param in family.denoiser.named_parameters():
        if "lora_B" in name:  # initialised to zero: make the adapters change the output, as trained ones do
            param.data.normal_(std=0.05)
    family.save_lora(str(tmp_path), family.denoiser, LoraConfig(**LORA))
    fresh = build()
    type(fresh).load_lora_weights(fresh, str(tmp_path))  # what a user does: <Pipeline>.load_lora_weights(folder)
    latents, timesteps, conditioning = _forward_inputs(family, batch)
    with torch.no_grad():
        expected = family.predict(family.denoiser, latents, timesteps, conditioning)
        loaded = family.predict(family_for(fresh).denoiser, latents, timesteps, conditioning)
        base = family.predict(family_for(build()).denoiser, latents, timesteps, conditioning)
    assert not torch.allclose(expected, base, atol=1e-4)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)
    # Resuming loads the same file back into the training denoiser's adapter.
    other = family_for(build()).denoiser
    other.add_adapter(LoraConfig(**LORA))
    family.load_lora_into(other, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(family.predict(other, latents, timesteps, conditioning), expected)


def test_pipeline_round_trip_with_and_without_gathered_weights(case, tmp_path):
    build, _, _ = case
    pipeline = build()
    family = family_for(pipeline)
    family.save_pipeline(str(tmp_path / "plain"))
    loaded = type(pipeline).from_pretrained(str(tmp_path / "plain"))
    assert type(loaded) is type(pipeline)
    for name, value in family.denoiser.state_dict().items():
        torch.testing.assert_close(family_for(loaded).denoiser.state_dict()[name], value)
    # A gathered state dict (DeepSpeed ZeRO-3) replaces the in-memory denoiser's weights in the written folder.
    gathered = {name: value + 1.0 for name, value in family.denoiser.state_dict().items()}
    family.save_pipeline(str(tmp_path / "gathered"), denoiser_state_dict=gathered)
    reloaded = type(pipeline).from_pretrained(str(tmp_path / "gathered"))
    for name, value in gathered.items():
        torch.testing.assert_close(family_for(reloaded).denoiser.state_dict()[name], value)
    # ... and resuming reads it back.
    target = family_for(build()).denoiser
    family.load_denoiser_into(target, str(tmp_path / "gathered"))
    for name, value in gathered.items():
        torch.testing.assert_close(target.state_dict()[name], value)


def test_latent_cache_replays_what_the_family_computes_from_pixels(case, tmp_path):
    """`cache_images`/`cache_text` store what `latents`/`conditioning_from_cache` need to reproduce the pixel path."""
    from trl_adaptive.caching import CachedPreferenceCollator, open_or_build_cache

    build, _, _ = case
    family = family_for(build())
    dataset, _ = prepare_preference_dataset(toy_preference_dataset(num_pairs=3, size=40, seed=0))
    cache = open_or_build_cache(family, dataset, str(tmp_path), model_name="tiny", resolution=RESOLUTION, random_flip=False)
    pixel_batch = PreferenceCollator(detect_schema(dataset.column_names), RESOLUTION)([dataset[i] for i in range(3)])
    cached_batch = CachedPreferenceCollator(cache.empty_prompt_text())([cache[i] for i in range(3)])
    from_pixels = torch.utils._pytree.tree_leaves(family.condition(pixel_batch))
    from_cache = torch.utils._pytree.tree_leaves(family.condition(cached_batch))
    assert len(from_pixels) == len(from_cache) > 0
    for expected, got in zip(from_pixels, from_cache):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    generators = lambda: [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)]  # noqa: E731
    for key in ("chosen", "rejected"):
        torch.testing.assert_close(
            family.latents(cached_batch, key, generator=generators()),
            family.latents(pixel_batch, key, generator=generators()),
            rtol=1e-5, atol=1e-5,
        )


def test_pair_latents_encode_both_sides_at_once_with_the_same_draws(case, batch):
    build, _, _ = case
    family = family_for(build())
    generators = lambda: [torch.Generator().manual_seed(seed) for seed in range(4)]  # noqa: E731
    shared = generators()  # one generator per pair, drawn for the winner first, then the loser
    separate = torch.cat([family.latents(batch, "chosen", generator=shared), family.latents(batch, "rejected", generator=shared)])
    torch.testing.assert_close(family.pair_latents(batch, generator=generators()), separate, rtol=1e-5, atol=1e-5)
