"""With LoRA, the reference and every EMA annotator in ONE batched denoiser call (and a cheap reference forward).

With LoRA, the reference is the base UNet (adapters off) and each EMA annotator is the base UNet plus its own
low-rank update, so the no-gradient forwards of a step differ only in which LoRA update each row gets. peft's LoRA
layers take ``adapter_names=[...]``, one name per row: the base layer runs once on the whole batch and each
adapter's update is added to its own rows only (``"__base__"`` rows get none). Here the rows of each forward are
contiguous blocks (reference, then annotator 0, 1, ...), so the updates are added by slices (`_add_block_updates`):
peft's per-row index lists would copy a list to the GPU in every layer, a host synchronisation each. This module adds extra adapters
``ema_0``, ``ema_1``, ... whose weights *are* the EMA shadow tensors (no copy: the EMA update writes into them; held
as plain tensors, so they are not model parameters or state), and runs reference + annotators as one call on a
(1 + K) * 2B batch.

Why: one big call instead of 1 + K small ones keeps a GPU busier at small per-device batches and launches each
kernel once; the base weights are read once. The cost is a larger transient activation peak (no gradient, so
nothing is kept) and, per LoRA layer, a gather/scatter of each adapter's rows. Measured numbers are in
docs/performance.md. Batching is used with LoRA when `AdaptiveDPOConfig.batch_frozen_forwards` is on, outside DeepSpeed
(ZeRO-3 partitions module parameters, so shadows and adapter weights could not share storage).
"""

from __future__ import annotations

import copy
import warnings
from functools import partial

import torch
from peft.tuners.lora import LoraLayer
from torch.utils._pytree import tree_map

BASE = "__base__"


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _add_block_updates(module, args, kwargs, output, blocks):
    """Forward hook of a LoRA layer run with only ``"__base__"`` rows: adds each adapter's LoRA update to its own
    contiguous block of rows, as peft's mixed-adapter forward would (the same arithmetic per row). By slices, not
    peft's per-row index lists: indexing a GPU tensor with a Python list copies the list to the device, a blocking
    copy (a host synchronisation) per layer and adapter."""
    x = args[0] if args else kwargs["x"]
    for adapter, rows in blocks:
        lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
        update = lora_B(lora_A(module.lora_dropout[adapter](x[rows].to(lora_A.weight.dtype)))) * module.scaling[adapter]
        output[rows] += update.to(output.dtype)
    return output


def _repeat_rows(tree, times: int):
    return tree_map(lambda x: torch.cat([x] * times) if isinstance(x, torch.Tensor) else x, tree)


def supports_mixed_adapter_batches(peft_config) -> bool:
    """peft's mixed-adapter batches cover plain LoRA (not DoRA or other variants)."""
    from peft import LoraConfig

    return isinstance(peft_config, LoraConfig) and not getattr(peft_config, "use_dora", False)


class LoraFrozenForwards:
    """The no-gradient forwards of a LoRA denoiser: the reference (base weights only) and, with
    `batch_annotators`, reference + every EMA annotator as one call (see the module docstring).

    Both go through peft's ``adapter_names`` argument on a precomputed list of LoRA layers, so a step never walks the
    module tree: diffusers' ``disable_adapters()`` / ``enable_adapters()`` visit every module and toggle
    ``requires_grad`` on every adapter weight, which costs milliseconds per call on a UNet.

    Args:
        denoiser: the UNet with its trained adapter (`trained_adapter`) already added.
        peft_config: the trained adapter's config (rank, alpha, targets), reused for the annotator adapters.
        annotators: the `EMAAnnotators` of that adapter's parameters, or None. With `batch_annotators`, their shadow
            tensors become the weights of new adapters ``ema_0``, ``ema_1``, ... (no copy).
    """

    def __init__(self, denoiser: torch.nn.Module, peft_config, annotators=None, batch_annotators: bool = True,
                 trained_adapter: str = "default"):
        self.adapter_names: list[str] = []
        if annotators is not None and len(annotators) and batch_annotators:
            self.adapter_names = [f"ema_{k}" for k in range(len(annotators))]
            self._add_annotator_adapters(denoiser, annotators, peft_config, trained_adapter)
        self.lora_layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]

    @property
    def batches_annotators(self) -> bool:
        return bool(self.adapter_names)

    def _add_annotator_adapters(self, denoiser, annotators, peft_config, trained_adapter: str) -> None:
        trainable = {name for name, p in denoiser.named_parameters() if p.requires_grad}
        with warnings.catch_warnings():  # peft warns of "multiple adapters in the model": here that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            for name in self.adapter_names:
                denoiser.add_adapter(copy.deepcopy(peft_config), adapter_name=name)
        denoiser.set_adapter(trained_adapter)  # only the trained adapter takes part in ordinary forwards
        params = dict(denoiser.named_parameters())
        for name, param in params.items():
            param.requires_grad_(name in trainable)
        marker = f".{trained_adapter}."
        for k, adapter in enumerate(self.adapter_names):
            for name, shadow in annotators.shadows[k].items():
                if marker not in name:
                    raise ValueError(f"trainable parameter {name} is not part of LoRA adapter {trained_adapter!r}")
                module_name, _, attribute = name.replace(marker, f".{adapter}.").rpartition(".")
                module = denoiser.get_submodule(module_name)
                # The adapter's weight becomes the fp32 shadow tensor itself (no copy: EMA updates land here), held as
                # a plain attribute, not a Parameter: it stays out of parameters(), state_dict() and optimizers.
                delattr(module, attribute)
                setattr(module, attribute, shadow)

    def _call(self, groups: list[str], family, denoiser, noisy, timesteps, conditioning) -> list[torch.Tensor]:
        rows = noisy.shape[0]
        # Every row "__base__" for peft (its base layer only), then each adapter's update on its block of rows.
        names = [BASE] * (rows * len(groups))
        blocks = [(group, slice(k * rows, (k + 1) * rows)) for k, group in enumerate(groups) if group != BASE]
        hooks = [
            layer.register_forward_pre_hook(partial(_inject_adapter_names, adapter_names=names), with_kwargs=True)
            for layer in self.lora_layers
        ]
        if blocks:
            hooks += [layer.register_forward_hook(partial(_add_block_updates, blocks=blocks), with_kwargs=True)
                      for layer in self.lora_layers]
        try:
            with torch.no_grad():
                if len(groups) > 1:
                    noisy, timesteps, conditioning = (_repeat_rows(x, len(groups)) for x in (noisy, timesteps, conditioning))
                prediction = family.predict(denoiser, noisy, timesteps, conditioning)
        finally:
            for hook in hooks:
                hook.remove()
        return list(prediction.chunk(len(groups)))

    def reference(self, family, denoiser, noisy, timesteps, conditioning) -> torch.Tensor:
        """The base UNet's prediction (every LoRA update skipped)."""
        return self._call([BASE], family, denoiser, noisy, timesteps, conditioning)[0]

    def reference_and_annotators(self, family, denoiser, noisy, timesteps, conditioning) -> list[torch.Tensor]:
        """[reference, annotator 0, annotator 1, ...] from one call on a (1 + K) * 2B batch."""
        return self._call([BASE, *self.adapter_names], family, denoiser, noisy, timesteps, conditioning)
