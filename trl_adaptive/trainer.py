"""`AdaptiveDiffusionDPOTrainer`: Diffusion-DPO and Adaptive-DPO on the transformers `Trainer`.

The trainer adds only what the method needs and delegates each part to its layer (docs/architecture.md): the model
family (`self.family`, `trl_adaptive.families`) knows how each pipeline is conditioned, noised, saved and loaded;
the paired forward (`self.forwards`, `trl_adaptive.forwards`) runs policy, reference and annotators on each pair's
shared noise and timestep; the robustness methods (`self.robustness`, `trl_adaptive.robustness`: Adaptive-DPO, the
minority filter) turn a step's outputs into per-pair weights and margins; the loss is `losses.preference_loss`;
metrics are gathered across processes by `self.metrics`. The trainer builds these, calls them, and saves
diffusers-format weights plus every method's state in each checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from types import MethodType

import torch
from transformers import Trainer
from transformers.trainer_utils import enable_full_determinism, set_seed
from transformers.utils import logging

from ._deprecated import DeprecatedTrainerAttributes
from .caching import use_latent_cache
from .callbacks import (
    CollatorEpochCallback,
    RobustnessStepCallback,
    use_diffusers_tensorboard,
)
from .config import AdaptiveDPOConfig
from .data import PreferenceCollator, dataset_columns, detect_schema, is_streamed, prepare_preference_dataset
from .distributed import prepare_reference_model
from .families import family_for, load_pipeline, replace_vae
from .forwards import PairForwards
from .losses import preference_loss
from .metrics import TrainingMetrics
from .model_card import build_model_card
from .robustness import GlobalBatch, PairStep, build_methods, check_training_columns, combine
from .sampling import SampleImagesCallback

logger = logging.get_logger(__name__)


def _train_if_mode_changes(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return module if module.training == mode else torch.nn.Module.train(module, mode)

TRAINING_ARGS_NAME = "training_args.bin"
#: Where `skip_bad_rows` lists the rows it dropped (row, column, error per split).
BAD_ROWS_FILE = "bad_rows.json"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


class AdaptiveDiffusionDPOTrainer(DeprecatedTrainerAttributes, Trainer):
    """Preference-tune a diffusers text-to-image pipeline with Diffusion-DPO or Adaptive-DPO.

    Args:
        model: a diffusers pipeline of a supported family, or a folder / Hub id that `from_pretrained` loads.
        ref_model: frozen reference denoiser for full fine-tuning (default: a copy of the initial denoiser).
            Must be None with `peft_config`: the reference is then the denoiser with its adapters disabled.
        args: an `AdaptiveDPOConfig`.
        train_dataset, eval_dataset: `datasets.Dataset` or `datasets.IterableDataset` (a stream: set `max_steps`) in
            the Pick-a-Pic, TRL or HPDv2 schema (see `trl_adaptive.data`). With `cache_dir`, a stream is read once
            into the latent cache and training reads the cache.
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
        self.family.configure(args)
        self.peft_config = peft_config
        self.weight_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        denoiser = self._prepare_denoiser(args, peft_config)
        self.ref_model = self._prepare_reference(ref_model, denoiser, peft_config)

        self.dataset_info = None
        if is_streamed(train_dataset) and args.cache_dir is None and args.world_size > 1:
            # accelerate would dispatch the stream's batches from the main process, and cannot send the prompts.
            raise ValueError(
                f"A streamed train_dataset trains on {args.world_size} processes only through the latent cache: set "
                "cache_dir (every process then encodes its share of the stream, and training reads the cache), or "
                "train on one process, or pass a map-style datasets.Dataset."
            )
        streamed = [name for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset))
                    if is_streamed(data)]
        if streamed and args.cache_dir is None and getattr(args, "workers_sized_to_machine", False):
            args.dataloader_num_workers = 0  # the machine-sized default: one reader keeps the stream's row ids in order
        if streamed and args.cache_dir is None and args.dataloader_num_workers > 0:
            # DataLoader workers would each read a share of the stream's files, numbering their rows from 0.
            raise ValueError(
                f"A streamed {streamed[0]} without cache_dir needs dataloader_num_workers=0 (got "
                f"{args.dataloader_num_workers}): workers would each read part of the stream and give its rows "
                "colliding row_index values. Set cache_dir (training then reads the cache, with workers) or 0 workers."
            )
        if train_dataset is not None:
            train_dataset, self.dataset_info = self._prepare_dataset(train_dataset, args, "train")
            check_training_columns(args, dataset_columns(train_dataset))
            if self.dataset_info.get("streamed"):
                logger.info(f"Preference data: {self.dataset_info['schema']} schema, streamed (rows checked as read)")
            else:
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
                detect_schema(dataset_columns(reference)),
                args.resolution,
                random_crop=args.random_crop,
                random_flip=args.random_flip,
                empty_prompt_probability=args.empty_prompt_probability,
                seed=args.seed,
            )

        super().__init__(
            model=denoiser,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=[RobustnessStepCallback(self), CollatorEpochCallback(self), *(callbacks or [])],
            optimizers=optimizers,
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if self.accelerator.num_processes != launched:
            # Seen on CPU: DeepSpeed under accelerate gets no process-group backend and each process trains alone.
            raise RuntimeError(
                f"Launched as {launched} processes (WORLD_SIZE) but training would run in {self.accelerator.num_processes}: "
                "the processes did not form one group. On CPUs pass ddp_backend='gloo' (GPUs use NCCL by default)."
            )
        self.family.place_frozen_modules(self.accelerator.device, self.weight_dtype)
        if self.ref_model is not None:
            # The reference must compute exactly as the policy does (identical weights give a logit of exactly 0):
            # DeepSpeed runs the policy in the training dtype, autocast mixed precision keeps its weights in fp32.
            policy_dtype = self.weight_dtype if self.is_deepspeed_enabled else next(denoiser.parameters()).dtype
            self.ref_model = prepare_reference_model(self.ref_model, self.accelerator, policy_dtype)
            if args.torch_compile:  # the Trainer compiles the policy; the frozen reference is ours to compile alike
                self.ref_model = torch.compile(self.ref_model, backend=args.torch_compile_backend,
                                               mode=args.torch_compile_mode)
        if args.cache_dir is not None:
            # Before the methods are built: they size their per-pair records by the data they train on, which for a
            # stream is known once the cache has read it.
            use_latent_cache(self)  # every process encodes its share (or all find the cache) and the collator swaps
        self.forwards = PairForwards(self.family, self.accelerator, self.weight_dtype, args.seed, self.ref_model,
                                     wrapped_model=lambda: self.model_wrapped)
        batch = GlobalBatch(self.accelerator)
        self.metrics = TrainingMetrics(batch, keep_pair_statistics=bool(args.eval_prompts))
        #: The robustness methods the config turns on, by name, in running order (`trl_adaptive.robustness`).
        self.robustness = build_methods(args, self.train_dataset, batch, self.forwards)
        for method in self.robustness.values():
            method.setup(denoiser, self.accelerator)  # Adaptive-DPO creates its annotators (sharded under ZeRO-3)
        if peft_config is not None and not self.is_deepspeed_enabled:
            self.forwards.use_lora(denoiser, peft_config, batch_annotators=args.batch_frozen_forwards)
        use_diffusers_tensorboard(self.callback_handler)
        if args.eval_prompts:
            self.add_callback(SampleImagesCallback(self))

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
        if args.use_channels_last(self.family.convolutional_denoiser):
            denoiser.to(memory_format=torch.channels_last)  # the reference and annotators copy it, strides included
        if not self.family.uses_sdpa():
            logger.warning(f"Attention processors without scaled_dot_product_attention: {self.family.attention_processors()}")
        return denoiser

    def _prepare_reference(self, ref_model, denoiser, peft_config):
        if peft_config is not None:
            if ref_model is not None:
                raise ValueError("ref_model must be None with peft_config: the reference is the base UNet (adapters off)")
            return None
        reference = ref_model if ref_model is not None else copy.deepcopy(denoiser)
        return reference.requires_grad_(False).eval()

    # ---- the loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """loss_i = W_i * ell(beta * l_i - gamma_i): l_i the pair's Diffusion-DPO logit on shared noise and timestep,
        W_i and gamma_i the robustness methods' detached weights and margins (1 and 0 without any)."""
        mode, step = ("train" if model.training else "eval"), self.state.global_step
        with_annotators = self.annotators_due(model.training)
        out = self.forwards.pair_forward(model, inputs, step, with_annotators)
        self.metrics.record_pairs(mode, out, self.args.beta)
        pairs = PairStep(out, inputs, step, model.training, policy=self.model, with_annotators=with_annotators)
        treatment = combine(method.treat(pairs, self.metrics) for method in self.robustness.values())
        losses = preference_loss(out["logits"][0], self.args.beta, self.args.loss_type, self.args.label_smoothing,
                                 treatment.weights, treatment.margins, misranked_weight=self.args.misranked_weight,
                                 max_margin=self.args.max_margin)
        loss = losses.mean()
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The Trainer calls model.train() at every step: a walk over every module (1-2 ms of host time on the tiny
        # UNet, 3.4 ms on SD 1.5's with LoRA; a launch-bound GPU step waits for it). Only evaluation and the sample
        # callback change the mode, and both restore it, so while the model is in train mode the walk is skipped.
        if not model.training:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train = MethodType(_train_if_mode_changes, model)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del model.train

    def annotators_due(self, training: bool) -> bool:
        """Whether this step's forward runs the EMA annotators (some robustness method wants them)."""
        return any(m.wants_annotators(self.state.global_step, training) for m in self.robustness.values())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The only place our metrics and the methods' device state are read back to the host (once per log).
        self.metrics.flush("train" if self.model.training else "eval", logs)
        for method in self.robustness.values():
            method.on_log(logs)
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

    # The robustness methods' state (annotators, per-pair histories) is training state like the optimizer's
    # moments: saved and restored beside them. Every process calls these (sharded annotators gather their shards).
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        for method in self.robustness.values():
            method.save(output_dir, write=self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            for method in self.robustness.values():
                method.load(checkpoint)

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
            denoiser_class=type(self.family.denoiser).__name__,
        )
        Path(folder, "README.md").write_text(card)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs) -> None:
        """Write README.md into `output_dir` (used by `push_to_hub`, as in transformers)."""
        if self.is_world_process_zero():
            if dataset_name:
                self.dataset_name = dataset_name
            self._write_model_card(self.args.output_dir)
