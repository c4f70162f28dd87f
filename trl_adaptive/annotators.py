"""EMA annotators: the extra "annotators" of Adaptive-DPO, as EMA copies of the trainable parameters.

Only the parameters that train are copied (the LoRA weights with LoRA), kept in float32 so that small updates at
decays near 1 do not vanish (the authors' code cast them to fp16). An annotator's prediction is the same module
called with its shadow parameters substituted through `torch.func.functional_call`: no weights are swapped in and
out of the model, no copy of the frozen weights exists, and nothing is recorded for autograd.

Warm-up rule (documented in docs/method.md): the n-th update (n = 0, 1, ...) uses the decay
``min(decay, (1 + n) / (10 + n))``, the schedule of diffusers' ``EMAModel`` that the authors used, so an annotator
with decay 0.9999 averages over roughly the last n/10 .. n steps early in training instead of freezing at the
initial weights.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch.func import functional_call

ANNOTATORS_FILE = "annotators.safetensors"


class EMAAnnotators:
    def __init__(self, model: torch.nn.Module, decays: list[float]):
        self.decays = list(decays)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if self.decays and not self.names:
            raise ValueError("EMA annotators need trainable parameters, but the model has none")
        params = dict(model.named_parameters())
        self.shadows = [{n: params[n].detach().float().clone() for n in self.names} for _ in self.decays]
        self.num_updates = 0

    def __len__(self) -> int:
        return len(self.decays)

    def effective_decay(self, decay: float) -> float:
        n = self.num_updates
        return min(decay, (1.0 + n) / (10.0 + n))

    def _trainable_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The model's parameters by name, looked up once per model: `named_parameters()` walks every module, several
        milliseconds per step on a UNet (Parameter objects outlive in-place updates and `.to()`)."""
        cached = getattr(self, "_parameters_of", None)
        if cached is None or cached[0] is not model:
            wanted = set(self.names)
            cached = self._parameters_of = (model, {n: p for n, p in model.named_parameters() if n in wanted})
        return cached[1]

    def bind(self, model_wrapped) -> None:
        """Called once the trainer's model is prepared (DDP, DeepSpeed); replicated annotators need nothing."""

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step towards the model's current trainable parameters (call after each optimizer step)."""
        params = self._trainable_parameters(model)
        current = [params[n].detach() for n in self.names]
        for shadow, decay in zip(self.shadows, self.decays):
            weight = 1.0 - self.effective_decay(decay)
            if all(t.dtype == torch.float32 for t in current):
                torch._foreach_lerp_(list(shadow.values()), current, weight)
            else:  # low-precision weights (DeepSpeed bf16): upcast one tensor at a time, not a full fp32 copy
                for target, value in zip(shadow.values(), current):
                    target.lerp_(value.float(), weight)
        self.num_updates += 1

    @torch.no_grad()
    def __call__(self, index: int, model: torch.nn.Module, *args, **kwargs):
        """Run `model(*args, **kwargs)` as annotator `index` (its EMA parameters, everything else shared)."""
        shadows = self.shadows[index]
        dtypes = {name: model.get_parameter(name).dtype for name in self.names}
        if any(dtypes[name] != shadow.dtype for name, shadow in shadows.items()):
            # The model's weights are bf16/fp16 (DeepSpeed runs them without autocast): the annotator runs with its
            # weights rounded to that dtype, so it computes exactly as the model would with those weights.
            shadows = {name: shadow.to(dtypes[name]) for name, shadow in shadows.items()}
        return functional_call(model, shadows, args, kwargs, strict=False)

    def to(self, device: torch.device) -> "EMAAnnotators":
        self.shadows = [{n: t.to(device) for n, t in shadow.items()} for shadow in self.shadows]
        return self

    # ---- checkpointing ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{k}/{n}": t for k, shadow in enumerate(self.shadows) for n, t in shadow.items()}

    def save(self, folder: str, write: bool = True) -> None:
        """Write the annotators to `folder` (`write=False` on processes that must not write; a no-op here)."""
        if not write:
            return
        self._write_file(folder, {k: v.detach().cpu() for k, v in self.state_dict().items()})

    def _write_file(self, folder: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write the annotator file (tensors plus the decays and update count as metadata)."""
        metadata = {"decays": json.dumps(self.decays), "num_updates": str(self.num_updates)}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(folder, ANNOTATORS_FILE), metadata=metadata)

    def _checked_file(self, folder: str) -> tuple[str, dict[str, str]]:
        """Path and metadata of a checkpoint's annotator file, after checking it exists and matches the decays."""
        from safetensors import safe_open

        path = os.path.join(folder, ANNOTATORS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint has no EMA annotator state, so resuming would silently "
                "restart the annotators. Resume from a checkpoint written by AdaptiveDiffusionDPOTrainer."
            )
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        saved_decays = json.loads(metadata["decays"])
        if saved_decays != self.decays:
            raise ValueError(f"Checkpoint annotator_decays {saved_decays} differ from the config's {self.decays}")
        return path, metadata

    def load(self, folder: str) -> None:
        path, metadata = self._checked_file(folder)
        tensors = load_file(path)
        for k, shadow in enumerate(self.shadows):
            for n in shadow:
                shadow[n].copy_(tensors[f"{k}/{n}"])
        self.num_updates = int(metadata["num_updates"])
