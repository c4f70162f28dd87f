"""SDXL in the trainer (LoRA and full fine-tune), its VAE handling, and per-pair noise keyed by row."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig

from trl_adaptive import AdaptiveDPOConfig, AdaptiveDiffusionDPOTrainer
from trl_adaptive.noise import pair_generators
from trl_adaptive.tiny import tiny_sdxl_pipeline, tiny_vae, toy_preference_dataset

torch.set_flush_denormal(True)

LORA = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _args(output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir), resolution=32, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return AdaptiveDPOConfig(**values)


@pytest.fixture(scope="module")
def pairs():
    return toy_preference_dataset(num_pairs=8, size=40, seed=0)  # 40 px images: resized and cropped to 32


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _unet_output(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 16, unet.config.cross_attention_dim, generator=generator)
    added = {"text_embeds": torch.randn(2, 32, generator=generator), "time_ids": torch.tensor([[40.0, 48, 0, 4, 32, 32]] * 2)}
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def test_sdxl_lora_trains_and_loads_with_the_sdxl_pipeline(pairs, tmp_path):
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sdxl_pipeline(seed=0), args=_args(tmp_path), train_dataset=pairs, peft_config=LoraConfig(**LORA)
    )
    before = _trainable(trainer.model)
    assert before and all("lora" in n for n in before)
    trainer.train()
    after = _trainable(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(k in logs[-1] for k in ("rewards/margins", "minority/score_mean", "minority/weight_min"))
    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    loaded = tiny_sdxl_pipeline(seed=0)
    loaded.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(_unet_output(loaded.unet), _unet_output(trainer.model), atol=1e-5, rtol=1e-4)


def test_sdxl_full_finetune_saves_a_loadable_pipeline(pairs, tmp_path):
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sdxl_pipeline(seed=0), args=_args(tmp_path), train_dataset=pairs)
    before = _trainable(trainer.model)
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in _trainable(trainer.model).items())
    reference = trainer.ref_model.state_dict()  # the frozen reference did not move
    assert all(torch.equal(reference[n], before[n]) for n in before)
    trainer.save_model()
    loaded = StableDiffusionXLPipeline.from_pretrained(str(tmp_path))
    torch.testing.assert_close(_unet_output(loaded.unet), _unet_output(trainer.model))


def test_sdxl_vae_stays_float32_and_encoders_take_the_training_dtype(pairs, tmp_path):
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sdxl_pipeline(seed=0), args=_args(tmp_path, bf16=True), train_dataset=pairs)
    pipeline = trainer.family.pipeline
    assert pipeline.vae.dtype == torch.float32  # force_upcast: the SDXL VAE overflows in half precision
    assert pipeline.text_encoder.dtype == pipeline.text_encoder_2.dtype == torch.bfloat16
    assert not any(p.requires_grad for m in trainer.family.frozen_modules().values() for p in m.parameters())


@pytest.mark.parametrize("lora", [False, True])
def test_reference_computes_like_the_untrained_policy_in_bf16(pairs, tmp_path, lora):
    """At step 0 the policy is the reference, so every logit must be exactly 0 (loss log 2) under bf16 mixed
    precision too: the reference runs under the policy's autocast, in its weights' dtype and in its module mode."""
    import math

    args = _args(tmp_path, bf16=True, max_steps=1, adaptive=False)
    peft_config = LoraConfig(**LORA) if lora else None
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sdxl_pipeline(seed=0), args=args, train_dataset=pairs, peft_config=peft_config)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/margins"] == 0.0 and first["denoising_loss/policy_chosen"] == first["denoising_loss/reference_chosen"]


def test_vae_name_or_path_replaces_the_vae(pairs, tmp_path):
    torch.manual_seed(123)
    fixed = tiny_vae(32, scaling_factor=0.13025, force_upcast=False)  # an "fp16-fix"-style VAE: no upcast needed
    fixed.save_pretrained(tmp_path / "vae-fix")
    args = _args(tmp_path / "out", bf16=True, vae_name_or_path=str(tmp_path / "vae-fix"))
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sdxl_pipeline(seed=0), args=args, train_dataset=pairs)
    vae = trainer.family.pipeline.vae
    assert vae.dtype == torch.bfloat16  # no force_upcast: runs in the training dtype
    for name, value in fixed.state_dict().items():
        torch.testing.assert_close(vae.state_dict()[name].float(), value, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="vae_name_or_path"):
        AdaptiveDiffusionDPOTrainer(
            tiny_sdxl_pipeline(seed=0), args=_args(tmp_path / "o2", vae_name_or_path=str(tmp_path / "missing")),
            train_dataset=pairs,
        )


def test_pair_generators_depend_on_seed_step_and_row_only():
    draw = lambda seed, step, rows: torch.stack(  # noqa: E731
        [torch.randn(3, generator=g) for g in pair_generators(seed, step, torch.tensor(rows), "cpu")]
    )
    full = draw(0, 5, [7, 3, 11])
    torch.testing.assert_close(draw(0, 5, [11, 3]), full[[2, 1]])  # any batch composition, any order
    assert not torch.allclose(draw(0, 6, [7]), full[:1])  # a new step: fresh noise for the same pair
    assert not torch.allclose(draw(1, 5, [7]), full[:1])  # another seed
    assert not torch.allclose(full[0], full[1])  # different pairs: different noise


def test_pair_forward_is_independent_of_how_pairs_are_batched(pairs, tmp_path):
    """What a 2-process run relies on: a pair's errors do not depend on which other pairs share its batch."""
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sdxl_pipeline(seed=0), args=_args(tmp_path), train_dataset=pairs, peft_config=LoraConfig(**LORA)
    )
    collate = trainer.data_collator
    rows = [trainer.train_dataset[i] for i in range(4)]
    trainer.model.train()
    with torch.no_grad():
        together = trainer.forwards.pair_forward(trainer.model, collate(rows), 0)
        halves = [trainer.forwards.pair_forward(trainer.model, collate(part), 0) for part in (rows[:2], rows[2:])]
    for key in ("policy_errors", "reference_errors"):
        split = torch.cat([h[key].view(2, -1) for h in halves], dim=1).view(-1)  # winners of both, then losers
        torch.testing.assert_close(together[key], split, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_example_training_script_runs_on_a_saved_pipeline_and_dataset(pairs, tmp_path):
    """examples/train_dpo.py, the script docs/distributed.md launches, on a tiny SDXL folder (1 step, CPU)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tiny_sdxl_pipeline(seed=0).save_pretrained(tmp_path / "model")
    pairs.save_to_disk(str(tmp_path / "data"))
    command = [
        sys.executable, str(repo / "examples" / "train_dpo.py"), "--model_name_or_path", str(tmp_path / "model"),
        "--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--lora_rank", "4",
        "--resolution", "32", "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu",
        "--report_to", "none", "--save_strategy", "no",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "model"))
    loaded.load_lora_weights(str(tmp_path / "out"))
