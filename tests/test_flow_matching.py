"""SD3 and Flux through the trainer: the velocity objective by hand, timestep densities and shifts, LoRA that the
pipelines load, exact resume, full fine-tuning from a folder, the latent cache, Flux's guidance embedding.
(The family interface itself is checked for every family in tests/test_families.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tiny_setup import lora_config, tiny_args
from trl_adaptive import AdaptiveDiffusionDPOTrainer
from trl_adaptive.families import family_for
from trl_adaptive.noise import TRAIN, pair_generators, pair_noise_and_timesteps
from trl_adaptive.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

torch.set_flush_denormal(True)

BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
FLOW = dict(max_sequence_length=8)  # T5 tokens: short prompts, fast tests


def _args(tmp_path, **overrides):
    return tiny_args(tmp_path, **{**FLOW, **overrides})


def test_velocity_objective_matches_a_hand_computation(toy_pairs, tmp_path):
    """SD3: logits and loss from the trainer equal the flow-matching DPO objective written out here."""
    pipeline = tiny_sd3_pipeline(seed=0)
    trainer = AdaptiveDiffusionDPOTrainer(pipeline, args=_args(tmp_path, adaptive=False, beta=500.0),
                                          train_dataset=toy_pairs, peft_config=lora_config())
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # zero at initialisation: move the policy away from the reference, as training does
            param.data.normal_(std=0.3)
    trainer.model.train()
    with torch.no_grad():
        loss, out = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    family = trainer.family
    # The same per-pair draws the trainer makes (keyed by seed, step 0, row).
    generators = pair_generators(0, 0, inputs["row_index"], "cpu", TRAIN)
    vae = pipeline.vae
    pixels = torch.cat([inputs["pixel_values_chosen"], inputs["pixel_values_rejected"]])
    posterior = vae.encode(pixels).latent_dist
    mean = (posterior.mean - vae.config.shift_factor) * vae.config.scaling_factor
    std = posterior.std * vae.config.scaling_factor
    from diffusers.utils.torch_utils import randn_tensor

    x0 = mean + std * randn_tensor(mean.shape, generator=generators + generators, dtype=mean.dtype)
    noise, timesteps = pair_noise_and_timesteps(family, generators, x0[:2].shape, "cpu", x0.dtype)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1).repeat(2, 1, 1, 1)
    eps = torch.cat([noise, noise])
    x_t = (1 - sigma) * x0 + sigma * eps
    embeds, _, pooled, _ = pipeline.encode_prompt(inputs["prompts"], None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=8)
    transformer = trainer.model

    def velocity_errors(adapters: bool):
        (transformer.enable_adapters if adapters else transformer.disable_adapters)()
        with torch.no_grad():
            v = transformer(hidden_states=x_t, timestep=torch.cat([timesteps, timesteps]),
                            encoder_hidden_states=embeds.repeat(2, 1, 1), pooled_projections=pooled.repeat(2, 1),
                            return_dict=False)[0]
        transformer.enable_adapters()
        return ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))  # the mean squared error of the velocity, per image

    policy, reference = velocity_errors(True), velocity_errors(False)
    logits = (reference[:2] - reference[2:]) - (policy[:2] - policy[2:])
    torch.testing.assert_close(out["policy_errors"], policy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["reference_errors"], reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["logits"][0], logits, rtol=1e-4, atol=1e-5)  # differences of ~5: float32 rounding
    torch.testing.assert_close(loss, -F.logsigmoid(500.0 * out["logits"][0]).mean())
    torch.testing.assert_close(loss, -F.logsigmoid(500.0 * logits).mean(), rtol=1e-4, atol=1e-4)
    # The policy differs from the reference, so the logits are not trivially zero.
    assert not torch.allclose(policy, reference)


def test_timestep_tables_follow_the_scripts_and_the_options(tmp_path):
    sd3 = family_for(tiny_sd3_pipeline())
    flux = family_for(tiny_flux_pipeline())
    draw = lambda family: family.noise_level(family.sample_timesteps(20000, "cpu", torch.Generator().manual_seed(0)))  # noqa: E731
    # Logit-normal(0, 1): median sigma 1/2 before the shift. SD3's scheduler ships shift 3 (median 3/4); Flux's shifts
    # only at inference (dynamic shifting), so training sees no shift, as in diffusers' Flux script.
    assert draw(sd3).median().item() == pytest.approx(0.75, abs=0.01)
    assert draw(flux).median().item() == pytest.approx(0.5, abs=0.01)
    flux.configure(_args(tmp_path, flow_shift=3.0))
    assert draw(flux).median().item() == pytest.approx(0.75, abs=0.01)
    # Resolution shift (Flux inference): mu linear in image tokens, 256 tokens -> base_shift 0.5.
    # The tiny VAE downsamples by 4: 128 px -> 32x32 latents -> 16x16 = 256 tokens of 2x2 patches.
    flux.configure(_args(tmp_path, flow_resolution_shift=True, resolution=128))
    expected = math.exp(0.5) / (math.exp(0.5) + 1.0)  # sigma 1/2 shifted by exp(mu)
    assert draw(flux).median().item() == pytest.approx(expected, abs=0.01)
    flux.configure(_args(tmp_path, timestep_density="uniform"))
    levels = draw(flux)
    assert levels.mean().item() == pytest.approx(0.5, abs=0.01) and levels.std().item() == pytest.approx(0.2887, abs=0.01)
    with pytest.raises(ValueError, match="timestep_density"):
        _args(tmp_path, timestep_density="cosmap")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_training_saves_what_the_pipeline_loads_and_resumes_exactly(name, toy_pairs, tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    def run(folder, resume=None, stop=False):
        args = _args(folder, max_steps=4, save_strategy="steps", save_steps=2, random_flip=True)
        trainer = AdaptiveDiffusionDPOTrainer(BUILDERS[name](seed=0), args=args, train_dataset=toy_pairs,
                                              peft_config=lora_config(), callbacks=[StopAt()] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "a")
    run(tmp_path / "b", stop=True)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    for key, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(resumed)[-2:] == losses(uninterrupted)[-2:]
    uninterrupted.save_model(str(tmp_path / "lora"))
    # What a user does with the result: load it into the family's pipeline.
    fresh, base = BUILDERS[name](seed=0), BUILDERS[name](seed=0)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    family = family_for(fresh)
    noisy = torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([300.0, 800.0])
    conditioning = family_for(base).encode_prompts(["a red square", "a blue square"])
    trained = uninterrupted.forwards.unwrapped(uninterrupted.model).eval()
    with torch.no_grad():
        loaded = family.predict(fresh.transformer, noisy, timesteps, conditioning)
        expected = family.predict(trained, noisy, timesteps, conditioning)
        untouched = family.predict(base.transformer, noisy, timesteps, conditioning)
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(loaded, untouched, atol=1e-4)


def test_flux_full_fine_tune_from_a_folder_with_the_latent_cache(toy_pairs, tmp_path):
    from diffusers import FluxPipeline

    folder = tmp_path / "flux"
    tiny_flux_pipeline(seed=0).save_pretrained(folder)
    args = _args(tmp_path / "out", cache_dir=str(tmp_path / "cache"), annotator_decays=[0.5])
    trainer = AdaptiveDiffusionDPOTrainer(str(folder), args=args, train_dataset=toy_pairs)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    # Trained from the cache: posterior means of the latents, text from the cached embeddings.
    assert "chosen.mean" in trainer.train_dataset.column_names
    assert type(trainer.data_collator).__name__ == "CachedPreferenceCollator"
    trainer.save_model()
    reloaded = FluxPipeline.from_pretrained(str(tmp_path / "out"))
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key, value in after.items():
        torch.testing.assert_close(reloaded.transformer.state_dict()[key], value)


@pytest.mark.parametrize("guidance_embeds,expected", [(True, 3.5), (False, None)])
def test_flux_feeds_the_guidance_embedding_only_to_guidance_distilled_models(guidance_embeds, expected, tmp_path):
    pipeline = tiny_flux_pipeline(guidance_embeds=guidance_embeds)
    family = family_for(pipeline)
    family.configure(_args(tmp_path))
    seen = {}
    pipeline.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    conditioning = family.encode_prompts(["a red square"])
    with torch.no_grad():
        family.predict(pipeline.transformer, torch.randn(1, 4, 8, 8), torch.tensor([500.0]), conditioning)
    if expected is None:
        assert seen["guidance"] is None
    else:
        assert seen["guidance"].tolist() == [expected]
    assert seen["timestep"].tolist() == [0.5]  # Flux's transformer takes sigma (it multiplies by 1000 itself)
    assert seen["hidden_states"].shape == (1, 16, 16)  # 8x8x4 latents as 16 tokens of 2x2x4 values


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_bf16_lora_steps_with_gradient_checkpointing(name, toy_pairs, tmp_path):
    args = _args(tmp_path, bf16=True, activation_checkpointing=True, max_steps=2)
    trainer = AdaptiveDiffusionDPOTrainer(BUILDERS[name](seed=0), args=args, train_dataset=toy_pairs,
                                          peft_config=lora_config())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert trainer.family.denoiser.is_gradient_checkpointing
    assert trainer.family.pipeline.text_encoder.dtype == torch.bfloat16  # frozen encoders in the training dtype


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flux_yaml_through_the_cli_resumes_exactly(tmp_path):
    """`trl-adaptive train --config examples/configs/flux_lora.yaml`, the model swapped for a tiny Flux folder: a run
    stopped at its step-2 checkpoint and resumed with `--resume_from_checkpoint latest` saves the same LoRA as an
    uninterrupted run."""
    import os
    import subprocess
    import sys

    from datasets import DatasetDict
    from safetensors.torch import load_file

    from tiny_setup import REPO_ROOT
    from trl_adaptive.tiny import toy_preference_dataset

    tiny_flux_pipeline(seed=0).save_pretrained(tmp_path / "flux")
    pairs = toy_preference_dataset(num_pairs=8, size=32, seed=0)
    DatasetDict(validation=pairs).save_to_disk(str(tmp_path / "pairs"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)

    def train(out, *flags):
        command = [os.path.join(os.path.dirname(sys.executable), "trl-adaptive"), "train", "--config",
                   "examples/configs/flux_lora.yaml", "--model_name_or_path", str(tmp_path / "flux"),
                   "--dataset_name", str(tmp_path / "pairs"), "--output_dir", str(out), "--cache_dir",
                   str(tmp_path / "cache"), "--resolution", "32", "--per_device_train_batch_size", "2",
                   "--gradient_accumulation_steps", "1", "--bf16", "false", "--dataloader_num_workers", "0",
                   "--max_sequence_length", "8", "--save_steps", "2", "--report_to", "none", "--disable_tqdm",
                   "true", *flags]
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    import shutil

    from safetensors.torch import save_file

    train(tmp_path / "whole", "--max_steps", "4")
    train(tmp_path / "stopped", "--max_steps", "2")
    assert (tmp_path / "stopped" / "checkpoint-2" / "annotators.safetensors").is_file()
    # A copy whose checkpoint LoRA is changed: resuming from it must give another result (the run reads it).
    shutil.copytree(tmp_path / "stopped", tmp_path / "changed")
    lora_file = str(tmp_path / "changed" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    save_file({k: v + 0.01 for k, v in load_file(lora_file).items()}, lora_file)
    train(tmp_path / "stopped", "--max_steps", "4", "--resume_from_checkpoint", "latest")
    train(tmp_path / "changed", "--max_steps", "4", "--resume_from_checkpoint", "latest")
    whole = load_file(str(tmp_path / "whole" / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "pytorch_lora_weights.safetensors"))
    assert whole.keys() == resumed.keys() and whole
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    changed = load_file(str(tmp_path / "changed" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(changed[k], whole[k]) for k in whole)
