"""`AdaptiveDPOConfig`: every option of Diffusion-DPO / Adaptive-DPO training, on top of `TrainingArguments`."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch

from transformers import TrainingArguments

from . import _checks
from .families.flow_matching import TIMESTEP_DENSITIES
from .losses import DEFAULT_MISRANKED_WEIGHT, PREFERENCE_LOSSES
from .robustness import validate_config as validate_robustness_options

LATENT_SAMPLING = ("sample", "mean")
#: Most data-loading workers `dataloader_num_workers=-1` starts per process (decoding and resizing two 512-1024 px
#: JPEGs per pair keeps a few cores busy per GPU; more only costs memory).
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or a job scheduler's share), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def data_workers(requested: int, on_gpu: bool, cpus: int | None = None, local_processes: int | None = None) -> int:
    """`dataloader_num_workers` for this machine: -1 sizes it (see the field's help), a larger number than the CPUs per
    local process is lowered to that number, with a warning."""
    cpus = available_cpus() if cpus is None else cpus
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_processes is None else local_processes
    per_process = max(cpus // max(local_processes, 1), 1)
    if requested == -1:
        return min(MAX_AUTO_WORKERS, per_process - 1) if on_gpu else 0
    if requested > per_process:
        warnings.warn(
            f"dataloader_num_workers={requested} but this process has {per_process} CPU(s) ({cpus} available, "
            f"{local_processes} local process(es)): using {per_process} workers (-1 sizes it to the machine)",
            UserWarning,
            stacklevel=4,  # the caller of AdaptiveDPOConfig(...)
        )
        return per_process
    return requested


def _cuda_training(args) -> bool:
    return torch.cuda.is_available() and not args.use_cpu


def _tf32_supported() -> bool:
    from transformers.utils import is_torch_tf32_available

    return is_torch_tf32_available()


@dataclass
class AdaptiveDPOConfig(TrainingArguments):
    r"""Configuration of [`AdaptiveDiffusionDPOTrainer`].

    Loss convention: ``-log sigmoid(beta * l)`` with ``l = (r_w - r_l) - (m_w - m_l)`` and **no 0.5 factor**, as in
    the diffusers research script and the Adaptive-DPO authors' code. ``beta=2500`` here is the same objective as
    ``beta=5000`` in the original Diffusion-DPO code, which uses ``-log sigmoid(0.5 * beta * l)``.

    Every field below has help text (``--help`` on the CLI shows it); defaults name their source.
    """

    # ---- Diffusion-DPO ---------------------------------------------------------------------------------
    beta: float = field(
        default=2500.0,
        metadata={
            "help": "Diffusion-DPO strength in `-log sigmoid(beta * l)` (no 0.5 factor). Default 2500 from the diffusers "
            "research script and the Adaptive-DPO code; equals 5000 in the original Diffusion-DPO code. What matters is "
            "beta * |l| (logged as rewards/margins_abs), which depends on the model: near 1 the loss is logistic; in the "
            "tens it acts like a hinge, and flipped labels do far more harm (docs/results.md, 'The beta regime')."
        },
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "Preference loss of z = beta * l - gamma: `sigmoid` (Diffusion-DPO; cDPO with label_smoothing > 0), "
            "`ipo` ((z - 1/2)^2 / beta^2, TRL's IPO), `robust` (Robust DPO, Chowdhury et al. 2024), `hinge` (relu(1 - z)), "
            "`capped_sigmoid` (-log sigmoid(z) for z >= 0, log 2 - misranked_weight * z below: this library's loss for "
            "minority labels, docs/method.md)."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Assumed label-flip rate eps in [0, 0.5) for `sigmoid` (cDPO) and `robust`; 0 disables (TRL's default)."
        },
    )
    misranked_weight: float | None = field(
        default=None,
        metadata={
            "help": "For loss_type='capped_sigmoid' only: the fixed gradient weight of a pair ranked against its label "
            "(z < 0), where -log sigmoid gives sigmoid(-z), up to 1. In (0, 1]; 0.5 is the logistic loss continued "
            "by its tangent; smaller values let a minority of flipped pairs hold learning back less. None: 0.2, "
            "chosen on validation seeds of the digits benchmark (docs/results.md)."
        },
    )
    # ---- Adaptive-DPO ------------------------------------------------------------------------------------
    adaptive: bool = field(
        default=True,
        metadata={"help": "Use the Adaptive-DPO minority metric (weights and margin). False gives plain Diffusion-DPO."},
    )
    annotator_decays: list[float] = field(
        default_factory=lambda: [0.9999, 0.5],
        metadata={
            "help": "EMA decays of the extra annotators (the current model is always annotator 0). The authors used "
            "0.9999 and 0.5. Each decay is warmed up as min(decay, (1 + n) / (10 + n)) after n updates."
        },
    )
    annotator_interval: int = field(
        default=1,
        metadata={
            "help": "Run the EMA annotators every N optimizer steps. 1 (default) is the paper's exact metric at every "
            "step. With N > 1 (amortised mode) the steps between refreshes take each pair's mean score over its "
            "earlier scored visits (0, i.e. weight 1/c, for a pair not scored yet), so annotators cost ~1/N."
        },
    )
    metric_rho: float = field(
        default=3.75,
        metadata={
            "help": "Scale of the logits inside the minority metric. Default 3.75 with metric_normalize=`rms` equals the "
            "authors' README setting (rho 15 with L2 normalisation over a 16-pair micro-batch: 15 / sqrt(16))."
        },
    )
    metric_normalize: str = field(
        default="rms",
        metadata={
            "help": "`rms`: divide each annotator's logits by their root mean square over the global batch before "
            "scaling (batch-size-free form of the authors' L2 normalisation); `none`: raw logits (then rho must "
            "match the logit scale, ~1e3-1e4)."
        },
    )
    metric_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps of plain Diffusion-DPO before the metric is used (u = 0 until then). Counted in "
            "global steps, not per epoch (the authors' code restarts the count each epoch)."
        },
    )
    weight_fn: str = field(
        default="linear",
        metadata={
            "help": "Pair weight W(u), detached: `none` (1), `linear` 1/(k u + c), `quadratic` 1/(k u^2 + c), "
            "`sqrt` 1/(exp(k sqrt(u)) + c), `sigmoid` 1/(exp(k u) + c). Default `linear` (authors)."
        },
    )
    weight_scale: float = field(default=10.0, metadata={"help": "k in W(u). Default 10 (authors' code)."})
    weight_intercept: float = field(default=1.0, metadata={"help": "c in W(u). Default 1 (authors' code)."})
    margin: str = field(
        default="linear",
        metadata={
            "help": "Adaptive margin gamma subtracted from beta * l: `none`, `linear` (c2 - k2 u) or `quadratic` "
            "(c2 - k2 u^2), c2 = detached mean logit of the global batch. At the authors' defaults the margin is "
            "~1e-3 against beta * l ~ 1: nearly inert (see docs/method.md)."
        },
    )
    margin_scale: float | None = field(
        default=None, metadata={"help": "k2 of the margin. Default None means 1 / beta (the authors' code)."}
    )
    # ---- Model -------------------------------------------------------------------------------------------
    vae_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder or Hub id of a VAE that replaces the pipeline's (e.g. an fp16-safe SDXL VAE such as "
            "`madebyollin/sdxl-vae-fp16-fix`); a pipeline folder with a `vae/` subfolder also works. A VAE whose config "
            "sets `force_upcast` (SDXL's) runs in float32 with SDXL, SD3 and Flux, others in the training dtype."
        },
    )
    max_sequence_length: int | None = field(
        default=None,
        metadata={
            "help": "T5 tokens per prompt for SD3 and Flux. None: the family's training default (SD3: 77, diffusers' "
            "SD3 scripts; Flux: 512, diffusers' Flux scripts; schnell was trained with 256)."
        },
    )
    # ---- Flow-matching models (SD3 / SD3.5, Flux.1; docs/method.md, "Flow-matching models") ---------------
    timestep_density: str = field(
        default="logit_normal",
        metadata={
            "help": "Density of each pair's noise level sigma over the schedule: `logit_normal` (sigmoid of a "
            "normal(logit_mean, logit_std); diffusers' SD3 scripts, flow_grpo's SD3.5 DPO), `mode` (SD3 paper's mode "
            "sampling with mode_scale) or `uniform` (diffusers' Flux LoRA script). Flow-matching families only."
        },
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal density (diffusers: 0)."})
    logit_std: float = field(default=1.0, metadata={"help": "Standard deviation of the logit-normal density (diffusers: 1)."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of the `mode` density (diffusers: 1.29)."})
    flow_shift: float | None = field(
        default=None,
        metadata={
            "help": "Static time shift s' = shift s / (1 + (shift - 1) s) of the training sigmas. None: the scheduler's "
            "own (SD3's config ships 3.0; Flux's shifts only at inference, so training sees no shift, as in "
            "diffusers' Flux script)."
        },
    )
    flow_resolution_shift: bool = field(
        default=False,
        metadata={
            "help": "Shift the training sigmas by the resolution-dependent shift the scheduler applies at inference "
            "(Flux's dynamic shifting: exp(mu) with mu linear in the image token count at `resolution`)."
        },
    )
    flow_guidance_scale: float = field(
        default=3.5,
        metadata={
            "help": "Guidance value fed to a guidance-distilled transformer (Flux.1-dev's guidance embedding) in every "
            "training forward. Default 3.5, diffusers' Flux training scripts. Ignored by models without the embedding."
        },
    )
    max_margin: float | None = field(
        default=None,
        metadata={
            "help": "Cap on z = beta * l - gamma inside the loss: a pair already ranked beyond it gets no further "
            "push (zero gradient), which stops runaway margins (reported with flow-matching DPO; SimpleTuner caps "
            "the positive margin the same way). None: no cap. Watch rewards/margins_abs (docs/method.md)."
        },
    )
    # ---- Minority filter (this library's variant, not in the Adaptive-DPO paper; see docs/method.md) -----------
    minority_filter: str = field(
        default="none",
        metadata={
            "help": "Drop (weight 0) the pairs whose evidence, averaged over their visits, says minority: `none` (off, "
            "the paper's method), `top_fraction` (the minority_filter_fraction of pairs with the highest mean "
            "evidence), `threshold` (pairs whose mean evidence exceeds minority_filter_threshold; the flip rate need "
            "not be known), `mixture` (pairs in the upper component of a two-Gaussian mixture fitted to the mean "
            "evidence; the flip rate need not be known). Works with adaptive True or False."
        },
    )
    minority_evidence: str = field(
        default="wrong_sign",
        metadata={
            "help": "Per-visit evidence the filter averages: `wrong_sign` (1 when l < 0: the share of visits on which "
            "the model ranked the pair against its label), `logit` (-l divided by the global batch's RMS of l); "
            "neither needs annotators; `score` (the Adaptive-DPO metric u; needs adaptive=True); or `prompt_contrast` "
            "(the reference model's judgement, not the policy's: 1 when the pair's own prompt, against another pair's "
            "prompt in the batch, lowers the reference's denoising error of the labelled loser more than of the "
            "winner, i.e. the reference finds the loser more faithful to the prompt; votes from pairs whose contrast "
            "prompt is the same text do not count, so it needs per-device batches of several distinct prompts). "
            "`prompt_contrast` closed half the gap on the digits benchmark at beta 100 where the preference follows "
            "prompt fidelity, and only there; or `judge` (a judge you bring: 1 when the data's `judge_scores` column, "
            "a reward model's scores of the two images from trl_adaptive.data.add_judge_scores, prefers the labelled "
            "loser; fixed per pair, so no extra draws are made and `minority_filter_min_visits` 1 suffices). Both "
            "judges are checked against the labels first (minority_filter_min_agreement; docs/minority_filter.md)."
        },
    )
    minority_evidence_draws: int = field(
        default=0,
        metadata={
            "help": "Extra noise/timestep draws per visit for `logit`/`wrong_sign`/`prompt_contrast` evidence (no "
            "gradient; each costs two forwards of the batch: policy and reference, or with `prompt_contrast` the "
            "reference under both prompts). 0: the training draw only (with `prompt_contrast` its vote costs one "
            "reference forward under the contrast prompts)."
        },
    )
    minority_evidence_min_noise: float = field(
        default=0.7,
        metadata={
            "help": "Take `logit`/`wrong_sign`/`prompt_contrast` evidence only from noisy timesteps, in [0, 1): the "
            "extra draws sample timesteps from the noisiest (1 - this) share of the schedule, and the training draw "
            "votes only when its timestep lies there. At low noise the model fits each pair's own images, flipped ones "
            "included, so those logits carry no minority signal (on the digits benchmark, per-draw AUROC < 0.5 below "
            "timestep 300 of 1000, 0.67-0.73 at 800-900; the reference's prompt-contrast votes: 0.57 below 300, 0.92 "
            "at 700-1000 over 8 draws; docs/results.md). 0: every timestep. The default 0.7 was chosen on the digits "
            "validation seeds."
        },
    )
    minority_evidence_decay: float = field(
        default=0.9,
        metadata={
            "help": "Forget old evidence, in [0, 1): at each visit of a pair the weight of its earlier visits is "
            "multiplied by this (0: plain mean over all visits). Votes cast before the model learned the majority "
            "preference are noise; a decay lets the filter follow the current model. 0.9 was best on the digits "
            "validation seeds at ~20 visits per pair. With `score` evidence it also applies to the amortised mode's "
            "per-pair history (the same record). With `prompt_contrast` use 0: the reference does not change, so "
            "old votes are as good as new ones."
        },
    )
    minority_filter_fraction: float = field(
        default=0.3,
        metadata={"help": "Share of pairs `top_fraction` drops, in [0, 1) (an assumed upper bound on the flip rate; 0.3 "
                  "was chosen on the digits validation seeds). It drops that share on clean data too: on the digits "
                  "benchmark at 0 flips this helped on four seeds of five and cost much of the gain on the fifth."},
    )
    minority_filter_threshold: float = field(
        default=0.5,
        metadata={"help": "`threshold` drops the pairs whose mean evidence exceeds this. With `wrong_sign` evidence, "
                  "0.5 drops the pairs the model ranks against their label on most of their recent votes. With "
                  "`prompt_contrast` evidence use 0.6 (the reference contradicts the pair on more than three votes in "
                  "five): on the digits benchmark it dropped about half as many clean pairs as 0.5 and closed as much "
                  "of the gap with flipped labels. With `judge` evidence use 0.55 (the judge prefers the labelled loser "
                  "by more than a fifth of its typical margin): 0.5 dropped every clean pair the judge got wrong, 6-11 "
                  "in 100 on the digits benchmark (docs/minority_filter.md)."},
    )
    minority_filter_max_fraction: float = field(
        default=0.3,
        metadata={"help": "`threshold` and `mixture` never drop more than this share of the judged pairs, in (0, 1] "
                  "(an assumed upper bound on the flip rate; 0.3 on the digits benchmark)."},
    )
    minority_filter_min_separation: float = field(
        default=2.0,
        metadata={
            "help": "`mixture` drops nothing unless its two components are at least this far apart (Ashman's D = "
            "|mu1 - mu0| / sqrt((var0 + var1) / 2); 2 is the usual bimodality bound). Protects clean data."
        },
    )
    minority_filter_warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps of evidence gathering before any pair is dropped (evidence is recorded from step 0)."},
    )
    minority_filter_min_visits: int = field(
        default=2, metadata={"help": "A pair is judged (and can be dropped) only after this many visits (extra draws do "
                             "not count as visits); one visit's votes are too few to judge a pair."}
    )
    minority_filter_min_agreement: float = field(
        default=0.57,
        metadata={"help": "With minority_evidence='prompt_contrast' or 'judge', the judge check: the filter drops nothing "
                  "until the judge has cast `minority_filter_agreement_votes` votes; then, if fewer than this share of "
                  "them agree with the labels, the judge cannot judge this preference and the filter turns itself off "
                  "for the rest of the run (plain Diffusion-DPO, with a warning). In [0, 1); 0 turns the check off. 0.57: "
                  "on the digits benchmark's validation seeds the share of agreeing votes was 0.507-0.565 with the style "
                  "rater's labels (any flip rate) and 0.576-0.748 with the fidelity rater's (0 to 30 in 100 labels "
                  "flipped; docs/minority_filter.md)."},
    )
    minority_filter_agreement_votes: int = field(
        default=2048,
        metadata={"help": "Votes of the judge counted before the judge check decides (all processes together). "
                  "2048 puts the agreement's standard error near 1.5 points even when a pair's votes are correlated "
                  "(about 1000 pair visits); a batch of 32 pairs casts about 65 votes per step with two extra draws."},
    )
    # ---- Data --------------------------------------------------------------------------------------------
    resolution: int = field(
        default=512, metadata={"help": "Training resolution: images are resized (shorter side) and cropped to it."}
    )
    random_crop: bool = field(default=False, metadata={"help": "Random instead of centre crop (same crop for a pair)."})
    random_flip: bool = field(default=False, metadata={"help": "Horizontally flip both images of a pair at random."})
    drop_ties: bool = field(
        default=True,
        metadata={
            "help": "Drop tied pairs (label 0.5). True as in the original Diffusion-DPO (about 12 percent of "
            "Pick-a-Pic pairs are ties). False keeps them with the first image as the winner (diffusers scripts)."
        },
    )
    empty_prompt_probability: float = field(
        default=0.0,
        metadata={"help": "Share of prompts replaced by '' during training (the original recipe used 0.2)."},
    )
    check_images: bool = field(
        default=True,
        metadata={
            "help": "Decode every image once when the trainer is built, with a progress bar, so that an image that cannot "
            "be decoded (or a missing file) stops the run before training starts instead of at the step that meets it "
            "(labels and prompts are always checked). About 2 ms per 512-px JPEG and process; cached for datasets "
            "read from disk. False skips the pass: a bad image then raises when its batch is collated."
        },
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={
            "help": "Drop bad rows (an undecodable image, a label outside {0, 0.5, 1}, a prompt that is not a string) "
            "with a warning that counts them, and list them in output_dir/bad_rows.json. False (default): the first "
            "bad rows are named in an error before training starts."
        },
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes for the up-front image check (`datasets.map` num_proc, as in TRL). None: one."},
    )
    latent_sampling: str = field(
        default="sample",
        metadata={
            "help": "How images become latents: `sample` draws from the VAE posterior (mean + std * noise) at every "
            "step, as the diffusers scripts do; `mean` uses the posterior mean (deterministic; a latent cache then "
            "stores half as much)."
        },
    )
    # ---- Samples while training -------------------------------------------------------------------------
    eval_prompts: list[str] | None = field(
        default=None,
        metadata={
            "help": "Prompts of images generated with the current policy every sample_steps steps (fixed seeds: seed, "
            "seed + 1, ...) and logged, with histograms of the minority score and weights, to the trackers of "
            "report_to that take images (tensorboard, wandb). A single entry ending in .txt is read as one prompt "
            "per line. None (default): no sampling, no cost."
        },
    )
    sample_steps: int = field(
        default=500, metadata={"help": "With eval_prompts: sample every N optimizer steps (and after the last step)."}
    )
    sample_reward_model: str | None = field(
        default=None,
        metadata={
            "help": "With eval_prompts: also score the samples with this scorer of trl_adaptive.evaluation (`pickscore`, "
            "`hpsv2`, `hpsv2.1`, `imagereward`, `clip`; `NAME=PATH` loads it from a local folder, file or Hub id) and log "
            "their mean as samples/<NAME>."
        },
    )
    sample_num_inference_steps: int = field(default=25, metadata={"help": "Sampling steps of the logged images."})
    sample_guidance_scale: float = field(default=7.5, metadata={"help": "Guidance scale of the logged images."})
    # ---- Speed -------------------------------------------------------------------------------------------
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the latent cache. When set, VAE latents (posterior mean and std; both flips with "
            "random_flip) and text embeddings are computed once, stored under a sub-folder named by a hash of the "
            "model weights and configs, transform settings and dataset fingerprint, reused by later runs with the "
            "same hash, and training reads them instead of running the VAE and text encoder. Not compatible with "
            "random_crop. See docs/caching.md."
        },
    )
    cache_block_rows: int = field(
        default=1024,
        metadata={
            "help": "With cache_dir: source rows per block of the cache build. Block k is encoded by process "
            "k mod world_size (all processes of all nodes encode at once), is written as one file, and is the unit an "
            "interrupted build resumes from. A build keeps the block size it started with. The builder holds one "
            "block of latents in host memory (1024 SDXL pairs at 1024 px with latent_sampling='sample': 512 MiB)."
        },
    )
    batch_frozen_forwards: bool = field(
        default=True,
        metadata={
            "help": "With LoRA and EMA annotators, run the reference and all annotators as one batched UNet call "
            "(peft mixed-adapter batches: the base weights are read once, each annotator's LoRA update goes to its "
            "own rows). False runs them one after another. Ignored without LoRA and under DeepSpeed."
        },
    )
    channels_last: bool | None = field(
        default=None,
        metadata={
            "help": "Keep the UNet's weights (policy, reference, EMA annotators) in channels_last memory format, which "
            "the GPU's tensor-core convolutions prefer (NVIDIA NeMo uses it for Stable Diffusion). None (default): on "
            "for UNet denoisers (SD 1.5, SDXL) on a CUDA GPU, off on the CPU (slower there: docs/performance.md) and for "
            "transformer denoisers (SD3, Flux), which have almost no convolutions."
        },
    )
    non_blocking_transfers: bool = field(
        default=True,
        metadata={
            "help": "Copy each batch to the GPU without making the host wait (sets accelerate's "
            "accelerator_config.non_blocking; with dataloader_pin_memory the copy overlaps the GPU's work). True (this "
            "library's default): a blocking copy waits for every queued kernel first. No effect without a GPU."
        },
    )
    # ---- Overrides of TrainingArguments defaults ---------------------------------------------------------
    dataloader_num_workers: int = field(
        default=-1,
        metadata={
            "help": "Data-loading worker processes per training process (0: load in the training process). -1 (this "
            "library's default): sized to the machine: on a CUDA GPU min(8, CPUs of this process / local processes - "
            "1), on the CPU 0 (workers would compete with training for the same cores). A number above CPUs / local "
            "processes (CPUs from os.sched_getaffinity, local processes from LOCAL_WORLD_SIZE) is lowered to it, with "
            "a warning: torch warns too, and the workers would starve the training loop."
        },
    )
    dataloader_pin_memory: bool = field(
        default=True,
        metadata={"help": "Collate batches into page-locked memory, which the GPU copies asynchronously "
                  "(non_blocking_transfers). True as in transformers; ignored (set False) without a CUDA GPU."},
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "transformers' filter that leaves a NaN/Inf loss out of the logged average. False (this library's "
            "default; transformers' is True): the filter tests every step's loss on the host, one GPU synchronisation "
            "per step (docs/performance.md). A NaN/Inf loss then shows in the logged loss, which is what you want to see."
        },
    )
    tf32: bool | None = field(
        default=None,
        metadata={
            "help": "TF32 for float32 matmuls and convolutions on Ampere and later GPUs (transformers' flag). None (this "
            "library's default): on where the GPU supports it (it speeds the float32 parts: VAE, text encoders, the "
            "float32 master weights' work) and left alone elsewhere. False keeps full float32 precision."
        },
    )
    learning_rate: float = field(
        default=1e-5, metadata={"help": "AdamW learning rate. Default 1e-5 (diffusers LoRA recipe, Adaptive-DPO README)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (TRL's DPOConfig default)."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the preference collator reads the raw image and label columns."},
    )

    def __post_init__(self):
        check_choice, require = partial(_checks.check_choice, self), partial(_checks.require, self)

        check_choice("loss_type", PREFERENCE_LOSSES)
        # Adaptive-DPO's and the minority filter's fields are checked by those methods (trl_adaptive.robustness).
        validate_robustness_options(self)
        check_choice("latent_sampling", LATENT_SAMPLING)
        if self.cache_dir is not None and self.random_crop:
            raise ValueError(
                "AdaptiveDPOConfig.random_crop=True cannot be used with cache_dir: cached latents are computed once from "
                "a centre crop. Set random_crop=False (random_flip is supported) or cache_dir=None."
            )
        require("beta", self.beta > 0, "> 0")
        require("label_smoothing", 0.0 <= self.label_smoothing < 0.5, "in [0, 0.5)")
        if self.label_smoothing > 0 and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(
                f"AdaptiveDPOConfig.label_smoothing applies to loss_type 'sigmoid' or 'robust', not {self.loss_type!r}"
            )
        if self.loss_type == "capped_sigmoid":
            if self.misranked_weight is None:
                self.misranked_weight = DEFAULT_MISRANKED_WEIGHT
            require("misranked_weight", 0.0 < self.misranked_weight <= 1.0, "in (0, 1]")
        elif self.misranked_weight is not None:
            raise ValueError(
                f"AdaptiveDPOConfig.misranked_weight applies to loss_type 'capped_sigmoid' only, not {self.loss_type!r}"
            )
        check_choice("timestep_density", TIMESTEP_DENSITIES)
        require("logit_std", self.logit_std > 0, "> 0")
        require("flow_shift", self.flow_shift is None or self.flow_shift > 0, "None or > 0")
        if self.flow_shift is not None and self.flow_resolution_shift:
            raise ValueError("AdaptiveDPOConfig.flow_shift and flow_resolution_shift are two ways to shift: set one")
        require("max_sequence_length", self.max_sequence_length is None or self.max_sequence_length >= 1, "None or >= 1")
        require("max_margin", self.max_margin is None or self.max_margin > 0, "None or > 0")
        require("resolution", self.resolution > 0 and self.resolution % 8 == 0, "a positive multiple of 8")
        require("empty_prompt_probability", 0.0 <= self.empty_prompt_probability <= 1.0, "in [0, 1]")
        require("sample_steps", self.sample_steps >= 1, ">= 1")
        require("sample_num_inference_steps", self.sample_num_inference_steps >= 1, ">= 1")
        require("dataset_num_proc", self.dataset_num_proc is None or self.dataset_num_proc >= 1, "None or >= 1")
        require("cache_block_rows", self.cache_block_rows >= 1, ">= 1")
        if self.remove_unused_columns:
            raise ValueError("AdaptiveDPOConfig.remove_unused_columns must be False (the collator needs raw columns)")
        require("dataloader_num_workers", self.dataloader_num_workers >= -1, ">= 0, or -1 (sized to the machine)")
        on_gpu = _cuda_training(self)
        self.workers_sized_to_machine = self.dataloader_num_workers == -1  # the trainer may lower them (streams)
        self.dataloader_num_workers = data_workers(self.dataloader_num_workers, on_gpu)
        if not on_gpu:
            self.dataloader_pin_memory = False  # nothing to pin for (torch warns)
        if self.tf32 is None and on_gpu and _tf32_supported():
            self.tf32 = True
        super().__post_init__()
        if self.non_blocking_transfers and self.dataloader_pin_memory:
            self.accelerator_config.non_blocking = True

    def use_channels_last(self, convolutional_denoiser: bool) -> bool:
        """`channels_last` for a denoiser (None: on for a convolutional one on a CUDA GPU)."""
        if self.channels_last is not None:
            return self.channels_last
        return convolutional_denoiser and _cuda_training(self)

    @property
    def effective_margin_scale(self) -> float:
        """k2 of the margin: `margin_scale`, or 1 / beta when unset."""
        return self.margin_scale if self.margin_scale is not None else 1.0 / self.beta
