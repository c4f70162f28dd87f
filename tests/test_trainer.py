"""AdaptiveDiffusionDPOTrainer on a tiny Stable Diffusion pipeline: training, evaluation, saving, resuming."""

import math
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from tiny_setup import SHARED_MODEL_CONFIGS, lora_config, tiny_args
from transformers import TrainerCallback

from trl_adaptive import AdaptiveDPOConfig, AdaptiveDiffusionDPOTrainer, flip_labels
from trl_adaptive.losses import DEFAULT_MISRANKED_WEIGHT
from trl_adaptive.tiny import tiny_sd_pipeline, toy_preference_dataset

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/margins_abs", "rewards/accuracies")
DENOISING_METRICS = tuple(
    f"denoising_loss/{m}_{i}" for m in ("policy", "reference") for i in ("chosen", "rejected")
)
MINORITY_METRICS = ("minority/score_mean", "minority/weight_mean", "minority/weight_min")


def snapshot(module: torch.nn.Module, trainable: bool | None = None) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in module.named_parameters()
        if trainable is None or p.requires_grad == trainable
    }


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    params = dict(module.named_parameters())
    return {n for n, t in before.items() if not torch.equal(t, params[n].detach())}


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps (after that step's checkpoint is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


# ---- training: each mode and loss_type -------------------------------------------------------------------------

BETA = 2500.0
#: |beta * l| a first step may show where the policy's logits and the reference's come from different forwards.
ROUNDING_OF_BETA_L = 1e-3


def expected_first_loss(loss_type="sigmoid", adaptive=True, annotator_decays=(0.9999, 0.5), weight_fn="linear",
                        margin="linear", label_smoothing=0.0, misranked_weight=None):
    """The loss of the first step, by hand. The policy still equals the reference (LoRA B = 0, or an exact copy), so
    l = 0 for every pair; the EMA annotators equal the model, so u = 0; without them u = sigmoid(-rho * 0) = 1/2."""
    u = 0.0 if annotator_decays else 0.5
    weight, gamma = 1.0, 0.0
    if adaptive:
        k, c = 10.0, 1.0  # default weight_scale and weight_intercept
        weight = {"linear": 1 / (k * u + c), "sqrt": 1 / (math.exp(k * math.sqrt(u)) + c)}[weight_fn]
        gamma = 0.0 - {"linear": u, "quadratic": u**2}[margin] / BETA  # mean logit 0, k2 = 1 / beta
    z, eps = -gamma, label_smoothing
    loss = {
        "sigmoid": (1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z)),
        "robust": ((1 - eps) * math.log1p(math.exp(-z)) - eps * math.log1p(math.exp(z))) / (1 - 2 * eps),
        "hinge": max(0.0, 1 - z),
        "ipo": ((z - 0.5) / BETA) ** 2,
        "capped_sigmoid": math.log1p(math.exp(-z)) if z >= 0 else math.log(2.0) - misranked_weight * z,
    }[loss_type]
    return weight * loss


CASES = {
    "lora-adaptive-sigmoid": dict(lora=True, adaptive=True, loss_type="sigmoid"),
    "lora-plain-sigmoid": dict(lora=True, adaptive=False, loss_type="sigmoid"),
    "full-adaptive-sigmoid": dict(lora=False, adaptive=True, loss_type="sigmoid"),
    "full-plain-sigmoid": dict(lora=False, adaptive=False, loss_type="sigmoid"),
    "lora-adaptive-ipo": dict(lora=True, adaptive=True, loss_type="ipo"),
    "lora-adaptive-hinge": dict(lora=True, adaptive=True, loss_type="hinge"),
    "lora-adaptive-robust": dict(lora=True, adaptive=True, loss_type="robust", label_smoothing=0.1),
    "lora-plain-cdpo": dict(lora=True, adaptive=False, loss_type="sigmoid", label_smoothing=0.1),
    "lora-plain-capped": dict(lora=True, adaptive=False, loss_type="capped_sigmoid", misranked_weight=0.2),
    "lora-adaptive-no-ema": dict(lora=True, adaptive=True, loss_type="sigmoid", annotator_decays=[]),
    "lora-adaptive-quadratic-sqrt": dict(lora=True, adaptive=True, loss_type="sigmoid", weight_fn="sqrt", margin="quadratic"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_moves_trainable_weights_only_and_logs_metrics(case, toy_pairs, tmp_path):
    options = dict(CASES[case])
    lora = options.pop("lora")
    pipeline = tiny_sd_pipeline(seed=0)
    dataset = flip_labels(toy_pairs, rate=0.5, seed=0) if options["adaptive"] else toy_pairs
    trainer = AdaptiveDiffusionDPOTrainer(
        pipeline,
        args=tiny_args(tmp_path, beta=BETA, **options),
        train_dataset=dataset,
        peft_config=lora_config() if lora else None,
    )
    unet = trainer.model
    trainable, frozen = snapshot(unet, trainable=True), snapshot(unet, trainable=False)
    encoder, vae = snapshot(pipeline.text_encoder), snapshot(pipeline.vae)
    if lora:
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert not frozen and trainer.ref_model is not None
        reference = snapshot(trainer.ref_model)

    trainer.train()

    assert changed(trainable, unet) == set(trainable)  # every trainable weight moved
    assert not changed(frozen, unet) and not changed(encoder, pipeline.text_encoder) and not changed(vae, pipeline.vae)
    if not lora:
        assert not changed(reference, trainer.ref_model)

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    # Rounding, not exact: with LoRA and EMA annotators the reference runs in one batched call with the annotators
    # (batch_frozen_forwards), whose float rounding differs from the policy's forward; l is then ~1e-7, not 0, and
    # beta = 2500 makes beta * l ~3e-4 (seen with diffusers 0.42 / peft 0.22 / torch 2.13; bit-exact before).
    rounding = ROUNDING_OF_BETA_L if lora and options["adaptive"] and options.get("annotator_decays") != [] else 0.0
    assert logs[0]["loss"] == pytest.approx(expected_first_loss(**options), rel=max(1e-5, 5 * rounding))
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for name in REWARD_METRICS + DENOISING_METRICS:
            assert math.isfinite(entry[name]), name
        assert all((name in entry) == options["adaptive"] for name in MINORITY_METRICS)
    # policy == reference at the first step
    assert abs(logs[0]["rewards/margins"]) <= rounding and abs(logs[0]["rewards/margins_abs"]) <= rounding
    assert logs[1]["rewards/margins_abs"] >= abs(logs[1]["rewards/margins"]) and logs[1]["rewards/margins_abs"] > 0
    if options["adaptive"]:
        assert 0.0 < logs[1]["minority/weight_min"] <= logs[1]["minority/weight_mean"] <= 1.0
        assert "minority/score_flipped" in logs[1] and "minority/score_clean" in logs[1]
        expected_annotators = len(options.get("annotator_decays", [0.9999, 0.5]))
        assert (trainer.robustness["adaptive"].annotators is not None) == (expected_annotators > 0)
    else:
        assert "adaptive" not in trainer.robustness


def test_metric_warmup_runs_plain_dpo_first(toy_pairs, tmp_path):
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sd_pipeline(), args=tiny_args(tmp_path, metric_warmup_steps=1), train_dataset=toy_pairs,
        peft_config=lora_config(),
    )
    trainer.train()
    first, second = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert not any(name in first for name in MINORITY_METRICS)  # step 1: plain Diffusion-DPO
    assert all(name in second for name in MINORITY_METRICS)  # step 2: the metric is on
    assert trainer.robustness["adaptive"].annotators.num_updates == 2  # the annotators were updated during the warm-up too


def test_logged_margin_is_the_adaptive_margin_not_the_logit(toy_pairs, tmp_path):
    # margin="none": gamma = 0 at every step, while beta * l (rewards/margins) has moved off 0 by step 2.
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sd_pipeline(), args=tiny_args(tmp_path, margin="none"), train_dataset=toy_pairs, peft_config=lora_config()
    )
    trainer.train()
    second = [entry for entry in trainer.state.log_history if "loss" in entry][1]
    assert second["minority/margin_mean"] == 0.0 and second["rewards/margins"] != 0.0


def test_trl_schema_trains(tmp_path):
    dataset = toy_preference_dataset(num_pairs=4, size=32, schema="trl")
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sd_pipeline(), args=tiny_args(tmp_path, max_steps=1), train_dataset=dataset, peft_config=lora_config()
    )
    trainer.train()
    assert trainer.dataset_info["schema"] == "trl" and trainer.dataset_info["num_rows"] == 4


def test_ties_kept_with_drop_ties_false_train(tmp_path):
    from datasets import Dataset

    rows = toy_preference_dataset(num_pairs=4, size=32).to_list()
    for row in rows[:2]:
        row["label_0"] = row["label_1"] = 0.5
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sd_pipeline(), args=tiny_args(tmp_path, drop_ties=False), train_dataset=Dataset.from_list(rows),
        peft_config=lora_config(),
    )
    assert trainer.dataset_info["num_ties"] == 2 and trainer.dataset_info["num_rows"] == 4
    trainer.train()
    assert trainer.state.global_step == 2


def test_v_prediction_trains_on_velocity_target(toy_pairs, tmp_path):
    pipeline = tiny_sd_pipeline(prediction_type="v_prediction")
    trainer = AdaptiveDiffusionDPOTrainer(
        pipeline, args=tiny_args(tmp_path), train_dataset=toy_pairs, peft_config=lora_config()
    )
    family = trainer.family
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 500, 999])
    alpha_bar = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(family.target(latents, noise, timesteps), velocity)

    before = snapshot(trainer.model, trainable=True)
    trainer.train()
    assert changed(before, trainer.model) == set(before)
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_epsilon_target_is_the_noise(toy_pairs, tmp_path):
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=tiny_args(tmp_path), train_dataset=toy_pairs)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(trainer.family.target(latents, noise, torch.tensor([3, 700])), noise)


# ---- evaluation ---------------------------------------------------------------------------------------------


def test_evaluate_returns_eval_prefixed_metrics(toy_pairs, tmp_path):
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sd_pipeline(),
        args=tiny_args(tmp_path),
        train_dataset=toy_pairs,
        eval_dataset=toy_pairs.select(range(4)),
        peft_config=lora_config(),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert all(key.startswith("eval_") for key in metrics if key != "epoch")  # transformers adds `epoch`
    for name in ("loss",) + REWARD_METRICS + DENOISING_METRICS + MINORITY_METRICS:
        assert math.isfinite(metrics[f"eval_{name}"]), name
    # every evaluation draws the same noise, timesteps and VAE samples, and leaves the training RNG where it was
    rng_before = torch.get_rng_state()
    again = trainer.evaluate()
    assert again["eval_loss"] == metrics["eval_loss"]
    assert again["eval_rewards/margins"] == metrics["eval_rewards/margins"]
    assert torch.equal(torch.get_rng_state(), rng_before)


# ---- saving, loading, model cards -------------------------------------------------------------------------------


def assert_model_card(folder):
    card = open(os.path.join(folder, "README.md")).read()
    assert "wallace2024diffusion" in card and "arXiv:2311.12908" in card  # Diffusion-DPO
    assert "2503.16921" in card  # Adaptive-DPO
    assert "| `beta` | `2500.0` |" in card


def test_lora_round_trip_through_load_lora_weights(tiny_pipeline_dir, toy_pairs, tmp_path):
    output_dir = tmp_path / "out"
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_pipeline_dir,  # a folder: the trainer loads it with from_pretrained
        args=tiny_args(output_dir, save_strategy="steps", save_steps=1),
        train_dataset=toy_pairs,
        peft_config=lora_config(r=4, alpha=8),
    )
    trainer.train()
    trainer.save_model()
    assert os.path.isfile(output_dir / "pytorch_lora_weights.safetensors")
    for folder in (output_dir, output_dir / "checkpoint-1", output_dir / "checkpoint-2"):
        assert_model_card(folder)
    card = (output_dir / "README.md").read_text()
    assert tiny_pipeline_dir in card  # named in the text; not as `base_model:`, which the Hub rejects for a folder
    assert "base_model:" not in card.split("---")[1]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    sample, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    hidden = torch.randn(1, 16, 32)
    with torch.no_grad():
        base_out = pipe.unet(sample, t, hidden).sample
    pipe.load_lora_weights(str(output_dir))

    trained = get_peft_model_state_dict(trainer.model)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.unet.active_adapters()[0])
    assert trained.keys() == loaded.keys()
    for name in trained:
        torch.testing.assert_close(loaded[name], trained[name])
    with torch.no_grad():
        loaded_out = pipe.unet(sample, t, hidden).sample
        trained_out = trainer.model(sample, t, hidden).sample
    torch.testing.assert_close(loaded_out, trained_out)  # alpha / r scaling survived the round trip
    assert not torch.allclose(loaded_out, base_out)


def test_full_fine_tune_saves_a_loadable_pipeline(toy_pairs, tmp_path):
    output_dir = tmp_path / "out"
    pipeline = tiny_sd_pipeline()
    encoder_before = snapshot(pipeline.text_encoder)
    trainer = AdaptiveDiffusionDPOTrainer(
        pipeline, args=tiny_args(output_dir, save_strategy="steps", save_steps=1), train_dataset=toy_pairs
    )
    trainer.train()
    trainer.save_model()
    for folder in (output_dir, output_dir / "checkpoint-1", output_dir / "checkpoint-2"):
        assert_model_card(folder)

    loaded = StableDiffusionPipeline.from_pretrained(str(output_dir))
    trained = trainer.model.state_dict()
    for name, tensor in loaded.unet.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])
    assert not changed(encoder_before, loaded.text_encoder)
    initial = trainer.ref_model.state_dict()
    assert any(not torch.equal(initial[n], t) for n, t in loaded.unet.state_dict().items())


def test_model_card_records_ties_and_create_model_card(tmp_path):
    rows = toy_preference_dataset(num_pairs=4, size=32).to_list()
    rows[1]["label_0"] = rows[1]["label_1"] = 0.5
    from datasets import Dataset

    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sd_pipeline(), args=tiny_args(tmp_path, max_steps=1), train_dataset=Dataset.from_list(rows),
        peft_config=lora_config(),
    )
    assert trainer.dataset_info["num_ties"] == 1 and trainer.dataset_info["num_rows"] == 3
    trainer.create_model_card(dataset_name="my/pairs")
    card = (tmp_path / "README.md").read_text()
    assert "`my/pairs`" in card and "1 ties dropped" in card and "LoRA (rank 4)" in card


def test_model_card_says_when_and_how_the_minority_filter_dropped_pairs(tmp_path):
    from trl_adaptive.model_card import build_model_card

    def card(**fields):
        return build_model_card(tiny_args(tmp_path, **fields), None, None, "StableDiffusionPipeline", None, 10)

    assert "minority filter" not in card() and "| `minority_filter` | `none` |" in card()
    contrast = card(minority_filter="threshold", minority_evidence="prompt_contrast")
    assert "the reference model, judging which image fits the prompt better" in contrast
    assert "| `minority_evidence` | `prompt_contrast` |" in contrast
    assert "the model being trained ranked them against their label" in card(minority_filter="threshold")


def test_model_card_names_a_hub_base_model_in_metadata(tmp_path):
    from trl_adaptive.model_card import build_model_card

    args = tiny_args(tmp_path)
    card = build_model_card(args, "stable-diffusion-v1-5/stable-diffusion-v1-5", None, "StableDiffusionPipeline", 8, 10)
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in card.split("---")[1]
    assert "full UNet" not in card and "LoRA (rank 8)" in card and "10 optimizer steps" in card
    card = build_model_card(args, str(tmp_path), None, "StableDiffusionPipeline", None, 10)
    assert "base_model:" not in card.split("---")[1] and "full fine-tune of the UNet2DConditionModel" in card


# ---- resume ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_matches_uninterrupted_run(lora, tmp_path):
    # 4 pairs, batch 2: 2 steps per epoch. The interrupted run stops at step 3 (mid epoch 1), the resumed one runs
    # to step 5 (into epoch 2). Random flips and empty prompts are on, so the augmentation stream must resume too.
    dataset = toy_preference_dataset(num_pairs=4, size=32)

    def run(output_dir, stop_at=None, resume=None):
        args = tiny_args(
            output_dir, max_steps=5, save_strategy="steps", save_steps=3, random_flip=True,
            empty_prompt_probability=0.5, beta=500.0,
        )
        trainer = AdaptiveDiffusionDPOTrainer(
            tiny_sd_pipeline(seed=0),
            args=args,
            train_dataset=dataset,
            peft_config=lora_config() if lora else None,
            callbacks=[StopAt(stop_at)] if stop_at else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", stop_at=3)
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "b" / "checkpoint-3"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "annotators.safetensors"):
        assert (checkpoint / name).is_file(), name
    resumed = run(tmp_path / "b", resume=str(checkpoint))

    assert resumed.state.global_step == uninterrupted.state.global_step == 5
    final_a, final_b = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], rtol=0, atol=0)
    assert resumed.robustness["adaptive"].annotators.num_updates == uninterrupted.robustness["adaptive"].annotators.num_updates == 5
    for shadow_a, shadow_b in zip(uninterrupted.robustness["adaptive"].annotators.shadows, resumed.robustness["adaptive"].annotators.shadows):
        for name in shadow_a:
            torch.testing.assert_close(shadow_b[name], shadow_a[name], rtol=0, atol=0)
    losses_a = [e["loss"] for e in uninterrupted.state.log_history if "loss" in e]
    losses_b = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert losses_b == losses_a
    # and training did something: the final weights differ from the step-3 checkpoint
    assert any(not torch.equal(interrupted.model.state_dict()[n], final_a[n]) for n in final_a)


class PreferFirstEvaluation(TrainerCallback):
    """Adds an eval metric that is best at step 1, so load_best_model_at_end must go back to checkpoint-1."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_first_is_best"] = 1.0 if state.global_step == 1 else 0.0


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_load_best_model_at_end_restores_the_best_checkpoint(lora, toy_pairs, tmp_path):
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sd_pipeline(),
        args=tiny_args(
            tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
            load_best_model_at_end=True, metric_for_best_model="first_is_best", greater_is_better=True,
        ),
        train_dataset=toy_pairs,
        eval_dataset=toy_pairs.select(range(2)),
        peft_config=lora_config() if lora else None,
        callbacks=[PreferFirstEvaluation()],
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    expected = tiny_sd_pipeline()
    if lora:
        expected.load_lora_weights(str(tmp_path / "checkpoint-1"))
        expected_state = get_peft_model_state_dict(expected.unet, adapter_name=expected.unet.active_adapters()[0])
        actual_state = get_peft_model_state_dict(trainer.model)
    else:
        expected_state = StableDiffusionPipeline.from_pretrained(str(tmp_path / "checkpoint-1")).unet.state_dict()
        actual_state = trainer.model.state_dict()
    assert (tmp_path / "checkpoint-2").is_dir()  # a later checkpoint exists, yet the model is checkpoint-1's
    for name, tensor in expected_state.items():
        torch.testing.assert_close(actual_state[name], tensor, rtol=0, atol=0)


# ---- configuration and argument errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("loss_type", "kto", "loss_type='kto'.*allowed values.*hinge.*ipo.*robust.*sigmoid"),
        ("weight_fn", "cubic", "weight_fn='cubic'.*allowed values"),
        ("margin", "huge", "margin='huge'.*allowed values"),
        ("metric_normalize", "l2", "metric_normalize='l2'.*allowed values"),
        ("beta", 0.0, "beta must be > 0"),
        ("label_smoothing", 0.5, r"label_smoothing must be in \[0, 0.5\)"),
        ("annotator_decays", [0.9, 1.0], r"annotator_decays entries must be in \[0, 1\)"),
        ("metric_rho", -1.0, "metric_rho must be > 0"),
        ("metric_warmup_steps", -1, "metric_warmup_steps must be >= 0"),
        ("weight_intercept", 0.0, "weight_intercept must be > 0"),
        ("weight_scale", -2.0, "weight_scale must be >= 0"),
        ("resolution", 100, "resolution must be a positive multiple of 8"),
        ("empty_prompt_probability", 1.5, r"empty_prompt_probability must be in \[0, 1\]"),
        ("remove_unused_columns", True, "remove_unused_columns must be False"),
        ("minority_evidence_decay", 1.0, r"minority_evidence_decay must be in \[0, 1\)"),
        ("minority_filter_min_agreement", 1.0, r"minority_filter_min_agreement must be in \[0, 1\) \(0: no judge check\)"),
        ("minority_filter_agreement_votes", 0, "minority_filter_agreement_votes must be >= 1"),
    ],
)
def test_config_errors_name_the_field(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=f"AdaptiveDPOConfig.{message}"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


def test_label_smoothing_only_with_sigmoid_or_robust(tmp_path):
    with pytest.raises(ValueError, match="AdaptiveDPOConfig.label_smoothing.*'hinge'"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), report_to="none", loss_type="hinge", label_smoothing=0.1)


def test_prompt_contrast_needs_other_pairs_in_the_batch(tmp_path):
    message = "AdaptiveDPOConfig.minority_evidence='prompt_contrast' needs per_device_train_batch_size >= 2, got 1"
    with pytest.raises(ValueError, match=message):
        AdaptiveDPOConfig(output_dir=str(tmp_path), report_to="none", minority_filter="threshold",
                          minority_evidence="prompt_contrast", per_device_train_batch_size=1)
    AdaptiveDPOConfig(output_dir=str(tmp_path), report_to="none", minority_evidence="prompt_contrast",
                      per_device_train_batch_size=1)  # the filter is off: nothing is judged, nothing to contrast


def test_misranked_weight_only_with_capped_sigmoid(tmp_path):
    with pytest.raises(ValueError, match="AdaptiveDPOConfig.misranked_weight.*'capped_sigmoid' only, not 'sigmoid'"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), report_to="none", misranked_weight=0.2)
    with pytest.raises(ValueError, match=r"AdaptiveDPOConfig.misranked_weight must be in \(0, 1\], got 0"):
        AdaptiveDPOConfig(output_dir=str(tmp_path), report_to="none", loss_type="capped_sigmoid", misranked_weight=0)
    default = AdaptiveDPOConfig(output_dir=str(tmp_path), report_to="none", loss_type="capped_sigmoid")
    assert default.misranked_weight == DEFAULT_MISRANKED_WEIGHT


def test_misranked_weight_reaches_the_loss(toy_pairs, tmp_path):
    """Step 1 sees l = 0 for every pair (policy = reference), so its gradient, and the model after it, do not depend
    on the loss's treatment of misranked pairs; step 2 sees the same logits in every run, some negative, where
    -log sigmoid(z) lies above its tangent log 2 - z/2 (misranked_weight 0.5), which lies above log 2 - 0.05 z."""
    second_losses = {}
    for name, options in {"sigmoid": {}, "tangent": dict(loss_type="capped_sigmoid", misranked_weight=0.5),
                          "capped": dict(loss_type="capped_sigmoid", misranked_weight=0.05)}.items():
        args = tiny_args(tmp_path / name, beta=BETA, adaptive=False, per_device_train_batch_size=8, **options)
        trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=args, peft_config=lora_config(),
                                              train_dataset=flip_labels(toy_pairs, 0.5, seed=0))
        trainer.train()
        first, second = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert first == pytest.approx(math.log(2.0), rel=1e-6)
        second_losses[name] = second
    assert second_losses["sigmoid"] > second_losses["tangent"] > second_losses["capped"]


def test_every_config_field_has_help():
    import dataclasses

    own = {f.name for f in dataclasses.fields(AdaptiveDPOConfig)} - {
        f.name for f in dataclasses.fields(AdaptiveDPOConfig.__mro__[1])
    }
    assert {"beta", "loss_type", "adaptive", "annotator_decays", "metric_rho", "weight_fn", "margin"} <= own
    for f in dataclasses.fields(AdaptiveDPOConfig):
        if f.name in own:
            assert f.metadata.get("help"), f.name


def test_trainer_argument_errors(toy_pairs, tmp_path):
    pipeline = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="ref_model must be None with peft_config"):
        AdaptiveDiffusionDPOTrainer(
            pipeline, ref_model=pipeline.unet, args=tiny_args(tmp_path), train_dataset=toy_pairs,
            peft_config=lora_config(),
        )
    with pytest.raises(TypeError, match="AdaptiveDPOConfig"):
        from transformers import TrainingArguments

        AdaptiveDiffusionDPOTrainer(pipeline, args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=toy_pairs)
    with pytest.raises(ValueError, match="train_dataset or an eval_dataset"):
        AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=tiny_args(tmp_path))


# ---- the real CLIP tokenizer ---------------------------------------------------------------------------------

REAL_TOKENIZER = SHARED_MODEL_CONFIGS / "sd15" / "tokenizer"


@pytest.mark.skipif(not REAL_TOKENIZER.is_dir(), reason=f"{REAL_TOKENIZER} not present")
def test_training_with_the_real_clip_tokenizer(toy_pairs, tmp_path):
    from transformers import CLIPTokenizer

    from trl_adaptive.tiny import tiny_text_encoder

    tokenizer = CLIPTokenizer.from_pretrained(str(REAL_TOKENIZER))
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    components = tiny_sd_pipeline().components
    components.update(tokenizer=tokenizer, text_encoder=tiny_text_encoder(vocab_size=len(tokenizer), max_positions=77))
    pipeline = StableDiffusionPipeline(**components)
    trainer = AdaptiveDiffusionDPOTrainer(
        pipeline, args=tiny_args(tmp_path), train_dataset=toy_pairs, peft_config=lora_config()
    )
    conditioning = trainer.family.encode_prompts(["a red square", "a blue square"])
    assert conditioning["encoder_hidden_states"].shape == (2, 77, 32)
    before = snapshot(trainer.model, trainable=True)
    trainer.train()
    assert changed(before, trainer.model) == set(before)


def test_rounding_level_logits_give_no_minority_score(toy_pairs, tmp_path):
    """At step 0 the EMA annotators equal the policy, so their logits differ only by float rounding (~1e-8, e.g.
    when the batched LoRA forward rounds differently from the policy's); the RMS normalisation must not blow that up
    into an arbitrary O(1) score."""
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sd_pipeline(), args=tiny_args(tmp_path), train_dataset=toy_pairs, peft_config=lora_config()
    )
    torch.manual_seed(0)
    rounding_noise = 1e-8 * torch.randn(3, 8)
    # After a first step (at step 0 u is set to 0 without computing it): the floor of the normaliser is under test.
    u = trainer.robustness["adaptive"].scores(rounding_noise, torch.arange(8), training=False, global_step=1)
    assert u.max().item() < 0.05  # unfloored, the same noise scores up to ~0.9


def pairs_with_a_broken_image(num_pairs: int = 8, row: int = 5):
    from datasets import Dataset

    rows = toy_preference_dataset(num_pairs=num_pairs, size=32, seed=0).to_list()
    rows[row]["jpg_1"] = b"not an image"
    return Dataset.from_list(rows)


def test_undecodable_image_stops_the_run_before_training(tmp_path):
    """Regression: one bad image used to stop a long run at the step that met it (and again after a resume)."""
    with pytest.raises(ValueError, match="row 5, column 'jpg_1': cannot decode image"):
        AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=tiny_args(tmp_path),
                                    train_dataset=pairs_with_a_broken_image())


def test_skip_bad_rows_drops_lists_and_resumes_past_them(tmp_path):
    import json

    def build():
        args = tiny_args(tmp_path, skip_bad_rows=True, max_steps=4, save_strategy="steps", save_steps=2)
        with pytest.warns(UserWarning, match="dropped 1 bad row.*row 5, column 'jpg_1'"):
            return AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(seed=0), args=args,
                                               train_dataset=pairs_with_a_broken_image())

    trainer = build()
    assert 5 not in trainer.train_dataset["row_index"] and len(trainer.train_dataset) == 7
    assert trainer.dataset_info["num_bad_rows"] == 1
    listed = json.loads((tmp_path / "bad_rows.json").read_text())
    assert [(r["row"], r["column"]) for r in listed["train"]] == [(5, "jpg_1")]
    trainer.add_callback(StopAt(2))
    trainer.train()
    resumed = build()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # past the bad row's place, to the end
    assert resumed.state.global_step == 4


def test_attributes_of_0_1_still_work_with_a_deprecation_warning(toy_pairs, tmp_path):
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=tiny_args(tmp_path), train_dataset=toy_pairs)
    with pytest.warns(FutureWarning, match=r'robustness\["adaptive"\].annotators'):
        assert trainer.annotators is trainer.robustness["adaptive"].annotators is not None
    with pytest.warns(FutureWarning, match="forwards.pair_forward"):
        out = trainer.pair_forward(trainer.model, trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[0]])))
    assert len(out["logits"]) == 3  # the current model and both annotators, as in 0.1
