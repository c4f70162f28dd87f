"""The minority filter through the trainer: evidence recorded per visit and draw, pairs dropped, state checkpointed."""

import os
import warnings

import torch

from trl_adaptive import AdaptiveDiffusionDPOTrainer, AdaptiveDPOConfig
from trl_adaptive.forwards import PairForwards
from trl_adaptive.tiny import tiny_sd_pipeline, toy_preference_dataset


def test_filter_records_evidence_and_drops_pairs(tmp_path):
    torch.set_flush_denormal(True)
    args = AdaptiveDPOConfig(
        output_dir=str(tmp_path), adaptive=False, max_steps=3, per_device_train_batch_size=4, resolution=32,
        learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=3, logging_steps=1, use_cpu=True,
        minority_filter="top_fraction", minority_evidence="wrong_sign", minority_evidence_draws=1,
        minority_filter_fraction=0.5, minority_filter_warmup_steps=1, minority_filter_min_visits=1,
        minority_evidence_min_noise=0.0,  # every draw votes (the noisy-timestep gate has its own test below)
    )
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(8))
    trainer.train()
    history = trainer.robustness["minority_filter"].history
    # 3 steps x 4 pairs visited; each visit casts 2 votes (training draw + 1 extra draw), each 0 or 1, and each later
    # visit discounts the earlier ones by the default decay 0.9.
    assert history.decay == 0.9
    assert int(history.visits.sum()) == 3 * 4
    expected_weight = 2 * (1 - 0.9 ** history.visits.double()) / (1 - 0.9)
    assert torch.allclose(history.weight, expected_weight)
    assert ((history.total >= 0) & (history.total <= history.weight)).all()
    kept = [log["minority/kept_fraction"] for log in trainer.state.log_history if "minority/kept_fraction" in log]
    assert len(kept) == 2  # steps 1 and 2 (step 0 is warm-up)
    assert os.path.isfile(os.path.join(str(tmp_path), "checkpoint-3", "pair_logit_evidence.safetensors"))


def test_filter_on_the_paper_score_shares_the_decayed_history(tmp_path):
    torch.set_flush_denormal(True)
    args = AdaptiveDPOConfig(
        output_dir=str(tmp_path), adaptive=True, annotator_decays=[0.9, 0.5], max_steps=2,
        per_device_train_batch_size=4, resolution=32, report_to=[], save_strategy="no", use_cpu=True,
        minority_filter="top_fraction", minority_evidence="score", minority_evidence_decay=0.5,
        minority_filter_min_visits=1,
    )
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(4))
    assert trainer.robustness["minority_filter"].history is trainer.robustness["adaptive"].history and trainer.robustness["adaptive"].history.decay == 0.5
    trainer.train()
    # 4 pairs, one per row, visited on both steps (batch 4 = the whole dataset): weights 0.5 + 1.
    assert trainer.robustness["adaptive"].history.visits.tolist() == [2, 2, 2, 2]
    assert torch.allclose(trainer.robustness["adaptive"].history.weight, torch.full((4,), 1.5, dtype=torch.float64))


def test_noisy_timestep_evidence_gates_the_training_draw_and_moves_the_extra_draws(tmp_path, monkeypatch):
    torch.set_flush_denormal(True)
    # The tiny scheduler has 1000 timesteps: min_noise 0.9 keeps t in [900, 1000).
    seen = []
    original = PairForwards.pair_forward

    def spy(self, model, inputs, global_step, with_annotators=False, draw=0, min_noise=0.0):
        out = original(self, model, inputs, global_step, with_annotators, draw=draw, min_noise=min_noise)
        seen.append((draw, out["timesteps"].clone()))
        return out

    monkeypatch.setattr(PairForwards, "pair_forward", spy)
    args = AdaptiveDPOConfig(
        output_dir=str(tmp_path), adaptive=False, max_steps=3, per_device_train_batch_size=8, resolution=32,
        report_to=[], save_strategy="no", use_cpu=True, minority_filter="top_fraction", minority_evidence_draws=1,
        minority_evidence_min_noise=0.9, minority_filter_min_visits=1, minority_evidence_decay=0.0,
    )
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(8))
    trainer.train()
    training = torch.stack([t for draw, t in seen if draw == 0])  # (3 steps, 8 pairs), uniform over [0, 1000)
    extra = torch.cat([t for draw, t in seen if draw == 1])
    assert (extra >= 900).all() and len(extra) == 24
    assert (training < 900).any()
    # Every visit has its extra vote; the training draw's vote counts only where its timestep is >= 900.
    history = trainer.robustness["minority_filter"].history
    assert history.visits.tolist() == [3] * 8
    assert float(history.weight.sum()) == 24 + int((training >= 900).sum())


def test_threshold_rule_reaches_the_trainer(tmp_path):
    torch.set_flush_denormal(True)

    def kept_fractions(threshold, max_fraction, folder):
        args = AdaptiveDPOConfig(
            output_dir=str(folder), adaptive=False, max_steps=3, per_device_train_batch_size=4, resolution=32,
            report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, minority_filter="threshold",
            minority_filter_threshold=threshold, minority_filter_max_fraction=max_fraction,
            minority_evidence="logit", minority_evidence_min_noise=0.0, minority_filter_min_visits=1,
        )
        trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(4))
        trainer.train()
        return [log["minority/kept_fraction"] for log in trainer.state.log_history if "minority/kept_fraction" in log]

    # One batch = the whole dataset (4 pairs), judged at every step. At step 0 the policy is the reference, so every
    # logit and every evidence value is 0 and none lies above the cap. Later the 4 values differ: none exceeds 1e9;
    # all exceed -1e9, but the cap (max_fraction 1: the minimum's quantile) keeps the lowest, max_fraction 0.5 two.
    assert kept_fractions(1e9, 1.0, tmp_path / "none") == [1.0] * 3
    assert kept_fractions(-1e9, 1.0, tmp_path / "all") == [1.0, 0.25, 0.25]
    assert kept_fractions(-1e9, 0.5, tmp_path / "half") == [1.0, 0.5, 0.5]


def _filter_warnings(tmp_path, beta):
    args = AdaptiveDPOConfig(
        output_dir=str(tmp_path), adaptive=False, beta=beta, max_steps=3, per_device_train_batch_size=4, resolution=32,
        learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        minority_filter="top_fraction", minority_filter_fraction=0.5, minority_filter_warmup_steps=1,
        minority_filter_min_visits=1, minority_evidence_min_noise=0.0,
    )
    trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any(log.get("minority/kept_fraction", 1) < 1 for log in trainer.state.log_history)  # the filter dropped
    return [w for w in caught if "starts dropping pairs" in str(w.message)]


def test_filter_warns_once_in_the_logistic_regime_only(tmp_path):
    torch.set_flush_denormal(True)
    # beta 1: |beta l| ~ 1e-4 when the filter first drops (step 1), far below 4: one warning over the two dropping steps.
    logistic = _filter_warnings(tmp_path / "logistic", beta=1.0)
    assert len(logistic) == 1 and "median |beta * l|" in str(logistic[0].message)
    # beta 1e9: the same logits give |beta l| far above 4 (a hinge-like loss): no warning.
    assert _filter_warnings(tmp_path / "hinge", beta=1e9) == []


def _prompt_contrast_args(folder, **overrides):
    values = dict(
        output_dir=str(folder), adaptive=False, max_steps=2, per_device_train_batch_size=4, resolution=32,
        learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        minority_filter="top_fraction", minority_filter_fraction=0.5, minority_evidence="prompt_contrast",
        minority_evidence_draws=1, minority_evidence_decay=0.0, minority_evidence_min_noise=0.0,
        minority_filter_min_visits=1, minority_filter_warmup_steps=1,
        minority_filter_min_agreement=0.0,  # no judge check (it has its own test below)
    )
    values.update(overrides)
    return AdaptiveDPOConfig(**values)


def test_prompt_contrast_votes_come_from_the_reference_not_the_policy(tmp_path, monkeypatch):
    torch.set_flush_denormal(True)
    counted = []
    original = PairForwards.prompt_contrast_votes

    def spy(self, *args, **kwargs):
        votes, differs = original(self, *args, **kwargs)
        counted.append(int(differs.sum()))
        return votes, differs

    monkeypatch.setattr(PairForwards, "prompt_contrast_votes", spy)
    trainer = AdaptiveDiffusionDPOTrainer(
        tiny_sd_pipeline(), args=_prompt_contrast_args(tmp_path), train_dataset=toy_preference_dataset(4)
    )
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    def votes():
        noised = trainer.forwards.noised_pairs(trainer.model, inputs, trainer.state.global_step, draw=1, min_noise=0.5)
        return trainer.forwards.prompt_contrast_votes(trainer.model, inputs, noised)

    before, differs = votes()
    parameters_before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(parameters_before, trainer.model.parameters()))  # policy moved
    trainer.state.global_step = 0  # the same draw again
    after, differs_after = votes()
    assert torch.equal(before, after) and torch.equal(differs, differs_after)
    # Pair i is contrasted with pair i - 1 of the batch; a vote counts only where the two prompts differ (the toy
    # prompts cycle through three colours, so two of the four pairs share their text).
    prompts = inputs["prompts"]
    assert differs.tolist() == [prompts[i] != prompts[i - 1] for i in range(4)]
    assert 0 < sum(differs.tolist()) < 4
    # Two steps, each with the training draw and one extra draw: every counted vote is one record (no decay).
    history = trainer.robustness["minority_filter"].history
    assert len(counted) == 2 + 2 + 2  # the two calls above, then two per training step
    assert float(history.weight.sum()) == sum(counted[1:-1])
    assert any("minority/evidence_mean" in log for log in trainer.state.log_history)


def test_the_judge_check_turns_the_contrast_filter_off_when_the_reference_disagrees(tmp_path):
    import json

    torch.set_flush_denormal(True)

    def run(folder, min_agreement, votes):
        args = _prompt_contrast_args(folder, max_steps=3, beta=1.0, save_strategy="steps", save_steps=3,
                                     minority_filter_warmup_steps=0, minority_filter_min_agreement=min_agreement,
                                     minority_filter_agreement_votes=votes)
        trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(8))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        kept = [log["minority/kept_fraction"] for log in trainer.state.log_history if "minority/kept_fraction" in log]
        agreement = [log["minority/judge_agreement"] for log in trainer.state.log_history if "minority/judge_agreement" in log]
        with open(os.path.join(str(folder), "checkpoint-3", "minority_judge_check.json")) as f:
            saved = json.load(f)
        turned_off = [str(w.message) for w in caught if "filter is off from step" in str(w.message)]
        return kept, agreement, saved, turned_off, trainer.robustness["minority_filter"].history

    # Decided on the first step's votes. Agreement is a share in [0, 1]: a minimum of 0.99 fails on random weights
    # (it is logged), so the filter keeps every pair of that step, says so once at its log and casts no more votes.
    kept, agreement, saved, turned_off, history = run(tmp_path / "fails", 0.99, votes=1)
    assert kept == [1.0] and len(agreement) == 1 and 0 <= agreement[0] < 0.99
    visits_when_off = int(history.visits.sum())
    assert 0 < visits_when_off <= 4  # step 0's batch only (a visit counts where a vote was cast)
    assert saved["decided"] and not saved["passed"] and saved["step"] == 0 and saved["votes"] >= 1
    assert len(turned_off) == 1 and f"{agreement[0]:.1%}" in turned_off[0]
    # Resumed from its checkpoint, the run is told again (its logs will not show the decision), and stays off.
    args = _prompt_contrast_args(tmp_path / "fails", max_steps=4, beta=1.0, minority_filter_warmup_steps=0,
                                 minority_filter_min_agreement=0.99, minority_filter_agreement_votes=1)
    resumed = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=args, train_dataset=toy_preference_dataset(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=str(tmp_path / "fails" / "checkpoint-3"))
    again = [str(w.message) for w in caught if "filter is off from step" in str(w.message)]
    assert len(again) == 1 and "decided before the checkpoint" in again[0] and f"{agreement[0]:.1%}" in again[0]
    assert int(resumed.robustness["minority_filter"].history.visits.sum()) == visits_when_off
    kept, _, saved, turned_off, history = run(tmp_path / "passes", 0.01, votes=1)
    assert saved["decided"] and saved["passed"] and turned_off == []
    assert len(kept) == 3 and any(k < 1 for k in kept) and int(history.visits.sum()) > visits_when_off
    # Until the check has counted its votes nothing is dropped, whatever the evidence says.
    kept, _, saved, turned_off, _ = run(tmp_path / "undecided", 0.01, votes=10**6)
    assert all(k == 1 for k in kept) and not saved["decided"] and turned_off == []
    assert 0 < saved["votes"] < 10**6


def test_judge_check_counts_votes_until_the_decision_by_hand(tmp_path):
    import pytest

    from trl_adaptive.robustness.minority_filter import JudgeCheck

    judge = JudgeCheck(min_agreement=0.6, min_votes=5)
    # Step 0: four valid votes, one against the label (1), the fifth entry invalid: 3 of 4 agree, not enough votes.
    judge.count(torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0]), torch.tensor([True, True, True, True, False]), global_step=0)
    assert not bool(judge.decided()) and not bool(judge.allows()) and float(judge.agreement()) == 0.75
    # Step 1: two more votes, both against: 6 votes, 3 agree (0.5 < 0.6): decided at step 1, failed.
    judge.count(torch.tensor([1.0, 1.0]), torch.tensor([True, True]), global_step=1)
    assert bool(judge.decided()) and not bool(judge.allows()) and judge.failed()
    assert float(judge.agreement()) == 0.5
    # After the decision the count stops: later votes change nothing.
    judge.count(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([True, True, True]), global_step=2)
    assert judge.state.tolist() == [6.0, 3.0, 1.0, 0.0, 1.0]
    assert judge.report({}) is None  # the log shows no decision: nothing read
    assert judge.report({"minority/judge_passed": 0.0}) == {"votes": 6, "agreeing": 3, "agreement": 0.5, "decided": True,
                                                            "passed": False, "step": 1}
    assert judge.report({"minority/judge_passed": 0.0}) is None  # once
    judge.save(str(tmp_path))
    restored = JudgeCheck(min_agreement=0.6, min_votes=5)
    restored.load(str(tmp_path))
    assert torch.equal(restored.state, judge.state) and restored.failed()
    # A checkpoint without the record (written before the check existed) resumes with a fresh count, and says so.
    fresh = JudgeCheck(min_agreement=0.6, min_votes=5)
    with pytest.warns(UserWarning, match="starts counting the reference's votes again"):
        fresh.load(str(tmp_path / "missing"))
    assert fresh.state.tolist() == [0.0] * 5


class _ColourJudge:
    """A judge with the scorer interface that knows the toy preference: the mean of the colour the prompt names."""

    def __init__(self, sign=1.0):
        self.sign = sign

    def score(self, images, prompts):
        import numpy as np

        channel = {"red": 0, "green": 1, "blue": 2}
        return torch.tensor([self.sign * np.asarray(image, dtype=np.float64)[..., channel[p.split()[1]]].mean()
                             for image, p in zip(images, prompts)])


def _judge_args(folder, **overrides):
    values = dict(
        output_dir=str(folder), adaptive=False, max_steps=4, per_device_train_batch_size=4, resolution=32,
        learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        minority_filter="threshold", minority_evidence="judge", minority_filter_threshold=0.5,
        minority_filter_max_fraction=1.0, minority_filter_min_visits=1, minority_filter_agreement_votes=4,
        minority_filter_min_agreement=0.6,
    )
    values.update(overrides)
    return AdaptiveDPOConfig(**values)


def test_judge_evidence_drops_the_pairs_the_judge_contradicts_and_its_check_falls_back(tmp_path):
    import pytest

    from trl_adaptive.data import add_judge_scores, flip_labels

    torch.set_flush_denormal(True)
    data = flip_labels(toy_preference_dataset(8), rate=0.25, seed=0)  # two pairs flipped

    def train(folder, judge):
        scored = add_judge_scores(data, judge, progress=False)
        trainer = AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=_judge_args(folder), train_dataset=scored)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        logs = trainer.state.log_history
        return ([(log["minority/flipped_dropped"] if "minority/flipped_dropped" in log else None,
                  log.get("minority/clean_dropped")) for log in logs if "minority/kept_fraction" in log],
                [log["minority/judge_agreement"] for log in logs if "minority/judge_agreement" in log],
                [str(w.message) for w in caught if "filter is off from step" in str(w.message)])

    # The judge knows the preference: it agrees with 6 of 8 labels. Decided on step 0's four votes; from then on the
    # pairs it contradicts, exactly the flipped ones, are dropped and no clean pair is.
    drops, agreement, turned_off = train(tmp_path / "knows", _ColourJudge())
    assert turned_off == [] and 0.6 <= agreement[0] <= 1.0
    assert drops and all(clean == 0.0 for _, clean in drops) and any(f == 1.0 for f, _ in drops)
    # A judge of the opposite preference agrees with the flipped labels only: the check fails, nothing is dropped,
    # and the user is told the run is plain Diffusion-DPO.
    drops, agreement, turned_off = train(tmp_path / "opposite", _ColourJudge(sign=-1.0))
    assert agreement[0] < 0.6 and len(turned_off) == 1 and "the judge's scores agreed" in turned_off[0]
    assert all(flipped in (0.0, None) and clean in (0.0, None) for flipped, clean in drops)
    # Without the column the trainer stops before training, naming it and the helper that adds it.
    with pytest.raises(ValueError, match=r"judge_scores.*add_judge_scores"):
        AdaptiveDiffusionDPOTrainer(tiny_sd_pipeline(), args=_judge_args(tmp_path / "none"), train_dataset=data)
