"""The digits benchmark's judge (trl_adaptive/benchmarks/digits/judge.py) and its `judge_filter` method: a reward
model fitted to separate pairs agrees with the preference it was fitted to, its pairs are cached, and the method
runs through the demo with the judge's scores added the way a user adds a reward model's."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trl_adaptive.benchmarks import digits
from trl_adaptive.benchmarks.digits.judge import PairJudge, fit_judge, grey_pixels


def _synthetic_pairs(n, seed):
    """Grey 8x8 images; the preferred one has more ink in its top half (the prompt says nothing about it)."""
    rng = np.random.default_rng(seed)
    a, b = rng.random((n, 64)).astype(np.float32), rng.random((n, 64)).astype(np.float32)
    a_wins = a[:, :32].sum(1) > b[:, :32].sum(1)
    winners, losers = np.where(a_wins[:, None], a, b), np.where(a_wins[:, None], b, a)
    prompts = [f"prompt {k % 3}" for k in range(n)]
    return {"winners": torch.from_numpy(winners), "losers": torch.from_numpy(losers), "prompts": prompts}


def test_a_judge_fitted_to_other_pairs_agrees_with_their_preference():
    judge = fit_judge(_synthetic_pairs(1500, seed=0), flip_rate=0.0, seed=0)
    held_out = _synthetic_pairs(300, seed=1)
    to_images = lambda rows: [Image.fromarray((r.reshape(8, 8).numpy() * 255).astype(np.uint8)) for r in rows]  # noqa: E731
    margin = (judge.score(to_images(held_out["winners"]), held_out["prompts"])
              - judge.score(to_images(held_out["losers"]), held_out["prompts"]))
    assert float((margin > 0).float().mean()) > 0.85
    # Through the scorer interface the images are grey pixels in [0, 1], as the judge was fitted on them.
    assert torch.allclose(grey_pixels(to_images(held_out["winners"][:4])), held_out["winners"][:4], atol=1 / 255)
    # A judge fitted to labels that are half wrong at random knows nothing of the preference.
    blind = fit_judge(_synthetic_pairs(1500, seed=0), flip_rate=0.5, seed=0)
    blind_margin = (blind.score(to_images(held_out["winners"]), held_out["prompts"])
                    - blind.score(to_images(held_out["losers"]), held_out["prompts"]))
    assert 0.35 < float((blind_margin > 0).float().mean()) < 0.65
    with pytest.raises(ValueError, match="fitted without the prompts"):
        PairJudge(judge.net, ["prompt 0"]).context(["prompt 1"])


def test_judge_filter_runs_through_the_demo_and_caches_its_pairs(tmp_path):
    """`trl-adaptive demo --methods judge_filter` on a reduced quick grid: the judge check decides (64 votes), its
    decision and the filter's drops are recorded, and the judge's pairs are cached beside the base model."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--quick", "--methods", "judge_filter", "--flip-rates", "0.2", "--judge-seeds", "2", "--train-steps", "6",
            "--set-method", "judge_filter:minority_filter_agreement_votes=64", "--output-dir", str(out),
            "--cache-dir", str(cache), "--no-progress", "--threads", "1", "--workers", "1"]
    digits.main(argv)
    run = json.loads((out / "results.json").read_text())["per_seed"][0]["runs"]["judge_filter@0.2"]
    stats = run["filter_stats"]
    assert stats["judge_decided"] and stats["judge_votes"] >= 64 and 0.0 <= stats["judge_agreement"] <= 1.0
    cached = sorted(p.name for p in cache.glob("judge-pairs-fidelity-*.npz"))
    assert len(cached) == 1
    saved = np.load(cache / cached[0])
    assert saved["winners"].shape[1] == 64 and len(saved["prompts"]) == len(saved["winners"]) > 0
    with pytest.raises(ValueError, match="--judge-flip-rate"):
        digits.settings_from_args(digits.parse_args(["--judge-flip-rate", "0.5"]))
