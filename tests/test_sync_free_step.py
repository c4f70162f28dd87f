"""A training step reads nothing back to the host: no GPU synchronisation in our part of a step.

On the CPU, `benchmarks/host_reads.py` counts every host read of a tensor (`.item()`, `.tolist()`, `.cpu()`,
`bool(t)`, boolean-mask indexing, ...) inside `training_step` and our `on_step_end` callback, for the configurations
that read different state (plain DPO, exact and amortised Adaptive-DPO, the minority filter with each kind of
evidence and rule, LoRA and full fine-tuning). On a GPU, `torch.cuda.set_sync_debug_mode("error")` turns any
synchronisation into an error (skipped without CUDA). Metrics are read once per log, in `trainer.log`.
"""

from collections import Counter

import pytest
import torch


@pytest.fixture(scope="module")
def host_reads(benchmark_script):
    return benchmark_script("host_reads")


# (case of benchmarks/host_reads.py, LoRA?): every robustness method and every evidence kind at least once, both modes.
CASES = [
    ("dpo", False), ("dpo", True),
    ("adaptive", True), ("adaptive_amortised", False), ("adaptive_margin_rms", True),
    ("filter_wrong_sign", True), ("filter_logit", False), ("filter_mixture", False), ("filter_threshold", True),
    ("filter_score", True), ("filter_prompt_contrast", False),
]


def _train_counting(host_reads, tmp_path, case, lora, **overrides):
    counter = host_reads.HostReadCounter()
    with counter.patched():
        trainer = host_reads.build_trainer(case, lora, str(tmp_path), steps=3, **overrides)
        steps, log_reads = host_reads.count_trainer_reads(trainer, counter)
    return trainer, steps, log_reads


@pytest.mark.parametrize("case,lora", CASES, ids=[f"{c}-{'lora' if lora else 'full'}" for c, lora in CASES])
def test_training_step_reads_nothing_back_to_the_host(host_reads, tmp_path, case, lora):
    torch.set_flush_denormal(True)
    trainer, steps, log_reads = _train_counting(host_reads, tmp_path, case, lora)
    assert [s["logged"] for s in steps] == [False, False, True]  # logging_steps = 3
    for step in steps:
        assert step["ours"] == Counter(), f"host reads in our part of step {steps.index(step)}: {dict(step['ours'])}"
    # The steps ran what they should (a filter that silently did nothing would also read nothing).
    logs = trainer.state.log_history[0]
    assert "rewards/accuracies" in logs
    if "minority_filter" in trainer.robustness:
        assert "minority/kept_fraction" in logs
        assert int(trainer.robustness["minority_filter"].history.visits.sum()) > 0
    if "adaptive" in trainer.robustness:
        assert "minority/weight_mean" in logs
    # Everything the steps recorded is read at the log, in one transfer (plus, once, the filter's regime check or its
    # judge check's decision).
    assert log_reads["tolist"] <= 2 and sum(log_reads.values()) == log_reads["tolist"]


def test_the_count_sees_a_host_read_in_the_step(host_reads, tmp_path, monkeypatch):
    """The test above can fail: a metric read back per step, as before, is counted."""
    from trl_adaptive.metrics import TrainingMetrics

    original = TrainingMetrics.add

    def add_and_read(self, mode, name, value, present=None):
        original(self, mode, name, value.item() if isinstance(value, torch.Tensor) else value, present)

    monkeypatch.setattr(TrainingMetrics, "add", add_and_read)
    _, steps, _ = _train_counting(host_reads, tmp_path, "dpo", True)
    assert steps[0]["ours"]["item"] == 9  # the nine rewards/* and denoising_loss/* means of record_pairs


def test_the_transformers_loss_filter_reads_every_step(host_reads, tmp_path):
    """What the transformers Trainer adds per step: `logging_nan_inf_filter` (its default True; ours False) tests the
    loss for NaN/Inf with two `bool(tensor)` per step; without it the whole step (clipping, AdamW) reads nothing."""
    _, with_filter, _ = _train_counting(host_reads, tmp_path / "on", "dpo", True, logging_nan_inf_filter=True)
    _, without, _ = _train_counting(host_reads, tmp_path / "off", "dpo", True)
    assert with_filter[0]["step"] == Counter({"__bool__": 2})
    assert without[0]["step"] == Counter()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("case,lora", [("dpo", True), ("adaptive", True), ("adaptive_amortised", False),
                                       ("filter_wrong_sign", True), ("filter_mixture", False),
                                       ("filter_prompt_contrast", True)])
def test_training_step_does_not_synchronise_the_gpu(host_reads, tmp_path, case, lora):
    trainer = host_reads.build_trainer(case, lora, str(tmp_path), steps=3, use_cpu=False)
    training_step = trainer.training_step

    def strict_training_step(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")  # every step, the first included
        try:
            return training_step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer.training_step = strict_training_step
    trainer.train()
    assert "rewards/accuracies" in trainer.state.log_history[0]
