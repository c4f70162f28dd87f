"""The interface of a per-pair treatment of the preference loss, and what a step hands to it.

A `RobustnessMethod` sees each step's paired outputs (`PairStep`: policy / reference errors, logits, row ids,
timesteps) and returns detached per-pair weights and margins (`PairTreatment`) that enter the loss as

    loss_i = weight_i * ell(beta * l_i - margin_i)

(`trl_adaptive.losses.preference_loss`). It owns its state (EMA annotators, per-pair histories), saves and loads it
with every checkpoint, validates its own config fields and reports its metrics through `TrainingMetrics`. Anything it
computes over the batch uses `GlobalBatch`, the batch of all processes, so its result does not depend on how many
processes ran it. Frozen forwards it needs (annotators, extra noise draws, contrast prompts) are asked of
`trl_adaptive.forwards.PairForwards`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch


class GlobalBatch:
    """Statistics over the global batch (every process's pairs), through the accelerator's collectives."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the last dimension across all processes (detached); keeps leading dimensions."""
        values = values.detach().float()
        # The count by `new_full`, not `new_tensor([...])`: a tensor made from host data is a blocking copy on a GPU.
        sums = torch.cat([values.sum(dim=-1).reshape(-1), values.new_full((1,), values.shape[-1])])
        sums = self.accelerator.reduce(sums, reduction="sum")
        return (sums[:-1] / sums[-1]).reshape(values.shape[:-1])

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The values of every process, concatenated along dimension 0 in process order (detached, float32)."""
        return self.accelerator.gather(values.detach().float().contiguous())


@dataclass
class PairStep:
    """One step's paired outputs, as the methods see them.

    Attributes:
        outputs: `PairForwards.pair_forward`'s dict (``logits``: [current model (B,), annotators...], errors (2B,),
            ``timesteps`` (B,), ``noised``).
        inputs: the collated batch (``row_index``; ``flipped`` on benchmark data).
        global_step: optimizer steps taken so far.
        training: False during evaluation.
        policy: the trained model, for extra forwards.
        with_annotators: whether this step's forward ran the EMA annotators.
    """

    outputs: dict
    inputs: Any
    global_step: int
    training: bool
    policy: torch.nn.Module | None = None
    with_annotators: bool = False

    @property
    def logits(self) -> torch.Tensor:
        """The current model's Diffusion-DPO logits l (B,), with gradient."""
        return self.outputs["logits"][0]

    @property
    def rows(self) -> torch.Tensor:
        return self.inputs["row_index"]

    @property
    def mode(self) -> str:
        return "train" if self.training else "eval"


@dataclass
class PairTreatment:
    """Detached per-pair weights (None: 1) and margins (None: 0) of one step."""

    weights: torch.Tensor | None = None
    margins: torch.Tensor | None = None


def combine(treatments: Iterable[PairTreatment | None]) -> PairTreatment:
    """Several methods' treatments as one: weights multiply, margins add, in the methods' order."""
    weights = margins = None
    for treatment in treatments:
        if treatment is None:
            continue
        if treatment.weights is not None:
            weights = treatment.weights if weights is None else weights * treatment.weights
        if treatment.margins is not None:
            margins = treatment.margins if margins is None else margins + treatment.margins
    return PairTreatment(weights, margins)


class RobustnessMethod:
    """Base class of a per-pair treatment (see the module docstring). Subclasses set `name`, and override
    `enabled`, `validate`, `treat` and, if they keep state, `save` / `load`.

    Args:
        args: the run's `AdaptiveDPOConfig`.
        num_rows: 1 + the largest ``row_index`` of the training data (size of per-pair records); None without it.
        batch: `GlobalBatch` of the run.
        forwards: the run's `PairForwards`.
    """

    name: ClassVar[str] = ""

    def __init__(self, args, num_rows: int | None, batch: GlobalBatch, forwards=None):
        self.args = args
        self.num_rows = num_rows
        self.batch = batch
        self.forwards = forwards

    @classmethod
    def enabled(cls, args) -> bool:
        """Whether the config turns this method on."""
        raise NotImplementedError

    @classmethod
    def validate(cls, args) -> None:
        """Check this method's config fields (called by `AdaptiveDPOConfig.__post_init__`); raise ValueError naming
        the field."""

    @classmethod
    def check_columns(cls, args, columns: list[str]) -> None:
        """Check, before training, that the training data has the columns this method reads (called when enabled);
        raise ValueError naming the column."""

    def setup(self, denoiser: torch.nn.Module, accelerator) -> None:
        """Called once the trainer's model and accelerator are prepared (create frozen copies here)."""

    def wants_annotators(self, global_step: int, training: bool) -> bool:
        """Whether this step's forward must also run the EMA annotators."""
        return False

    def treat(self, step: PairStep, metrics) -> PairTreatment | None:
        """This step's weights and margins (detached), or None for no change; report metrics to `metrics`."""
        raise NotImplementedError

    def on_optimizer_step(self, model: torch.nn.Module) -> None:
        """Called after every optimizer step with the unwrapped model."""

    def on_log(self, logs: dict[str, float]) -> None:
        """Called when the trainer logs, with the metrics just read back (`logs`): the one place where a method may
        read its device state back to the host (warnings, reports; better: look at its metrics in `logs`, read in
        the same transfer). `treat` and `on_optimizer_step` must not: a read makes the step wait for the GPU."""

    def save(self, folder: str, write: bool) -> None:
        """Save the state into a checkpoint folder. Called on every process (sharded state gathers, a collective);
        only write files when `write`."""

    def load(self, folder: str) -> None:
        """Restore the state saved by `save`."""
