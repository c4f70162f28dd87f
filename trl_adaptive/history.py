"""Per-pair memory of the minority score across visits.

Every time the exact metric is computed for a training pair, its score ``u`` is added to the pair's record, keyed by
the pair's ``row_index`` (its position in the dataset the user passed). The running mean over visits is what the
amortised annotator mode uses between annotator refreshes, and a less noisy view of a pair than one step's ``u``
(a single timestep's logit is noisy). Every process records the gathered global batch, so all copies are equal.

With `decay` d in (0, 1) the mean is exponentially weighted over the pair's own visits: each later visit of the pair
multiplies the weight of its earlier records by d, so a record `n` visits old counts d^n as much as the newest. The
minority filter uses this to forget the votes cast before the model had learned the majority preference.

A `growable` history (for a streamed dataset, whose number of rows is unknown before it has been read) starts empty
and grows to cover every row it is asked about; every process grows it alike, as they record the same global batch.
(Growing reads the largest row id back to the host, so a stream trained without a cache is the one case
where recording waits for the device.)

The record lives on the training device (`to`) and is updated there with fixed-shape operations: no step waits for
the device to answer (no boolean indexing, no `unique`, no copy to the host). It is copied to the host only to be
saved.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

HISTORY_FILE = "pair_history.safetensors"


class PairHistory:
    def __init__(self, num_rows: int, filename: str = HISTORY_FILE, decay: float = 0.0, growable: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"PairHistory decay must be in [0, 1) (0: plain mean over visits), got {decay}")
        self.filename = filename
        self.decay = decay
        self.growable = growable
        self.total = torch.zeros(num_rows, dtype=torch.float64)  # (weighted) sum of the recorded scores
        self.weight = torch.zeros(num_rows, dtype=torch.float64)  # (weighted) number of records; = visits if no decay
        self.visits = torch.zeros(num_rows, dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return self.total.device

    def to(self, device) -> PairHistory:
        """Keep the record on `device` (the training device: then recording and reading never leave it)."""
        self.total, self.weight, self.visits = (t.to(device) for t in (self.total, self.weight, self.visits))
        return self

    def _cover(self, rows: torch.Tensor) -> None:
        """Grow a growable history to cover `rows` (new rows: no records, no visits)."""
        if not self.growable or not rows.numel():
            return
        size = int(rows.max()) + 1
        if size > self.total.shape[0]:
            extra = size - self.total.shape[0]
            self.total, self.weight, self.visits = (torch.cat([t, t.new_zeros(extra)])
                                                    for t in (self.total, self.weight, self.visits))

    def record(self, rows: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Record one visit of each row (a row listed twice adds two records to the same visit). Entries where
        `valid` is False are ignored; a row with no valid entry is not visited (no decay, no visit counted)."""
        rows, scores = rows.detach().long().to(self.device), scores.detach().double().to(self.device)
        self._cover(rows)
        valid = torch.ones_like(rows, dtype=torch.bool) if valid is None else valid.detach().bool().to(self.device)
        counted = valid.double()
        # Rows with at least one valid entry, as a mask over all rows (the same shape whatever the data).
        visited = torch.zeros_like(self.weight).index_add_(0, rows, counted) > 0
        if self.decay:
            # float64 like the record (x * 1.0 is exact: rows not visited keep their bits)
            factor = torch.ones_like(self.total).masked_fill_(visited, self.decay)
            self.total.mul_(factor)
            self.weight.mul_(factor)
        # Invalid entries add an exact 0 (the same sums, in the same order, as leaving them out).
        self.total.index_add_(0, rows, torch.where(valid, scores, 0.0))
        self.weight.index_add_(0, rows, counted)
        self.visits.add_(visited)

    def mean(self, rows: torch.Tensor) -> torch.Tensor:
        """Mean recorded score of each row (on the device of `rows`); 0 for rows never scored (a neutral weight of 1 / c)."""
        rows = rows.detach().long()
        index = rows.to(self.device)
        self._cover(index)
        return (self.total[index] / self.weight[index].clamp_min(1e-12)).float().to(rows.device)

    def visit_counts(self, rows: torch.Tensor) -> torch.Tensor:
        """Visits of each row (on the device of `rows`)."""
        index = rows.detach().long().to(self.device)
        self._cover(index)
        return self.visits[index].to(rows.device)

    def means_with_visits(self, min_visits: int = 1) -> torch.Tensor:
        """Mean recorded score of every row with at least `min_visits` visits (float64; its length depends on the
        data, so on a GPU this waits for the device: the training step uses `means_or_nan`)."""
        seen = self.visits >= max(min_visits, 1)
        return self.total[seen] / self.weight[seen]

    def means_or_nan(self, min_visits: int = 1) -> torch.Tensor:
        """Mean recorded score of every row, NaN for rows with fewer than `min_visits` visits (float64, one entry per
        row: the fixed-shape form of `means_with_visits`, which `filtering.minority_keep_mask` accepts)."""
        seen = self.visits >= max(min_visits, 1)
        return torch.where(seen, self.total / self.weight.clamp_min(1e-300), torch.nan)

    def save(self, folder: str) -> None:
        tensors = {"total": self.total.cpu(), "weight": self.weight.cpu(), "visits": self.visits.cpu()}
        save_file(tensors, os.path.join(folder, self.filename))

    def load(self, folder: str) -> None:
        path = os.path.join(folder, self.filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint has no per-pair minority history")
        tensors = load_file(path)
        if self.growable:
            self.total, self.weight, self.visits = (torch.zeros_like(t[:0]) for t in (self.total, self.weight, self.visits))
            self._cover(torch.tensor([tensors["total"].shape[0] - 1], device=self.device))
        if tensors["total"].shape != self.total.shape:
            raise ValueError(
                f"Checkpoint pair history covers {tensors['total'].shape[0]} rows, the dataset {self.total.shape[0]}"
            )
        self.total.copy_(tensors["total"])
        self.visits.copy_(tensors["visits"])
        # Checkpoints written before the weighted mean existed hold no weights: their records were unweighted.
        self.weight.copy_(tensors["weight"] if "weight" in tensors else tensors["visits"].double())
