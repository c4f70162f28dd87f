"""Training metrics, gathered across processes and averaged over the steps between two logs (TRL's habit).

Every metric is a mean over the *global* batch (`GlobalBatch.gather`), so a logged value does not depend on how
many processes ran. The trainer records Diffusion-DPO's own metrics (`record_pairs`, names as TRL's DPOTrainer:
``rewards/chosen``, ``rewards/margins``, ...); the robustness methods add theirs (``minority/...``) through the same
object, and `flush` moves the averages into the Trainer's log.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .losses import implicit_rewards


class TrainingMetrics:
    """Per-mode ("train" / "eval") lists of metric values since the last log.

    Args:
        batch: the run's `GlobalBatch`.
        keep_pair_statistics: keep the last training step's per-pair minority statistics of the global batch in
            `last_pair_statistics` (the sample callback's histograms read them; off otherwise: no host copy).
    """

    def __init__(self, batch, keep_pair_statistics: bool = False):
        self.batch = batch
        self.keep_pair_statistics = keep_pair_statistics
        self.values: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.last_pair_statistics: dict[str, torch.Tensor] = {}

    def add(self, mode: str, name: str, value: float) -> None:
        self.values[mode][name].append(value)

    def add_pair_means(self, mode: str, per_pair: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Record the global-batch mean of each per-pair tensor; returns the gathered tensors."""
        gathered = {name: self.batch.gather(v) for name, v in per_pair.items()}
        for name, values in gathered.items():
            self.add(mode, name, values.mean().item())
        return gathered

    def keep_for_histograms(self, mode: str, name: str, gathered: torch.Tensor) -> None:
        if self.keep_pair_statistics and mode == "train":
            self.last_pair_statistics[name] = gathered.cpu()

    def add_group_means(self, mode: str, values: torch.Tensor, inputs, flipped_name: str, clean_name: str) -> None:
        """On data with a ``flipped`` column (benchmarks): the means of the gathered per-pair `values` over the
        flipped and over the clean pairs of the global batch, as `flipped_name` and `clean_name`."""
        if "flipped" not in inputs:
            return
        flipped = self.batch.gather(inputs["flipped"].float()).bool()
        if flipped.any():
            self.add(mode, flipped_name, values[flipped].mean().item())
        if (~flipped).any():
            self.add(mode, clean_name, values[~flipped].mean().item())

    def record_pairs(self, mode: str, outputs: dict, beta: float) -> None:
        """Diffusion-DPO's metrics of a step: implicit rewards, their margins and accuracy, denoising losses."""
        m_w, m_l = outputs["policy_errors"].detach().chunk(2)
        r_w, r_l = outputs["reference_errors"].detach().chunk(2)
        chosen, rejected = implicit_rewards(m_w, r_w, beta), implicit_rewards(m_l, r_l, beta)
        scaled_logits = chosen - rejected  # beta * l (not the adaptive margins gamma of the loss)
        self.add_pair_means(mode, {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": scaled_logits,
            # Mean |beta l|: in the tens, -log sigmoid acts like a hinge (docs/results.md, "The beta regime").
            "rewards/margins_abs": scaled_logits.abs(),
            "rewards/accuracies": (chosen > rejected).float(),
            "denoising_loss/policy_chosen": m_w,
            "denoising_loss/policy_rejected": m_l,
            "denoising_loss/reference_chosen": r_w,
            "denoising_loss/reference_rejected": r_l,
        })

    def flush(self, mode: str, logs: dict[str, float]) -> None:
        """Add the mean of every metric recorded since the last log to `logs` (``eval_`` prefix in evaluation)."""
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self.values[mode].items():
            if values:
                logs[f"{prefix}{name}"] = sum(values) / len(values)
        self.values[mode].clear()
