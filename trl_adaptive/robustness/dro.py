"""Distributionally robust reweighting of the pairs of a batch (Dr. DPO: Wu et al. 2024, "Towards Robust Alignment
of Language Models: Distributionally Robustifying Direct Preference Optimization").

Dr. DPO replaces the mean of the per-pair losses by a soft minimum over the batch,

    L = -tau * log mean_i exp(-loss_i / tau),

whose gradient is sum_i w_i grad loss_i with w_i = softmax_i(-loss_i / tau): pairs with a high loss, those the model
ranks most strongly against their label (where flipped labels gather), count less, and as tau -> infinity it is
plain Diffusion-DPO again. This class returns those weights, scaled to mean 1 over the global batch and detached,
so the trainer's mean of ``weight_i * loss_i`` has exactly Dr. DPO's gradient. ``loss_i`` is the configured
``loss_type`` at the pair's logit (margins of other methods are not applied to it). Rater-agnostic: it needs no
judge, only the batch's own losses.

``dro_evidence="step"`` is Dr. DPO as published: the loss of this step's draw. A diffusion pair's loss on one draw
(one timestep, one noise) is noisy, so ``dro_evidence="history"`` (this library's variant) weights by the pair's
mean loss over its visits so far, this one included, older visits discounted by ``dro_history_decay`` per visit:
the per-pair evidence across visits, as the minority filter keeps it. The history is per-pair device tensors over
the global batch (identical on every process), saved with each checkpoint. No host reads per step: the normaliser
is a logsumexp over the gathered batch, on the device.
"""

from __future__ import annotations

import math

import torch

from .._checks import require
from ..losses import preference_loss
from .base import PairStep, PairTreatment, RobustnessMethod


class DistributionallyRobustWeights(RobustnessMethod):
    """Config: ``dro_temperature`` (tau; 0 turns it off), ``dro_evidence``, ``dro_history_decay``,
    ``dro_warmup_steps``."""

    name = "dro"
    STATE_FILE = "dro_history.pt"

    def __init__(self, args, num_rows, batch, forwards=None):
        super().__init__(args, num_rows, batch, forwards)
        self.loss_sums = self.visit_weights = None  # (num_rows,) device tensors, created at the first step

    @classmethod
    def uses_history(cls, args) -> bool:
        return args.dro_evidence == "history"

    @classmethod
    def enabled(cls, args) -> bool:
        return args.dro_temperature > 0

    @classmethod
    def validate(cls, args) -> None:
        require(args, "dro_temperature", args.dro_temperature >= 0 and math.isfinite(args.dro_temperature),
                ">= 0 and finite (0: off)")
        require(args, "dro_warmup_steps", args.dro_warmup_steps >= 0, ">= 0")
        from .._checks import check_choice

        check_choice(args, "dro_evidence", ("step", "history"))
        require(args, "dro_history_decay", 0.0 <= args.dro_history_decay <= 1.0, "in [0, 1]")

    def losses(self, logits: torch.Tensor) -> torch.Tensor:
        args = self.args
        return preference_loss(logits.detach().float(), args.beta, args.loss_type, args.label_smoothing,
                               misranked_weight=args.misranked_weight)

    def record(self, rows: torch.Tensor, losses: torch.Tensor, training: bool) -> torch.Tensor:
        """The pairs' (decayed) mean loss over their visits, this one included; training visits are recorded."""
        if self.num_rows is None:
            raise ValueError("dro_evidence='history' needs training data with a row_index column")
        if self.loss_sums is None:
            self.loss_sums = torch.zeros(self.num_rows, dtype=torch.float64, device=losses.device)
            self.visit_weights = torch.zeros(self.num_rows, dtype=torch.float64, device=losses.device)
        elif self.loss_sums.device != losses.device:  # loaded from a checkpoint onto the CPU
            self.loss_sums, self.visit_weights = self.loss_sums.to(losses.device), self.visit_weights.to(losses.device)
        decay = self.args.dro_history_decay
        own = rows.long().to(losses.device)
        own_means = (decay * self.loss_sums[own] + losses.double()) / (decay * self.visit_weights[own] + 1.0)
        every_row = self.batch.gather(rows).long().to(losses.device)
        every_loss = self.batch.gather(losses).double()
        sums = decay * self.loss_sums[every_row] + every_loss
        counts = decay * self.visit_weights[every_row] + 1.0
        if training:
            self.loss_sums[every_row] = sums
            self.visit_weights[every_row] = counts
        return (sums / counts).float(), own_means.float()

    def weights(self, step: PairStep) -> torch.Tensor:
        """Dr. DPO's per-pair weights of this process's pairs, mean 1 over the global batch (detached)."""
        losses = self.losses(step.logits)
        if self.uses_history(self.args):
            every_loss, losses = self.record(step.rows, losses, step.training)
        else:
            every_loss = self.batch.gather(losses)
        tau = self.args.dro_temperature
        log_normaliser = torch.logsumexp(-every_loss / tau, dim=0) - math.log(every_loss.shape[0])
        return (-losses / tau - log_normaliser).exp()

    def treat(self, step: PairStep, metrics) -> PairTreatment | None:
        if step.global_step < self.args.dro_warmup_steps:
            if self.uses_history(self.args):  # the history gathers evidence from step 0
                self.record(step.rows, self.losses(step.logits), step.training)
            return None
        weights = self.weights(step)
        gathered = metrics.add_pair_means(step.mode, {"dro/weight_mean": weights})
        metrics.keep_for_histograms(step.mode, "dro/weight", gathered["dro/weight_mean"])
        # Synthetic-minority runs: the mean weight of the flipped and of the clean pairs.
        metrics.add_group_means(step.mode, gathered["dro/weight_mean"], step.inputs, "dro/weight_flipped",
                                "dro/weight_clean")
        return PairTreatment(weights=weights)

    def save(self, folder: str, write: bool) -> None:
        if write and self.loss_sums is not None:
            import os

            torch.save({"loss_sums": self.loss_sums.cpu(), "visit_weights": self.visit_weights.cpu()},
                       os.path.join(folder, self.STATE_FILE))

    def load(self, folder: str) -> None:
        import os

        path = os.path.join(folder, self.STATE_FILE)
        if os.path.isfile(path):
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.loss_sums, self.visit_weights = state["loss_sums"], state["visit_weights"]
