"""Smoke test of the digits demo (`trl-adaptive demo --quick`): the pipeline runs and every output is complete.

Not who wins: the quick grid is far too small for that (docs/results.md reports the full benchmark).
"""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from test_repo import readme_commands

from trl_adaptive.benchmarks import digits


@pytest.mark.timeout(600)
def test_quick_demo_writes_complete_outputs(tmp_path):
    """The README's main job as a user runs it (its console script, in a fresh process), on the quick grid."""
    demo = readme_commands()[0].split("&& ")[-1]
    assert demo == "trl-adaptive demo"
    out = tmp_path / "out"
    argv = ["--quick", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--threads", "1"]
    # One thread: on the shared 2-core development machine this run took 52 s; with torch's default threads it was stopped
    # unfinished after 10 minutes (thread oversubscription).
    command = [os.path.join(os.path.dirname(sys.executable), "trl-adaptive"), *demo.split()[1:], *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for name in ("results.md", "results.json", "reward_vs_flip_rate.png", "flipped_share_by_u_decile.png", "samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    import torch

    assert saved["machine"]["packages"]["torch"] == torch.__version__  # which releases' rounding the runs had
    settings = digits.quick_settings()
    expected = {f"{m}@{r}" for r, m in digits.runs_for(settings)}
    assert set(saved["per_seed"][0]["runs"]) == expected
    for key, run in saved["per_seed"][0]["runs"].items():
        assert 0.0 <= run["reward"] <= 1.0 and 0.0 <= run["win_rate"] <= 1.0, key
        # Rated through trl_adaptive.evaluation (the rater as its scorer): with the prompt-level bootstrap interval.
        low, high = run["win_rate_ci_prompts"]
        assert low <= run["win_rate"] <= high, key
    summary = saved["summary"]
    gap_closed = summary["contrast_filter@0.2"].get("gap_closed")
    assert gap_closed is None or math.isfinite(gap_closed)  # None when the oracle does not beat DPO
    # The paper's Figure 3 and the AUROC of u come from the adaptive run with flipped pairs.
    assert 0.0 <= summary["adaptive@0.2"]["auroc_u_pair_mean"] <= 1.0
    assert len(summary["adaptive@0.2"]["flipped_share_by_u_decile"]) == 10
    table = (out / "results.md").read_text()
    for method in settings.methods:
        assert digits.METHOD_LABELS[method] in table
    # The base model was cached: a second call would reuse this folder.
    assert glob.glob(str(tmp_path / "cache" / "**" / "model_index.json"), recursive=True)


@pytest.mark.parametrize("shares", [(1.0, 0.0), (0.5, 0.25)])
def test_diagnostic_drops_follow_the_labels_from_the_given_step(tmp_path, shares):
    # oracle_late (1, 0) and matched_random: from `truth_filter_from`, a fixed random share of the flipped and of the
    # clean pairs gets weight 0, the same rows at every step.
    import torch

    from trl_adaptive import AdaptiveDPOConfig
    from trl_adaptive.data import flip_labels, prepare_preference_dataset
    from trl_adaptive.tiny import tiny_sd_pipeline, toy_preference_dataset

    torch.set_flush_denormal(True)
    pairs, _ = prepare_preference_dataset(toy_preference_dataset(16, schema="trl"))
    pairs = flip_labels(pairs, 0.5, seed=0)
    args = AdaptiveDPOConfig(output_dir=str(tmp_path), adaptive=False, max_steps=3, per_device_train_batch_size=16,
                             resolution=32, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = digits._recording_trainer_class()(tiny_sd_pipeline(), args=args, train_dataset=pairs, truth_filter_from=1,
                                                truth_drop_shares=shares)
    trainer.train()
    flipped = torch.tensor(list(pairs["flipped"]))
    rows = torch.tensor(list(pairs["row_index"]))
    u = trainer.robustness["truth_drops"].row_uniforms[rows]
    expected_flipped = float((u[flipped] < shares[0]).float().mean())
    expected_clean = float((u[~flipped] < shares[1]).float().mean())
    logs = [log for log in trainer.state.log_history if "minority/flipped_dropped" in log]
    assert len(logs) == 2  # steps 1 and 2, not step 0
    for log in logs:
        assert log["minority/flipped_dropped"] == pytest.approx(expected_flipped)
        assert log["minority/clean_dropped"] == pytest.approx(expected_clean)


@pytest.mark.parametrize("method", ["chosen_flipped", "chosen_clean", "chosen_both"])
def test_evidence_chosen_drops_take_the_pairs_with_the_highest_evidence(tmp_path, method):
    # chosen_*: in each chosen group, the pairs judged so far with the highest minority evidence are dropped (the
    # group's share of them); a group not chosen loses the fixed random subset of matched_random.
    import torch

    from trl_adaptive import AdaptiveDPOConfig
    from trl_adaptive.data import flip_labels, prepare_preference_dataset
    from trl_adaptive.tiny import tiny_sd_pipeline, toy_preference_dataset

    pairs, _ = prepare_preference_dataset(toy_preference_dataset(40, schema="trl"))
    pairs = flip_labels(pairs, 0.5, seed=0)
    fields = digits.method_overrides(method, 0.5, train_steps=3)
    assert fields["minority_filter"] != "none"  # the filter's evidence is recorded
    args = AdaptiveDPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, resolution=32,
                             report_to=[], save_strategy="no", use_cpu=True, **fields)
    shares = {"flipped": 0.5, "clean": 0.25}
    trainer = digits._recording_trainer_class()(
        tiny_sd_pipeline(), args=args, train_dataset=pairs, truth_filter_from=1,
        truth_drop_shares=(shares["flipped"], shares["clean"]), evidence_chosen_groups=digits.EVIDENCE_CHOSEN_GROUPS[method])
    diagnostics = trainer.robustness["truth_drops"]
    history = diagnostics.history
    rows = torch.tensor(list(pairs["row_index"]))
    flipped = torch.tensor(list(pairs["flipped"]))
    evidence = torch.linspace(0.0, 1.0, len(rows), dtype=torch.float64)[torch.randperm(len(rows))]
    history.total[rows], history.weight[rows] = evidence, torch.ones(len(rows), dtype=torch.float64)
    history.visits[rows] = 2
    history.visits[rows[0]] = 0  # not judged yet (fewer than minority_filter_min_visits): never chosen
    drops = diagnostics.diagnostic_drops()[rows]
    for group, members in (("flipped", flipped), ("clean", ~flipped)):
        if group in digits.EVIDENCE_CHOSEN_GROUPS[method]:
            judged = members & (history.visits[rows] >= args.minority_filter_min_visits)
            expected = judged & (evidence > torch.quantile(evidence[judged], 1 - shares[group]))
            assert 0 < int(expected.sum()) <= round(shares[group] * int(judged.sum())) + 1
        else:
            expected = diagnostics.row_uniforms[rows] < shares[group]
        assert torch.equal(drops[members], expected[members]), group
    # The evidence comes from the filter: a run without it cannot choose by evidence.
    plain = AdaptiveDPOConfig(output_dir=str(tmp_path), adaptive=False, max_steps=3, resolution=32, report_to=[],
                              use_cpu=True)
    with pytest.raises(ValueError, match="evidence"):
        digits._recording_trainer_class()(tiny_sd_pipeline(), args=plain, train_dataset=pairs, truth_filter_from=1,
                                          evidence_chosen_groups=("clean",))


def test_drop_shares_option(tmp_path):
    settings = digits.settings_from_args(digits.parse_args(["--drop-shares", "0.7", "0.1"]))
    assert settings.drop_shares == (0.7, 0.1)
    assert digits.settings_from_args(digits.parse_args([])).drop_shares is None  # the filter's shares at beta 2500
    with pytest.raises(ValueError, match="--drop-shares"):
        digits.settings_from_args(digits.parse_args(["--drop-shares", "0.7", "1.5"]))


def test_beta_and_set_reach_every_method_config(tmp_path):
    # --beta changes every method's beta (the loss regime, docs/results.md "The beta regime"); --set only the filters'.
    settings = digits.settings_from_args(digits.parse_args(["--beta", "2500", "--set", "minority_filter_threshold=0.4"]))
    for method in ("dpo", "cdpo", "adaptive", "capped", "filter", "filter_free", "contrast_filter", "oracle"):
        config = digits.method_config(method, 0.2, settings, seed=3, work_dir=str(tmp_path))
        assert config.beta == 2500.0 and config.seed == 3 and config.max_steps == settings.train_steps, method
        assert (config.minority_filter_threshold == 0.4) == (method in ("filter", "filter_free")), method
        assert (config.loss_type == "capped_sigmoid") == (method == "capped"), method
        assert (config.minority_evidence == "prompt_contrast") == (method == "contrast_filter"), method
    # The contrast filter judges by the fixed reference: no decay, no warm-up beyond the visits a pair needs.
    contrast = digits.method_config("contrast_filter", 0.2, settings, seed=3, work_dir=str(tmp_path))
    assert contrast.minority_evidence_decay == 0.0 and contrast.minority_filter_warmup_steps == 0
    assert contrast.minority_filter == "threshold" and contrast.minority_evidence_draws == 2
    assert digits.method_config("dpo", 0.2, digits.BenchmarkSettings(), 0, str(tmp_path)).beta == 100.0
    # A bad --beta is an error that names the option, not silently the default.
    zero = digits.settings_from_args(digits.parse_args(["--beta", "0"]))
    with pytest.raises(ValueError, match="beta"):
        digits.method_config("dpo", 0.2, zero, 0, str(tmp_path))


def test_the_rater_is_a_scorer_of_the_evaluation_module():
    """The demo's rater behind `trl_adaptive.evaluation.Scorer`: PIL images and prompts in, the probability of the
    prompted digit out, equal to the rater's own rewards; prompts that name no digit or two are refused."""
    from PIL import Image

    from trl_adaptive.benchmarks.digits.rater import DigitRater, DigitRaterScorer, split_digits
    from trl_adaptive.evaluation import score_images

    x_train, x_test, y_train, y_test = split_digits(0)
    rater = DigitRater(x_test, y_test, c=0.1)
    images_uint8 = (x_train[:12] * 255).round().astype(np.uint8)
    prompts = [f"a handwritten {digits.DIGIT_WORDS[d]}" for d in y_train[:12]]
    scorer = DigitRaterScorer(rater)
    scores = score_images(scorer, [Image.fromarray(i, mode="L") for i in images_uint8], prompts, batch_size=5,
                          progress=False)
    np.testing.assert_array_equal(scores, rater.rewards(images_uint8, y_train[:12]))
    assert scores.mean() > 0.5  # real digits under their own labels: the rater agrees
    for prompt in ("a handwritten digit", "one or two"):
        with pytest.raises(ValueError, match="names"):
            scorer.prompted_digit(prompt)


def test_the_style_rater_scores_ink_for_the_digit_not_the_digit():
    """The style rater: exp(-(z - target)^2 / (2 width^2)) of the ink mass z standardised within the prompted digit's
    class on real digits. Centred on the real digits of each class (the prompt alone says nothing about the reward),
    peaked at the target (heavier strokes help a light image and hurt a heavy one), ranked by |z - target| whatever
    the width, and a Scorer like the fidelity rater."""
    from PIL import Image

    from trl_adaptive.benchmarks.digits.rater import StyleRater, StyleRaterScorer, make_rater, split_digits
    from trl_adaptive.evaluation import score_images

    x_train, x_test, y_train, y_test = split_digits(0)
    rater = StyleRater(x_test, y_test)
    real = (x_test * 255).round().astype(np.uint8)
    z = rater.standardised_ink(real, y_test)
    rewards = rater.rewards(real, y_test)
    assert np.all((rewards > 0) & (rewards <= 1)) and 0.3 < rewards.mean() < 0.6  # well inside the range
    for d in range(10):  # standardised within each class (up to the uint8 rounding of the images)
        assert abs(z[y_test == d].mean()) < 0.02 and abs(z[y_test == d].std(ddof=1) - 1) < 0.02, d
    light, heavy = int(np.argmin(z)), int(np.argmax(z))
    for index, better in ((light, True), (heavy, False)):
        heavier = np.clip(real[index:index + 1].astype(np.int32) + 25, 0, 255).astype(np.uint8)
        gained = rater.rewards(heavier, y_test[index:index + 1])[0] > rewards[index]
        assert gained == better
    wide = StyleRater(x_test, y_test, width=2.0)
    order = np.argsort(np.abs(z[:50] - rater.target), kind="stable")
    assert np.all(np.diff(wide.rewards(real[:50], y_test[:50])[order]) <= 0)
    scorer = StyleRaterScorer(rater)
    prompts = [f"a handwritten {digits.DIGIT_WORDS[d]}" for d in y_test[:7]]
    scores = score_images(scorer, [Image.fromarray(i, mode="L") for i in real[:7]], prompts, batch_size=3,
                          progress=False)
    np.testing.assert_array_equal(scores, rewards[:7])
    assert scorer.name != "digit_rater"
    settings = digits.BenchmarkSettings()
    assert isinstance(make_rater("style", settings, x_test, y_test)[0], StyleRater)
    with pytest.raises(ValueError, match="rater"):
        make_rater("aesthetics", settings, x_test, y_test)
    with pytest.raises(ValueError, match="width"):
        StyleRater(x_test, y_test, width=0.0)


def test_ink_offset_scorers_show_where_the_stroke_weight_went():
    """The diagnostics reported beside the style reward: the signed offset z - target (drift) and its size (spread),
    per image, for the digit the prompt names; heavier strokes move the signed offset up."""
    from PIL import Image

    from trl_adaptive.benchmarks.digits.rater import InkOffsetScorer, StyleRater, split_digits
    from trl_adaptive.evaluation import score_images

    _, x_test, _, y_test = split_digits(0)
    rater = StyleRater(x_test, y_test, target=0.5)
    real = (x_test[:9] * 255).round().astype(np.uint8)
    prompts = [f"a handwritten {digits.DIGIT_WORDS[d]}" for d in y_test[:9]]
    expected = rater.standardised_ink(real, y_test[:9]) - 0.5
    pil = [Image.fromarray(i, mode="L") for i in real]
    signed, size = InkOffsetScorer(rater), InkOffsetScorer(rater, "abs")
    assert (signed.name, size.name) == ("ink_z", "ink_abs_z")
    np.testing.assert_allclose(score_images(signed, pil, prompts, batch_size=4, progress=False), expected)
    np.testing.assert_allclose(score_images(size, pil, prompts, batch_size=4, progress=False), np.abs(expected))
    heavier = [Image.fromarray(np.clip(i.astype(np.int32) + 20, 0, 255).astype(np.uint8), mode="L") for i in real]
    assert np.all(score_images(signed, heavier, prompts, batch_size=9, progress=False) > expected)
    with pytest.raises(ValueError, match="statistic"):
        InkOffsetScorer(rater, "squared")


def test_pairs_are_ranked_by_the_chosen_rater():
    """build_pairs takes any rater with `rewards(images, digits)`: the chosen image has the higher reward."""
    import torch

    from trl_adaptive.benchmarks.digits.rater import StyleRater, split_digits

    x_train, x_test, y_train, y_test = split_digits(0)
    pipeline = digits.build_base_pipeline(0)
    settings = digits.quick_settings()
    settings.samples_per_class, settings.sampling_steps, settings.tie_gap = 8, 2, 1e-9
    rater = StyleRater(x_test, y_test, width=100.0)  # untrained model: its images are far from real ink
    torch.manual_seed(0)
    pairs, info = digits.build_pairs(pipeline, rater, settings, seed=0)
    chosen = np.stack([np.asarray(i.convert("L")) for i in pairs["chosen"]])
    rejected = np.stack([np.asarray(i.convert("L")) for i in pairs["rejected"]])
    named = np.array([digits.rater.DigitRaterScorer.prompted_digit(p) for p in pairs["prompt"]])
    assert len(pairs) > 0 and np.all(rater.rewards(chosen, named) > rater.rewards(rejected, named))


def test_rater_and_set_method_options(tmp_path):
    settings = digits.settings_from_args(digits.parse_args(
        ["--rater", "style", "--set-method", "capped:misranked_weight=0.3", "--set-method", "capped:beta=50"]))
    assert settings.rater == "style"
    config = digits.method_config("capped", 0.2, settings, seed=0, work_dir=str(tmp_path))
    assert config.misranked_weight == 0.3 and config.beta == 50
    assert digits.method_config("dpo", 0.2, settings, seed=0, work_dir=str(tmp_path)).beta == settings.beta
    assert digits.settings_from_args(digits.parse_args([])).rater == "fidelity"
    with pytest.raises(ValueError, match="--set-method"):
        digits.settings_from_args(digits.parse_args(["--set-method", "nomethod:beta=1"]))


@pytest.mark.timeout(600)
def test_quick_style_demo_reports_fidelity_beside_the_style_reward(tmp_path):
    """`trl-adaptive demo --rater style` on a reduced quick grid: runs rated by the style rater, with the fidelity
    reward of the same images beside it in results.json and the table."""
    out = tmp_path / "out"
    digits.main(["--quick", "--rater", "style", "--methods", "dpo", "capped", "--flip-rates", "0.2", "--output-dir", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--threads", "1", "--workers", "1"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["rater"] == "style"
    for key, run in saved["per_seed"][0]["runs"].items():
        assert 0.0 <= run["reward"] <= 1.0, key
        fidelity = run["other_rewards"]["digit_rater"]
        assert 0.0 <= fidelity["tuned"] <= 1.0 and 0.0 <= fidelity["base"] <= 1.0, key
    assert "digit_rater" in (out / "results.md").read_text()


def test_judge_random_drops_at_the_judge_filters_shares_from_its_decision():
    from trl_adaptive.benchmarks.digits.methods import JUDGE_MATCHED_DROP_SHARES, diagnostic_drops

    settings = digits.BenchmarkSettings(rater="style", methods=("dpo", "judge_random", "oracle"))
    # The judge filter starts dropping once its check has counted 512 votes: after 16 steps of 32 pairs.
    assert diagnostic_drops("judge_random", 0.2, settings) == (16, JUDGE_MATCHED_DROP_SHARES["style"][0.2])
    settings.train_batch = 30
    assert diagnostic_drops("judge_random", 0.0, settings)[0] == 18  # the step whose votes reach 512 (ceil)
    settings.drop_shares = (0.5, 0.1)
    assert diagnostic_drops("judge_random", 0.0, settings)[1] == (0.5, 0.1)
    # The other truth diagnostics start after the minority filter's warm-up, a third of the steps.
    assert diagnostic_drops("oracle_late", 0.2, settings) == (100, (1.0, 0.0))
    # Unlike the other diagnostics it runs at 0% flips as well: random clean pairs only.
    assert (0.0, "judge_random") in digits.runs_for(settings) and (0.0, "oracle") not in digits.runs_for(settings)
