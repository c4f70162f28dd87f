"""benchmarks/learned_judge.py: a cross-fitted Bradley-Terry judge finds flipped labels where the features carry the
preference, and sits at chance where they do not."""

import numpy as np
import torch


def _pairs(num_pairs=400, flip_rate=0.2, seed=0):
    """Pairs of 4-feature images ranked by feature 0 (the preference), a share of them flipped."""
    rng = np.random.default_rng(seed)
    first, second = rng.normal(size=(num_pairs, 4)), rng.normal(size=(num_pairs, 4))
    first_wins = first[:, 0] > second[:, 0]
    flipped = rng.random(num_pairs) < flip_rate
    wins = first_wins ^ flipped
    winners = np.where(wins[:, None], first, second)
    losers = np.where(wins[:, None], second, first)
    context = np.ones((num_pairs, 1))  # one prompt
    return (torch.tensor(winners, dtype=torch.float32), torch.tensor(losers, dtype=torch.float32),
            torch.tensor(context, dtype=torch.float32), flipped)


def test_cross_fitted_judge_finds_the_flipped_pairs_when_the_features_carry_the_preference(benchmark_script):
    from sklearn.metrics import roc_auc_score

    judge = benchmark_script("learned_judge")
    winners, losers, context, flipped = _pairs()
    margins = judge.cross_fitted_margins(winners, losers, context, folds=5, hidden=8, steps=200)
    assert roc_auc_score(flipped, -margins) > 0.9
    # agreement with the given labels of a judge right on a share a of the pairs: a (1 - f) + (1 - a) f, 0.68-0.8
    # for a = 0.8-1 at f = 0.2 (pairs of nearly equal feature 0 are hard for any judge)
    assert 0.65 < (margins > 0).mean() < 0.85


def test_cross_fitted_judge_is_at_chance_when_the_features_do_not_carry_it(benchmark_script):
    judge = benchmark_script("learned_judge")
    winners, losers, context, _ = _pairs(flip_rate=0.0)
    # drop the feature the labels follow: what is left is independent of them
    margins = judge.cross_fitted_margins(winners[:, 1:], losers[:, 1:], context, folds=5, hidden=8, steps=200)
    assert 0.4 < (margins > 0).mean() < 0.6


def test_pair_features_rejects_an_unknown_kind(benchmark_script):
    import pytest
    from datasets import Dataset
    from PIL import Image

    judge = benchmark_script("learned_judge")
    image = Image.new("RGB", (8, 8))
    dataset = Dataset.from_list([{"prompt": "a", "chosen": image, "rejected": image}])
    with pytest.raises(ValueError, match="features must be"):
        judge.pair_features(dataset, "colour")
    winners, losers, context = judge.pair_features(dataset, "ink")
    assert winners.shape == (1, 1) and context.shape == (1, 1)
