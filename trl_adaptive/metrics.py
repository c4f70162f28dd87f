"""Training metrics, gathered across processes and averaged over the steps between two logs (TRL's habit).

Every metric is a mean over the *global* batch (`GlobalBatch.gather`), so a logged value does not depend on how
many processes ran. The trainer records Diffusion-DPO's own metrics (`record_pairs`, names as TRL's DPOTrainer:
``rewards/chosen``, ``rewards/margins``, ...); the robustness methods add theirs (``minority/...``) through the same
object, and `flush` moves the averages into the Trainer's log.

Nothing here reads a value back to the host during a step: a step's metrics stay device tensors (one gather per
group of per-pair metrics) until `flush`, which reads everything recorded since the last log in one transfer. A
training step therefore never waits for the GPU because of its metrics (docs/performance.md, "A step without host
synchronisation").
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .losses import implicit_rewards

#: Values kept per metric between two logs before they are folded into one running sum (bounds the memory of a run
#: that never logs; folding sums on the device, so values logged after a fold may differ in the last bit).
MAX_PENDING_VALUES = 4096


class TrainingMetrics:
    """Per-mode ("train" / "eval") metric values since the last log, as device tensors.

    Args:
        batch: the run's `GlobalBatch`.
        keep_pair_statistics: keep the last training step's per-pair minority statistics of the global batch in
            `last_pair_statistics` (the sample callback's histograms read them; off otherwise). They stay on the
            device; the reader copies them.
    """

    def __init__(self, batch, keep_pair_statistics: bool = False):
        self.batch = batch
        self.keep_pair_statistics = keep_pair_statistics
        #: mode -> name -> list of (value, present): value a 0-dim tensor (or a float), present a 0-dim bool tensor
        #: or None (always present). A value whose `present` is False is not counted (e.g. no flipped pair in a batch).
        self.pending: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.folded: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {"train": {}, "eval": {}}
        self.last_pair_statistics: dict[str, torch.Tensor] = {}

    def add(self, mode: str, name: str, value: torch.Tensor | float, present: torch.Tensor | None = None) -> None:
        """Record one value of a metric (a 0-dim tensor, left on its device; or a float); with `present`, a 0-dim bool
        tensor, it counts only where that is True."""
        values = self.pending[mode][name]
        values.append((value.detach() if isinstance(value, torch.Tensor) else value, present))
        if len(values) > MAX_PENDING_VALUES:
            self._fold(mode, name)

    def add_pair_means(self, mode: str, per_pair: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Record the global-batch mean of each per-pair tensor (all of one length); returns the gathered tensors.
        One gather for all of them."""
        names = list(per_pair)
        gathered = self.batch.gather(torch.stack([per_pair[n].detach().float() for n in names], dim=1)).T.contiguous()
        for name, mean in zip(names, gathered.mean(dim=1).unbind()):
            self.add(mode, name, mean)
        return dict(zip(names, gathered.unbind()))

    def keep_for_histograms(self, mode: str, name: str, gathered: torch.Tensor) -> None:
        if self.keep_pair_statistics and mode == "train":
            self.last_pair_statistics[name] = gathered.detach()

    def add_group_means(self, mode: str, values: torch.Tensor, inputs, flipped_name: str, clean_name: str) -> None:
        """On data with a ``flipped`` column (benchmarks): the means of the gathered per-pair `values` over the
        flipped and over the clean pairs of the global batch, as `flipped_name` and `clean_name` (each counted only
        for batches that have such pairs)."""
        if "flipped" not in inputs:
            return
        flipped = self.batch.gather(inputs["flipped"].float()).bool()
        for name, members in ((flipped_name, flipped), (clean_name, ~flipped)):
            count = members.sum()
            self.add(mode, name, torch.where(members, values, 0.0).sum() / count.clamp_min(1), present=count > 0)

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

    # ---- reading (once per log) ----------------------------------------------------------------------------
    def _fold(self, mode: str, name: str) -> None:
        """Sum the pending values of a metric into its running (sum, count), on the device."""
        values = self.pending[mode].pop(name)
        device = next((v.device for v, _ in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        as_double = lambda x: torch.as_tensor(x, dtype=torch.float64, device=device)  # noqa: E731
        present = torch.stack([as_double(1.0 if p is None else p) for _, p in values])
        sums = torch.where(present > 0, torch.stack([as_double(v) for v, _ in values]), 0.0).sum()
        counts = present.sum()
        if name in self.folded[mode]:
            previous = self.folded[mode][name]
            sums, counts = sums + previous[0].to(sums.device), counts + previous[1].to(counts.device)
        self.folded[mode][name] = (sums, counts)

    def _read(self, mode: str) -> tuple[dict[str, list[float]], dict[str, tuple[float, float]]]:
        """The pending values of every metric (those of batches where it was absent left out) and the folded
        (sum, count) pairs, as floats, in one device-to-host transfer."""
        pending, folded = self.pending[mode], self.folded[mode]
        tensors = [t for values in pending.values() for v, p in values for t in (v, p) if isinstance(t, torch.Tensor)]
        tensors += [t for pair in folded.values() for t in pair]
        host = iter(torch.stack([t.double().to(tensors[0].device) for t in tensors]).tolist() if tensors else [])
        values_read = {}
        for name, values in pending.items():  # the order in which `tensors` listed them
            kept = []
            for value, present in values:
                value = next(host) if isinstance(value, torch.Tensor) else value
                if present is None or next(host):
                    kept.append(value)
            values_read[name] = kept
        return values_read, {name: (next(host), next(host)) for name in folded}

    def read(self, mode: str) -> dict[str, list[float]]:
        """Every value recorded since the last log (or fold, `MAX_PENDING_VALUES`), per metric, as floats; reads the
        device once and clears nothing."""
        return self._read(mode)[0]

    def flush(self, mode: str, logs: dict[str, float]) -> None:
        """Add the mean of every metric recorded since the last log to `logs` (``eval_`` prefix in evaluation)."""
        prefix = "eval_" if mode == "eval" else ""
        values_read, folded = self._read(mode)
        for name in {**folded, **values_read}:
            total, count = folded.get(name, (0, 0))
            for value in values_read.get(name, ()):  # in order, from 0: the same float sum as Python's sum()
                total += value
            count += len(values_read.get(name, ()))
            if count:
                logs[f"{prefix}{name}"] = total / count
        self.pending[mode].clear()
        self.folded[mode].clear()
