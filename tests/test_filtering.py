"""The minority filter's pure functions against values computed by hand."""

import math

import pytest
import torch

from trl_adaptive.filtering import (
    implied_flip_rate,
    logit_evidence,
    minority_keep_mask,
    mixture_minority_posterior,
    mixture_separation,
    prompt_contrast_evidence,
    top_fraction_threshold,
    two_gaussian_mixture,
)


def test_logit_evidence_is_negated_logit_over_rms():
    logits = torch.tensor([1.0, -2.0, 0.0], requires_grad=True)
    evidence = logit_evidence(logits, torch.tensor(2.0))
    assert torch.allclose(evidence, torch.tensor([-0.5, 1.0, 0.0]))
    assert not evidence.requires_grad


def test_top_fraction_threshold():
    values = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    # 75% quantile with linear interpolation: position 0.75 * 4 = 3 -> value 3, so only 4.0 lies above it.
    assert top_fraction_threshold(values, 0.25) == pytest.approx(3.0)
    # 60% quantile: position 2.4 -> 2 + 0.4 * (3 - 2) = 2.4
    assert top_fraction_threshold(values, 0.4) == pytest.approx(2.4)
    assert top_fraction_threshold(values, 0.0) == float("inf")


def test_keep_mask_top_fraction_and_min_visits():
    all_means = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    batch_means = torch.tensor([4.0, 3.0, 0.5, 4.0])
    visits = torch.tensor([3, 3, 3, 1])
    keep = minority_keep_mask(batch_means, visits, all_means, "top_fraction", fraction=0.25, min_visits=2)
    # 4.0 > 3.0 is dropped; 3.0 is not above the threshold; the last pair has too few visits to be judged.
    assert keep.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert minority_keep_mask(batch_means, visits, all_means, "none").tolist() == [1.0] * 4


def test_keep_mask_threshold_is_capped_by_max_fraction():
    all_means = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    batch_means = torch.tensor([0.5, 0.75, 1.0, 0.9])
    visits = torch.tensor([3, 3, 3, 1])
    # Above 0.5 is dropped (0.5 itself is kept); the last pair has too few visits to be judged.
    keep = minority_keep_mask(batch_means, visits, all_means, "threshold", threshold=0.5, min_visits=2)
    assert keep.tolist() == [1.0, 0.0, 0.0, 1.0]
    # At most 25% of the judged pairs: the cap is their 75% quantile, 0.75, which 0.75 itself does not exceed.
    keep = minority_keep_mask(batch_means, visits, all_means, "threshold", threshold=0.5, min_visits=2, max_fraction=0.25)
    assert keep.tolist() == [1.0, 1.0, 0.0, 1.0]


def _two_clusters():
    low = [-0.1, -0.05, 0.0, 0.05, 0.1]  # mean 0, variance (0.01 + 0.0025 + 0 + 0.0025 + 0.01) / 5 = 0.005
    high = [4.9, 5.0, 5.1]  # mean 5, variance 0.02 / 3
    return torch.tensor(low + high)


def test_two_gaussian_mixture_recovers_separated_clusters():
    mixture = two_gaussian_mixture(_two_clusters())
    assert torch.allclose(mixture["means"], torch.tensor([0.0, 5.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(mixture["variances"], torch.tensor([0.005, 0.02 / 3], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(mixture["weights"], torch.tensor([5 / 8, 3 / 8], dtype=torch.float64), atol=1e-6)
    # Ashman's D = 5 / sqrt((0.005 + 0.00667) / 2) = 65.47
    assert mixture_separation(mixture) == pytest.approx(5 / ((0.005 + 0.02 / 3) / 2) ** 0.5, rel=1e-4)
    posterior = mixture_minority_posterior(torch.tensor([0.0, 5.0]), mixture)
    assert posterior[0] < 1e-6 and posterior[1] > 1 - 1e-6


def test_mixture_mask_drops_upper_cluster_only():
    values = _two_clusters()
    keep = minority_keep_mask(values, torch.full((8,), 5), values, "mixture", min_visits=1, max_fraction=0.5)
    assert keep.tolist() == [1.0] * 5 + [0.0] * 3
    # The cap: with max_fraction 0.25 only values above the 75% quantile go: sorted position 0.75 * 7 = 5.25,
    # i.e. 4.9 + 0.25 * (5.0 - 4.9) = 4.925, so 5.0 and 5.1 are dropped and 4.9 is kept.
    keep = minority_keep_mask(values, torch.full((8,), 5), values, "mixture", max_fraction=0.25)
    assert keep.tolist() == [1.0] * 6 + [0.0] * 2


def test_mixture_keeps_everything_on_a_unimodal_sample():
    normal = torch.special.ndtri(torch.linspace(0.005, 0.995, 199))  # Gaussian quantiles: one mode, no minority
    assert mixture_separation(two_gaussian_mixture(normal)) < 2.0
    keep = minority_keep_mask(normal, torch.full((199,), 5), normal, "mixture")
    assert keep.min().item() == 1.0


def test_wrong_sign_evidence_votes_when_logit_negative():
    from trl_adaptive.filtering import wrong_sign_evidence

    assert wrong_sign_evidence(torch.tensor([0.3, -1e-6, 0.0, -2.0])).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_prompt_contrast_evidence_votes_when_the_prompt_fits_the_loser_better():
    # Errors of (winner 0, winner 1, loser 0, loser 1) under the own prompts and under contrast prompts. How much the
    # own prompt helps (contrast - own): winners 0.4 and 0.1, losers 0.1 and 0.5. Pair 0's label agrees with the
    # reference (vote 0), pair 1's does not (vote 1); absolute error levels do not matter, only the differences.
    own = torch.tensor([1.0, 2.0, 1.5, 1.0])
    contrast = torch.tensor([1.4, 2.1, 1.6, 1.5])
    assert prompt_contrast_evidence(own, contrast).tolist() == [0.0, 1.0]
    assert prompt_contrast_evidence(own + 7.0, contrast + 7.0).tolist() == [0.0, 1.0]


def test_pair_history_plain_mean_counts_visits_not_votes(tmp_path):
    from trl_adaptive.history import PairHistory

    history = PairHistory(3)
    history.record(torch.tensor([0, 1, 0, 1]), torch.tensor([1.0, 0.0, 0.0, 0.0]))  # one visit, two votes each
    history.record(torch.tensor([0]), torch.tensor([1.0]))
    assert history.visits.tolist() == [2, 1, 0]
    assert history.mean(torch.tensor([0, 1, 2])).tolist() == pytest.approx([2 / 3, 0.0, 0.0])
    history.save(str(tmp_path))
    restored = PairHistory(3)
    restored.load(str(tmp_path))
    assert restored.mean(torch.tensor([0])).item() == pytest.approx(2 / 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pair_history_answers_on_the_device_of_the_rows():
    # The history lives on the CPU; the filter combines its answers with masks on the batch's device (a mismatch
    # crashed the filter on the first GPU run).
    from trl_adaptive.filtering import minority_keep_mask
    from trl_adaptive.history import PairHistory

    history = PairHistory(4)
    history.record(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    history.record(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    rows = torch.tensor([0, 1, 2, 3], device="cuda")
    means, visits = history.mean(rows), history.visit_counts(rows)
    assert means.device == visits.device == rows.device
    keep = minority_keep_mask(means, visits, history.means_with_visits(2).float(), "top_fraction", fraction=0.25,
                              min_visits=2)
    assert keep.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_pair_history_ignores_invalid_votes_and_does_not_visit_rows_without_one():
    from trl_adaptive.history import PairHistory

    history = PairHistory(3, decay=0.5)
    history.record(torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    # Row 0: one valid vote of two; row 1: no valid vote (not visited, nothing decays); row 2: one valid vote.
    history.record(torch.tensor([0, 1, 0, 2]), torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([True, False, False, True]))
    assert history.visits.tolist() == [2, 1, 1]
    assert history.mean(torch.tensor([0, 1, 2])).tolist() == pytest.approx([0.5 / 1.5, 1.0, 0.0])


def test_pair_history_decay_weights_recent_visits_more():
    from trl_adaptive.history import PairHistory

    history = PairHistory(2, decay=0.5)
    for value in (1.0, 0.0, 0.0):  # row 0: votes 1, 0, 0 on three visits; row 1 visited only once
        history.record(torch.tensor([0]), torch.tensor([value]))
    history.record(torch.tensor([1]), torch.tensor([1.0]))
    # weights 0.25, 0.5, 1 -> (0.25 * 1) / 1.75
    assert history.mean(torch.tensor([0, 1])).tolist() == pytest.approx([0.25 / 1.75, 1.0])
    assert history.means_with_visits(2).tolist() == pytest.approx([0.25 / 1.75])
    with pytest.raises(ValueError, match="decay"):
        PairHistory(2, decay=1.0)


def test_keep_mask_on_the_fixed_shape_history_equals_the_compacted_one():
    """`PairHistory.means_or_nan` (one entry per row, NaN for rows not judged: no data-dependent shape, so no GPU
    synchronisation) gives the same rule as the compacted means of the judged rows."""
    from trl_adaptive.history import PairHistory

    generator = torch.Generator().manual_seed(0)
    history = PairHistory(40, decay=0.9)
    for _ in range(6):
        rows = torch.randint(0, 40, (8,), generator=generator)
        history.record(rows, torch.cat([torch.randn(6, generator=generator), torch.randn(2, generator=generator) + 4]))
    rows = torch.arange(40)
    batch, visits = history.mean(rows), history.visit_counts(rows)
    compact, padded = history.means_with_visits(2).float(), history.means_or_nan(2).float()
    assert padded.isnan().any() and torch.equal(padded[~padded.isnan()], compact)
    for method in ("top_fraction", "threshold", "mixture"):
        kwargs = dict(fraction=0.2, threshold=0.5, min_visits=2, max_fraction=0.3, min_separation=0.5)
        expected = minority_keep_mask(batch, visits, compact, method, **kwargs)
        assert torch.equal(minority_keep_mask(batch, visits, padded, method, **kwargs), expected), method
        assert (expected == 0).any(), method  # the rule dropped something: the comparison is not vacuous
    # Fewer than two judged rows: nothing is dropped, as with the compacted form.
    lonely = torch.full((40,), float("nan"))
    lonely[3] = 9.0
    assert minority_keep_mask(batch, visits, lonely, "threshold", threshold=0.0, min_visits=0).eq(1).all()


def test_judge_evidence_by_hand():
    from trl_adaptive.filtering import judge_evidence

    # sigmoid(-margin / rms): a judge that prefers the labelled loser (negative margin) gives more than one half.
    margins = torch.tensor([2.0, -1.0, 0.5, float("nan")])
    evidence = judge_evidence(margins, rms=2.0)
    expected = [1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.25))]
    assert evidence[:3].tolist() == pytest.approx(expected, abs=1e-6) and torch.isnan(evidence[3])
    assert judge_evidence(margins * 10, rms=20.0)[:3].tolist() == pytest.approx(expected, abs=1e-6)  # scale-free


def test_implied_flip_rate_by_hand():
    # f = (a - g) / (2a - 1): a judge right on 90% of clean pairs agreeing on 75% of the labels implies 0.15 / 0.8.
    assert implied_flip_rate(0.75, 0.9) == pytest.approx(0.1875)
    assert implied_flip_rate(0.9, 0.9) == 0.0 and implied_flip_rate(0.75, 0.75) == 0.0  # agreement = accuracy: clean
    assert implied_flip_rate(0.95, 0.9) == 0.0  # above its own accuracy: no flips, not a negative share
    assert implied_flip_rate(0.2, 0.9) == 0.5  # below what any flip share up to one half explains: clipped
    assert implied_flip_rate(0.6, 1.0) == pytest.approx(0.4)  # a perfect judge's disagreement is the flip share
    with pytest.raises(ValueError, match="judge_accuracy"):
        implied_flip_rate(0.7, 0.5)
    with pytest.raises(ValueError, match="agreement"):
        implied_flip_rate(1.2, 0.9)
