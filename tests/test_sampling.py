"""Images generated while training (`eval_prompts`): logged to TensorBoard with the minority histograms, read back
from the event files; sampling does not change the training run; off by default."""

from __future__ import annotations

import glob

import pytest
import torch
from tiny_setup import lora_config, tiny_args

from trl_adaptive import AdaptiveDiffusionDPOTrainer
from trl_adaptive.sampling import SampleImagesCallback
from trl_adaptive.tiny import tiny_sd_pipeline, toy_preference_dataset


def train(tmp_path, **overrides):
    args = tiny_args(tmp_path, max_steps=3, annotator_decays=[0.9, 0.5], **overrides)
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=args, train_dataset=toy_preference_dataset(8),
                                          peft_config=lora_config())
    trainer.train()
    return trainer


def test_samples_and_histograms_reach_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5: where TensorBoard writes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue square\n")
    train(tmp_path, eval_prompts=[str(prompts)], sample_steps=2, sample_num_inference_steps=2,
          report_to=["tensorboard"])
    (events,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    log = EventAccumulator(events, size_guidance={"images": 0, "histograms": 0}).Reload()
    images = log.Images("samples")
    assert [e.step for e in images] == [2, 3]  # every 2 steps, and after the last one
    assert (images[0].width, images[0].height) == (32 * 2, 32)  # both prompts, side by side, at the resolution
    for name in ("minority/score", "minority/weight"):
        histograms = log.Histograms(name)
        assert [h.step for h in histograms] == [2, 3] and histograms[0].histogram_value.num == 2  # one value per pair


def test_sample_reward_is_logged_as_a_scalar(tmp_path):
    from trl_adaptive.evaluation.scorers import load_scorer
    from trl_adaptive.tiny import tiny_clip_scorer

    clip = tiny_clip_scorer(str(tmp_path / "clip"))
    trainer = train(tmp_path / "run", eval_prompts=["a red square", "a blue square"], sample_steps=3,
                    sample_num_inference_steps=2, sample_reward_model=f"clip={clip}")
    (logged,) = [e for e in trainer.state.log_history if "samples/clip" in e]
    assert logged["step"] == 3 and "loss" in logged  # with the step's training log, which is not lost
    assert all("rewards/margins" in e for e in trainer.state.log_history if "loss" in e)
    assert sum("loss" in e for e in trainer.state.log_history) == 3
    images = trainer.callback_handler.callbacks[-1].generate()  # the same seeds: the same images again
    expected = float(load_scorer("clip", clip).score(images, ["a red square", "a blue square"]).mean())
    assert logged["samples/clip"] == pytest.approx(expected, rel=1e-5)


def test_a_wrong_sample_reward_model_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown scorer 'pickscor'"):
        AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=tiny_args(tmp_path, eval_prompts=["a"],
                                    sample_reward_model="pickscor"), train_dataset=toy_preference_dataset(8))


def test_sampling_leaves_the_training_run_unchanged(tmp_path):
    plain = train(tmp_path / "plain")
    sampled = train(tmp_path / "sampled", eval_prompts=["a red square"], sample_steps=1, sample_num_inference_steps=2)
    for (name, a), b in zip(plain.model.named_parameters(), sampled.model.parameters()):
        assert torch.equal(a, b), name


def test_sampling_is_off_by_default(tmp_path):
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=tiny_args(tmp_path),
                                          train_dataset=toy_preference_dataset(8), peft_config=lora_config())
    assert not any(isinstance(c, SampleImagesCallback) for c in trainer.callback_handler.callbacks)


class _RecordingTrackio:
    """Stands in for the `trackio` module behind transformers' TrackioCallback (trackio is not installed here: it
    pins pillow < 13): records what is logged, with trackio's Image / Histogram signatures."""

    class Image:
        def __init__(self, value, caption=None):
            self.value, self.caption = value, caption

    class Histogram:
        def __init__(self, sequence=None, np_histogram=None, num_bins=64):
            self.values = sequence

    def __init__(self):
        self.logged = []

    def log(self, metrics, step=None):
        self.logged.append((step, metrics))

    def __getattr__(self, name):  # init / finish / config.update ...: nothing to do in a test
        return _RecordingTrackio._noop

    class _Noop:
        def __call__(self, *args, **kwargs):
            return None

        def __getattr__(self, name):
            return self

    _noop = _Noop()


def test_samples_and_histograms_reach_trackio(tmp_path):
    from transformers.integrations import TrackioCallback

    callback = TrackioCallback.__new__(TrackioCallback)  # its __init__ imports trackio
    callback._trackio, callback._initialized = _RecordingTrackio(), True
    callback._space_id = callback._static_space_id = None
    args = tiny_args(tmp_path, max_steps=3, annotator_decays=[0.9, 0.5], eval_prompts=["a red square", "a blue square"],
                     sample_steps=2, sample_num_inference_steps=2)
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=args, train_dataset=toy_preference_dataset(8),
                                          peft_config=lora_config(), callbacks=[callback])
    trainer.train()
    samples = [(m["train/global_step"], m) for _, m in callback._trackio.logged if "samples/0" in m]
    assert [step for step, _ in samples] == [2, 3]
    step, metrics = samples[0]
    # One image per key (trackio.log drops a list of images; checked with trackio 0.43 itself)
    assert [metrics[f"samples/{k}"].caption for k in range(2)] == ["a red square", "a blue square"]
    assert metrics["samples/0"].value.size == (32, 32) and metrics["samples/0"].value.mode == "RGB"
    assert len(metrics["minority/score"].values) == 2 and len(metrics["minority/weight"].values) == 2  # one per pair
    assert any("train/loss" in m for _, m in callback._trackio.logged)  # the Trainer's own logs go through it too
