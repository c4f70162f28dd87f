"""Images generated while training, logged to the trackers with the minority statistics' histograms.

With `AdaptiveDPOConfig.eval_prompts` set, every `sample_steps` optimizer steps the current policy generates one
image per prompt with fixed seeds (the same noise at every sampling, so the images show what training changed) and
the trainer logs them, and histograms of the last step's per-pair minority score, weights and filter keep mask, to
each tracker of `report_to` that takes images: TensorBoard, Weights & Biases and Trackio; with `sample_reward_model` their
mean reward goes out as a scalar with the next training log. Off by default, and then nothing here runs.

Every process generates (under DeepSpeed ZeRO-3 each forward gathers the sharded weights, a collective); only the
main process logs. Generation runs in evaluation mode, under the training's autocast, inside a forked RNG: the
training run's random stream is not touched.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback, TrackioCallback, WandbCallback


def read_prompts(prompts: list[str]) -> list[str]:
    """`eval_prompts` as given, or the lines of a .txt file given as its single entry."""
    if len(prompts) == 1 and prompts[0].endswith(".txt"):
        with open(prompts[0]) as f:
            return [line.strip() for line in f if line.strip()]
    return list(prompts)


class SampleImagesCallback(TrainerCallback):
    """Generates and logs the samples every `args.sample_steps` steps (and after the last step)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.prompts = read_prompts(trainer.args.eval_prompts)
        self.scorer = None  # loaded now, on the process that logs: a wrong name or path fails before training
        spec = trainer.args.sample_reward_model
        if spec and trainer.is_world_process_zero():
            from .evaluation.scorers import load_scorer

            name, _, path = spec.partition("=")
            self.scorer = load_scorer(name, path or None, device=trainer.accelerator.device)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.sample_steps == 0 or state.global_step == state.max_steps:
            self.sample_and_log(state.global_step)

    @torch.no_grad()
    def generate(self) -> list:
        trainer, args = self.trainer, self.trainer.args
        pipeline = trainer.family.pipeline
        denoiser = trainer.forwards.unwrapped(trainer.model)
        was_training = denoiser.training
        device = trainer.accelerator.device
        forked = [] if device.type == "cpu" else [device]
        denoiser.eval()
        try:
            with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"), \
                    trainer.accelerator.autocast():
                generators = [torch.Generator(device=device).manual_seed(args.seed + k) for k in range(len(self.prompts))]
                pipeline.set_progress_bar_config(disable=True)
                return pipeline(
                    self.prompts, generator=generators, num_inference_steps=args.sample_num_inference_steps,
                    guidance_scale=args.sample_guidance_scale, height=args.resolution, width=args.resolution,
                ).images  # fmt: skip
        finally:
            denoiser.train(was_training)

    def sample_and_log(self, step: int) -> None:
        images = self.generate()
        if not self.trainer.is_world_process_zero():
            return
        if self.scorer is not None:
            # Goes out with the next training log, like every other metric (logging from here would reset the
            # Trainer's should_log flag and drop this step's training log).
            reward = float(self.scorer.score(images, self.prompts).mean())
            self.trainer.metrics.add("train", f"samples/{self.scorer.name}", reward)
        histograms = {k: v.cpu().numpy() for k, v in self.trainer.metrics.last_pair_statistics.items()}
        for callback in self.trainer.callback_handler.callbacks:
            for tracker, log in IMAGE_LOGGERS.items():
                if isinstance(callback, tracker):
                    log(callback, images, self.prompts, histograms, step)


def _log_to_tensorboard(callback, images, prompts, histograms, step):
    if callback.tb_writer is None:  # not set up on this process
        return
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (N, H, W, 3) uint8
    callback.tb_writer.add_images("samples", pixels, step, dataformats="NHWC")
    for name, values in histograms.items():
        callback.tb_writer.add_histogram(name, values, step)
    callback.tb_writer.flush()


def _log_to_wandb(callback, images, prompts, histograms, step):
    if not getattr(callback, "_initialized", False):
        return
    wandb = callback._wandb
    logged = {"samples": [wandb.Image(image, caption=p) for image, p in zip(images, prompts)]}
    logged.update({name: wandb.Histogram(values) for name, values in histograms.items()})
    wandb.log({**logged, "train/global_step": step})


def _log_to_trackio(callback, images, prompts, histograms, step):
    if not getattr(callback, "_initialized", False):
        return
    trackio = callback._trackio
    # One key per prompt: trackio.log skips a list of images (it stores single media values, tables and traces).
    logged = {f"samples/{k}": trackio.Image(image.convert("RGB"), caption=p) for k, (image, p) in enumerate(zip(images, prompts))}
    logged.update({name: trackio.Histogram(values) for name, values in histograms.items()})
    trackio.log({**logged, "train/global_step": step})  # as transformers' TrackioCallback logs the training metrics


#: The transformers tracker callbacks that take images, and how each one is given the samples.
IMAGE_LOGGERS = {TensorBoardCallback: _log_to_tensorboard, WandbCallback: _log_to_wandb, TrackioCallback: _log_to_trackio}
