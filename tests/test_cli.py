"""The `trl-adaptive` command line: YAML config with flag overrides, datasets from disk, the built-in example."""

import os

import pytest
import torch
import yaml
from datasets import DatasetDict

from trl_adaptive import cli
from trl_adaptive.tiny import toy_preference_dataset


@pytest.fixture(scope="module")
def saved_pairs(tmp_path_factory):
    """A DatasetDict with train and validation splits, written with save_to_disk."""
    folder = tmp_path_factory.mktemp("pairs")
    DatasetDict(
        train=toy_preference_dataset(num_pairs=8, size=32, seed=0),
        validation=toy_preference_dataset(num_pairs=4, size=32, seed=1),
    ).save_to_disk(str(folder))
    return str(folder)


def write_yaml(path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def base_config(output_dir, model, data, **extra):
    values = {
        "model_name_or_path": model,
        "dataset_name": data,
        "output_dir": str(output_dir),
        "resolution": 32,
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "learning_rate": "1e-3",  # YAML reads 1e-3 (no dot) as a string; the parser converts it
        "beta": 1000.0,
        "annotator_decays": [0.9, 0.5],
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    values.update(extra)
    return values


def test_yaml_values_and_flag_overrides(tmp_path, tiny_pipeline_dir, saved_pairs):
    config = write_yaml(tmp_path / "run.yaml", base_config(tmp_path / "out", tiny_pipeline_dir, saved_pairs, lora_rank=4))
    model_args, data_args, args = cli.parse_train_args(
        ["--config", config, "--beta", "500", "--adaptive", "false", "--lora_target_modules", "to_q", "to_v"]
    )
    assert model_args.model_name_or_path == tiny_pipeline_dir and model_args.lora_rank == 4
    assert model_args.lora_target_modules == ["to_q", "to_v"]
    assert data_args.dataset_name == saved_pairs and data_args.dataset_train_split == "train"
    assert args.beta == 500.0  # flag beats YAML
    assert args.adaptive is False
    assert args.learning_rate == 1e-3 and args.max_steps == 2  # from YAML
    assert args.annotator_decays == [0.9, 0.5]


def test_unknown_yaml_key_is_an_error(tmp_path, tiny_pipeline_dir, saved_pairs):
    config = write_yaml(tmp_path / "run.yaml", base_config(tmp_path, tiny_pipeline_dir, saved_pairs, bta=3.0))
    with pytest.raises(ValueError, match="bta"):
        cli.parse_train_args(["--config", config])


def test_invalid_value_names_the_field(tmp_path, tiny_pipeline_dir, saved_pairs):
    config = write_yaml(tmp_path / "run.yaml", base_config(tmp_path, tiny_pipeline_dir, saved_pairs))
    with pytest.raises(ValueError, match="AdaptiveDPOConfig.weight_fn='cubic'"):
        cli.parse_train_args(["--config", config, "--weight_fn", "cubic"])


def test_train_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--beta", "--loss_type", "--adaptive", "--annotator_decays", "--metric_rho", "--weight_fn",
                 "--margin_scale", "--drop_ties", "--lora_rank", "--lora_alpha", "--lora_target_modules",
                 "--dataset_name", "--flip_rate", "--model_name_or_path"):
        assert flag in text, flag


def test_train_lora_from_yaml_with_flags(tmp_path, tiny_pipeline_dir, saved_pairs, capsys):
    output_dir = tmp_path / "out"
    config = write_yaml(tmp_path / "run.yaml", base_config(output_dir, tiny_pipeline_dir, saved_pairs, lora_rank=4))
    trainer = cli.train(["--config", config, "--max_steps", "3", "--lora_alpha", "8", "--flip_rate", "0.25"])
    assert trainer.state.global_step == 3
    assert trainer.peft_config.r == 4 and trainer.peft_config.lora_alpha == 8
    assert sum(trainer.train_dataset["flipped"]) == 2  # 25% of 8 pairs
    assert any("minority/score_flipped" in entry for entry in trainer.state.log_history)
    assert os.path.isfile(output_dir / "pytorch_lora_weights.safetensors")
    card = (output_dir / "README.md").read_text()
    assert saved_pairs in card and "| `beta` | `1000.0` |" in card
    assert f"Saved the trained LoRA weights to {output_dir}" in capsys.readouterr().out


def test_train_full_with_eval_split(tmp_path, tiny_pipeline_dir, saved_pairs):
    output_dir = tmp_path / "out"
    values = base_config(output_dir, tiny_pipeline_dir, saved_pairs, max_steps=1, dataset_test_split="validation")
    trainer = cli.train(["--config", write_yaml(tmp_path / "run.yaml", values), "--eval_strategy", "steps",
                         "--eval_steps", "1"])
    assert trainer.peft_config is None and len(trainer.eval_dataset) == 4
    assert any("eval_rewards/accuracies" in entry for entry in trainer.state.log_history)
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(str(output_dir))
    trained = trainer.model.state_dict()
    for name, tensor in loaded.unet.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])


def test_train_scores_the_pairs_with_a_named_judge(tmp_path, tiny_pipeline_dir, saved_pairs):
    """`--judge_scorer pickscore --judge_scorer_path DIR` scores the (flipped) pairs into the column that
    `--minority_evidence judge` reads; a tiny random PickScore, so its judgement is arbitrary but its scores are
    those the scorer gives."""
    from datasets import load_from_disk

    from trl_adaptive.data import decode_image
    from trl_adaptive.evaluation import load_scorer
    from trl_adaptive.tiny import tiny_clip_scorer

    scorer_dir = tiny_clip_scorer(str(tmp_path / "pickscore"))
    values = base_config(tmp_path / "out", tiny_pipeline_dir, saved_pairs, max_steps=2, adaptive=False,
                         minority_filter="threshold", minority_evidence="judge", minority_filter_min_visits=1,
                         minority_filter_min_agreement=0.0)
    trainer = cli.train(["--config", write_yaml(tmp_path / "run.yaml", values), "--judge_scorer", "pickscore",
                         "--judge_scorer_path", scorer_dir, "--flip_rate", "0.25"])
    scores = trainer.train_dataset["judge_scores"]
    assert len(scores) == 8 and all(len(pair) == 2 for pair in scores)
    row = trainer.train_dataset[0]
    source = load_from_disk(saved_pairs)["train"][0]
    images = [decode_image(source[column], 0, column) for column in ("jpg_0", "jpg_1")]
    expected = load_scorer("pickscore", scorer_dir).score(images, [row["caption"]] * 2)
    # row 0 is unflipped or flipped; Pick-a-Pic flips change the label, not the images, so the scores are the same
    assert scores[0] == pytest.approx(expected.tolist(), abs=1e-5)
    assert any("minority/kept_fraction" in entry for entry in trainer.state.log_history)
    # Without the scores, the judge evidence is refused before training, naming the column.
    with pytest.raises(ValueError, match="judge_scores"):
        cli.train(["--config", write_yaml(tmp_path / "run.yaml", values)])


def test_bad_split_is_named(tmp_path, tiny_pipeline_dir, saved_pairs):
    values = base_config(tmp_path, tiny_pipeline_dir, saved_pairs, dataset_train_split="test")
    with pytest.raises(ValueError, match="'test'.*\\['train', 'validation'\\]"):
        cli.train(["--config", write_yaml(tmp_path / "run.yaml", values)])


def test_main_usage_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_example_command_trains_and_saves_a_loadable_lora(tmp_path, capsys):
    assert cli.main(["example", "--output_dir", str(tmp_path), "--max_steps", "2"]) == 0
    out = capsys.readouterr().out
    lora_dir = tmp_path / "lora"
    assert f"LoRA saved to: {lora_dir}" in out
    assert os.path.isfile(lora_dir / "pytorch_lora_weights.safetensors")
    assert os.path.isfile(lora_dir / "README.md")
