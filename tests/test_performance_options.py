"""The speed options of `AdaptiveDPOConfig` (docs/performance.md, "Speed options"): wired, defaulted where safe, and
leaving the training arithmetic alone."""

import warnings

import pytest
import torch

import trl_adaptive.config as config_module
from tiny_setup import lora_config, tiny_args
from trl_adaptive import AdaptiveDiffusionDPOTrainer, AdaptiveDPOConfig
from trl_adaptive.config import data_workers
from trl_adaptive.tiny import tiny_sd_pipeline, toy_preference_dataset


def _losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_defaults_on_the_cpu(tmp_path):
    args = AdaptiveDPOConfig(output_dir=str(tmp_path), report_to=[])
    assert args.optim == "adamw_torch_fused"  # transformers' default with torch >= 2.8; it runs on the CPU too
    assert args.logging_nan_inf_filter is False  # its per-step read of the loss is a GPU synchronisation
    assert args.dataloader_num_workers == 0 and args.dataloader_pin_memory is False  # no GPU to feed
    assert args.tf32 is None and args.accelerator_config.non_blocking is False
    assert args.use_channels_last(convolutional_denoiser=True) is False
    assert AdaptiveDPOConfig(output_dir=str(tmp_path), report_to=[], channels_last=True).use_channels_last(False)


def test_defaults_on_a_gpu(tmp_path, monkeypatch):
    # What the config resolves to on a CUDA machine (TF32 left off: transformers checks the real GPU for it).
    monkeypatch.setattr(config_module, "_cuda_training", lambda args: True)
    monkeypatch.setattr(config_module, "_tf32_supported", lambda: False)
    monkeypatch.setattr(config_module, "available_cpus", lambda: 16)
    args = AdaptiveDPOConfig(output_dir=str(tmp_path), report_to=[])
    assert args.dataloader_num_workers == 8 and args.dataloader_pin_memory is True
    assert args.accelerator_config.non_blocking is True  # pinned batches copied without waiting
    assert args.use_channels_last(convolutional_denoiser=True) and not args.use_channels_last(False)
    off = AdaptiveDPOConfig(output_dir=str(tmp_path), report_to=[], non_blocking_transfers=False)
    assert off.accelerator_config.non_blocking is False


def test_data_workers_are_sized_to_the_machine():
    assert data_workers(-1, on_gpu=False, cpus=64, local_processes=1) == 0
    assert data_workers(-1, on_gpu=True, cpus=16, local_processes=1) == 8
    assert data_workers(-1, on_gpu=True, cpus=96, local_processes=8) == 8  # 12 per process, capped at 8
    assert data_workers(-1, on_gpu=True, cpus=16, local_processes=8) == 1
    assert data_workers(-1, on_gpu=True, cpus=2, local_processes=1) == 1
    assert data_workers(3, on_gpu=True, cpus=16, local_processes=1) == 3
    with pytest.warns(UserWarning, match="using 2 workers"):  # the CLI's 4 workers on a 2-core machine
        assert data_workers(4, on_gpu=False, cpus=2, local_processes=1) == 2
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        AdaptiveDPOConfig(output_dir="unused", report_to=[], dataloader_num_workers=-2)


def test_attention_runs_through_scaled_dot_product_attention(monkeypatch):
    pipeline = tiny_sd_pipeline()
    from trl_adaptive.families import family_for

    family = family_for(pipeline)
    assert family.uses_sdpa() and set(family.attention_processors()) == {"AttnProcessor2_0"}
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    unet = pipeline.unet
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, unet.config.cross_attention_dim))
    assert len(calls) == sum(family.attention_processors().values())  # every attention layer, once


def test_channels_last_trains_the_same_model(tmp_path):
    torch.set_flush_denormal(True)
    runs = {}
    for channels_last in (False, True):
        args = tiny_args(tmp_path / str(channels_last), adaptive=True, max_steps=2, channels_last=channels_last)
        trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(4))
        conv = trainer.model.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert trainer.ref_model.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        trainer.train()
        runs[channels_last] = (_losses(trainer), trainer.model.conv_in.weight.detach().contiguous())
    # Another memory layout, other convolution kernels: equal up to float rounding, not bit for bit. The second loss
    # (61, after a first step of gradient norm ~2000) differed by 1.4e-4 relative with diffusers 0.42 / torch 2.13.
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-3)
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-5)


def test_torch_compile_trains_lora_with_gradient_checkpointing(tmp_path):
    """The Trainer's own `torch_compile` flag: the policy and the frozen LoRA forwards (reference = adapters off) run
    through the compiled module, with gradient checkpointing. The `eager` backend traces every forward with dynamo
    (graph capture, guards, recompiles) without generating kernels, which on this CPU would take minutes
    (`inductor`: measured in docs/performance.md); with it the losses equal the uncompiled run's exactly."""
    torch.set_flush_denormal(True)
    torch._dynamo.reset()
    losses = {}
    for compiled in (False, True):
        args = tiny_args(tmp_path / str(compiled), max_steps=2, activation_checkpointing=True,
                         torch_compile=compiled, torch_compile_backend="eager" if compiled else None)
        trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(4),
                                              peft_config=lora_config())
        frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        losses[compiled] = _losses(trainer)
        if compiled:
            assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
            assert type(trainer.forwards.unwrapped(trainer.model_wrapped)).__name__ == "OptimizedModule"
            # One graph with gradient (the policy), one without (the reference, adapters off) at least.
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before >= 2
    assert losses[True] == losses[False]
    torch._dynamo.reset()


def test_training_steps_skip_the_mode_walk_but_not_a_mode_change(tmp_path, monkeypatch):
    """`training_step` does not walk every module to set train mode again while the model is in train mode, and
    still does after evaluation put it in eval mode."""
    torch.set_flush_denormal(True)
    args = tiny_args(tmp_path, adaptive=False, max_steps=1)
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(4))
    model, block = trainer.model, trainer.model.down_blocks[0]
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the steps are called directly here
    walks = []
    original = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: walks.append(self) or original(self, mode))
    model.train()
    trainer.training_step(model, batch)  # the frozen reference follows the policy into train mode, once
    walks.clear()
    trainer.training_step(model, batch)
    assert walks == []  # already in train mode (policy and reference): no walk
    model.eval()
    trainer.training_step(model, batch)
    assert block in walks and block.training and model.training  # evaluation's eval mode is undone, as before
    assert "train" not in vars(model)  # the per-step shortcut is removed again
