"""Step time of Diffusion-DPO and Adaptive-DPO: a reference loop against ours, in one run, on one model.

Cases (same pipeline weights, batch, resolution, dtype, optimizer and LoRA settings for all):

  a         a minimal loop doing the per-step work of diffusers' research script train_diffusion_dpo.py: VAE encode of
            both images, text encode, policy forward + backward, reference forward (no_grad), grad clipping, optimizer
            and LR-scheduler step. Written here from the script's structure; no caching (the script has none).
  b         ours, plain Diffusion-DPO (adaptive=False)
  c         ours, Adaptive-DPO with the exact metric (annotators every step)
  c/seq     as c+cache, but reference and annotators run one after another (batch_frozen_forwards=False; LoRA only)
  d         ours, amortised Adaptive-DPO (annotator_interval=--interval)
  f         ours, Diffusion-DPO + the minority filter on the training draw's own logits (no extra forward; the
            setting that docs/results.md tests as near-free robustness)
  X+cache   case X trained from the latent cache (VAE latents and text embeddings computed once, before timing)

What is timed: ours run through `AdaptiveDiffusionDPOTrainer.train()` (the real code path), one interval per optimizer
step from the Trainer's `on_step_begin` to the end of `on_step_end` (after the EMA annotator update), with a device
sync at both ends. Data loading (image decoding, collation) happens before `on_step_begin` and is excluded from every
case, including (a), which is fed the same pre-collated batches; moving the batch to the device is included everywhere.
The first --warmup steps are dropped. We print the median and the mean over the timed steps; ratios use medians,
except for (d), whose steps are not alike (one in --interval runs the annotators): its ratio uses means over a whole
number of intervals (--steps must be a multiple of --interval).

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on one extra training step of each case (matmuls,
convolutions and attention, forward and backward; elementwise work and the optimizer are not counted). MFU is printed
on a GPU whose peak is known; CPU peak memory is not tracked by torch, so it prints n/a there.

Examples:
  python benchmarks/step_time.py                                   # tiny architecture on CPU, LoRA, fp32
  python benchmarks/step_time.py --full --threads 1
  python benchmarks/step_time.py --arch-dir ../shared/model-configs/sd15 --lora --batch 8 --dtype bf16   # GPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from transformers import TrainerCallback  # noqa: E402

from trl_adaptive import AdaptiveDPOConfig, AdaptiveDiffusionDPOTrainer, family_for  # noqa: E402
from trl_adaptive.data import PreferenceCollator, detect_schema, prepare_preference_dataset  # noqa: E402
from trl_adaptive.tiny import random_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, toy_preference_dataset  # noqa: E402

#: Dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name substring, most specific first (vendor data sheets).
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    name: str
    description: str
    adaptive: bool = False
    interval: int = 1
    cached: bool = False
    batched: bool = True
    reference_loop: bool = False
    config_fields: dict = field(default_factory=dict)  # AdaptiveDPOConfig fields (minority-filter cases, levers)
    step_times: list[float] = field(default_factory=list)  # wall seconds of every step, all rounds
    step_cpu_times: list[float] = field(default_factory=list)  # process CPU seconds of the same steps
    round_values: list[float] = field(default_factory=list)  # per round: median (mean for amortised) of the clock
    setup_s: float = 0.0
    flops: float | None = None
    peak_bytes: int | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------


def meta_flops(folder: str, resolution: int | None) -> dict[str, float]:
    """FLOPs of one denoiser forward and one VAE encode per image and of the text encoders per prompt, counted on the
    meta device (shapes only: no weights, no compute), at the model's native resolution unless given. Flow-matching
    folders (a `transformer`, SD3 / Flux) go to `flow_meta_flops`."""
    with open(os.path.join(folder, "model_index.json")) as f:
        if "transformer" in json.load(f):
            return flow_meta_flops(folder, resolution)
    modules = random_pipeline(folder, "meta").components
    unet, vae = modules["unet"], modules["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = resolution or unet.config.sample_size * scale
    size = resolution // scale
    meta = dict(device="meta")
    hidden = torch.zeros(1, 77, unet.config.cross_attention_dim, **meta)
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and six time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled, **meta), "time_ids": torch.zeros(1, 6, **meta)}}
    with torch.no_grad():
        counts = {
            "resolution": resolution,
            "unet_forward": count_flops(lambda: unet(torch.zeros(1, unet.config.in_channels, size, size, **meta),
                                                     torch.tensor([500], **meta), hidden, **extra)),
            "vae_encode": count_flops(lambda: vae.encode(torch.zeros(1, 3, resolution, resolution, **meta))),
            "text_encoders": sum(
                count_flops(lambda m=m: m(torch.zeros(1, 77, dtype=torch.long, **meta)))
                for n, m in modules.items() if n.startswith("text_encoder")
            ),
        }
    counts["denoiser_forward"] = counts["unet_forward"]
    return counts


#: T5 tokens per prompt in training (the families' defaults: diffusers' SD3 and Flux scripts).
FLOW_TEXT_TOKENS = {"StableDiffusion3Pipeline": 77, "FluxPipeline": 512}


def flow_meta_flops(folder: str, resolution: int | None) -> dict[str, float]:
    """`meta_flops` of an SD3 / Flux folder (configs only; tokenizers are not needed): the transformer on its image
    tokens (SD3: 2x2 patches of the 16-channel latent; Flux: packed 2x2 patches) and its text tokens (77 CLIP + 77
    T5 for SD3, 512 T5 for Flux), the VAE encode, and every text encoder on its tokens. Default 1024 px."""
    import diffusers
    import transformers

    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    modules = {}
    with torch.device("meta"):
        for name, (library, class_name) in ((n, s) for n, s in index.items() if isinstance(s, list) and s[0]):
            if "Tokenizer" in class_name or "Scheduler" in class_name:
                continue
            path = os.path.join(folder, name)
            if library == "transformers":
                cls = getattr(transformers, class_name)
                modules[name] = cls._from_config(cls.config_class.from_pretrained(path))
            else:
                cls = getattr(diffusers, class_name)
                modules[name] = cls.from_config(cls.load_config(path))
    transformer, vae = modules["transformer"], modules["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = resolution or 1024
    side, meta = resolution // scale, dict(device="meta")
    t5_tokens = FLOW_TEXT_TOKENS[index["_class_name"]]
    config = transformer.config
    with torch.no_grad():
        if index["_class_name"] == "FluxPipeline":
            tokens = (side // 2) ** 2
            denoiser = count_flops(lambda: transformer(
                hidden_states=torch.zeros(1, tokens, config.in_channels, **meta), timestep=torch.tensor([0.5], **meta),
                guidance=torch.tensor([3.5], **meta) if config.guidance_embeds else None,
                pooled_projections=torch.zeros(1, config.pooled_projection_dim, **meta),
                encoder_hidden_states=torch.zeros(1, t5_tokens, config.joint_attention_dim, **meta),
                txt_ids=torch.zeros(t5_tokens, 3, **meta), img_ids=torch.zeros(tokens, 3, **meta)))
        else:
            denoiser = count_flops(lambda: transformer(
                hidden_states=torch.zeros(1, config.in_channels, side, side, **meta),
                timestep=torch.tensor([500.0], **meta),
                encoder_hidden_states=torch.zeros(1, 77 + t5_tokens, config.joint_attention_dim, **meta),
                pooled_projections=torch.zeros(1, config.pooled_projection_dim, **meta)))
        text = 0
        for name, module in modules.items():
            if name.startswith("text_encoder"):
                length = t5_tokens if module.__class__.__name__.startswith("T5") else 77
                text += count_flops(lambda m=module, n=length: m(torch.zeros(1, n, dtype=torch.long, **meta)))
        counts = {
            "resolution": resolution,
            "denoiser_forward": denoiser,
            "denoiser_parameters": sum(p.numel() for p in transformer.parameters()),
            "vae_encode": count_flops(lambda: vae.encode(torch.zeros(1, 3, resolution, resolution, **meta))),
            "text_encoders": text,
        }
    counts["unet_forward"] = counts["denoiser_forward"]
    return counts


def print_flop_arithmetic(folder: str, resolution: int | None, interval: int) -> None:
    """Expected per-pair FLOPs of every case from counted component FLOPs (backward = 2x forward for full
    fine-tuning, 1x with LoRA, where only activation gradients flow through the frozen weights)."""
    c = meta_flops(folder, resolution)
    unet, vae, text = c["denoiser_forward"], c["vae_encode"], c["text_encoders"]
    print(f"FLOPs counted on the meta device for {folder} at {c['resolution']} px (FlopCounterMode):")
    print(f"  denoiser forward {unet / 1e12:.3f} TFLOP/image, VAE encode {vae / 1e12:.3f} TFLOP/image, "
          f"text encoder(s) {text / 1e12:.4f} TFLOP/prompt")
    print("| mode | (a) ref loop | (b) plain | (b+cache) | (c) exact | (c+cache) | (d+cache) | c/b | (c+cache)/(b+cache) "
          "| (d+cache)/(b+cache) | a/(b+cache) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, units in (("LoRA", 6), ("full", 8)):
        plain = units * unet
        encode = 2 * vae + text
        annotators = 4 * unet
        a, b, bc = plain + encode, plain + encode, plain
        cc, dc = plain + annotators, plain + annotators / interval
        cells = [x / 1e12 for x in (a, b, bc, b + annotators, cc, dc)]
        print(f"| {mode} | " + " | ".join(f"{x:.2f}" for x in cells)
              + f" | {(b + annotators) / b:.3f} | {cc / bc:.3f} | {dc / bc:.3f} | {a / bc:.3f} |")
    print("(TFLOP per pair; d uses --interval; cached cases skip the VAE and text encoders)")


def default_resolution(pipeline) -> int:
    return pipeline.unet.config.sample_size * getattr(pipeline, "vae_scale_factor", 8)


def lora_config(rank: int, family):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(family.default_lora_target_modules))


# ----------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class Baton:
    """Runs the cases of a round in threads, one at a time, switching after every timed step: the cases interleave
    step by step and share the machine's load equally. A thread works (set-up, steps, FLOP counting) only while it
    holds the baton, so nothing of one case runs during another's timed step."""

    def __init__(self, names: list[str]):
        self.order, self.turn, self.cond = list(names), 0, threading.Condition()

    def wait_turn(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.order[self.turn] == name)

    def pass_on(self, name: str) -> None:
        with self.cond:
            self.turn = (self.order.index(name) + 1) % len(self.order)
            self.cond.notify_all()

    def next_step(self, name: str) -> None:
        self.pass_on(name)
        self.wait_turn(name)

    def finish(self, name: str) -> None:
        with self.cond:
            index = self.order.index(name)
            self.order.pop(index)
            self.turn = index % len(self.order) if self.order else 0
            self.cond.notify_all()


class StepTimer(TrainerCallback):
    """Seconds from each optimizer step's `on_step_begin` to its `on_step_end`; registered last, so the EMA annotator
    update (an earlier `on_step_end` callback) is inside the interval."""

    def __init__(self, case: Case, device: torch.device, baton: Baton | None = None):
        self.case, self.device, self.start, self.baton = case, device, None, baton

    def on_train_begin(self, args, state, control, **kwargs):
        reset_peak(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self.start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.case.step_times.append(time.perf_counter() - self.start[0])
        self.case.step_cpu_times.append(time.process_time() - self.start[1])
        if self.baton is not None:
            self.baton.next_step(self.case.name)

    def on_train_end(self, args, state, control, **kwargs):
        peak = read_peak(self.device)
        self.case.peak_bytes = None if peak is None else max(peak, self.case.peak_bytes or 0)


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------------
# (a) the reference loop
# ----------------------------------------------------------------------------------------------------------


def reference_loop_phases(case: Case, template, batches, opts, device, weight_dtype, count: bool = True, baton=None):
    """Per-step work of diffusers' train_diffusion_dpo.py, written minimally: nothing cached, VAE and text encoder at
    every step, the policy forward before the reference forward, as the script does.

    A generator of three phases (set-up, timed steps, FLOP counting and clean-up), so that `--interleave` can set up
    every case before any trains."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from torch.nn import functional as F
    started = time.perf_counter()
    pipe = copy.deepcopy(template)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for encoder in (text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            encoder.requires_grad_(False).to(device, weight_dtype)
    # The SDXL script keeps its VAE in float32 (it overflows in float16), as its config's force_upcast says.
    vae.requires_grad_(False).to(device, torch.float32 if vae.config.get("force_upcast", False) and sdxl else weight_dtype)
    reference = None
    if opts.lora:
        unet.requires_grad_(False).to(device, weight_dtype)
        unet.add_adapter(lora_config(opts.rank, family_for(pipe)))
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.requires_grad_(True).to(device)
        reference = copy.deepcopy(unet).requires_grad_(False).to(weight_dtype)
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    # The same optimizer class and settings as the Trainer's default, so only the per-step work differs.
    optimizer_cls, optimizer_kwargs = opts.optimizer_spec
    optimizer = optimizer_cls(params, **optimizer_kwargs)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    unet.train()

    def encode_text(batch, pairs: int) -> dict:
        """Denoiser text conditioning for the 2B images (SD: CLIP last hidden state; SDXL: both encoders' penultimate
        states, pooled embedding and fixed size/crop time ids, as the SDXL script)."""
        with torch.no_grad():
            if not sdxl:
                return {"encoder_hidden_states": text_encoder(batch["input_ids"].to(device))[0].repeat(2, 1, 1)}
            hidden, _, pooled, _ = pipe.encode_prompt(
                batch["prompts"], device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        size = opts.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=hidden.dtype).repeat(2 * pairs, 1)
        return {
            "encoder_hidden_states": hidden.repeat(2, 1, 1),
            "added_cond_kwargs": {"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids},
        }

    def step(batch):
        pixels = torch.cat([batch["pixel_values_chosen"], batch["pixel_values_rejected"]]).to(device, vae.dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        latents = latents.to(weight_dtype)
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0] // 2,), device=device)
        timesteps = timesteps.repeat(2)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        conditioning = encode_text(batch, latents.shape[0] // 2)
        with autocast:
            prediction = unet(noisy, timesteps, **conditioning).sample
        model_losses = (prediction.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        model_diff = model_losses.chunk(2)[0] - model_losses.chunk(2)[1]
        with torch.no_grad(), autocast:
            if reference is None:
                unet.disable_adapters()
                ref_prediction = unet(noisy, timesteps, **conditioning).sample
                unet.enable_adapters()
            else:
                ref_prediction = reference(noisy, timesteps, **conditioning).sample
        ref_losses = (ref_prediction.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        ref_diff = ref_losses.chunk(2)[0] - ref_losses.chunk(2)[1]
        loss = -F.logsigmoid(-opts.beta * (model_diff - ref_diff)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()  # the script logs the loss every step

    if count:
        case.setup_s = time.perf_counter() - started
    yield
    use_tf32(opts.default_tf32)  # the same TF32 setting as our default
    reset_peak(device)
    for i in range(opts.warmup + opts.steps):
        batch = batches[i % len(batches)]
        sync(device)
        start = (time.perf_counter(), time.process_time())
        step(batch)
        sync(device)
        case.step_times.append(time.perf_counter() - start[0])
        case.step_cpu_times.append(time.process_time() - start[1])
        if baton is not None:
            baton.next_step(case.name)
    peak = read_peak(device)
    case.peak_bytes = None if peak is None else max(peak, case.peak_bytes or 0)
    yield
    if not count:
        pipe = unet = vae = text_encoder = reference = optimizer = None  # free them (the closures share these cells)
        free(device)
        return

    def counted_step():  # FLOPs of forward + backward (the optimizer's elementwise work is not counted)
        step(batches[0])

    case.flops = count_flops(counted_step)
    with torch.no_grad():  # FLOPs of one UNet forward on one image, for the arithmetic of the targets
        size = opts.resolution // 2 ** (len(vae.config.block_out_channels) - 1)  # the latents of a training image
        latents = torch.zeros(1, unet.config.in_channels, size, size, device=device, dtype=weight_dtype)
        conditioning = {  # first image of the first batch
            k: (v[:1] if torch.is_tensor(v) else {kk: vv[:1] for kk, vv in v.items()})
            for k, v in encode_text(batches[0], 1).items()
        }
        with autocast:
            case.extra["unet_forward_flops_per_image"] = count_flops(
                lambda: unet(latents, torch.tensor([500], device=device), **conditioning)
            )
    pipe = unet = vae = text_encoder = reference = optimizer = None  # free them (the closures share these cells)
    free(device)


# ----------------------------------------------------------------------------------------------------------
# (b, c, d) ours, through the trainer
# ----------------------------------------------------------------------------------------------------------


def make_args(opts, output_dir: str, case: Case) -> AdaptiveDPOConfig:
    weight_dtype = opts.dtype
    fields = dict(
        output_dir=output_dir,
        resolution=opts.resolution,
        per_device_train_batch_size=opts.batch,
        max_steps=opts.warmup + opts.steps,
        beta=opts.beta,
        adaptive=case.adaptive,
        annotator_interval=case.interval,
        batch_frozen_forwards=case.batched,
        cache_dir=opts.cache_dir if case.cached else None,
        bf16=weight_dtype == "bf16",
        fp16=weight_dtype == "fp16",
        use_cpu=opts.device.type == "cpu",
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
        activation_checkpointing=opts.gradient_checkpointing,
    )
    return AdaptiveDPOConfig(**{**fields, **case.config_fields})  # a lever may override any of these


def ours_phases(case: Case, template, dataset, opts, device, count: bool = True, baton=None):
    """Our trainer on one case, as a generator of three phases like `reference_loop_phases`."""
    started = time.perf_counter()
    pipe = copy.deepcopy(template)
    output_dir = tempfile.mkdtemp(prefix="step-time-")
    peft_config = lora_config(opts.rank, family_for(pipe)) if opts.lora else None
    trainer = AdaptiveDiffusionDPOTrainer(
        pipe, args=make_args(opts, output_dir, case), train_dataset=dataset, peft_config=peft_config,
        callbacks=[StepTimer(case, device, baton)],
    )
    if count:
        case.setup_s = time.perf_counter() - started  # includes building the latent cache, the first time
    annotators = getattr(trainer.robustness.get("adaptive"), "annotators", None)
    if annotators is not None:
        state = sum(t.numel() * t.element_size() for shadow in annotators.shadows for t in shadow.values())
        trainable = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
        case.extra.update(annotator_state_bytes=state, trainable_param_bytes=trainable)
    yield
    use_tf32(trainer.args.tf32)
    trainer.train()
    yield
    if not count:
        del trainer, pipe
        shutil.rmtree(output_dir, ignore_errors=True)
        free(device)
        return

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model

    def counted_step(global_step: int) -> float:
        trainer.state.global_step = global_step  # decides whether the annotators run on an amortised step
        flops = count_flops(lambda: trainer.training_step(model, batch))
        model.zero_grad(set_to_none=True)
        return flops

    if case.interval > 1:  # one refresh step and interval - 1 cheap steps per interval
        refresh, cheap = counted_step(0), counted_step(1)
        case.flops = (refresh + (case.interval - 1) * cheap) / case.interval
    else:
        case.flops = counted_step(0)
    trainer = model = pipe = batch = None  # free them (counted_step's closure shares these cells)
    shutil.rmtree(output_dir, ignore_errors=True)
    free(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def per_round(values: list[float], opts, amortised: bool) -> list[float]:
    """Median (mean for amortised cases) of the timed steps of each round."""
    per = opts.warmup + opts.steps
    rounds = [values[i + opts.warmup : i + per] for i in range(0, len(values), per)]
    return [statistics.fmean(r) if amortised else statistics.median(r) for r in rounds if r]


def summarise(case: Case, opts) -> dict:
    amortised = case.interval > 1
    per = opts.warmup + opts.steps
    timed_wall = [t for i, t in enumerate(case.step_times) if i % per >= opts.warmup]
    timed_cpu = [t for i, t in enumerate(case.step_cpu_times) if i % per >= opts.warmup]
    clock = case.step_cpu_times if opts.clock == "cpu" else case.step_times
    rounds = per_round(clock, opts, amortised)
    round_means = per_round(clock, opts, True)
    seconds = statistics.median(rounds)
    return {
        "case": case.name,
        "description": case.description,
        "median_wall_s": statistics.median(timed_wall),
        "mean_wall_s": statistics.fmean(timed_wall),
        "median_cpu_s": statistics.median(timed_cpu),
        "mean_cpu_s": statistics.fmean(timed_cpu),
        "round_values": rounds,
        "round_means": round_means,
        "seconds_used": seconds,
        "pairs_per_s": opts.batch / seconds,
        "flops_per_step": case.flops,
        "achieved_flops": case.flops / seconds if case.flops else None,
        "peak_bytes": case.peak_bytes,
        "setup_s": case.setup_s,
        "num_timed_steps": len(timed_wall),
        "step_wall_s": timed_wall,  # every timed step, rounds one after another (for paired ratios)
        "step_cpu_s": timed_cpu,
        **case.extra,
    }


def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def round_ratio(results: dict, num: str, den: str, key: str = "round_values") -> float:
    """Median over rounds of the per-round ratio (within a round, cases run side by side or minutes apart)."""
    return statistics.median(n / d for n, d in zip(results[num][key], results[den][key]))


def print_report(results: dict[str, dict], opts, device) -> None:
    peak = device_peak_flops(device, opts.dtype_name)
    clock = "process CPU time" if opts.clock == "cpu" else "wall time"
    print(f"\nSeconds per optimizer step. 'used' = {clock}: median over rounds of each round's median (mean for amortised).")
    print("| case | what | wall median | wall mean | cpu median | used | pairs/s | x (b) | FLOP/step | FLOP x (b) | TFLOP/s | MFU | peak mem | setup s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = round_ratio(results, name, "b") if "b" in results else float("nan")
        base_flops = results["b"]["flops_per_step"] if "b" in results else None
        flop_ratio = r["flops_per_step"] / base_flops if base_flops and r["flops_per_step"] else float("nan")
        tflops = (r["achieved_flops"] or 0) / 1e12
        mfu = f"{r['achieved_flops'] / peak:.1%}" if peak and r["achieved_flops"] else "n/a"
        print(
            f"| {name} | {r['description']} | {r['median_wall_s']:.4f} | {r['mean_wall_s']:.4f} | {r['median_cpu_s']:.4f} | "
            f"{r['seconds_used']:.4f} | {r['pairs_per_s']:.2f} | {ratio:.3f} | {r['flops_per_step']:.3e} | {flop_ratio:.3f} | "
            f"{tflops:.3f} | {mfu} | {fmt_bytes(r['peak_bytes'])} | {r['setup_s']:.1f} |"
        )
    print()
    if "a" in results and "unet_forward_flops_per_image" in results["a"]:
        per_image = results["a"]["unet_forward_flops_per_image"]
        print(f"UNet forward: {per_image / 1e12:.4f} TFLOP per image (FlopCounterMode)")
    units = (6, 4) if opts.lora else (8, 4)  # image-forwards per pair: plain DPO, two exact annotators
    print(
        f"Arithmetic of the targets ({'LoRA' if opts.lora else 'full'}): plain DPO = {units[0]} UNet image-forwards per "
        f"pair, two annotators add {units[1]}: exact/plain >= {(units[0] + units[1]) / units[0]:.3f} by UNet FLOPs"
    )

    def line(label, num, den, target=None, key="round_values"):
        if num not in results or den not in results:
            return
        measured = round_ratio(results, num, den, key)
        flops = results[num]["flops_per_step"] / results[den]["flops_per_step"]
        verdict = ""
        if target == "flops":
            deviation = measured / flops - 1  # below 0: the annotators cost less time than their share of FLOPs
            verdict = f"  [{deviation:+.1%} from the FLOP ratio: {'within' if abs(deviation) <= 0.10 else 'NOT within'} 10%]"
        elif target is not None:
            verdict = f"  [target <= {target}: {'met' if measured <= target else 'MISSED'}]"
        print(f"{label}: measured {measured:.3f}, counted-FLOP ratio {flops:.3f}{verdict}")

    line("(c)/(b) exact / plain", "c", "b", target="flops")
    line("(c+cache)/(b+cache)", "c+cache", "b+cache", target="flops")
    line("(c/seq)/(b+cache), sequential annotators", "c/seq", "b+cache", target="flops")
    line("(c/seq)/(c+cache), sequential / batched annotators", "c/seq", "c+cache")
    # Amortised steps are not alike: compare mean step times on both sides (a mean against a median is biased up).
    line("(d)/(b) amortised / plain (means)", "d", "b", target=1.05, key="round_means")
    line("(d+cache)/(b+cache) (means)", "d+cache", "b+cache", target=1.05, key="round_means")
    line("(d/seq)/(d+cache), sequential / batched annotators (means)", "d/seq", "d+cache", key="round_means")
    line("(f)/(b) minority filter on training-draw evidence / plain", "f", "b", target=1.05)
    line("(f+cache)/(b+cache)", "f+cache", "b+cache", target=1.05)
    line("(p)/(b) contrast filter, training-draw votes / plain", "p", "b")
    line("(p+cache)/(b+cache)", "p+cache", "b+cache")
    line("(p2)/(b) contrast filter, 2 extra draws / plain", "p2", "b")
    for name in results:  # the levers: each case '<base>[FIELD=VALUE]' against its base
        base = name.split("[")[0]
        if "[" in name and base in results:
            speedup = 1.0 / round_ratio(results, name, base)
            print(f"lever {name[len(base):]}: {speedup:.3f}x the pairs/s of ({base}) "
                  f"({'faster' if speedup > 1 else 'slower'}; {clock}, median over rounds)")
    if "a" in results and "b" in results and opts.interleave:
        # Side by side, step i of (a) and step i of (b) ran next to each other under the same load: their ratios,
        # step by step, are less noisy than the ratio of medians.
        key = "step_cpu_s" if opts.clock == "cpu" else "step_wall_s"
        paired = [b / a for a, b in zip(results["a"][key], results["b"][key])]
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        print(f"(b)/(a) step by step ({clock}, {len(paired)} paired steps): median {statistics.median(paired):.3f}, "
              f"quartiles {q[0]:.3f}-{q[-1]:.3f} [target <= 1.02 on CPU: "
              f"{'met' if statistics.median(paired) <= 1.02 else 'MISSED'}]")
    if "a" in results:
        for name in ("b", "b+cache", "c+cache", "d+cache"):
            if name in results:
                speedup = 1.0 / round_ratio(results, name, "a")
                flops = results["a"]["flops_per_step"] / results[name]["flops_per_step"]
                print(f"pairs/s of {name} / reference loop (a): {speedup:.2f}x (FLOP ratio a/{name} {flops:.2f}; GPU target for cached >= 1.5x)")
    for name, r in results.items():
        if "annotator_state_bytes" in r:
            print(
                f"annotator state ({name}): {r['annotator_state_bytes']:,} bytes = "
                f"{r['annotator_state_bytes'] / r['trainable_param_bytes']:.2f} x the trainable parameters "
                f"({r['trainable_param_bytes']:,} bytes)"
            )
            break
    if device.type != "cuda":
        print(f"peak memory: n/a on CPU (torch keeps no CPU peak); process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"load average (1 min) during the run: {opts.load_before} at start, {os.getloadavg()[0]:.2f} at end")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "tiny-sdxl"], default="tiny", help="built-in CPU-sized architecture")
    parser.add_argument("--arch-dir", help="model folder with configs (e.g. ../shared/model-configs/sd15): random weights")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=True, help="train LoRA adapters (default)")
    mode.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per case (a multiple of --interval)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--interval", type=int, default=16, help="annotator_interval of the amortised case (d)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="training dtype (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--resolution", type=int, help="image size (default: tiny 64, else the model's native size)")
    parser.add_argument("--beta", type=float, default=2500.0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in backward (all cases)")
    parser.add_argument("--cases", default="a,b,b+cache,c,c+cache,c/seq,d,d+cache,f,p", help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--interleave", action=argparse.BooleanOptionalAction, default=None,
        help="run the cases of a round side by side, one step of each in turn (default: on CPU; off on GPU, where all "
        "models of a round would have to fit in memory together)",
    )
    parser.add_argument("--rounds", type=int, help="run every case this many times, alternating the order (default: 3 on CPU, 1 on GPU)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"],
        help="what the ratios use: wall time, or process CPU time (default: wall on GPU, cpu on CPU, where a shared "
        "machine's load inflates wall time; CPU time is only meaningful with --threads 1)",
    )
    parser.add_argument(
        "--levers", default="",
        help="comma-separated AdaptiveDPOConfig overrides FIELD=VALUE (Python literals), each timed as an extra case "
        "'<base>[FIELD=VALUE]' beside --lever-base, e.g. torch_compile=True,channels_last=False,optim='adamw_torch'",
    )
    parser.add_argument("--lever-base", default="b", help="the case the --levers vary (default b)")
    parser.add_argument(
        "--batches", default="",
        help="comma-separated pairs per step to sweep (ascending): every case runs at each size (one round each); the "
        "first size that runs out of GPU memory ends the sweep, and the size with the most pairs/s is reported",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--flops-only", action="store_true",
        help="with --arch-dir: only count FLOPs on the meta device (no weights, runs anywhere in seconds) and print the "
        "FLOP ratios every case should show on a GPU",
    )
    opts = parser.parse_args(argv)
    if opts.steps < 10:
        print(f"warning: --steps {opts.steps} < 10: medians are not meaningful (use this only for smoke tests)")
    if opts.steps % opts.interval:
        parser.error(f"--steps ({opts.steps}) must be a multiple of --interval ({opts.interval}) so (d) covers whole intervals")
    return opts


#: (f): the minority filter on the training draw's own logits (no extra forward), active from the first step.
POLICY_FILTER = dict(minority_filter="top_fraction", minority_evidence="wrong_sign", minority_evidence_decay=0.8)
#: (p): the minority filter on the reference's prompt-contrast votes (one extra reference forward per step, and two
#: per extra draw in p2), active from the first step; min_noise 0 so every step votes.
CONTRAST_FILTER = dict(minority_filter="threshold", minority_evidence="prompt_contrast", minority_evidence_decay=0.0,
                       minority_evidence_min_noise=0.0, minority_filter_min_visits=1)


def build_cases(opts) -> list[Case]:
    n = opts.interval
    catalogue = {
        "a": Case("a", "reference loop (research-script work)", reference_loop=True),
        "b": Case("b", "ours, Diffusion-DPO"),
        "b+cache": Case("b+cache", "ours, Diffusion-DPO, cached", cached=True),
        "c": Case("c", "ours, Adaptive-DPO exact", adaptive=True),
        "c+cache": Case("c+cache", "ours, Adaptive-DPO exact, cached", adaptive=True, cached=True),
        "c/seq": Case("c/seq", "c+cache, sequential annotators", adaptive=True, cached=True, batched=False),
        "d": Case("d", f"ours, amortised (interval {n})", adaptive=True, interval=n),
        "d+cache": Case("d+cache", f"ours, amortised (interval {n}), cached", adaptive=True, interval=n, cached=True),
        "d/seq": Case("d/seq", "d+cache, sequential annotators", adaptive=True, interval=n, cached=True, batched=False),
        "f": Case("f", "ours, DPO + minority filter (training-draw evidence)", config_fields=POLICY_FILTER),
        "f+cache": Case("f+cache", "ours, DPO + minority filter, cached", config_fields=POLICY_FILTER, cached=True),
        "p": Case("p", "ours, DPO + contrast filter (training-draw votes)", config_fields=CONTRAST_FILTER),
        "p+cache": Case("p+cache", "ours, DPO + contrast filter, cached", config_fields=CONTRAST_FILTER, cached=True),
        "p2": Case("p2", "ours, DPO + contrast filter, 2 extra draws",
                   config_fields=dict(CONTRAST_FILTER, minority_evidence_draws=2)),
    }
    names = [c.strip() for c in opts.cases.split(",") if c.strip()]
    unknown = [c for c in names + [opts.lever_base] if c not in catalogue]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(catalogue)}")
    if not opts.lora:
        names = [c for c in names if not c.endswith("/seq")]  # batching applies to LoRA annotators only
    cases = [catalogue[c] for c in names]
    base = catalogue[opts.lever_base]
    for spec, fields in parse_levers(opts.levers):
        cases.append(Case(f"{base.name}[{spec}]", f"{base.description}, {spec}", adaptive=base.adaptive,
                          interval=base.interval, cached=base.cached, batched=base.batched,
                          config_fields={**base.config_fields, **fields}))
    return cases


def parse_levers(text: str) -> list[tuple[str, dict]]:
    """'a=1,b=x' -> [('a=1', {'a': 1}), ('b=x', {'b': 'x'})] (values as Python literals, else strings)."""
    import ast

    levers = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        name, _, value = spec.partition("=")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        levers.append((spec, {name.strip(): parsed}))
    return levers


def use_tf32(enabled: bool | None) -> None:
    """Set the process-wide TF32 flags (each case's own: a config with `tf32` set changes them for every later case)."""
    if enabled is not None and torch.cuda.is_available():
        from transformers.utils.import_utils import enable_tf32

        enable_tf32(bool(enabled))


def main(argv=None) -> dict[str, dict]:
    opts = parse_args(argv)
    if opts.flops_only:
        if not opts.arch_dir:
            raise SystemExit("--flops-only needs --arch-dir")
        print_flop_arithmetic(opts.arch_dir, opts.resolution, opts.interval)
        return {}
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals make CPU steps erratically slow at high beta
    opts.device = device
    opts.rounds = opts.rounds or (1 if device.type == "cuda" else 3)
    opts.interleave = device.type == "cpu" if opts.interleave is None else opts.interleave
    opts.clock = opts.clock or ("wall" if device.type == "cuda" else "cpu")
    opts.load_before = f"{os.getloadavg()[0]:.2f}"
    opts.dtype_name = opts.dtype or ("bf16" if device.type == "cuda" else "fp32")
    opts.dtype = opts.dtype_name
    weight_dtype = DTYPES[opts.dtype_name]
    # Recorded in the JSON for benchmarks/gpu_summary.py.
    opts.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    opts.peak_flops, opts.torch_version = device_peak_flops(device, opts.dtype_name), torch.__version__

    if opts.arch_dir:
        template = random_pipeline(opts.arch_dir, seed=0)
    elif opts.arch == "tiny-sdxl":
        template = tiny_sdxl_pipeline(seed=0, resolution=64)
    else:
        template = tiny_sd_pipeline(seed=0, resolution=64)
    opts.resolution = opts.resolution or (default_resolution(template) if opts.arch_dir else 64)
    if opts.arch_dir is None:  # the tiny VAE downsamples by 4: keep the UNet's sample size consistent
        template.unet.register_to_config(sample_size=opts.resolution // 4)
    opts.cache_root = tempfile.mkdtemp(prefix="step-time-cache-")
    sizes = [int(b) for b in opts.batches.split(",") if b.strip()] or [opts.batch]
    sweep, results = {}, {}
    for size in sizes:
        opts.batch = size
        try:
            results = run_cases(opts, template, device, weight_dtype)
        except torch.OutOfMemoryError as error:  # the sweep's end: this size does not fit
            print(f"batch {size}: out of GPU memory ({str(error).splitlines()[0][:120]})")
            sweep[size] = {"out_of_memory": True}
            break
        sweep[size] = results
    free(device)
    shutil.rmtree(opts.cache_root, ignore_errors=True)
    if len(sizes) > 1:
        print_sweep(sweep, opts, device)
    if opts.json:
        payload = {"settings": {k: str(v) for k, v in vars(opts).items()}, "results": results}
        if len(sizes) > 1:
            payload["sweep"] = {str(k): v for k, v in sweep.items()}
        with open(opts.json, "w") as f:
            json.dump(payload, f, indent=1)
    return results


def run_cases(opts, template, device, weight_dtype) -> dict[str, dict]:
    """Every case at `opts.batch` pairs per step: set-up, rounds, report."""
    num_pairs = max(4 * opts.batch, 16)
    dataset, _ = prepare_preference_dataset(toy_preference_dataset(num_pairs=num_pairs, size=opts.resolution, seed=0))
    opts.cache_dir = tempfile.mkdtemp(dir=opts.cache_root)
    arch = opts.arch_dir or f"{opts.arch} ({opts.resolution}px)"
    print(
        f"step_time: arch={arch} mode={'LoRA r=' + str(opts.rank) if opts.lora else 'full'} batch={opts.batch} pairs "
        f"dtype={opts.dtype_name} device={torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'} "
        f"threads={torch.get_num_threads()} steps={opts.steps} warmup={opts.warmup} interval={opts.interval} "
        f"rounds={opts.rounds} interleave={opts.interleave} clock={opts.clock} "
        f"torch={torch.__version__}"
    )
    cases = build_cases(opts)
    # Made once, here: creating TrainingArguments resets accelerate's global state, which must not happen mid-round.
    from transformers import Trainer

    defaults = make_args(opts, tempfile.gettempdir(), Case("a", ""))
    opts.optimizer_spec, opts.default_tf32 = Trainer.get_optimizer_cls_and_kwargs(defaults), defaults.tf32
    batches = None
    if any(c.reference_loop for c in cases):
        collator = PreferenceCollator(detect_schema(dataset.column_names), opts.resolution)
        tokenizer = template.tokenizer
        batches = []
        for start in range(0, len(dataset) - opts.batch + 1, opts.batch):
            batch = collator([dataset[i] for i in range(start, start + opts.batch)])
            batch["input_ids"] = tokenizer(  # the script tokenizes in its data pipeline, outside the step
                batch["prompts"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            batches.append(batch)

    def phases(case, round_index, baton=None):
        if case.reference_loop:
            return reference_loop_phases(case, template, batches, opts, device, weight_dtype, round_index == 0, baton)
        return ours_phases(case, template, dataset, opts, device, round_index == 0, baton)

    for round_index in range(opts.rounds):
        order = cases if round_index % 2 == 0 else cases[::-1]  # alternate, so slow drifts of load cancel
        print(f"  round {round_index + 1}/{opts.rounds}: {', '.join(c.name for c in order)}", flush=True)
        if not opts.interleave:
            for case in order:
                for _ in phases(case, round_index):
                    pass
            continue
        # Set up every case first (a Trainer's construction resets accelerate's global state, which must not happen
        # under a training one), then train them side by side, one step each in turn, then count and clean up.
        baton, errors = Baton([c.name for c in order]), []
        runners = [phases(case, round_index, baton) for case in order]
        for runner in runners:
            next(runner)

        def train(case, runner, baton=baton):
            try:
                baton.wait_turn(case.name)
                next(runner)
            except BaseException as error:  # re-raised below, after the other threads finish
                errors.append(error)
            finally:
                baton.finish(case.name)

        threads = [threading.Thread(target=train, args=(case, runner)) for case, runner in zip(order, runners)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for runner in runners:
            next(runner, None)
    results = {case.name: summarise(case, opts) for case in cases}
    print_report(results, opts, device)
    return results


def print_sweep(sweep: dict, opts, device) -> None:
    """Pairs/s of every case at each batch size, and the size with the most pairs/s that fit in memory."""
    peak = device_peak_flops(device, opts.dtype_name)
    names = sorted({name for r in sweep.values() if "out_of_memory" not in r for name in r})
    print("\nBatch sweep (pairs per step; MFU against the card's dense bf16 peak):")
    print("| case | " + " | ".join(f"batch {b}" for b in sweep) + " | best |")
    print("|---|" + "---|" * (len(sweep) + 1))
    for name in names:
        cells, best = [], None
        for size, r in sweep.items():
            if "out_of_memory" in r:
                cells.append("out of memory")
                continue
            x = r.get(name)
            mfu = f", MFU {x['achieved_flops'] / peak:.1%}" if peak and x and x["achieved_flops"] else ""
            cells.append(f"{x['pairs_per_s']:.2f} pairs/s{mfu}, {fmt_bytes(x['peak_bytes'])}" if x else "-")
            if x and (best is None or x["pairs_per_s"] > best[1]):
                best = (size, x["pairs_per_s"])
        print(f"| {name} | " + " | ".join(cells) + f" | {'batch %d' % best[0] if best else '-'} |")


if __name__ == "__main__":
    main()
