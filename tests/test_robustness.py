"""Conformance of every robustness method (trl_adaptive.robustness), on synthetic paired outputs.

Each case runs one `RobustnessMethod` configuration through the checks every implementation must pass:

* **checkpoint**: saved after some steps and loaded into a fresh instance, it gives bit-identical weights and
  margins for the following steps (annotators, histories and counters all restored);
* **global batch**: two processes with half of the batch each give the same weights and margins per pair as one
  process with the whole batch (the statistics it takes over the batch are global);
* **detached**: weights and margins carry no gradient, while the logits they are computed from do.

The paired outputs are a deterministic function of (row, step, draw), standing in for `PairForwards`; the two
"processes" are threads exchanging tensors through the same `GlobalBatch` code the trainer uses. To add a method,
add its config to CASES.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest
import torch

from trl_adaptive import AdaptiveDPOConfig
from trl_adaptive.robustness import (
    ROBUSTNESS_METHODS,
    GlobalBatch,
    PairStep,
    build_methods,
    combine,
)

NUM_ROWS, BATCH, STEPS, SAVE_AT = 16, 8, 6, 3

CASES = {
    "adaptive": dict(adaptive=True),
    "adaptive_amortised": dict(adaptive=True, annotator_interval=3),
    "adaptive_margin_quadratic": dict(adaptive=True, margin="quadratic", weight_fn="sigmoid", metric_normalize="none",
                                      metric_rho=1.0),
    **{
        f"filter_{evidence}": dict(
            adaptive=evidence == "score", minority_filter="threshold", minority_evidence=evidence,
            minority_filter_threshold=0.2 if evidence != "wrong_sign" else 0.4, minority_filter_max_fraction=0.5,
            minority_filter_warmup_steps=1, minority_filter_min_visits=1, minority_evidence_draws=1,
            minority_evidence_min_noise=0.0, minority_evidence_decay=0.8,
            # The judge check decides at step 3 (12 votes a step), the checkpoint's step: its count must survive it.
            **(dict(minority_filter_min_agreement=0.01, minority_filter_agreement_votes=40)
               if evidence == "prompt_contrast" else {}),
        )
        for evidence in ("logit", "wrong_sign", "score", "prompt_contrast")
    },
    # The judge's votes are fixed per pair (`judge_margin` in the batch): decided once 20 of them are counted.
    "filter_judge": dict(adaptive=False, minority_filter="threshold", minority_evidence="judge",
                         minority_filter_threshold=0.5, minority_filter_max_fraction=0.5, minority_filter_min_visits=1,
                         minority_filter_min_agreement=0.01, minority_filter_agreement_votes=20),
    "filter_mixture": dict(adaptive=False, minority_filter="mixture", minority_evidence="logit", minority_filter_min_separation=0.0,
                           minority_filter_warmup_steps=2, minority_filter_min_visits=1, minority_evidence_draws=2),
}


def test_every_method_has_a_case():
    enabled = {type(m).__name__ for config in CASES.values() for m in _methods(config, _LocalAccelerator()).values()}
    assert enabled == {method.__name__ for method in ROBUSTNESS_METHODS}


# ---- synthetic outputs --------------------------------------------------------------------------------------
def _wave(rows: torch.Tensor, step: int, draw: int, k: int = 0) -> torch.Tensor:
    """A deterministic logit per (row, step, draw, annotator): a fixed per-row preference plus a moving part, and a
    different preference before the checkpoint step (so a method that forgot those steps decides differently)."""
    rows = rows.double()
    early = 3.0 * torch.cos(2.3 * rows + k) if step < SAVE_AT else 0.0
    return (torch.sin(1.7 * rows + 0.9 * k) + 0.6 * torch.cos(0.8 * rows * (step + 1) + 1.3 * draw + 0.4 * k)
            + early).float()


class _SyntheticForwards:
    """Stands in for `PairForwards`: outputs as functions of (row, step, draw), annotators registered as usual."""

    def __init__(self):
        self.annotators = None
        self.family = SimpleNamespace(noise_level=lambda t: t.float() / 1000)

    def register_annotators(self, annotators):
        self.annotators = annotators

    def bound_annotators(self):
        return self.annotators

    def pair_forward(self, model, inputs, global_step, with_annotators=False, draw=0, min_noise=0.0):
        rows = inputs["row_index"]
        logits = [_wave(rows, global_step, draw)]
        if with_annotators:
            # The annotators' logits depend on their EMA weights, so a lost annotator state shows in the scores.
            for k in range(len(self.annotators)):
                shift = sum(t.double().sum() for t in self.annotators.shadows[k].values()).float()
                logits.append(_wave(rows, global_step, draw, k + 1) + shift)
        timesteps = (rows * 97 + 31 * global_step + 500 * draw) % 1000
        errors = torch.cat([1 + 0.1 * _wave(rows, global_step, draw, 7), 1 + 0.1 * _wave(rows, global_step, draw, 8)])
        return {"policy_errors": errors, "reference_errors": errors, "logits": logits, "timesteps": timesteps,
                "noised": {"draw": draw, "step": global_step}}

    def noised_pairs(self, model, inputs, global_step, draw=0, min_noise=0.0):
        return {"draw": draw, "step": global_step}

    def contrast_conditioning(self, inputs):
        return None

    def prompt_contrast_votes(self, model, inputs, noised, own_errors=None, contrast_conditioning=None):
        rows = inputs["row_index"]
        votes = (_wave(rows, noised["step"], noised["draw"], 5) > 0.3).float()
        return votes, rows % 4 != 0  # every fourth pair's contrast prompt is its own: no vote


class _LocalAccelerator:
    device = torch.device("cpu")
    state = SimpleNamespace(deepspeed_plugin=None)

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


class _ThreadGroup:
    def __init__(self, size):
        self.size, self.barrier, self.slots = size, threading.Barrier(size, timeout=60), [None] * size

    def exchange(self, rank, tensor):
        self.slots[rank] = tensor
        self.barrier.wait()
        everything = list(self.slots)
        self.barrier.wait()
        return everything


class _ThreadAccelerator(_LocalAccelerator):
    """One "process" of a group of threads: reduce and gather exchange tensors with the other threads."""

    def __init__(self, group, rank):
        self.group, self.rank = group, rank

    def reduce(self, tensor, reduction="sum"):
        return torch.stack(self.group.exchange(self.rank, tensor)).sum(dim=0)

    def gather(self, tensor):
        return torch.cat(self.group.exchange(self.rank, tensor))


def _args(config):
    return AdaptiveDPOConfig(output_dir="unused", beta=10.0, annotator_decays=[0.9, 0.5], report_to=[], use_cpu=True,
                             per_device_train_batch_size=BATCH, **config)


def _methods(config, accelerator, model=None):
    dataset = {"row_index": list(range(NUM_ROWS))}
    methods = build_methods(_args(config), dataset, GlobalBatch(accelerator), _SyntheticForwards())
    model = model if model is not None else _policy()
    for method in methods.values():
        method.setup(model, accelerator)
    return methods


def _policy(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _batch_rows(step, rank=0, world=1):
    """The step's batch (a different window of rows each step, wrapping), this process's share of it."""
    rows = (torch.arange(BATCH) + 5 * step) % NUM_ROWS
    share = BATCH // world
    return rows[rank * share:(rank + 1) * share]


def _run(methods, model, steps, rank=0, world=1, flipped=True):
    """Treat `steps` and take an optimizer-like step of the model after each; returns per-step (weights, margins)."""
    results = []
    forwards = next(iter(methods.values())).forwards
    for step in steps:
        rows = _batch_rows(step, rank, world)
        # A judge's margins (winner minus loser score): fixed per row, some against the label, NaN where it abstains.
        inputs = {"row_index": rows,
                  "judge_margin": torch.where(rows % 5 == 0, float("nan"), torch.sin(2.1 * rows.float() + 0.5))}
        if flipped:
            inputs["flipped"] = rows % 3 == 0
        with_annotators = any(m.wants_annotators(step, True) for m in methods.values())
        outputs = forwards.pair_forward(model, inputs, step, with_annotators)
        outputs["logits"][0].requires_grad_(True)
        metrics = _Metrics()
        treatment = combine(m.treat(PairStep(outputs, inputs, step, True, model, with_annotators), metrics)
                            for m in methods.values())
        results.append((treatment.weights, treatment.margins, outputs["logits"][0]))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
        for method in methods.values():
            method.on_optimizer_step(model)
    return results


class _Metrics:
    """Collects what a method reports (its values are not under test here)."""

    def __init__(self):
        self.values = {}

    def add(self, mode, name, value, present=None):  # values are device tensors, read at log time by the real one
        assert math.isfinite(float(value)), name
        self.values[name] = value

    def add_pair_means(self, mode, per_pair):
        return {name: v.detach().float() for name, v in per_pair.items()}

    def keep_for_histograms(self, mode, name, gathered):
        pass

    def add_group_means(self, mode, values, inputs, flipped_name, clean_name):
        pass


def _equal(a, b):
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_continues_identically(case, tmp_path):
    torch.manual_seed(0)
    model_a = _policy()
    first = _methods(CASES[case], _LocalAccelerator(), model_a)
    _run(first, model_a, range(SAVE_AT))
    for method in first.values():
        method.save(str(tmp_path), write=True)
    model_b = _policy()
    model_b.load_state_dict(model_a.state_dict())
    second = _methods(CASES[case], _LocalAccelerator(), model_b)
    for method in second.values():
        method.load(str(tmp_path))
    continued = _run(first, model_a, range(SAVE_AT, STEPS))
    resumed = _run(second, model_b, range(SAVE_AT, STEPS))
    treated = 0
    for (w_a, m_a, _), (w_b, m_b, _) in zip(continued, resumed):
        assert _equal(w_a, w_b) and _equal(m_a, m_b)
        treated += (w_a is not None and not torch.all(w_a == 1)) or (m_a is not None and bool(m_a.abs().sum() > 0))
    assert treated > 0, "the method changed nothing after the checkpoint: the comparison would be vacuous"
    # Without its state the method does not continue identically, so the check above can fail.
    model_c = _policy()
    model_c.load_state_dict(model_a.state_dict())
    restarted = _run(_methods(CASES[case], _LocalAccelerator(), model_c), model_c, range(SAVE_AT, STEPS))
    assert any(not (_equal(a[0], b[0]) and _equal(a[1], b[1])) for a, b in zip(continued, restarted))


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_treat_pairs_as_one(case):
    torch.manual_seed(0)
    single = _run(_methods(CASES[case], _LocalAccelerator()), _policy(), range(STEPS))
    group, halves = _ThreadGroup(2), [None, None]
    models = [_policy(), _policy()]  # built here: torch.manual_seed in two threads at once would race

    def process(rank):
        model = models[rank]
        halves[rank] = _run(_methods(CASES[case], _ThreadAccelerator(group, rank), model), model, range(STEPS), rank, 2)

    threads = [threading.Thread(target=process, args=(rank,), daemon=True) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(h is not None for h in halves), "a process failed (see the thread's traceback)"
    for step, whole in enumerate(single):
        for part in (0, 1):  # weights, margins
            if whole[part] is None:
                assert halves[0][step][part] is None and halves[1][step][part] is None
                continue
            joined = torch.cat([halves[0][step][part], halves[1][step][part]])
            torch.testing.assert_close(joined, whole[part], rtol=1e-6, atol=1e-7, msg=f"step {step}, part {part}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_weights_and_margins_are_detached(case):
    for weights, margins, logits in _run(_methods(CASES[case], _LocalAccelerator()), _policy(), range(STEPS)):
        assert logits.requires_grad
        for value in (weights, margins):
            assert value is None or not value.requires_grad


def test_adaptive_u_is_zero_until_the_first_optimizer_step(tmp_path):
    # The EMA annotators start as copies of the policy: before the first optimizer step u = 0 for every pair, set
    # rather than computed (the synthetic logits differ across annotators, as rounding makes real ones differ).
    model = _policy()
    methods = _methods(CASES["adaptive"], _LocalAccelerator(), model)
    (weights0, _, _), (weights1, _, _) = _run(methods, model, range(2))
    assert torch.equal(weights0, torch.ones_like(weights0))  # u = 0: weight 1 / (k * 0 + c) with c = 1
    assert not torch.equal(weights1, torch.ones_like(weights1))
    # A run resumed from a checkpoint (saved after optimizer steps) computes u from its first step.
    methods["adaptive"].save(str(tmp_path), write=True)
    resumed = _methods(CASES["adaptive"], _LocalAccelerator(), model)
    resumed["adaptive"].load(str(tmp_path))
    ((weights2, _, _),) = _run(resumed, model, range(2, 3))
    assert not torch.equal(weights2, torch.ones_like(weights2))
