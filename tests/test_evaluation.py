"""`trl_adaptive.evaluation`: paired statistics by hand, scorer preprocessing against its reference, and
`trl-adaptive evaluate` end to end on tiny pipelines and random-weight scorers saved to folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trl_adaptive.evaluation import paired_summary, win_rate
from trl_adaptive.evaluation.scorers import AestheticHead, load_scorer
from trl_adaptive.tiny import tiny_clip_scorer, tiny_hpsv2_checkpoint, tiny_imagereward_checkpoint


# ---- statistics -------------------------------------------------------------------------------------------------


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 2, 3, 4], [2, 2, 1, 5]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_paired_summary_by_hand():
    base, tuned = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 1.0, 6.0])
    s = paired_summary(base, tuned, prompt_ids=[0, 0, 1, 1], resamples=500)
    assert (s["num_pairs"], s["num_prompts"]) == (4, 2)
    assert (s["base_mean"], s["tuned_mean"], s["mean_difference"]) == (2.5, 2.75, 0.25)
    assert s["win_rate"] == pytest.approx(0.625)
    # Two prompts: prompt 0 has differences (1, 0), prompt 1 (-2, 2). A resample takes prompt 0 twice, 1 twice, or
    # one of each: mean difference 0.5, 0 or 0.25; win rate 0.75, 0.5 or 0.625 -- the intervals lie within those.
    assert 0.0 <= s["mean_difference_ci"][0] <= 0.25 <= s["mean_difference_ci"][1] <= 0.5
    assert 0.5 <= s["win_rate_ci"][0] <= s["win_rate_ci"][1] <= 0.75


def test_paired_summary_resamples_prompts_not_images():
    """Many seeds of one prompt are not independent: with the prompt as the unit the interval stays wide."""
    rng = np.random.default_rng(0)
    prompt_effect = np.repeat(rng.normal(size=10), 50)  # 10 prompts x 50 seeds, all variation between prompts
    base, tuned = np.zeros(500), prompt_effect
    by_prompt = paired_summary(base, tuned, np.repeat(np.arange(10), 50), resamples=1000)
    by_image = paired_summary(base, tuned, np.arange(500), resamples=1000)
    width = lambda s: s["mean_difference_ci"][1] - s["mean_difference_ci"][0]  # noqa: E731
    assert width(by_prompt) > 3 * width(by_image)


def test_paired_summary_rejects_unpaired_input():
    with pytest.raises(ValueError, match="equal length"):
        paired_summary([1.0, 2.0], [1.0], [0, 1])


# ---- scorers ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return tiny_clip_scorer(str(tmp_path_factory.mktemp("tiny-clip")))


def test_clip_preprocessing_matches_the_reference_recipe(clip_dir):
    """CLIP's (and PickScore's) image preprocessing: shorter side to the size with bicubic resampling, centre crop,
    [0, 1] scaling, OpenAI's mean and std -- computed here by hand with PIL and compared to the scorer's."""
    scorer = load_scorer("clip", clip_dir)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8))
    resized = image.resize((48, 32), Image.BICUBIC)  # shorter side 40 -> 32, aspect kept
    cropped = np.asarray(resized.crop((8, 0, 40, 32)), dtype=np.float32) / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    reference = torch.from_numpy(((cropped - mean) / std).transpose(2, 0, 1)).float()
    ours = scorer.processor(images=[image], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, reference, atol=2e-2, rtol=0)  # PIL vs reference rounding of the resize


def test_scorers_score_each_image_against_its_own_prompt(clip_dir, tmp_path):
    from safetensors.torch import save_file

    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    prompts = ["a red square", "a blue square", "a green square"]
    pick, clip = load_scorer("pickscore", clip_dir), load_scorer("clip", clip_dir)
    scores = pick.score(images, prompts)
    assert scores.shape == (3,) and not scores.requires_grad
    # One image at a time gives the same scores as the batch (each pairs with its own prompt).
    alone = torch.cat([pick.score([im], [p]) for im, p in zip(images, prompts)])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)
    cosine = pick.cosines(images, prompts)
    torch.testing.assert_close(scores, pick.model.logit_scale.exp().detach() * cosine)
    torch.testing.assert_close(clip.score(images, prompts), 100 * cosine.clamp_min(0))
    head = AestheticHead(pick.model.config.projection_dim)
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    aesthetic = load_scorer("aesthetic", clip_dir, head=str(tmp_path / "head.safetensors"))
    torch.testing.assert_close(aesthetic.score(images, prompts), head.eval()(aesthetic.image_embeddings(images)))


def test_unknown_scorer_is_named():
    with pytest.raises(ValueError, match="Unknown scorer 'hpsv3'.*pickscore"):
        load_scorer("hpsv3")


# ---- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, tiny_pipeline_dir):
    """A LoRA trained for two steps from the tiny pipeline folder (its card names the base)."""
    from tiny_setup import lora_config, tiny_args

    from trl_adaptive import AdaptiveDiffusionDPOTrainer
    from trl_adaptive.tiny import toy_preference_dataset

    out = tmp_path_factory.mktemp("lora")
    trainer = AdaptiveDiffusionDPOTrainer(tiny_pipeline_dir, args=tiny_args(out, learning_rate=1e-2),
                                          train_dataset=toy_preference_dataset(8), peft_config=lora_config())
    trainer.train()
    trainer.save_model()
    return str(out)


@pytest.mark.slow
def test_evaluate_command_writes_table_json_and_grid(trained_lora, tiny_pipeline_dir, clip_dir, tmp_path, capsys):
    from trl_adaptive import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue square\n\na green square\na red square\n")  # blank and repeat dropped
    out = tmp_path / "eval"
    hps, image_reward = tiny_hpsv2_checkpoint(str(tmp_path / "hps")), tiny_imagereward_checkpoint(str(tmp_path / "ir"))
    argv = ["evaluate", "--model", trained_lora, "--base", tiny_pipeline_dir, "--prompts", str(prompts),
            "--scorers", "pickscore,hpsv2,clip,imagereward", "--scorer-path", f"pickscore={clip_dir}",
            "--scorer-path", f"clip={clip_dir}", "--scorer-path", f"hpsv2={hps}", "--scorer-path", f"imagereward={image_reward}",
            "--seeds-per-prompt", "2", "--steps", "2", "--resolution", "32", "--batch-size", "4",
            "--resamples", "200", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["prompts"] == ["a red square", "a blue square", "a green square"]
    assert list(report["scorers"]) == ["pickscore", "hpsv2", "clip", "imagereward"]
    for name in report["scorers"]:
        summary = report["scorers"][name]
        assert summary["num_pairs"] == 6 and summary["num_prompts"] == 3
        scores = report["per_image"][name]
        assert summary["mean_difference"] == pytest.approx(np.mean(scores["tuned"]) - np.mean(scores["base"]))
        assert summary["win_rate_ci"][0] <= summary["win_rate"] <= summary["win_rate_ci"][1]
    assert report["per_image"]["pickscore"]["base"] != report["per_image"]["pickscore"]["tuned"]  # the LoRA acts
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in report["scorers"]) and "| hpsv2 |" in capsys.readouterr().out
    grid = Image.open(out / "grid.png")
    assert grid.size == (32 * 6, 32 * 2)
    # Same seeds, same images: a rerun generates nothing new and finds the same scores.
    stamps = {p: os.path.getmtime(out / "images" / "base" / p) for p in os.listdir(out / "images" / "base")}
    assert cli.main(argv) == 0
    assert stamps == {p: os.path.getmtime(out / "images" / "base" / p) for p in stamps}
    assert json.loads((out / "results.json").read_text())["per_image"] == report["per_image"]


def test_evaluate_takes_the_base_from_the_model_card(trained_lora, tiny_pipeline_dir):
    from trl_adaptive.evaluation.generation import base_model_from_card

    assert base_model_from_card(trained_lora) == tiny_pipeline_dir


def test_images_of_other_settings_are_not_mixed(trained_lora, tiny_pipeline_dir, clip_dir, tmp_path):
    from trl_adaptive.evaluation import GenerationSettings, evaluate

    scorer = [load_scorer("clip", clip_dir)]
    common = dict(model=trained_lora, base=tiny_pipeline_dir, prompts=["a red square"], scorers=scorer,
                  output_dir=str(tmp_path), resamples=10, progress=False)
    evaluate(settings=GenerationSettings(num_inference_steps=2, resolution=32), **common)
    with pytest.raises(ValueError, match="other settings"):
        evaluate(settings=GenerationSettings(num_inference_steps=3, resolution=32), **common)


def test_builtin_parti_prompts():
    """PartiPrompts ships with the library (Apache-2.0): 1,632 unique prompts, sorted by category, so a random sample
    (kept in the file's order, the same for the same seed) spans categories where the first N would not."""
    from trl_adaptive.evaluation import load_prompts

    prompts = load_prompts("parti")
    assert len(prompts) == 1632 and prompts[0] == "bond"
    sample = load_prompts("parti", sample=50, sample_seed=0)
    assert len(sample) == 50 and sample == load_prompts("parti", sample=50, sample_seed=0)
    assert sample != load_prompts("parti", sample=50, sample_seed=1)
    assert sample == [p for p in prompts if p in set(sample)]  # in the set's order
    assert load_prompts("parti", max_prompts=3) == prompts[:3]
    # The first 51 are all "Abstract" single words; the sample reaches well past them.
    assert max(prompts.index(p) for p in sample) > 1000
