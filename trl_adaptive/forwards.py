"""The paired denoiser calls of a step: policy, reference and EMA annotators on each pair's shared noise and timestep.

`PairForwards` is the layer between the model family (`trl_adaptive.families`: how a model is conditioned, noised
and called) and the robustness methods (`trl_adaptive.robustness`: what they do with the errors). It owns the frozen
forwards: the reference (a frozen copy, or the LoRA denoiser with its adapters off), the EMA annotators a method
registers, and the prompt-contrast forward of the minority filter. The trainer and the methods ask it for denoising
errors and logits and never call a denoiser themselves.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch.utils._pytree import tree_map

from .filtering import prompt_contrast_evidence
from .lora_batching import LoraFrozenForwards, supports_mixed_adapter_batches
from .losses import denoising_error, dpo_logits
from .data import ROW_INDEX_LIST
from .noise import EVAL, TRAIN, pair_generators, pair_noise_and_timesteps


def to_dtype(tree, dtype: torch.dtype):
    """Floating-point tensors of a nested structure in `dtype` (integer tensors such as timesteps unchanged)."""
    return tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


class PairForwards:
    """Denoising errors and Diffusion-DPO logits of a batch of preference pairs.

    Args:
        family: the pipeline's `DiffusionFamily`.
        accelerator: the trainer's accelerator (device, autocast, unwrapping).
        weight_dtype: the training dtype; denoiser inputs are cast to it (DeepSpeed runs bf16/fp16 weights without
            autocast).
        seed: the run's seed; each pair's randomness is keyed by (seed, step, row_index) (`trl_adaptive.noise`).
        ref_model: the frozen reference denoiser of a full fine-tune, prepared (`distributed.prepare_reference_model`);
            None with LoRA, where the reference is the denoiser with its adapters disabled.
        wrapped_model: returns the prepared model (ZeRO-3 annotator shards need its DeepSpeed engine).
    """

    def __init__(self, family, accelerator, weight_dtype: torch.dtype, seed: int, ref_model=None,
                 wrapped_model: Callable[[], torch.nn.Module] | None = None):
        self.family = family
        self.accelerator = accelerator
        self.weight_dtype = weight_dtype
        self.seed = seed
        self.ref_model = ref_model
        self.wrapped_model = wrapped_model
        self.annotators = None  # registered by the method that owns them (`register_annotators`)
        self.lora = None  # LoRA reference (and batched annotators) without walking the module tree

    # ---- set-up ----------------------------------------------------------------------------------------
    def register_annotators(self, annotators) -> None:
        """EMA annotators whose predictions `pair_forward(..., with_annotators=True)` adds to the logits."""
        self.annotators = annotators

    def use_lora(self, denoiser, peft_config, batch_annotators: bool) -> None:
        """With plain LoRA, run the reference (and, with `batch_annotators`, every registered annotator in the same
        call) through peft's mixed-adapter batches (`trl_adaptive.lora_batching`). Call after `register_annotators`."""
        if supports_mixed_adapter_batches(peft_config):
            self.lora = LoraFrozenForwards(denoiser, peft_config, self.annotators, batch_annotators=batch_annotators)

    def bound_annotators(self):
        """The EMA annotators, attached to the prepared model (ZeRO-3 shards need its DeepSpeed engine)."""
        self.annotators.bind(self.wrapped_model() if self.wrapped_model is not None else None)
        return self.annotators

    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        """`accelerator.unwrap_model(model)`, memoised: accelerate walks every module (a torch.compile check) on each
        call, milliseconds per step on a UNet."""
        cached = getattr(self, "_unwrap_cache", None)
        if cached is None or cached[0] is not model:
            cached = self._unwrap_cache = (model, self.accelerator.unwrap_model(model))
        return cached[1]

    # ---- frozen predictions ----------------------------------------------------------------------------
    @contextmanager
    def _adapters_disabled(self, denoiser):
        denoiser.disable_adapters()
        try:
            yield
        finally:
            denoiser.enable_adapters()

    @torch.no_grad()
    def _reference_prediction(self, denoiser, noisy, timesteps, conditioning):
        if self.ref_model is not None:
            # The reference must compute exactly as the policy would with the same weights: under the same autocast
            # (accelerate wraps only the prepared policy's forward) and in the same module mode (diffusers' ResNet
            # blocks take a different, differently rounded path in train mode). Like the LoRA reference (the policy
            # with adapters off), it therefore also shares the policy's dropout, which diffusers' UNets default to 0.
            if self.ref_model.training != denoiser.training:  # (a walk over every module: only when it changes)
                self.ref_model.train(denoiser.training)
            with self.accelerator.autocast():
                return self.family.predict(self.ref_model, noisy, timesteps, conditioning)
        with self._adapters_disabled(denoiser):
            return self.family.predict(denoiser, noisy, timesteps, conditioning)

    @torch.no_grad()
    def frozen_predictions(self, denoiser, noisy, timesteps, conditioning, with_annotators: bool):
        """Reference prediction and one per EMA annotator (if `with_annotators`), without gradient, under the
        training's autocast. With LoRA they run as one batched call (`trl_adaptive.lora_batching`)."""
        lora = self.lora
        with self.accelerator.autocast():
            if lora is not None and lora.batches_annotators and with_annotators:
                reference, *annotators = lora.reference_and_annotators(self.family, denoiser, noisy, timesteps, conditioning)
                return reference, annotators
            if lora is not None:
                reference = lora.reference(self.family, denoiser, noisy, timesteps, conditioning)
            else:
                reference = self._reference_prediction(denoiser, noisy, timesteps, conditioning)
            if not with_annotators:
                return reference, []
            annotators, predictions = self.bound_annotators(), []
            for k in range(len(annotators)):
                as_annotator = lambda *a, _k=k, **kw: annotators(_k, denoiser, *a, **kw)  # noqa: E731
                predictions.append(self.family.predict(as_annotator, noisy, timesteps, conditioning))
            return reference, predictions

    # ---- the paired forward ----------------------------------------------------------------------------
    def noised_pairs(self, model, inputs, global_step: int, draw: int = 0, min_noise: float = 0.0) -> dict:
        """Both images of every pair noised with the pair's shared noise and timestep (2B rows, winners first), the
        denoising target and the conditioning, in the denoiser's dtype; `pair_timesteps` has one entry per pair.
        Training draws are keyed by the step; evaluation draws by the row only (the same at every evaluation)."""
        family = self.family
        step, purpose = (global_step, TRAIN) if model.training else (0, EVAL)
        # The host copy of the rows, where the collator made one: seeding from the device tensor would wait for the GPU.
        rows = inputs.get(ROW_INDEX_LIST, inputs["row_index"])
        generators = pair_generators(self.seed, step, rows, self.accelerator.device, purpose, draw)
        latents = family.pair_latents(inputs, generator=generators)  # one VAE call for both images of every pair
        chosen = latents[: latents.shape[0] // 2]
        noise, pair_timesteps = pair_noise_and_timesteps(
            family, generators, chosen.shape, chosen.device, chosen.dtype, min_noise=min_noise
        )
        noise, timesteps = torch.cat([noise, noise]), torch.cat([pair_timesteps, pair_timesteps])
        return {
            "noisy": family.add_noise(latents, noise, timesteps).to(self.weight_dtype),
            "timesteps": timesteps,
            "pair_timesteps": pair_timesteps,
            "target": family.target(latents, noise, timesteps),
            "conditioning": to_dtype(family.condition(inputs), self.weight_dtype),
        }

    def pair_forward(self, model, inputs, global_step: int, with_annotators: bool = False, draw: int = 0,
                     min_noise: float = 0.0) -> dict:
        """Policy, reference and (with `with_annotators`) annotator denoising errors of each pair.

        Returns ``policy_errors`` and ``reference_errors`` of shape (2B,) (winners first), ``logits``: a list whose
        entry 0 is the current model's (B,) logits (with gradient) and entries 1.. the EMA annotators' (detached),
        each pair's ``timesteps`` (B,) and the ``noised`` inputs. ``draw`` > 0 and ``min_noise`` serve the minority
        filter's extra evidence draws.
        """
        noised = self.noised_pairs(model, inputs, global_step, draw, min_noise)
        noisy, timesteps, target, conditioning = (noised[k] for k in ("noisy", "timesteps", "target", "conditioning"))
        denoiser = self.unwrapped(model)
        # The no-gradient forwards run first, so their activations never coexist with the policy's saved ones.
        reference, annotators = self.frozen_predictions(denoiser, noisy, timesteps, conditioning, with_annotators)
        reference_errors = denoising_error(reference, target)
        policy_errors = denoising_error(self.family.predict(model, noisy, timesteps, conditioning), target)
        logits = [dpo_logits(*policy_errors.chunk(2), *reference_errors.chunk(2))]
        for prediction in annotators:
            errors = denoising_error(prediction, target)
            logits.append(dpo_logits(*errors.chunk(2), *reference_errors.chunk(2)))
        return {"policy_errors": policy_errors, "reference_errors": reference_errors, "logits": logits,
                "timesteps": noised["pair_timesteps"], "noised": noised}

    # ---- the reference as a judge of prompt fidelity (minority_evidence="prompt_contrast") -----------------
    @torch.no_grad()
    def contrast_conditioning(self, inputs) -> dict:
        """Each pair conditioned on the previous pair's prompt of the batch (images keep their own conditioning)."""
        return to_dtype(self.family.condition(inputs, prompt_shift=1), self.weight_dtype)

    @torch.no_grad()
    def prompt_contrast_votes(self, model, inputs, noised: dict, own_errors: torch.Tensor | None = None,
                              contrast_conditioning: dict | None = None):
        """`prompt_contrast` evidence of one draw: the reference's votes (`filtering.prompt_contrast_evidence`) with
        each pair's prompt contrasted against the next pair's in the batch, and which votes count (False where the
        two prompts are the same text, so the contrast says nothing). `own_errors`: the reference's errors under the
        own prompts when the caller already has them (the training draw); `contrast_conditioning`: the batch's
        contrast conditioning when the caller already has it (every draw of a visit shares it)."""
        denoiser = self.unwrapped(model)
        noisy, timesteps, target = noised["noisy"], noised["timesteps"], noised["target"]
        if own_errors is None:
            own, _ = self.frozen_predictions(denoiser, noisy, timesteps, noised["conditioning"], with_annotators=False)
            own_errors = denoising_error(own, target)
        if contrast_conditioning is None:
            contrast_conditioning = self.contrast_conditioning(inputs)
        contrast, _ = self.frozen_predictions(denoiser, noisy, timesteps, contrast_conditioning, with_annotators=False)
        num_pairs = noisy.shape[0] // 2
        own_text = noised["conditioning"]["encoder_hidden_states"][:num_pairs]
        differs = (contrast_conditioning["encoder_hidden_states"][:num_pairs] != own_text).flatten(1).any(dim=1)
        return prompt_contrast_evidence(own_errors, denoising_error(contrast, target)), differs
