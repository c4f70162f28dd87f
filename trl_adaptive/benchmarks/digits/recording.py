"""The trainer subclass of the benchmark's runs: records every training visit's logit and minority score, and
runs the truth diagnostics' drops as a robustness method in the minority filter's place (`_recording_trainer_class`)."""

from __future__ import annotations

import numpy as np
import torch


def _recording_trainer_class():
    """A trainer subclass that records, for every training visit of a pair, its logit and minority score.

    Only used for the benchmark's diagnostics (AUROC of each method's minority evidence against `flipped`).
    """
    from ...filtering import top_fraction_threshold
    from ...robustness import PairTreatment, RobustnessMethod, report_kept_pairs
    from ...trainer import AdaptiveDiffusionDPOTrainer

    class TruthDrops(RobustnessMethod):
        """Diagnostics: from step `start`, drop a share of the flipped / clean pairs: a fixed random subset of each
        group, or in `evidence_chosen_groups` the pairs with the highest minority evidence of `evidence_filter` (a
        `MinorityFilter` that keeps recording its evidence, while its own choice of pairs is not used)."""

        name = "truth_drops"

        def __init__(self, args, batch, dataset, start: int, drop_shares, evidence_chosen_groups, evidence_filter):
            num_rows = max(dataset["row_index"]) + 1
            super().__init__(args, num_rows, batch)
            self.start, self.drop_shares = start, drop_shares
            self.evidence_chosen_groups, self.evidence_filter = tuple(evidence_chosen_groups), evidence_filter
            if self.evidence_chosen_groups and evidence_filter is None:
                raise ValueError("evidence_chosen_groups needs the minority filter's evidence (minority_filter != 'none')")
            self.row_uniforms = torch.rand(num_rows, generator=torch.Generator().manual_seed(args.seed))
            self.row_flipped = torch.zeros(num_rows, dtype=torch.bool)
            self.row_flipped[torch.tensor(dataset["row_index"])] = torch.tensor(dataset["flipped"]).bool()

        @property
        def history(self):
            return self.evidence_filter.history if self.evidence_filter is not None else None

        def treat(self, step, metrics):
            if not step.training:
                return None
            if self.evidence_filter is not None:
                self.evidence_filter.record_evidence(step, metrics)
            if step.global_step < self.start:
                return None
            keep = (~self.diagnostic_drops()[step.rows.long().cpu()]).float().to(step.logits.device)
            report_kept_pairs(keep, step, self.batch, metrics)
            return PairTreatment(weights=keep)

        def diagnostic_drops(self) -> torch.Tensor:
            """Rows the truth diagnostics drop now (bool per row index)."""
            flipped, u = self.row_flipped, self.row_uniforms
            drops = {"flipped": flipped & (u < self.drop_shares[0]), "clean": ~flipped & (u < self.drop_shares[1])}
            history = self.history
            evidence = history.total / history.weight.clamp_min(1e-12) if self.evidence_chosen_groups else None
            for group in self.evidence_chosen_groups:  # its share with the highest evidence, among its judged pairs
                members = (flipped if group == "flipped" else ~flipped) & (
                    history.visits >= self.args.minority_filter_min_visits)
                share = self.drop_shares[0 if group == "flipped" else 1]
                drops[group] = members & (evidence > top_fraction_threshold(evidence[members], share))
            return drops["flipped"] | drops["clean"]

        def save(self, folder, write):
            if self.evidence_filter is not None:
                self.evidence_filter.save(folder, write)

        def load(self, folder):
            if self.evidence_filter is not None:
                self.evidence_filter.load(folder)

    class RecordingTrainer(AdaptiveDiffusionDPOTrainer):
        def __init__(self, *args, truth_filter_from: int | None = None, truth_drop_shares=(1.0, 0.0),
                     evidence_chosen_groups: tuple[str, ...] = (), **kwargs):
            super().__init__(*args, **kwargs)
            if truth_filter_from is not None:  # the diagnostics take the minority filter's place
                self.robustness["truth_drops"] = TruthDrops(
                    self.args, self.metrics.batch, self.train_dataset, truth_filter_from, truth_drop_shares,
                    evidence_chosen_groups, self.robustness.pop("minority_filter", None))
            elif evidence_chosen_groups:
                raise ValueError("evidence_chosen_groups needs truth_filter_from")
            self.visits = {"row": [], "step": [], "logit": [], "score": []}
            self.metric_history: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True)
            if model.training:
                self.visits["row"].append(inputs["row_index"].detach().cpu())
                self.visits["step"].append(torch.full_like(inputs["row_index"], self.state.global_step).cpu())
                self.visits["logit"].append(out["logits"][0].detach().float().cpu())
                score = out.get("minority_score")
                self.visits["score"].append(score.float().cpu() if score is not None else torch.full_like(
                    out["logits"][0], float("nan")).detach().cpu())
            return (loss, out) if return_outputs else loss

        def log(self, logs, start_time=None):
            for name, values in self.metrics.read("train").items():  # kept for the run summary before log() clears
                self.metric_history.setdefault(name, []).extend(values)
            super().log(logs, start_time)

        def visit_table(self) -> dict[str, np.ndarray]:
            return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in self.visits.items()}

    return RecordingTrainer
