"""Count the host reads of tensors in a training step: each is a GPU synchronisation (the host waits for the device).

On a GPU, `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool(t)` / `float(t)` / `int(t)` and every operation whose
output shape depends on the data (boolean-mask indexing, `nonzero`, `unique`, `masked_select`) make the host wait
for the device to finish its queue, so the host cannot run ahead launching the next kernels. This script counts
those calls on the CPU (where the same calls happen, only cheaply) by patching them on `torch.Tensor`, in two
windows of every optimizer step of `AdaptiveDiffusionDPOTrainer.train()`:

  ours   `training_step` (forward, loss, robustness methods, metrics, backward) and our `on_step_end` callback
         (EMA annotators): must be zero on every step that does not log.
  step   the whole optimizer step, `on_step_begin` to `on_step_end`: adds the transformers Trainer's own work (the
         NaN/Inf loss filter, gradient clipping, the optimizer). On a CPU this also counts the optimizer's reads of
         its host-side step counters (AdamW's `.item()` of CPU tensors), which are no GPU synchronisation.

Usage: python benchmarks/host_reads.py [--steps 3] [--cases dpo,adaptive,...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections import Counter, defaultdict

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

#: Tensor methods that read values to the host.
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")
#: Methods whose output shape depends on the values (a host read of the size on a GPU). Also counted: indexing with
#: a boolean mask (the same) and with a Python list (copied to the device: a blocking host-to-device copy).
DATA_DEPENDENT = ("nonzero", "unique", "masked_select", "argwhere")


class HostReadCounter:
    """Patches the host-reading methods of `torch.Tensor` (`patched`); counts their calls in every open `window`."""

    def __init__(self):
        self.open: Counter = Counter()  # window name -> nesting depth
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def _count(self, name: str) -> None:
        for window, depth in self.open.items():
            if depth:
                self.counts[window][name] += 1

    @contextlib.contextmanager
    def patched(self):
        originals = {name: getattr(torch.Tensor, name) for name in READS + DATA_DEPENDENT + ("__getitem__", "__setitem__")}

        def wrap(name, original):
            def counted(tensor, *args, **kwargs):
                self._count(name)
                return original(tensor, *args, **kwargs)
            return counted

        def wrap_indexing(name, original):
            def indexed(tensor, index, *args):
                if _has_mask(index):
                    self._count(f"{name}[bool mask]")
                if _has_host_list(index):
                    self._count(f"{name}[list]")
                return original(tensor, index, *args)
            return indexed

        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap_indexing(name, original) if name.endswith("item__") else wrap(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    @contextlib.contextmanager
    def window(self, name: str):
        self.open[name] += 1
        try:
            yield
        finally:
            self.open[name] -= 1

    def take(self, name: str) -> Counter:
        return self.counts.pop(name, Counter())


def _has_mask(index) -> bool:
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in indices)


def _has_host_list(index) -> bool:
    """Indexing with a Python list: on a GPU the list is copied to the device first, a blocking copy."""
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, list) for i in indices)


def _counted(counter: HostReadCounter, window: str, fn):
    def counted(*args, **kwargs):
        with counter.window(window):
            return fn(*args, **kwargs)
    return counted


def count_trainer_reads(trainer, counter: HostReadCounter) -> tuple[list[dict], Counter]:
    """Train `trainer` (inside `counter.patched()`); returns per optimizer step {"ours", "step": Counter, "logged"}
    and the reads of all `trainer.log` calls together."""
    from transformers import TrainerCallback

    steps: list[dict] = []
    trainer.training_step = _counted(counter, "ours", trainer.training_step)
    trainer.log = _counted(counter, "log", trainer.log)
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "RobustnessStepCallback":  # our on_step_end: the EMA annotators' update
            callback.on_step_end = _counted(counter, "ours", callback.on_step_end)

    class StepWindow(TrainerCallback):  # registered last: its on_step_end runs after every other callback's
        def on_step_begin(self, args, state, control, **kwargs):
            counter.take("ours"), counter.take("step")  # nothing from before the step (data loading) counts
            counter.open["step"] += 1

        def on_step_end(self, args, state, control, **kwargs):
            counter.open["step"] -= 1
            logged = bool(args.logging_steps) and state.global_step % args.logging_steps == 0
            steps.append({"ours": counter.take("ours"), "step": counter.take("step"), "logged": logged})

    trainer.add_callback(StepWindow())
    trainer.train()
    return steps, counter.take("log")


def case_args(name: str, output_dir: str, steps: int, **overrides):
    """The trainer configurations that matter for host reads (tiny pipeline, CPU)."""
    from trl_adaptive import AdaptiveDPOConfig

    base = dict(output_dir=output_dir, resolution=32, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-3,
                logging_steps=steps, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, seed=0, adaptive=False)
    filter_base = dict(minority_filter="top_fraction", minority_filter_fraction=0.5, minority_filter_warmup_steps=1,
                       minority_filter_min_visits=1, minority_evidence_min_noise=0.0, minority_evidence_draws=1)
    cases = {
        "dpo": {},
        "adaptive": dict(adaptive=True),
        "adaptive_amortised": dict(adaptive=True, annotator_interval=2),
        "adaptive_margin_rms": dict(adaptive=True, margin="linear", metric_normalize="rms"),
        "filter_wrong_sign": dict(filter_base, minority_evidence="wrong_sign"),
        "filter_logit": dict(filter_base, minority_evidence="logit"),
        "filter_mixture": dict(filter_base, minority_filter="mixture", minority_evidence="logit"),
        "filter_threshold": dict(filter_base, minority_filter="threshold", minority_evidence="wrong_sign"),
        "filter_score": dict(filter_base, adaptive=True, minority_evidence="score", minority_evidence_draws=0),
        # The judge check decides on the first step (a low bar, so the filter goes on): its one read at the log counts.
        "filter_prompt_contrast": dict(filter_base, minority_evidence="prompt_contrast", minority_filter_min_agreement=0.01,
                                       minority_filter_agreement_votes=1),
    }
    return AdaptiveDPOConfig(**{**base, **cases[name], **overrides})


CASES = ("dpo", "adaptive", "adaptive_amortised", "adaptive_margin_rms", "filter_wrong_sign", "filter_logit",
         "filter_mixture", "filter_threshold", "filter_score", "filter_prompt_contrast")


def build_trainer(name: str, lora: bool, output_dir: str, steps: int, **overrides):
    from trl_adaptive import AdaptiveDiffusionDPOTrainer
    from trl_adaptive.tiny import tiny_sd_pipeline, toy_preference_dataset

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    args = case_args(name, output_dir, steps, **overrides)
    return AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(8),
                                       peft_config=peft_config)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the last one logs)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--modes", default="full,lora", help="full, lora or both")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="AdaptiveDPOConfig override for every case (Python literal), e.g. logging_nan_inf_filter=True")
    opts = parser.parse_args(argv)
    import ast

    overrides = {}
    for item in opts.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    torch.set_flush_denormal(True)
    results = {}
    print(f"host reads per optimizer step ({opts.steps} steps, the last logs; overrides {overrides or 'none'})")
    print("| case | mode | ours per non-logging step | ours, logging step | whole step per non-logging step | all logs |")
    print("|---|---|---|---|---|---|")
    counter = HostReadCounter()
    for name in opts.cases.split(","):
        for mode in opts.modes.split(","):
            with tempfile.TemporaryDirectory() as folder, counter.patched():
                trainer = build_trainer(name, mode == "lora", folder, opts.steps, **overrides)
                steps, log_reads = count_trainer_reads(trainer, counter)
            quiet = [s for s in steps if not s["logged"]]
            ours = sum((s["ours"] for s in quiet), Counter())
            whole = sum((s["step"] for s in quiet), Counter())
            logged = sum((s["ours"] for s in steps if s["logged"]), Counter())
            results[f"{name}/{mode}"] = {"ours_quiet": dict(ours), "whole_quiet": dict(whole),
                                         "ours_logging_step": dict(logged), "log": dict(log_reads),
                                         "quiet_steps": len(quiet)}
            per_step = lambda c: ", ".join(f"{k} {v / len(quiet):g}" for k, v in sorted(c.items())) or "0"  # noqa: E731
            total = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "0"  # noqa: E731
            print(f"| {name} | {mode} | {per_step(ours)} | {total(logged)} | {per_step(whole)} | {total(log_reads)} |",
                  flush=True)
    return results


if __name__ == "__main__":
    main()
