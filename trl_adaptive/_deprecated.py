"""Trainer attributes of trl-adaptive 0.1 that moved into their layers (docs/architecture.md); they still work and
warn once. To be removed in 0.3."""

from __future__ import annotations

import warnings


def _moved(old: str, new: str) -> None:
    warnings.warn(f"AdaptiveDiffusionDPOTrainer.{old} is deprecated; use trainer.{new}", FutureWarning, stacklevel=3)


class DeprecatedTrainerAttributes:
    """Mixed into `AdaptiveDiffusionDPOTrainer`."""

    @property
    def annotators(self):
        _moved("annotators", 'robustness["adaptive"].annotators')
        return getattr(self.robustness.get("adaptive"), "annotators", None)

    @property
    def pair_history(self):
        _moved("pair_history", 'robustness["adaptive"].history')
        return getattr(self.robustness.get("adaptive"), "history", None)

    @property
    def evidence_history(self):
        _moved("evidence_history", 'robustness["minority_filter"].history')
        return getattr(self.robustness.get("minority_filter"), "history", None)

    @property
    def last_pair_statistics(self):
        _moved("last_pair_statistics", "metrics.last_pair_statistics")
        return self.metrics.last_pair_statistics

    def pair_forward(self, model, inputs, draw: int = 0, min_noise: float = 0.0):
        _moved("pair_forward", "forwards.pair_forward")
        return self.forwards.pair_forward(model, inputs, self.state.global_step, self.annotators_due(model.training),
                                          draw=draw, min_noise=min_noise)

    def unwrapped(self, model):
        _moved("unwrapped", "forwards.unwrapped")
        return self.forwards.unwrapped(model)
