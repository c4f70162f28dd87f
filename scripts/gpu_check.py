"""GPU check: bf16 training steps of real SD 1.5, SDXL, SD3.5 and Flux.1 architectures through AdaptiveDiffusionDPOTrainer.

    python scripts/gpu_check.py ../shared/model-configs            # one H100: about 5-8 minutes in all
    python scripts/gpu_check.py --tiny                              # CPU smoke test with tiny models (~1 minute)

MODEL_CONFIGS is a folder with an `sd15/` and an `sdxl/` model folder laid out as on the Hub (model_index.json,
a config.json per component, tokenizer files; weights are not needed and not read): every component is built from
its config with random weights (speed does not depend on weight values) and the tokenizers are the real ones. Point
`--sd15`/`--sdxl` at other folders to check your own architectures.

Cases, each with Adaptive-DPO off (plain Diffusion-DPO) and on (two EMA annotators):
  sd15-lora, sd15-full          SD 1.5 at 512 px, LoRA rank 8 / full UNet fine-tune (AdamW, fp32 master weights)
  sdxl-lora                     SDXL at 1024 px, LoRA rank 8
  sdxl-full-zero2               SDXL at 1024 px, full UNet under DeepSpeed ZeRO-2 (bf16 weights, fp32 master copy in
                                the optimizer) with gradient checkpointing; Adafactor as in the original SDXL
                                Diffusion-DPO recipe (`--sdxl-full-optim adamw_torch` for AdamW)
  sd35-lora, flux-lora          SD3.5 medium and Flux.1-dev at 1024 px, LoRA rank 8, gradient checkpointing, from the
                                configs in benchmarks/model-configs (`--sd35`, `--flux`); their tokenizers are the
                                offline stand-ins (same sequence lengths). Not yet run on a GPU; select them with
                                `--cases sd35-lora flux-lora` (the time budget may skip them after the SD cases).
Each case trains `--warmup` steps, then times `--steps` more (the median is reported). Printed per case: step time,
pairs/s, peak GPU memory (torch.cuda.max_memory_allocated from the start of training: DeepSpeed's set-up included,
building the random-weight pipeline beforehand not) and model FLOP
utilisation: UNet FLOPs of the step divided by step time and the card's dense bf16 peak (`--peak-tflops`, 989 for an
H100 SXM). UNet FLOPs per image forward are measured with torch.utils.flop_counter.FlopCounterMode on the real
config; a step counts (4 + K) image-forwards per image with full fine-tuning (policy forward + backward = 3, reference
1, K annotators) and (3 + K) with LoRA (the backward computes input gradients only); gradient-checkpointing
recomputation, text encoders and VAE are not counted (this is model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Dense bf16 peak TFLOP/s by card name (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
#: Reference denoiser forward cost per image (FlopCounterMode on the real configs: issue 5 for the UNets,
#: benchmarks/step_time.py --flops-only for SD3.5 medium and Flux.1-dev at 1024 px), printed for cross-checking.
REFERENCE_UNET_TFLOP = {"sd15": 0.80, "sdxl": 6.76, "sd35": 10.78, "flux": 74.38}
#: Training resolution of each model's cases.
RESOLUTIONS = {"sd15": 512, "sdxl": 1024, "sd35": 1024, "flux": 1024}
#: Text tokens the flow-matching transformers see in training (CLIP 77 + T5 77 for SD3; T5 512 for Flux).
FLOW_TEXT_TOKENS = {"sd35": 154, "flux": 512}


@dataclass
class Case:
    name: str
    model: str  # "sd15", "sdxl", "sd35" or "flux"
    lora: bool
    zero2: bool = False
    checkpointing: bool = False


CASES = [
    Case("sd15-lora", "sd15", lora=True),
    Case("sd15-full", "sd15", lora=False),
    Case("sdxl-lora", "sdxl", lora=True),
    Case("sdxl-full-zero2", "sdxl", lora=False, zero2=True, checkpointing=True),
    Case("sd35-lora", "sd35", lora=True, checkpointing=True),
    Case("flux-lora", "flux", lora=True, checkpointing=True),
]


# ---- building pipelines ----------------------------------------------------------------------------------------


def build_tiny(model: str):
    from trl_adaptive import tiny

    builders = {"sd15": tiny.tiny_sd_pipeline, "sdxl": tiny.tiny_sdxl_pipeline, "sd35": tiny.tiny_sd3_pipeline,
                "flux": tiny.tiny_flux_pipeline}
    return builders[model](seed=0)


def unet_forward_tflop(pipeline, resolution: int, device, dtype) -> float:
    """FLOPs of one denoiser forward on one image at `resolution`, counted by FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if getattr(pipeline, "transformer", None) is not None:
        return _transformer_forward_tflop(pipeline, resolution, device, dtype)
    unet = pipeline.unet
    side = resolution // pipeline.vae_scale_factor
    kwargs = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=dtype),
        }
    sample = torch.randn(1, unet.config.in_channels, side, side, device=device, dtype=dtype)
    unet.to(device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(sample, torch.tensor([500], device=device), **kwargs)
    return counter.get_total_flops() / 1e12


def _transformer_forward_tflop(pipeline, resolution: int, device, dtype) -> float:
    """SD3 / Flux: one transformer forward through the family's own call (packing, ids, guidance), on zero text
    states of the training length."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trl_adaptive.families import family_for

    family = family_for(pipeline)
    config = pipeline.transformer.config
    tokens = FLOW_TEXT_TOKENS["flux" if type(pipeline).__name__ == "FluxPipeline" else "sd35"]
    conditioning = {"encoder_hidden_states": torch.zeros(1, tokens, config.joint_attention_dim, device=device, dtype=dtype),
                    "pooled_projections": torch.zeros(1, config.pooled_projection_dim, device=device, dtype=dtype)}
    side = resolution // pipeline.vae_scale_factor
    latents = torch.zeros(1, pipeline.vae.config.latent_channels, side, side, device=device, dtype=dtype)
    pipeline.transformer.to(device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        family.predict(pipeline.transformer, latents, torch.tensor([500.0], device=device), conditioning)
    return counter.get_total_flops() / 1e12


# ---- one case ---------------------------------------------------------------------------------------------------


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def _single_process_rendezvous() -> None:
    """DeepSpeed in one process still wants a torch.distributed rendezvous."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip


def run_case(case: Case, adaptive: bool, opts, pipeline_factory, forward_tflop: float) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_adaptive import AdaptiveDPOConfig, AdaptiveDiffusionDPOTrainer
    from trl_adaptive.tiny import toy_preference_dataset

    cuda = torch.cuda.is_available() and not opts.tiny
    resolution = opts.tiny_resolution if opts.tiny else RESOLUTIONS[case.model]
    batch = {"sd15": opts.sd15_batch, "sdxl": opts.sdxl_batch, "sd35": opts.flow_batch, "flux": opts.flow_batch}[case.model]
    if case.zero2:
        batch = opts.sdxl_full_batch
    total_steps = opts.warmup + opts.steps

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (forward, backward, optimizer, EMA update), GPU synchronised."""

        def __init__(self):
            self.times, self._start = [], None

        def _sync(self):
            if cuda:
                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:  # peak memory of training, not of building the pipeline in float32 beforehand
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.times.append(time.perf_counter() - self._start)

    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    extra = {}
    if case.zero2:
        _single_process_rendezvous()
        zero = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}
        extra["deepspeed"] = {
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "zero_optimization": zero,
            # Adafactor is not on DeepSpeed's list of tested ZeRO optimizers (it works: ZeRO-2 only shards its state).
            "zero_allow_untested_optimizer": True,
        }
        extra["optim"] = opts.sdxl_full_optim
    args = AdaptiveDPOConfig(
        output_dir=os.path.join(opts.output_dir, f"{case.name}-{'adaptive' if adaptive else 'dpo'}"),
        resolution=resolution,
        per_device_train_batch_size=batch,
        max_steps=total_steps,
        learning_rate=1e-5,
        adaptive=adaptive,
        bf16=cuda,
        activation_checkpointing=case.checkpointing,
        logging_steps=total_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0 if opts.tiny else 4,
        use_cpu=opts.tiny and not case.zero2,
        seed=0,
        **extra,
    )
    pairs = toy_preference_dataset(num_pairs=batch * 4, size=resolution, seed=0, schema="trl")
    timer = StepTimer()
    peft_config = LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]) if case.lora else None
    started = time.perf_counter()
    trainer = AdaptiveDiffusionDPOTrainer(
        pipeline_factory(case.model), args=args, train_dataset=pairs, peft_config=peft_config, callbacks=[timer]
    )
    trainer.train()
    times = timer.times[opts.warmup :]
    step = statistics.median(times)
    annotators = 2 if adaptive else 0
    image_forwards = (3 if case.lora else 4) + annotators
    step_tflop = image_forwards * 2 * batch * forward_tflop
    peak_tflops = opts.peak_tflops
    result = {
        "case": case.name,
        "adaptive": adaptive,
        "pairs_per_step": batch,
        "resolution": resolution,
        "step_s": step,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "timed_steps": len(times),
        "pairs_per_s": batch / step,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "unet_tflop_per_step": step_tflop,
        "mfu": step_tflop / step / peak_tflops if peak_tflops else None,
        "case_wall_s": time.perf_counter() - started,
    }
    del trainer
    gc.collect()
    _reset_accelerate()
    return result


def _format(result: dict) -> str:
    if "error" in result:
        return f"| {result['case']} | {'on' if result['adaptive'] else 'off'} | {result['error']} | | | | | |"
    memory = f"{result['peak_memory_gib']:.1f}" if result["peak_memory_gib"] is not None else "n/a"
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
    return (
        f"| {result['case']} | {'on' if result['adaptive'] else 'off'} | {result['pairs_per_step']} "
        f"| {result['step_s']:.3f} | {result['pairs_per_s']:.2f} | {memory} | {result['unet_tflop_per_step']:.3g} | {mfu} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_configs", nargs="?", help="folder with sd15/ and sdxl/ model folders")
    parser.add_argument("--sd15", help="SD 1.5-architecture folder (default MODEL_CONFIGS/sd15)")
    parser.add_argument("--sdxl", help="SDXL-architecture folder (default MODEL_CONFIGS/sdxl)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny pipelines (no folder needed)")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="run only these cases")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 10; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --tiny)")
    parser.add_argument("--sd15-batch", type=int, default=4, help="pairs per step, SD 1.5 cases")
    parser.add_argument("--sdxl-batch", type=int, default=1, help="pairs per step, SDXL LoRA")
    parser.add_argument("--sdxl-full-batch", type=int, default=1, help="pairs per step, SDXL full fine-tune")
    parser.add_argument("--sdxl-full-optim", default="adafactor", help="optimizer of the SDXL full case (Trainer name)")
    parser.add_argument("--sd35", default=str(REPO / "benchmarks" / "model-configs" / "sd35-medium"),
                        help="SD3.5-architecture folder (default: the configs shipped in benchmarks/model-configs)")
    parser.add_argument("--flux", default=str(REPO / "benchmarks" / "model-configs" / "flux1-dev"),
                        help="Flux.1-architecture folder (default: the configs shipped in benchmarks/model-configs)")
    parser.add_argument("--flow-batch", type=int, default=1, help="pairs per step, SD3.5 and Flux LoRA")
    parser.add_argument("--tiny-resolution", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (default: by name)")
    parser.add_argument("--time-budget-min", type=float, default=8.0, help="skip cases that would start after this")
    parser.add_argument("--output-dir", default="/tmp/trl-adaptive-gpu-check")
    parser.add_argument("--json", help="also write the results to this JSON file")
    opts = parser.parse_args(argv)
    opts.steps = opts.steps if opts.steps is not None else (2 if opts.tiny else 10)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.tiny else 3)
    if opts.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
    elif not (opts.model_configs or (opts.sd15 and opts.sdxl)):
        parser.error("give MODEL_CONFIGS (a folder with sd15/ and sdxl/), or --sd15 and --sdxl, or --tiny")

    began = time.perf_counter()
    import torch

    from trl_adaptive.tiny import random_pipeline

    torch.set_flush_denormal(True)
    cuda = torch.cuda.is_available() and not opts.tiny
    if not opts.tiny and not cuda:
        parser.error("no CUDA device: the GPU check needs one (use --tiny for the CPU smoke test)")
    device = "cuda" if cuda else "cpu"
    if opts.peak_tflops is None and cuda:
        name = torch.cuda.get_device_name()
        opts.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    folders = {
        "sd15": opts.sd15 or (opts.model_configs and os.path.join(opts.model_configs, "sd15")),
        "sdxl": opts.sdxl or (opts.model_configs and os.path.join(opts.model_configs, "sdxl")),
        "sd35": opts.sd35,
        "flux": opts.flux,
    }

    def pipeline_factory(model: str):
        return build_tiny(model) if opts.tiny else random_pipeline(folders[model], device)

    cases = [c for c in CASES if not opts.cases or c.name in opts.cases]
    forward_tflop = {}
    for model in sorted({c.model for c in cases}):
        pipeline = pipeline_factory(model)
        resolution = opts.tiny_resolution if opts.tiny else RESOLUTIONS[model]
        forward_tflop[model] = unet_forward_tflop(pipeline, resolution, device, torch.bfloat16 if cuda else torch.float32)
        del pipeline

    card = torch.cuda.get_device_name() if cuda else "CPU (tiny smoke test)"
    print(f"# trl-adaptive GPU check: {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    for model, tflop in forward_tflop.items():
        reference = "" if opts.tiny else f" (reference {REFERENCE_UNET_TFLOP[model]:.2f})"
        print(f"# {model} denoiser forward, one image: {tflop:.4g} TFLOP measured with FlopCounterMode{reference}")
    print(f"# peak bf16 TFLOP/s used for MFU: {opts.peak_tflops or 'n/a'}; median of {opts.steps} steps after {opts.warmup}")
    print("| case | adaptive | pairs/step | step s (median) | pairs/s | peak GiB | UNet TFLOP/step | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    results = []
    # Cases without DeepSpeed first: the DeepSpeed case leaves a process group behind.
    for case in sorted(cases, key=lambda c: c.zero2):
        for adaptive in (False, True):
            elapsed_min = (time.perf_counter() - began) / 60
            if elapsed_min > opts.time_budget_min:
                result = {"case": case.name, "adaptive": adaptive, "error": f"skipped: {elapsed_min:.1f} min elapsed"}
            else:
                try:
                    result = run_case(case, adaptive, opts, pipeline_factory, forward_tflop[case.model])
                except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                    if "out of memory" not in str(err).lower():
                        raise
                    result = {"case": case.name, "adaptive": adaptive, "error": f"out of GPU memory ({str(err)[:80]})"}
                    gc.collect()
                    torch.cuda.empty_cache()
                    _reset_accelerate()
            results.append(result)
            print(_format(result), flush=True)
    total = time.perf_counter() - began
    print(f"# total wall time {total / 60:.1f} min")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"card": card, "forward_tflop": forward_tflop, "results": results}, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
