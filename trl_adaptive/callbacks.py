"""The trainer's own callbacks: robustness methods told of every optimizer step, the collator told of the epoch,
TensorBoard logging that works with a diffusers denoiser."""

from __future__ import annotations

import json
import math

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback


class RobustnessStepCallback(TrainerCallback):
    """Tells every robustness method of each optimizer step (the EMA annotators move one step)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.forwards.unwrapped(self.trainer.model)
        for method in self.trainer.robustness.values():
            method.on_optimizer_step(model)


class CollatorEpochCallback(TrainerCallback):
    """Tells the collator the epoch, so its random augmentations are a function of (seed, epoch, row) and a resumed
    run draws the same ones as an uninterrupted run."""

    def __init__(self, trainer):
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


def use_diffusers_tensorboard(callback_handler) -> None:
    """Swap transformers' TensorBoard callback, if `report_to` added it, for `DiffusersTensorBoardCallback`."""
    for callback in list(callback_handler.callbacks):
        if type(callback) is TensorBoardCallback:
            callback_handler.remove_callback(callback)
            callback_handler.add_callback(DiffusersTensorBoardCallback())
