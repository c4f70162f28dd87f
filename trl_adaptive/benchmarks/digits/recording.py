"""The trainer subclass of the benchmark's runs: records every training visit's logit and minority score, and
runs the truth diagnostics' drops (`_recording_trainer_class`)."""

from __future__ import annotations

import numpy as np
import torch


def _recording_trainer_class():
    """A trainer subclass that records, for every training visit of a pair, its logit and minority score.

    Only used for the benchmark's diagnostics (AUROC of each method's minority evidence against `flipped`).
    """
    from ...filtering import top_fraction_threshold
    from ...trainer import AdaptiveDiffusionDPOTrainer

    class RecordingTrainer(AdaptiveDiffusionDPOTrainer):
        def __init__(self, *args, truth_filter_from: int | None = None, truth_drop_shares=(1.0, 0.0),
                     evidence_chosen_groups: tuple[str, ...] = (), **kwargs):
            super().__init__(*args, **kwargs)
            # Diagnostics: from step `truth_filter_from`, drop a share of the flipped / clean pairs: a fixed random
            # subset of each group, or in `evidence_chosen_groups` the pairs with the highest minority evidence.
            self.truth_filter_from = truth_filter_from
            self.truth_drop_shares = truth_drop_shares
            self.evidence_chosen_groups = tuple(evidence_chosen_groups)
            if self.evidence_chosen_groups and self.evidence_history is None:
                raise ValueError("evidence_chosen_groups needs the minority filter's evidence (minority_filter != 'none')")
            self.row_uniforms = self.row_flipped = None
            if truth_filter_from is not None:
                self._filter_regime_checked = True  # the filter's regime warning is about its own drops, not these
                num_rows = max(self.train_dataset["row_index"]) + 1
                self.row_uniforms = torch.rand(num_rows, generator=torch.Generator().manual_seed(self.args.seed))
                self.row_flipped = torch.zeros(num_rows, dtype=torch.bool)
                self.row_flipped[torch.tensor(self.train_dataset["row_index"])] = torch.tensor(
                    self.train_dataset["flipped"]).bool()
            self.visits = {"row": [], "step": [], "logit": [], "score": []}
            self.metric_history: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True)
            if model.training:
                self.visits["row"].append(inputs["row_index"].detach().cpu())
                self.visits["step"].append(torch.full_like(inputs["row_index"], self.state.global_step).cpu())
                self.visits["logit"].append(out["logits"][0].detach().float().cpu())
                score = getattr(self, "_last_scores", None)
                self.visits["score"].append(score if score is not None else torch.full_like(out["logits"][0], float("nan")).cpu())
                self._last_scores = None
            return (loss, out) if return_outputs else loss

        def minority_filter_mask(self, out, inputs):
            keep = super().minority_filter_mask(out, inputs)  # also records the filter's evidence, if it has any
            if self.truth_filter_from is None:
                return keep
            if self.state.global_step < self.truth_filter_from:
                return None
            drop = self.diagnostic_drops()[inputs["row_index"].long().cpu()]
            return (~drop).float().to(out["logits"][0].device)

        def diagnostic_drops(self) -> torch.Tensor:
            """Rows the truth diagnostics drop now (bool per row index)."""
            flipped, u = self.row_flipped, self.row_uniforms
            drops = {"flipped": flipped & (u < self.truth_drop_shares[0]),
                     "clean": ~flipped & (u < self.truth_drop_shares[1])}
            evidence = self.evidence_history.total / self.evidence_history.weight.clamp_min(1e-12) if (
                self.evidence_chosen_groups) else None
            for group in self.evidence_chosen_groups:  # its share with the highest evidence, among its judged pairs
                members = (flipped if group == "flipped" else ~flipped) & (
                    self.evidence_history.visits >= self.args.minority_filter_min_visits)
                share = self.truth_drop_shares[0 if group == "flipped" else 1]
                drops[group] = members & (evidence > top_fraction_threshold(evidence[members], share))
            return drops["flipped"] | drops["clean"]

        def minority_scores(self, annotator_logits, inputs, training):
            u = super().minority_scores(annotator_logits, inputs, training)
            if training:
                self._last_scores = u.detach().float().cpu()
            return u

        def log(self, logs, start_time=None):
            for name, values in self._metrics["train"].items():  # kept for the run summary before log() clears them
                self.metric_history.setdefault(name, []).extend(values)
            super().log(logs, start_time)

        def visit_table(self) -> dict[str, np.ndarray]:
            return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in self.visits.items()}

    return RecordingTrainer
