"""Training runs that the distributed tests launch in subprocesses (`accelerate launch ...` or plain `python`).

Kept out of pytest's collection (no `test_` prefix) and importable by the tests for the single-process references.

    python tests/distributed_worker.py run --out DIR [--batch B] [--lora]   # one tiny run; rank 0 writes DIR/result.json
    python tests/distributed_worker.py deepspeed --out DIR                  # ZeRO-2 and ZeRO-3 checks in one process

The ZeRO checks need DeepSpeed's CPU accelerator and a one-process rendezvous
(DS_ACCELERATOR=cpu RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=...), which the test sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_flush_denormal(True)  # high beta -> denormal gradients, 2x slower CPU steps

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: Metrics the equal-results test compares between process counts.
COMPARED_PREFIXES = ("loss", "rewards/", "minority/", "denoising_loss/")


def tiny_run_args(output_dir: str, batch: int, **overrides):
    from trl_adaptive import AdaptiveDPOConfig

    values = dict(
        output_dir=output_dir,
        resolution=32,
        per_device_train_batch_size=batch,
        max_steps=3,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=0,
        annotator_decays=[0.9, 0.5],
        # Several CPU processes talk over gloo (accelerate picks no backend for DeepSpeed without a GPU).
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
    )
    values.update(overrides)
    return AdaptiveDPOConfig(**values)


def build_trainer(output_dir: str, batch: int, lora: bool = False, sdxl: bool = False, num_pairs: int = 12, **overrides):
    from peft import LoraConfig

    from trl_adaptive import AdaptiveDiffusionDPOTrainer
    from trl_adaptive.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline, toy_preference_dataset

    pipeline = tiny_sdxl_pipeline(seed=0) if sdxl else tiny_sd_pipeline(seed=0)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights="gaussian") if lora else None
    return AdaptiveDiffusionDPOTrainer(
        pipeline,
        args=tiny_run_args(output_dir, batch, **overrides),
        train_dataset=toy_preference_dataset(num_pairs=num_pairs, size=40, seed=0),
        peft_config=peft_config,
    )


def build_eval_set():
    from trl_adaptive.tiny import toy_preference_dataset

    return toy_preference_dataset(num_pairs=4, size=40, seed=1)


def logged_metrics(trainer) -> list[dict[str, float]]:
    """The per-step training logs, restricted to the compared metrics."""
    return [
        {k: float(v) for k, v in entry.items() if k.startswith(COMPARED_PREFIXES)}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    """The trained parameters in full (gathered under ZeRO-3; every process must call this)."""
    import deepspeed

    model = trainer.accelerator.unwrap_model(trainer.model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params) if hasattr(params[0], "ds_id") else _null():
        return {n: p.detach().float().cpu().clone() for n, p in zip(names, params)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


#: The equal-results runs use plain SGD with a large step. Adam divides each gradient by its own magnitude, so a
#: coordinate whose gradient is ~0 moves by +-lr depending on float rounding; and with small steps the annotators
#: differ from the model so little that the minority score (a spread across them) is dominated by rounding. With
#: these settings, one process run with 1 or 2 threads differs by ~1e-4 relative, as does a 2-process run.
EQUAL_RESULTS_OPTIMIZER = dict(optim="sgd", learning_rate=0.5)


def command_run(out: str, batch: int, lora: bool) -> None:
    """One tiny Adaptive-DPO run; the equal-results test launches it on 1 or 2 processes."""
    trainer = build_trainer(out, batch, lora=lora, **EQUAL_RESULTS_OPTIMIZER)
    trainer.train()
    annotators = trainer.forwards.bound_annotators().state_dict()  # collective under ZeRO-3
    if trainer.accelerator.is_main_process:
        result = {
            "world_size": trainer.accelerator.num_processes,
            "zero_stage": _zero_stage(trainer),
            "metrics": logged_metrics(trainer),
            "annotator_norms": {k: float(v.float().norm()) for k, v in annotators.items()},
        }
        Path(out, "result.json").write_text(json.dumps(result, indent=1))
    if _zero_stage(trainer) == 3:
        result = check_sharded_annotator_forward(trainer)
        if trainer.accelerator.is_main_process:
            Path(out, "annotator_forward.json").write_text(json.dumps(result))


def _zero_stage(trainer):
    from trl_adaptive.distributed import zero_stage

    return zero_stage(trainer.accelerator)


def check_sharded_annotator_forward(trainer) -> dict[str, float]:
    """Annotator 0 run through ZeRO-3 (shards swapped in, gathered by ZeRO's hooks) against a plain, unsharded UNet
    holding the gathered annotator weights, on the same input: the largest absolute difference, and the difference
    between the annotator's and the policy's outputs (which must not be zero, or the check proves nothing)."""
    import deepspeed

    module = trainer.accelerator.unwrap_model(trainer.model)
    annotators = trainer.forwards.bound_annotators()
    full_shadows = {k.split("/", 1)[1]: v for k, v in annotators.state_dict().items() if k.startswith("0/")}
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        plain = type(module).from_config(module.config)
        plain.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
    plain.load_state_dict(full_shadows, strict=False)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 500])
    hidden = torch.randn(2, 16, module.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        through_zero3 = annotators(0, module, sample, timesteps, encoder_hidden_states=hidden).sample
        policy = module(sample, timesteps, encoder_hidden_states=hidden).sample
        reference = plain(sample, timesteps, encoder_hidden_states=hidden).sample
    return {
        "max_abs_diff": float((through_zero3 - reference).abs().max()),
        "annotator_vs_policy": float((through_zero3 - policy).abs().max()),
    }


# ---- single-process DeepSpeed checks -------------------------------------------------------------------------


def _deepspeed_config(stage: int) -> str:
    """The shipped DeepSpeed JSON of that stage (the `deepspeed` launcher's route; the accelerate YAMLs are tested by
    the two-process launches). No optimizer block: no fused-Adam build on CPU."""
    return str(Path(__file__).resolve().parents[1] / "examples" / "accelerate_configs" / f"ds_zero{stage}.json")


@torch.no_grad()
def output_difference(model: torch.nn.Module, other: torch.nn.Module) -> float:
    """Largest absolute difference of two UNets' outputs on one fixed input (either may be ZeRO-3 partitioned)."""
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 16, model.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([10, 500])
    outputs = [m(sample, timesteps, encoder_hidden_states=hidden).sample.float() for m in (model, other)]
    return float((outputs[0] - outputs[1]).abs().max())


def optimizer_parameters(engine) -> list[torch.nn.Parameter]:
    """The model parameters a DeepSpeed ZeRO optimizer updates (its groups of original, unflattened parameters)."""
    optimizer = engine.optimizer
    groups = getattr(optimizer, "fp16_groups", None) or getattr(optimizer, "bit16_groups", None)
    if groups is None:
        raise RuntimeError(f"Cannot list the parameters of {type(optimizer).__name__}")
    return [p for group in groups for p in group]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def check_zero3_from_folder(folder: str, family: str = "sdxl") -> dict:
    """ZeRO-3 with the model given as a folder (as a Hub id is): the pipeline is loaded after the ZeRO-3 config
    exists, which used to build the frozen text encoders under zero.Init (partitioned: the first step failed). Also
    what a user's own `from_pretrained` after the config gives: a clear error, not a crash at the first step.
    `family`: "sdxl" (two CLIP encoders) or "flux" (CLIP and T5, a transformer denoiser)."""
    from trl_adaptive import AdaptiveDiffusionDPOTrainer
    from trl_adaptive.distributed import zero3_init_disabled
    from trl_adaptive.tiny import tiny_flux_pipeline, tiny_sdxl_pipeline, toy_preference_dataset

    build = {"sdxl": tiny_sdxl_pipeline, "flux": tiny_flux_pipeline}[family]
    model_dir = os.path.join(folder, "model")
    with zero3_init_disabled():  # the earlier runs' ZeRO-3 config is still registered in this process
        pipeline_class = type(build(seed=0))
        build(seed=0).save_pretrained(model_dir)
    args = tiny_run_args(os.path.join(folder, "out"), 2, max_steps=2, deepspeed=_deepspeed_config(3),
                         **({"max_sequence_length": 8} if family == "flux" else {}))
    pairs = toy_preference_dataset(num_pairs=4, size=40, seed=0)
    trainer = AdaptiveDiffusionDPOTrainer(model=model_dir, args=args, train_dataset=pairs)
    trainer.train()
    frozen = [p for m in trainer.family.frozen_modules().values() for p in m.parameters()]
    denoiser = trainer.accelerator.unwrap_model(trainer.model)
    entry = {
        "zero_stage": _zero_stage(trainer),
        "frozen_partitioned": sum(hasattr(p, "ds_id") for p in frozen),
        "frozen_numel": sum(p.numel() for p in frozen),
        "denoiser_partitioned": all(hasattr(p, "ds_id") for p in denoiser.parameters()),
        "reference": type(trainer.ref_model).__name__,
        "annotators": type(trainer.robustness["adaptive"].annotators).__name__,
        "metrics": logged_metrics(trainer),
    }
    del trainer
    own_pipeline = pipeline_class.from_pretrained(model_dir)  # after the ZeRO-3 config: under zero.Init
    try:
        AdaptiveDiffusionDPOTrainer(model=own_pipeline, args=args, train_dataset=pairs)
        entry["own_pipeline_error"] = None
    except ValueError as err:
        entry["own_pipeline_error"] = str(err)
    return entry


def command_deepspeed(out: str) -> None:
    """ZeRO-2 and ZeRO-3 in one process: LoRA and full fine-tune, save_model, ZeRO-3 save + resume with annotators.

    Writes out/deepspeed.json with what it observed; the test asserts on it.
    """
    from diffusers import StableDiffusionPipeline

    from trl_adaptive.tiny import tiny_sd_pipeline

    report: dict[str, dict] = {}
    for stage in (2, 3):
        for lora in (False, True):
            name = f"zero{stage}_{'lora' if lora else 'full'}"
            folder = os.path.join(out, name)
            # ZeRO-3 full fine-tune with activation checkpointing: the policy's backward recomputes layers after
            # the annotators swapped their shards in and out.
            checkpointing = stage == 3 and not lora
            trainer = build_trainer(
                folder, 2, lora=lora, max_steps=2, deepspeed=_deepspeed_config(stage), activation_checkpointing=checkpointing
            )
            trainer.train()
            trainer.save_model()
            evaluation = trainer.evaluate(build_eval_set())
            optimized = optimizer_parameters(trainer.model_wrapped)
            frozen = [p for m in trainer.family.frozen_modules().values() for p in m.parameters()]
            denoiser = trainer.accelerator.unwrap_model(trainer.model)
            entry = {
                "zero_stage": _zero_stage(trainer),
                "annotators": type(trainer.robustness["adaptive"].annotators).__name__,
                "reference": type(trainer.ref_model).__name__,
                "frozen_in_optimizer": sum(id(p) in {id(q) for q in optimized} for p in frozen),
                "frozen_partitioned": sum(hasattr(p, "ds_id") for p in frozen),
                "optimized_numel": sum(getattr(p, "ds_numel", p.numel()) for p in optimized),
                "trainable_numel": sum(getattr(p, "ds_numel", p.numel()) for p in denoiser.parameters() if p.requires_grad),
                "metrics": logged_metrics(trainer),
                "eval_loss": evaluation["eval_loss"],
                "eval_minority_score": evaluation.get("eval_minority/score_mean"),
                "saved_files": sorted(os.listdir(folder)),
            }
            # What save_model wrote, loaded the way users load it, must compute what the trained model computes.
            if lora:
                reloaded = tiny_sd_pipeline(seed=0)
                reloaded.load_lora_weights(folder)
            else:
                reloaded = StableDiffusionPipeline.from_pretrained(folder)
            entry["saved_vs_trained_output_diff"] = output_difference(denoiser, reloaded.unet)
            entry["trained_vs_initial_output_diff"] = output_difference(denoiser, tiny_sd_pipeline(seed=0).unet)
            if stage == 3 and not lora:
                entry["annotator_forward"] = check_sharded_annotator_forward(trainer)
            report[name] = entry
            del trainer
            _reset_accelerate()

    report["zero3_from_folder"] = check_zero3_from_folder(os.path.join(out, "zero3_from_folder"))
    report["zero3_flux_from_folder"] = check_zero3_from_folder(os.path.join(out, "zero3_flux_from_folder"), "flux")
    _reset_accelerate()

    # ZeRO-3 resume: 3 steps with a checkpoint after 2, then a fresh trainer resumes from that checkpoint and
    # trains the third step again; both must end with the same weights and annotators.
    stage3 = _deepspeed_config(3)
    folder = os.path.join(out, "zero3_resume")
    runs = {}
    initial = {n: p.detach().clone() for n, p in tiny_sd_pipeline(seed=0).unet.named_parameters()}
    for label, resume in (("uninterrupted", None), ("resumed", os.path.join(folder, "checkpoint-2"))):
        trainer = build_trainer(folder, 2, max_steps=3, save_strategy="steps", save_steps=2, deepspeed=stage3)
        trainer.train(resume_from_checkpoint=resume)
        runs[label] = {
            "weights": trained_weights(trainer),
            "annotators": trainer.forwards.bound_annotators().state_dict(),
            "num_updates": trainer.robustness["adaptive"].annotators.num_updates,
        }
        del trainer
        _reset_accelerate()
    runs["resumed"]["checkpoint_files"] = sorted(os.listdir(os.path.join(folder, "checkpoint-2")))
    a, b = runs["uninterrupted"], runs["resumed"]
    report["zero3_resume"] = {
        "weights_max_diff": max(float((a["weights"][n] - b["weights"][n]).abs().max()) for n in a["weights"]),
        "weights_moved": max(float((v - initial[n]).abs().max()) for n, v in a["weights"].items()),
        "annotators_max_diff": max(float((a["annotators"][k] - b["annotators"][k]).abs().max()) for k in a["annotators"]),
        "num_updates": [a["num_updates"], b["num_updates"]],
        "checkpoint_files": b["checkpoint_files"],
    }
    Path(out, "deepspeed.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run", "deepspeed"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    if args.command == "run":
        command_run(args.out, args.batch, args.lora)
    else:
        command_deepspeed(args.out)
    # Every result is on disk by now. Shut the process group down and leave without the interpreter's teardown:
    # with two gloo processes on CPU, about one run in six aborted *after* main() had returned ("terminate called
    # without an active exception", no Python frame left: a C++ thread still joinable when static objects are
    # destroyed), even with the group destroyed explicitly. That is torch's CPU teardown, not the training under test.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
