"""Per-pair memory of the minority score across visits.

Every time the exact metric is computed for a training pair, its score ``u`` is added to the pair's record, keyed by
the pair's ``row_index`` (its position in the dataset the user passed). The running mean over visits is what the
amortised annotator mode uses between annotator refreshes, and a less noisy view of a pair than one step's ``u``
(a single timestep's logit is noisy). Every process records the gathered global batch, so all copies are equal.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

HISTORY_FILE = "pair_history.safetensors"


class PairHistory:
    def __init__(self, num_rows: int, filename: str = HISTORY_FILE):
        self.filename = filename
        self.total = torch.zeros(num_rows, dtype=torch.float64)
        self.visits = torch.zeros(num_rows, dtype=torch.long)

    def record(self, rows: torch.Tensor, scores: torch.Tensor) -> None:
        rows = rows.detach().long().cpu()
        self.total.index_add_(0, rows, scores.detach().double().cpu())
        self.visits.index_add_(0, rows, torch.ones_like(rows))

    def mean(self, rows: torch.Tensor) -> torch.Tensor:
        """Mean recorded score of each row; 0 for rows never scored (a neutral weight of 1 / c)."""
        rows = rows.detach().long().cpu()
        visits = self.visits[rows]
        return (self.total[rows] / visits.clamp_min(1)).float().to(rows.device)

    def visit_counts(self, rows: torch.Tensor) -> torch.Tensor:
        return self.visits[rows.detach().long().cpu()].to(rows.device)

    def means_with_visits(self, min_visits: int = 1) -> torch.Tensor:
        """Mean recorded score of every row with at least `min_visits` visits (float64, CPU)."""
        seen = self.visits >= max(min_visits, 1)
        return self.total[seen] / self.visits[seen]

    def save(self, folder: str) -> None:
        save_file({"total": self.total, "visits": self.visits}, os.path.join(folder, self.filename))

    def load(self, folder: str) -> None:
        path = os.path.join(folder, self.filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint has no per-pair minority history")
        tensors = load_file(path)
        if tensors["total"].shape != self.total.shape:
            raise ValueError(
                f"Checkpoint pair history covers {tensors['total'].shape[0]} rows, the dataset {self.total.shape[0]}"
            )
        self.total.copy_(tensors["total"])
        self.visits.copy_(tensors["visits"])
