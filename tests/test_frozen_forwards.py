"""Reference and EMA-annotator forwards: batched with LoRA (peft mixed-adapter batches), no gradient, training's autocast,
no weight copies."""

import pytest
import torch
from peft import LoraConfig

from trl_adaptive import AdaptiveDPOConfig, AdaptiveDiffusionDPOTrainer
from trl_adaptive.tiny import tiny_sd_pipeline, toy_preference_dataset

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def dataset():
    return toy_preference_dataset(num_pairs=8, size=32, seed=1)


def _trainer(tmp_path, dataset, lora=True, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), resolution=32, per_device_train_batch_size=4, max_steps=2, report_to=[],
        save_strategy="no", use_cpu=True, annotator_decays=[0.9, 0.5], disable_tqdm=True,
    )
    kwargs.update(overrides)
    peft_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS) if lora else None
    return AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=AdaptiveDPOConfig(**kwargs), train_dataset=dataset,
                                       peft_config=peft_config)


def _perturb(trainer, seed=0):
    """Make the policy's LoRA and each annotator differ from the base model and from each other."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        for shadow in trainer.robustness["adaptive"].annotators.shadows:
            for tensor in shadow.values():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))


def _batch(trainer):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))


def test_batched_reference_and_annotators_equal_one_by_one(tmp_path, dataset):
    batched = _trainer(tmp_path / "batched", dataset, batch_frozen_forwards=True)
    sequential = _trainer(tmp_path / "sequential", dataset, batch_frozen_forwards=False)
    assert batched.forwards.lora.batches_annotators and not sequential.forwards.lora.batches_annotators
    outputs = []
    for trainer in (batched, sequential):
        _perturb(trainer)
        torch.manual_seed(0)
        outputs.append(trainer.forwards.pair_forward(trainer.model, _batch(trainer), 0, with_annotators=True))
    torch.testing.assert_close(outputs[0]["reference_errors"], outputs[1]["reference_errors"], rtol=1e-5, atol=1e-6)
    assert len(outputs[0]["logits"]) == 3
    for mine, theirs in zip(outputs[0]["logits"], outputs[1]["logits"]):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-4, atol=1e-6)
    # The annotators really differ from the policy here, so the comparison above is not vacuous.
    assert not torch.allclose(outputs[0]["logits"][1], outputs[0]["logits"][0].detach())


def test_lora_reference_is_the_base_model(tmp_path, dataset):
    trainer = _trainer(tmp_path, dataset)
    _perturb(trainer)
    denoiser, family = trainer.model, trainer.family
    noisy = torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([10, 200, 500, 900])
    conditioning = {"encoder_hidden_states": torch.randn(4, 16, 32)}
    with torch.no_grad():
        reference = trainer.forwards.lora.reference(family, denoiser, noisy, timesteps, conditioning)
        with_lora = family.predict(denoiser, noisy, timesteps, conditioning)
        denoiser.disable_adapters()
        base = family.predict(denoiser, noisy, timesteps, conditioning)
        denoiser.enable_adapters()
    torch.testing.assert_close(reference, base)
    assert not torch.allclose(reference, with_lora)


def test_annotator_adapters_share_the_shadows(tmp_path, dataset):
    trainer = _trainer(tmp_path, dataset)
    denoiser, annotators = trainer.model, trainer.robustness["adaptive"].annotators
    params = dict(denoiser.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == set(annotators.names) and all(".default." in n for n in trainable)
    assert not any("ema_" in n for n in params) and not any("ema_" in n for n in denoiser.state_dict())
    for k, shadow in enumerate(annotators.shadows):
        for name, tensor in shadow.items():
            module_name, _, attribute = name.replace(".default.", f".ema_{k}.").rpartition(".")
            adapter_weight = getattr(denoiser.get_submodule(module_name), attribute)
            assert adapter_weight is tensor and adapter_weight.dtype == torch.float32
            assert not adapter_weight.requires_grad
    # Memory: the annotators hold exactly K copies of the LoRA weights, nothing else (2 annotators: 2x).
    lora_bytes = sum(params[n].numel() * params[n].element_size() for n in trainable)
    state_bytes = sum(t.numel() * t.element_size() for shadow in annotators.shadows for t in shadow.values())
    assert state_bytes == len(annotators) * lora_bytes
    # An EMA update lands in the adapter weights the batched forward reads.
    def adapter_weight(name, k):
        module_name, _, attribute = name.replace(".default.", f".ema_{k}.").rpartition(".")
        return getattr(denoiser.get_submodule(module_name), attribute)

    name = annotators.names[0]
    before = adapter_weight(name, 1).clone()
    with torch.no_grad():
        params[name].add_(1.0)
    annotators.update(denoiser)
    assert not torch.equal(adapter_weight(name, 1), before)
    # Checkpoint round trip keeps the binding; the saved LoRA holds only the trained adapter.
    annotators.save(str(tmp_path))
    saved = {n: t.detach().clone() for n, t in annotators.shadows[0].items()}
    with torch.no_grad():
        for tensor in annotators.shadows[0].values():
            tensor.zero_()
    annotators.load(str(tmp_path))
    for n, t in saved.items():
        torch.testing.assert_close(adapter_weight(n, 0), t)
    trainer.save_model(str(tmp_path / "lora"))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")).keys()
    assert keys and not any("ema_" in k for k in keys)


@pytest.mark.parametrize("lora,batched", [(True, True), (True, False), (False, False)])
def test_frozen_forwards_run_without_grad_in_training_autocast(tmp_path, dataset, lora, batched):
    trainer = _trainer(tmp_path, dataset, lora=lora, bf16=True, batch_frozen_forwards=batched, max_steps=1)
    seen = []

    def record(module, args):  # on an inner layer: inside accelerate's autocast-wrapped forward
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), args[0].shape[0]))

    modules = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    hooks = [m.conv_in.register_forward_pre_hook(record) for m in modules]
    trainer.train()
    for hook in hooks:
        hook.remove()
    with_grad = [s for s in seen if s[0]]
    without_grad = [s for s in seen if not s[0]]
    assert len(with_grad) == 1 and with_grad[0][3] == 8  # the policy: 4 pairs = 8 images
    # Reference + 2 annotators: one call on 24 rows when batched (LoRA), else three calls on 8.
    assert [s[3] for s in without_grad] == ([24] if lora and batched else [8, 8, 8])
    assert all(autocast and dtype == torch.bfloat16 for _, autocast, dtype, _ in seen)
