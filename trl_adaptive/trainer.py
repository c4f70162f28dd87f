"""`AdaptiveDiffusionDPOTrainer`: Diffusion-DPO and Adaptive-DPO on the transformers `Trainer`.

The trainer adds only what the method needs: the paired forward (policy, reference, annotators on shared noise
and timestep), the loss assembly from `trl_adaptive.losses`, EMA annotators kept in step with the optimizer and
saved in every checkpoint, metrics gathered across processes, and diffusers-format saving. Everything that
differs between model families is asked of `self.family` (see `trl_adaptive.families`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._pytree import tree_map
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import enable_full_determinism, set_seed
from transformers.utils import logging

from .caching import use_latent_cache
from .config import AdaptiveDPOConfig
from .data import PreferenceCollator, detect_schema, prepare_preference_dataset
from .distributed import make_annotators, prepare_reference_model
from .families import family_for, load_pipeline, replace_vae
from .filtering import logit_evidence, minority_keep_mask, prompt_contrast_evidence, wrong_sign_evidence
from .history import PairHistory
from .lora_batching import LoraFrozenForwards, supports_mixed_adapter_batches
from .losses import (
    adaptive_margin,
    denoising_error,
    dpo_logits,
    implicit_rewards,
    minority_score,
    minority_weights,
    preference_loss,
)
from .model_card import build_model_card
from .noise import EVAL, TRAIN, pair_generators, pair_noise_and_timesteps
from .sampling import SampleImagesCallback

logger = logging.get_logger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"
#: Where `skip_bad_rows` lists the rows it dropped (row, column, error per split).
BAD_ROWS_FILE = "bad_rows.json"
#: Smallest RMS a metric normaliser may take: above float32 rounding of denoising errors (~1e-7), below the logits
#: of a model that has started to move (~1e-5 and up).
RMS_NORMALIZER_FLOOR = 1e-6
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: Median |beta * l| below which the minority filter warns: under 4, -log sigmoid is still far from a hinge
#: (sigmoid(-4) = 0.018 of the largest gradient), the logistic regime in which the filter was measured to harm.
FILTER_HINGE_REGIME_MIN = 4.0
#: Below this share of `prompt_contrast` votes agreeing with the labels the trainer warns that the reference's
#: judgement is close to chance for this data (on the digits benchmark: 0.71-0.73 clean, 0.59 at 30% flips).
PROMPT_CONTRAST_MIN_AGREEMENT = 0.55


class AnnotatorUpdateCallback(TrainerCallback):
    """Moves the EMA annotators one step after every optimizer step."""

    def __init__(self, trainer: "AdaptiveDiffusionDPOTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.annotators is not None:
            self.trainer.bound_annotators().update(self.trainer.unwrapped(self.trainer.model))


class CollatorEpochCallback(TrainerCallback):
    """Tells the collator the epoch, so its random augmentations are a function of (seed, epoch, row) and a resumed
    run draws the same ones as an uninterrupted run."""

    def __init__(self, trainer: "AdaptiveDiffusionDPOTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.trainer.data_collator, "set_epoch"):
            # state.epoch is fractional when resuming mid-epoch; the floor is the epoch being (re)started.
            self.trainer.data_collator.set_epoch(math.floor(state.epoch or 0))


class DiffusersTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard logging, for a diffusers denoiser: it writes the model's config as JSON text at the
    start, calling `config.to_json_string()`, which a diffusers config (a dict) lacks."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.tb_writer is not None and model is not None and isinstance(getattr(model, "config", None), dict):
            self.tb_writer.add_text("model_config", json.dumps(dict(model.config), indent=1, default=str))


def _to_dtype(tree, dtype: torch.dtype):
    """Floating-point tensors of a nested structure in `dtype` (integer tensors such as timesteps unchanged)."""
    return tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


class AdaptiveDiffusionDPOTrainer(Trainer):
    """Preference-tune a diffusers text-to-image pipeline with Diffusion-DPO or Adaptive-DPO.

    Args:
        model: a diffusers pipeline of a supported family, or a folder / Hub id that `from_pretrained` loads.
        ref_model: frozen reference denoiser for full fine-tuning (default: a copy of the initial denoiser).
            Must be None with `peft_config`: the reference is then the denoiser with its adapters disabled.
        args: an `AdaptiveDPOConfig`.
        train_dataset, eval_dataset: `datasets.Dataset` in the Pick-a-Pic, TRL or HPDv2 schema (see `trl_adaptive.data`).
        peft_config: a `peft.LoraConfig` to train LoRA adapters on the denoiser instead of all its weights.
        data_collator: replaces the default `PreferenceCollator`.
        callbacks, optimizers: as in `transformers.Trainer`.
    """

    _tag_names = ("diffusion-dpo", "adaptive-dpo")
    # compute_loss returns the mean over the micro-batch, so the Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model,
        ref_model: torch.nn.Module | None = None,
        args: AdaptiveDPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        peft_config=None,
        data_collator=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args if args is not None else AdaptiveDPOConfig(output_dir="trl-adaptive-output")
        if not isinstance(args, AdaptiveDPOConfig):
            raise TypeError(f"args must be an AdaptiveDPOConfig, got {type(args).__name__}")
        # The Trainer seeds in its own __init__, but the LoRA adapters are created (randomly) before it runs: seed
        # first, so that the same seed gives the same start and a rerun gives the same model.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        if isinstance(model, (str, os.PathLike)):
            self.base_model_name = str(model)
            model = load_pipeline(str(model))
        else:
            self.base_model_name = getattr(model, "name_or_path", None) or model.config.get("_name_or_path") or None
        if args.vae_name_or_path:
            replace_vae(model, args.vae_name_or_path)
        self.family = family_for(model)
        self.family.check_not_partitioned()
        self.family.sample_latents = args.latent_sampling == "sample"
        self.peft_config = peft_config
        self.weight_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        denoiser = self._prepare_denoiser(args, peft_config)
        self.ref_model = self._prepare_reference(ref_model, denoiser, peft_config)

        self.dataset_info = None
        if train_dataset is not None:
            train_dataset, self.dataset_info = self._prepare_dataset(train_dataset, args, "train")
            logger.info(
                f"Preference data: {self.dataset_info['schema']} schema, {self.dataset_info['num_rows']} pairs, "
                f"{self.dataset_info['num_ties']} ties {'dropped' if args.drop_ties else 'kept'}"
            )
        self.dataset_name = getattr(getattr(train_dataset, "info", None), "dataset_name", None)
        if eval_dataset is not None:
            eval_dataset, _ = self._prepare_dataset(eval_dataset, args, "eval")
        if data_collator is None:
            reference = train_dataset if train_dataset is not None else eval_dataset
            if reference is None:
                raise ValueError("AdaptiveDiffusionDPOTrainer needs a train_dataset or an eval_dataset")
            data_collator = PreferenceCollator(
                detect_schema(reference.column_names),
                args.resolution,
                random_crop=args.random_crop,
                random_flip=args.random_flip,
                empty_prompt_probability=args.empty_prompt_probability,
                seed=args.seed,
            )

        self.annotators = None  # created below, once the distributed set-up (ZeRO stage) is known
        self.pair_history = None
        if args.adaptive and train_dataset is not None:
            # With the filter judging by `score`, this record is its evidence too, so it takes the filter's decay.
            scored_by_filter = args.minority_filter != "none" and args.minority_evidence == "score"
            decay = args.minority_evidence_decay if scored_by_filter else 0.0
            self.pair_history = PairHistory(max(train_dataset["row_index"]) + 1, decay=decay)
        # The minority filter's per-pair evidence: the pair history itself for `score`, its own record otherwise.
        self.evidence_history = None
        if args.minority_filter != "none" and train_dataset is not None:
            if args.minority_evidence == "score":
                self.evidence_history = self.pair_history
            else:
                num_rows = max(train_dataset["row_index"]) + 1
                self.evidence_history = PairHistory(
                    num_rows, filename="pair_logit_evidence.safetensors", decay=args.minority_evidence_decay
                )
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        #: The last training step's per-pair minority statistics of the global batch (for the samples' histograms).
        self.last_pair_statistics: dict[str, torch.Tensor] = {}
        self._filter_regime_checked = False
        super().__init__(
            model=denoiser,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=[AnnotatorUpdateCallback(self), CollatorEpochCallback(self), *(callbacks or [])],
            optimizers=optimizers,
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if self.accelerator.num_processes != launched:
            # Seen on CPU: DeepSpeed under accelerate gets no process-group backend and each process trains alone.
            raise RuntimeError(
                f"Launched as {launched} processes (WORLD_SIZE) but training would run in {self.accelerator.num_processes}: "
                "the processes did not form one group. On CPUs pass ddp_backend='gloo' (GPUs use NCCL by default)."
            )
        device = self.accelerator.device
        self.family.place_frozen_modules(device, self.weight_dtype)
        if self.ref_model is not None:
            # The reference must compute exactly as the policy does (identical weights give a logit of exactly 0):
            # DeepSpeed runs the policy in the training dtype, autocast mixed precision keeps its weights in fp32.
            policy_dtype = self.weight_dtype if self.is_deepspeed_enabled else next(denoiser.parameters()).dtype
            self.ref_model = prepare_reference_model(self.ref_model, self.accelerator, policy_dtype)
        if args.adaptive and len(args.annotator_decays) > 0:
            self.annotators = make_annotators(denoiser, args.annotator_decays, self.accelerator).to(device)
        self.lora_forwards = None  # LoRA reference (and batched annotators) without walking the module tree
        if peft_config is not None and supports_mixed_adapter_batches(peft_config) and not self.is_deepspeed_enabled:
            self.lora_forwards = LoraFrozenForwards(
                denoiser, peft_config, self.annotators, batch_annotators=args.batch_frozen_forwards
            )
        for callback in list(self.callback_handler.callbacks):
            if type(callback) is TensorBoardCallback:
                self.callback_handler.remove_callback(callback)
                self.callback_handler.add_callback(DiffusersTensorBoardCallback())
        if args.eval_prompts:
            self.add_callback(SampleImagesCallback(self))
        if args.cache_dir is not None:
            use_latent_cache(self)  # encodes the datasets once (or finds their cache) and swaps in the cached collator

    # ---- set-up ----------------------------------------------------------------------------------------
    @staticmethod
    def _prepare_dataset(dataset, args: AdaptiveDPOConfig, split: str):
        """Check every row before training (`prepare_preference_dataset`); with `skip_bad_rows`, drop the bad ones,
        warn with their count and list them in `output_dir/bad_rows.json`. The main process goes first, so that
        the other processes reuse its cached image check for datasets read from disk."""
        with args.main_process_first(desc=f"checking the {split} preference data"):
            dataset, info = prepare_preference_dataset(
                dataset, args.drop_ties, check_images=args.check_images, skip_bad_rows=args.skip_bad_rows,
                num_proc=args.dataset_num_proc, progress=not args.disable_tqdm,
            )
        if info["bad_rows"]:
            path = Path(args.output_dir, BAD_ROWS_FILE)
            if args.should_save:
                path.parent.mkdir(parents=True, exist_ok=True)
                listed = json.loads(path.read_text()) if path.is_file() else {}
                listed[split] = info["bad_rows"]
                path.write_text(json.dumps(listed, indent=1))
            warnings.warn(
                f"skip_bad_rows: dropped {info['num_bad_rows']} bad row(s) of the {split} data (first: "
                f"{info['bad_rows'][0]['error']}); all of them are listed in {path}",
                UserWarning,
                stacklevel=3,
            )
        return dataset, info

    def _prepare_denoiser(self, args, peft_config) -> torch.nn.Module:
        denoiser = self.family.denoiser
        if peft_config is not None:
            from diffusers.training_utils import cast_training_params

            # diffusers' LoRA recipe: frozen base weights in the training dtype, trainable adapters in float32.
            denoiser.requires_grad_(False).to(self.weight_dtype)
            denoiser.add_adapter(peft_config)
            cast_training_params(denoiser, dtype=torch.float32)
        else:
            denoiser.requires_grad_(True)
        if args.activation_checkpointing:
            denoiser.enable_gradient_checkpointing()
            # transformers calls `activation_checkpointing_enable`, which diffusers models name differently.
            denoiser.activation_checkpointing_enable = lambda **_: None
        return denoiser

    def _prepare_reference(self, ref_model, denoiser, peft_config):
        if peft_config is not None:
            if ref_model is not None:
                raise ValueError("ref_model must be None with peft_config: the reference is the base UNet (adapters off)")
            return None
        reference = ref_model if ref_model is not None else copy.deepcopy(denoiser)
        return reference.requires_grad_(False).eval()

    # ---- the paired forward ----------------------------------------------------------------------------
    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        """`accelerator.unwrap_model(model)`, memoised: accelerate walks every module (a torch.compile check) on each
        call, milliseconds per step on a UNet."""
        cached = getattr(self, "_unwrap_cache", None)
        if cached is None or cached[0] is not model:
            cached = self._unwrap_cache = (model, self.accelerator.unwrap_model(model))
        return cached[1]

    @contextmanager
    def _adapters_disabled(self, denoiser):
        denoiser.disable_adapters()
        try:
            yield
        finally:
            denoiser.enable_adapters()

    @torch.no_grad()
    def _reference_prediction(self, denoiser, noisy, timesteps, conditioning):
        if self.ref_model is not None:
            # The reference must compute exactly as the policy would with the same weights: under the same autocast
            # (accelerate wraps only the prepared policy's forward) and in the same module mode (diffusers' ResNet
            # blocks take a different, differently rounded path in train mode). Like the LoRA reference (the policy
            # with adapters off), it therefore also shares the policy's dropout, which diffusers' UNets default to 0.
            self.ref_model.train(denoiser.training)
            with self.accelerator.autocast():
                return self.family.predict(self.ref_model, noisy, timesteps, conditioning)
        with self._adapters_disabled(denoiser):
            return self.family.predict(denoiser, noisy, timesteps, conditioning)

    def bound_annotators(self):
        """The EMA annotators, attached to the prepared model (ZeRO-3 shards need its DeepSpeed engine)."""
        self.annotators.bind(self.model_wrapped)
        return self.annotators

    @torch.no_grad()
    def _frozen_predictions(self, denoiser, noisy, timesteps, conditioning, with_annotators: bool):
        """Reference prediction and one per EMA annotator (if `with_annotators`), without gradient, under the
        training's autocast. With LoRA they run as one batched call (`trl_adaptive.lora_batching`)."""
        lora = self.lora_forwards
        with self.accelerator.autocast():
            if lora is not None and lora.batches_annotators and with_annotators:
                reference, *annotators = lora.reference_and_annotators(self.family, denoiser, noisy, timesteps, conditioning)
                return reference, annotators
            if lora is not None:
                reference = lora.reference(self.family, denoiser, noisy, timesteps, conditioning)
            else:
                reference = self._reference_prediction(denoiser, noisy, timesteps, conditioning)
            if not with_annotators:
                return reference, []
            annotators, predictions = self.bound_annotators(), []
            for k in range(len(annotators)):
                as_annotator = lambda *a, _k=k, **kw: annotators(_k, denoiser, *a, **kw)  # noqa: E731
                predictions.append(self.family.predict(as_annotator, noisy, timesteps, conditioning))
            return reference, predictions

    def pair_forward(self, model, inputs, draw: int = 0, min_noise: float = 0.0) -> dict[str, torch.Tensor]:
        """Policy, reference and annotator denoising errors of each pair on shared noise and timestep.

        Each pair's randomness (VAE posterior samples, noise, timestep) comes from its own generator keyed by
        (seed, step, row_index), so it is the same on any number of processes (`trl_adaptive.noise`).

        Returns ``policy_errors`` and ``reference_errors`` of shape (2B,) (winners first), ``logits`` of shape
        (K, B): row 0 is the current model (with gradient), rows 1.. the EMA annotators (detached), and each pair's
        ``timesteps`` (B,). ``draw`` > 0 and ``min_noise`` serve the minority filter's extra evidence draws.
        """
        noised = self._noised_pairs(model, inputs, draw, min_noise)
        noisy, timesteps, target, conditioning = (noised[k] for k in ("noisy", "timesteps", "target", "conditioning"))
        denoiser = self.unwrapped(model)
        # The no-gradient forwards run first, so their activations never coexist with the policy's saved ones.
        reference, annotators = self._frozen_predictions(
            denoiser, noisy, timesteps, conditioning, with_annotators=self._annotators_due(model.training)
        )
        reference_errors = denoising_error(reference, target)
        policy_errors = denoising_error(self.family.predict(model, noisy, timesteps, conditioning), target)
        logits = [dpo_logits(*policy_errors.chunk(2), *reference_errors.chunk(2))]
        for prediction in annotators:
            errors = denoising_error(prediction, target)
            logits.append(dpo_logits(*errors.chunk(2), *reference_errors.chunk(2)))
        return {"policy_errors": policy_errors, "reference_errors": reference_errors, "logits": logits,
                "timesteps": noised["pair_timesteps"], "noised": noised}

    def _noised_pairs(self, model, inputs, draw: int = 0, min_noise: float = 0.0) -> dict:
        """Both images of every pair noised with the pair's shared noise and timestep (2B rows, winners first), the
        denoising target and the conditioning, in the denoiser's dtype; `pair_timesteps` has one entry per pair."""
        family = self.family
        step, purpose = (self.state.global_step, TRAIN) if model.training else (0, EVAL)
        generators = pair_generators(self.args.seed, step, inputs["row_index"], self.args.device, purpose, draw)
        latents = family.pair_latents(inputs, generator=generators)  # one VAE call for both images of every pair
        chosen = latents[: latents.shape[0] // 2]
        noise, pair_timesteps = pair_noise_and_timesteps(
            family, generators, chosen.shape, chosen.device, chosen.dtype, min_noise=min_noise
        )
        noise, timesteps = torch.cat([noise, noise]), torch.cat([pair_timesteps, pair_timesteps])
        # Denoiser inputs in the training dtype: DeepSpeed runs bf16/fp16 weights without autocast.
        return {
            "noisy": family.add_noise(latents, noise, timesteps).to(self.weight_dtype),
            "timesteps": timesteps,
            "pair_timesteps": pair_timesteps,
            "target": family.target(latents, noise, timesteps),
            "conditioning": _to_dtype(family.condition(inputs), self.weight_dtype),
        }

    @torch.no_grad()
    def prompt_contrast_votes(self, model, inputs, noised: dict, own_errors: torch.Tensor | None = None,
                              contrast_conditioning: dict | None = None):
        """`prompt_contrast` evidence of one draw: the reference's votes (`filtering.prompt_contrast_evidence`) with
        each pair's prompt contrasted against the next pair's in the batch, and which votes count (False where the
        two prompts are the same text, so the contrast says nothing). `own_errors`: the reference's errors under the
        own prompts when the caller already has them (the training draw); `contrast_conditioning`: the batch's
        contrast conditioning when the caller already has it (every draw of a visit shares it)."""
        denoiser = self.unwrapped(model)
        noisy, timesteps, target = noised["noisy"], noised["timesteps"], noised["target"]
        if own_errors is None:
            own, _ = self._frozen_predictions(denoiser, noisy, timesteps, noised["conditioning"], with_annotators=False)
            own_errors = denoising_error(own, target)
        if contrast_conditioning is None:
            contrast_conditioning = self.contrast_conditioning(inputs)
        contrast, _ = self._frozen_predictions(denoiser, noisy, timesteps, contrast_conditioning, with_annotators=False)
        num_pairs = noisy.shape[0] // 2
        own_text = noised["conditioning"]["encoder_hidden_states"][:num_pairs]
        differs = (contrast_conditioning["encoder_hidden_states"][:num_pairs] != own_text).flatten(1).any(dim=1)
        return prompt_contrast_evidence(own_errors, denoising_error(contrast, target)), differs

    @torch.no_grad()
    def contrast_conditioning(self, inputs) -> dict:
        """Each pair conditioned on the previous pair's prompt of the batch (images keep their own conditioning)."""
        return _to_dtype(self.family.condition(inputs, prompt_shift=1), self.weight_dtype)

    def _metric_active(self) -> bool:
        return self.args.adaptive and self.state.global_step >= self.args.metric_warmup_steps

    def _annotators_due(self, training: bool) -> bool:
        """Whether this step runs the EMA annotators (always in evaluation; every `annotator_interval` steps in training)."""
        if self.annotators is None or not self._metric_active():
            return False
        return not training or self.state.global_step % self.args.annotator_interval == 0

    # ---- global-batch statistics -----------------------------------------------------------------------
    def _global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the last dimension across all processes (detached); keeps leading dimensions."""
        values = values.detach().float()
        sums = torch.cat([values.sum(dim=-1).reshape(-1), values.new_tensor([values.shape[-1]])])
        sums = self.accelerator.reduce(sums, reduction="sum")
        return (sums[:-1] / sums[-1]).reshape(values.shape[:-1])

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(values.detach().float().contiguous())

    # ---- loss ------------------------------------------------------------------------------------------
    def minority_scores(self, annotator_logits: torch.Tensor, inputs, training: bool) -> torch.Tensor:
        """The metric u per pair: exact from the annotators' logits, or (amortised steps) from the pair history."""
        args = self.args
        if annotator_logits.shape[0] == 1 and self.annotators is not None:  # amortised step between refreshes
            return self.pair_history.mean(inputs["row_index"]).to(annotator_logits.device)
        normalizers = None
        if args.metric_normalize == "rms":
            # Floored: while the annotators still equal the policy (step 0) every logit is float rounding (~1e-8), and
            # dividing by its RMS would blow that noise up to an O(1), arbitrary score.
            normalizers = self._global_mean(annotator_logits.pow(2)).sqrt().clamp_min(RMS_NORMALIZER_FLOOR)
        u = minority_score(annotator_logits, args.metric_rho, normalizers)
        if training and self.pair_history is not None:
            self.pair_history.record(self._gather(inputs["row_index"]), self._gather(u))
        return u

    def adaptive_terms(self, u: torch.Tensor, logits: torch.Tensor):
        """Weights W(u) and margins gamma(u) for one step (detached, global-batch statistics)."""
        args = self.args
        weights = minority_weights(u, args.weight_fn, args.weight_scale, args.weight_intercept)
        mean_logit = self._global_mean(logits) if args.margin != "none" else 0.0
        margins = adaptive_margin(u, args.margin, mean_logit, args.effective_margin_scale)
        return weights, margins

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        out = self.pair_forward(model, inputs)
        logits = out["logits"][0]
        u = weights = margins = None
        if self.args.adaptive and self._metric_active():
            annotator_logits = torch.stack([x.detach() for x in out["logits"]])
            u = self.minority_scores(annotator_logits, inputs, training=mode == "train")
            weights, margins = self.adaptive_terms(u, logits)
        keep = self.minority_filter_mask(out, inputs) if mode == "train" else None
        if keep is not None:
            weights = keep if weights is None else weights * keep
        losses = preference_loss(logits, self.args.beta, self.args.loss_type, self.args.label_smoothing, weights, margins,
                                 misranked_weight=self.args.misranked_weight)
        self._record_metrics(mode, out, u, weights, margins, inputs)
        if keep is not None:
            self._check_filter_regime(self._record_filter_metrics(keep, inputs), logits)
        loss = losses.mean()
        return (loss, out) if return_outputs else loss

    def minority_filter_mask(self, out: dict, inputs) -> torch.Tensor | None:
        """The minority filter (docs/minority_filter.md): record this visit's evidence, then 0 for pairs judged minority."""
        args = self.args
        if self.evidence_history is None:
            return None
        logits = out["logits"][0]
        rows = inputs["row_index"]
        if args.minority_evidence != "score":  # `score` is recorded by minority_scores into the same history
            draws, valid = self._visit_evidence(out, inputs)
            evidence, valid = self._gather(torch.cat(draws)), self._gather(torch.cat(valid)).bool()
            # One visit: all its draws in one record (one decay step, one visit counted).
            self.evidence_history.record(self._gather(rows.repeat(len(draws))), evidence, valid)
            if valid.any():
                self._metrics["train"]["minority/evidence_mean"].append(evidence[valid].mean().item())
        if self.state.global_step < args.minority_filter_warmup_steps:
            return None
        keep = minority_keep_mask(
            self.evidence_history.mean(rows),
            self.evidence_history.visit_counts(rows),
            self.evidence_history.means_with_visits(args.minority_filter_min_visits).float(),
            args.minority_filter,
            fraction=args.minority_filter_fraction,
            threshold=args.minority_filter_threshold,
            min_visits=args.minority_filter_min_visits,
            max_fraction=args.minority_filter_max_fraction,
            min_separation=args.minority_filter_min_separation,
        )
        return keep.to(logits.device)

    def _visit_evidence(self, out: dict, inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This visit's evidence per draw (the training draw, then `minority_evidence_draws` extra ones) and which
        entries count. Only noisy timesteps vote (`minority_evidence_min_noise`): the extra draws sample there, the
        training draw's uniform timestep counts when it falls there."""
        args = self.args
        min_noise = args.minority_evidence_min_noise
        contrast = args.minority_evidence == "prompt_contrast"
        noisy_enough = self.family.noise_level(out["timesteps"]) >= min_noise
        if contrast:  # the contrast prompts are encoded once per visit and shared by its draws
            contrast_conditioning = self.contrast_conditioning(inputs)
            votes, differs = self.prompt_contrast_votes(
                self.model, inputs, out["noised"], out["reference_errors"], contrast_conditioning
            )
            evidence, valid = [votes], [noisy_enough & differs]
        else:
            evidence, valid = [out["logits"][0].detach()], [noisy_enough]
        with torch.no_grad():
            for d in range(1, args.minority_evidence_draws + 1):  # extra noise/timestep draws: a less noisy vote
                if contrast:  # the reference alone: no policy forward
                    noised = self._noised_pairs(self.model, inputs, draw=d, min_noise=min_noise)
                    votes, differs = self.prompt_contrast_votes(
                        self.model, inputs, noised, contrast_conditioning=contrast_conditioning
                    )
                    evidence.append(votes)
                    valid.append(differs)
                else:
                    evidence.append(self.pair_forward(self.model, inputs, draw=d, min_noise=min_noise)["logits"][0])
                    valid.append(torch.ones_like(valid[0]))
        if args.minority_evidence == "logit":
            evidence = [logit_evidence(draw, self._global_mean(draw.pow(2)).sqrt()) for draw in evidence]
        elif args.minority_evidence == "wrong_sign":
            evidence = [wrong_sign_evidence(draw) for draw in evidence]
        return evidence, valid

    def _record_filter_metrics(self, keep: torch.Tensor, inputs) -> torch.Tensor:
        """Log what the filter kept and dropped; returns the keep weights of the global batch."""
        keep = self._gather(keep)
        self._metrics["train"]["minority/kept_fraction"].append(keep.mean().item())
        if self.args.eval_prompts:
            self.last_pair_statistics["minority/keep"] = keep.cpu()
        if "flipped" in inputs:
            flipped = self._gather(inputs["flipped"].float()).bool()
            if flipped.any():
                self._metrics["train"]["minority/flipped_dropped"].append((1 - keep[flipped]).mean().item())
            if (~flipped).any():
                self._metrics["train"]["minority/clean_dropped"].append((1 - keep[~flipped]).mean().item())
        return keep

    def _check_filter_regime(self, global_keep: torch.Tensor, logits: torch.Tensor) -> None:
        """Warn once, when the filter first drops a pair, if its evidence is unlikely to help: with the policy's own
        evidence, if the loss is in the logistic regime, where that filter was measured to harm; with the reference's
        `prompt_contrast` votes, if they barely agree with the labels (docs/minority_filter.md, "Limits"). Decided on
        gathered values, so every process agrees."""
        if self._filter_regime_checked or not (global_keep < 1).any():
            return
        self._filter_regime_checked = True
        if self.args.minority_evidence == "prompt_contrast":  # the reference's votes work in either regime
            history = self.evidence_history
            agreement = 1.0 - (history.total.sum() / history.weight.sum().clamp_min(1e-12)).item()
            if agreement < PROMPT_CONTRAST_MIN_AGREEMENT:
                warnings.warn(
                    f"minority_evidence='prompt_contrast' starts dropping pairs while the reference agrees with the "
                    f"labels on only {agreement:.0%} of its votes (below {PROMPT_CONTRAST_MIN_AGREEMENT:.0%}): its "
                    "judgement of prompt fidelity says little about this preference, and the filter would drop pairs "
                    "nearly at random. On the digits benchmark it agreed on 71-73% of the votes with clean labels and "
                    "59% at 30% flips (docs/minority_filter.md).",
                    UserWarning,
                    stacklevel=2,
                )
            return
        median = (self.args.beta * self._gather(logits)).abs().median().item()
        if median < FILTER_HINGE_REGIME_MIN:
            warnings.warn(
                f"minority_filter={self.args.minority_filter!r} starts dropping pairs while the median |beta * l| is "
                f"{median:.2f} (below {FILTER_HINGE_REGIME_MIN:g}: the logistic regime). The filter helped on the digits "
                "benchmark only with |beta * l| in the tens (a hinge-like loss); with |beta * l| near 1 it did not help "
                "and broke some runs. Consider adaptive=True without the filter (docs/minority_filter.md, 'Limits').",
                UserWarning,
                stacklevel=2,
            )

    # ---- metrics ---------------------------------------------------------------------------------------
    def _record_metrics(self, mode, out, u, weights, margins, inputs) -> None:
        beta = self.args.beta
        m_w, m_l = out["policy_errors"].detach().chunk(2)
        r_w, r_l = out["reference_errors"].detach().chunk(2)
        chosen, rejected = implicit_rewards(m_w, r_w, beta), implicit_rewards(m_l, r_l, beta)
        scaled_logits = chosen - rejected  # beta * l (not `margins`, the adaptive margins gamma of the loss)
        per_pair = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": scaled_logits,
            # Mean |beta l|: in the tens, -log sigmoid acts like a hinge (docs/results.md, "The beta regime").
            "rewards/margins_abs": scaled_logits.abs(),
            "rewards/accuracies": (chosen > rejected).float(),
            "denoising_loss/policy_chosen": m_w,
            "denoising_loss/policy_rejected": m_l,
            "denoising_loss/reference_chosen": r_w,
            "denoising_loss/reference_rejected": r_l,
        }
        if u is not None:
            per_pair.update({"minority/score_mean": u, "minority/weight_mean": weights, "minority/margin_mean": margins})
        gathered = {name: self._gather(v) for name, v in per_pair.items()}
        metrics = {name: v.mean().item() for name, v in gathered.items()}
        if u is not None and mode == "train" and self.args.eval_prompts:  # only the samples' histograms read these
            self.last_pair_statistics["minority/score"] = gathered["minority/score_mean"].cpu()
            self.last_pair_statistics["minority/weight"] = gathered["minority/weight_mean"].cpu()
        if u is not None:
            metrics["minority/weight_min"] = gathered["minority/weight_mean"].min().item()
            if "flipped" in inputs:  # synthetic-minority runs: how well u separates flipped pairs
                flipped = self._gather(inputs["flipped"].float()).bool()
                scores = gathered["minority/score_mean"]
                if flipped.any():
                    metrics["minority/score_flipped"] = scores[flipped].mean().item()
                if (~flipped).any():
                    metrics["minority/score_clean"] = scores[~flipped].mean().item()
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            if values:
                logs[f"{prefix}{name}"] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)

    # ---- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, *args, **kwargs):
        # Evaluation noise is keyed by (seed, row_index) only (`trl_adaptive.noise`): the same at every evaluation.
        # Building the eval dataloader still draws from the global RNG, so evaluate inside a fork: evaluating
        # mid-training must not shift the training run's random stream.
        device = self.args.device
        forked = [] if device.type == "cpu" else [device]
        with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
            return super().evaluate(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- saving and resuming ---------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.accelerator.unwrap_model(self.model)
        if state_dict is not None and len(state_dict) == 0:
            # DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the Trainer saves the sharded
            # DeepSpeed checkpoint instead; there are no consolidated weights to write.
            logger.warning(f"No consolidated weights written to {output_dir} (ZeRO-3 without gathering on save)")
        elif self.peft_config is not None:
            self.family.save_lora(output_dir, denoiser, self.peft_config, state_dict=state_dict)
        elif state_dict is None:
            self.family.save_pipeline(output_dir)
        else:
            self.family.save_pipeline(output_dir, denoiser_state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        self._write_model_card(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.peft_config is not None:
            self.family.load_lora_into(denoiser, resume_from_checkpoint)
        else:
            self.family.load_denoiser_into(denoiser, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # The Trainer looks for transformers/PEFT weight files and, finding none of ours (diffusers format), only logs
        # a warning: load_best_model_at_end silently kept the last weights. Load the best checkpoint like a resume.
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # The annotators are training state like the optimizer's moments: saved and restored beside them. Every process
    # calls these (sharded annotators gather their shards); only the main process writes.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.annotators is not None:
            self.bound_annotators().save(output_dir, write=self.args.should_save)
        if self.args.should_save:
            if self.pair_history is not None:
                self.pair_history.save(output_dir)
            if self.evidence_history is not None and self.evidence_history is not self.pair_history:
                self.evidence_history.save(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            if self.annotators is not None:
                self.bound_annotators().load(checkpoint)
            if self.pair_history is not None:
                self.pair_history.load(checkpoint)
            if self.evidence_history is not None and self.evidence_history is not self.pair_history:
                self.evidence_history.load(checkpoint)

    # ---- model card ------------------------------------------------------------------------------------
    def _write_model_card(self, folder: str) -> None:
        card = build_model_card(
            self.args,
            base_model=self.base_model_name,
            dataset_name=self.dataset_name,
            pipeline_class=type(self.family.pipeline).__name__,
            lora_rank=getattr(self.peft_config, "r", None),
            global_step=self.state.global_step,
            dataset_info=self.dataset_info,
            tags=self._tag_names,
        )
        Path(folder, "README.md").write_text(card)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs) -> None:
        """Write README.md into `output_dir` (used by `push_to_hub`, as in transformers)."""
        if self.is_world_process_zero():
            if dataset_name:
                self.dataset_name = dataset_name
            self._write_model_card(self.args.output_dir)
