"""Per-pair treatments of the preference loss for minority labels, each behind `RobustnessMethod`.

`ROBUSTNESS_METHODS` lists them in the order they run (a later method may read an earlier one's state: the minority
filter's ``score`` evidence is Adaptive-DPO's record of u). To add a method: subclass `RobustnessMethod` in its own
file, add it here and to `build_methods`, and add it to the cases of tests/test_robustness.py (docs/architecture.md).
"""

from __future__ import annotations

from .adaptive import AdaptiveDPO
from .base import GlobalBatch, PairStep, PairTreatment, RobustnessMethod, combine
from .minority_filter import MinorityFilter, report_kept_pairs

ROBUSTNESS_METHODS: tuple[type[RobustnessMethod], ...] = (AdaptiveDPO, MinorityFilter)


def validate_config(args) -> None:
    """Every method checks its own fields (on or off: a bad value is an error either way)."""
    for method in ROBUSTNESS_METHODS:
        method.validate(args)


def check_training_columns(args, columns: list[str]) -> None:
    """Every enabled method checks that the training data has what it reads, before training starts."""
    for method in ROBUSTNESS_METHODS:
        if method.enabled(args):
            method.check_columns(args, columns)


def source_rows(dataset) -> int:
    """1 + the largest ``row_index`` of the training data: a latent cache knows it, a map-style dataset has the
    column; a stream's is unknown before it is read, so its records start empty and grow (`PairHistory`)."""
    from ..data import is_streamed

    if hasattr(dataset, "num_source_rows"):
        return dataset.num_source_rows
    if is_streamed(dataset):
        return 0
    return max(dataset["row_index"]) + 1


def build_methods(args, train_dataset, batch: GlobalBatch, forwards) -> dict[str, RobustnessMethod]:
    """The methods the config turns on, by name, in running order (not yet `setup`). Their per-pair records are
    sized by the training data's largest ``row_index`` (`source_rows`; none without training data)."""
    methods: dict[str, RobustnessMethod] = {}
    enabled = any(method.enabled(args) for method in ROBUSTNESS_METHODS)
    num_rows = source_rows(train_dataset) if enabled and train_dataset is not None else None
    if AdaptiveDPO.enabled(args):
        # With the filter judging by `score`, Adaptive-DPO's record is its evidence too, so it takes the filter's decay.
        shared = MinorityFilter.enabled(args) and args.minority_evidence == "score"
        decay = args.minority_evidence_decay if shared else 0.0
        methods["adaptive"] = AdaptiveDPO(args, num_rows, batch, forwards, history_decay=decay)
    if MinorityFilter.enabled(args):
        scores = methods["adaptive"].history if "adaptive" in methods else None
        methods["minority_filter"] = MinorityFilter(args, num_rows, batch, forwards, scores_history=scores)
    return methods


__all__ = [
    "ROBUSTNESS_METHODS",
    "AdaptiveDPO",
    "GlobalBatch",
    "MinorityFilter",
    "PairStep",
    "PairTreatment",
    "RobustnessMethod",
    "build_methods",
    "check_training_columns",
    "combine",
    "report_kept_pairs",
    "validate_config",
]
