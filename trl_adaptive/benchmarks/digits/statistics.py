"""Statistics of the runs: detection of the flipped pairs (AUROC, decile shares, per-pair means), mean and CI over
seeds, and the per-(flip rate, method) summary."""

from __future__ import annotations

import math

import numpy as np

from .settings import BenchmarkSettings


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for the positive class (None when a class is missing)."""
    from sklearn.metrics import roc_auc_score

    positives = np.asarray(positives, dtype=bool)
    keep = np.isfinite(scores)
    if keep.sum() == 0 or positives[keep].all() or not positives[keep].any():
        return None
    return float(roc_auc_score(positives[keep], scores[keep]))


def decile_shares(scores: np.ndarray, positives: np.ndarray) -> list[float] | None:
    """Share of positives in each decile of `scores` (lowest decile first), the paper's Figure 3."""
    keep = np.isfinite(scores)
    if keep.sum() < 10:
        return None
    order = np.argsort(scores[keep], kind="stable")
    return [float(chunk.mean()) for chunk in np.array_split(np.asarray(positives)[keep][order], 10)]


def per_pair_means(visits: dict, key: str, last_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `visits[key]` per pair over its visits (optionally only the last part of training)."""
    steps = visits["step"]
    keep = steps >= steps.max() * (1.0 - last_fraction) if len(steps) else np.zeros(0, dtype=bool)
    rows, values = visits["row"][keep], visits[key][keep]
    finite = np.isfinite(values)
    rows, values = rows[finite], values[finite]
    unique = np.unique(rows)
    index = np.searchsorted(unique, rows)
    sums = np.bincount(index, weights=values, minlength=len(unique))
    counts = np.bincount(index, minlength=len(unique))
    return unique, sums / np.maximum(counts, 1)


def detection_metrics(visits: dict) -> dict:
    """How well each kind of minority evidence finds the flipped pairs."""
    if "flipped" not in visits or not visits["flipped"].any():
        return {}
    out = {}
    flipped_by_row = {}
    for r, f in zip(visits["row"], visits["flipped"]):
        flipped_by_row[int(r)] = bool(f)
    if np.isfinite(visits["score"]).any():
        finite = np.isfinite(visits["score"])
        out["auroc_u_per_step"] = auroc(visits["score"][finite], visits["flipped"][finite])
        rows, mean_u = per_pair_means(visits, "score")
        labels = np.array([flipped_by_row[int(r)] for r in rows])
        out["auroc_u_pair_mean"] = auroc(mean_u, labels)
        out["flipped_share_by_u_decile"] = decile_shares(mean_u, labels)
    out["auroc_neg_logit_per_step"] = auroc(-visits["logit"], visits["flipped"])
    steps = visits["step"]
    rms = np.sqrt(np.bincount(steps, weights=visits["logit"] ** 2) / np.maximum(np.bincount(steps), 1))
    normalised = dict(visits)
    normalised["evidence"] = -visits["logit"] / np.maximum(rms[steps], 1e-12)
    rows, mean_evidence = per_pair_means(normalised, "evidence")
    out["auroc_evidence_pair_mean"] = auroc(mean_evidence, np.array([flipped_by_row[int(r)] for r in rows]))
    rows, mean_logit = per_pair_means(visits, "logit")
    labels = np.array([flipped_by_row[int(r)] for r in rows])
    out["auroc_neg_logit_pair_mean"] = auroc(-mean_logit, labels)
    signs = dict(visits)
    signs["sign"] = (visits["logit"] < 0).astype(np.float64)
    rows, wrong_share = per_pair_means(signs, "sign")
    out["auroc_wrong_share_pair_mean"] = auroc(wrong_share, labels)
    return out


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample sd and the half-width of a 95% t-interval over seeds (sd and CI are nan for one value)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan"), float("nan")
    sd = float(values.std(ddof=1))
    return float(values.mean()), sd, float(stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values)))


def method_at(runs_by_key: dict, method: str, rate: float) -> dict | None:
    """The run of a method at a flip rate, mapping cDPO/oracle at 0% to Diffusion-DPO (they are identical there)."""
    key = f"{method}@{rate}"
    if key in runs_by_key:
        return runs_by_key[key]
    if rate == 0.0 and method in ("cdpo", "oracle"):
        return runs_by_key.get(f"dpo@{rate}")
    return None


def summarise(seed_results: list[dict], settings: BenchmarkSettings) -> dict:
    """Per (flip rate, method): reward mean/sd/CI over seeds, share of the DPO-to-oracle gap closed, win rate CI,
    detection AUROCs."""
    summary = {}
    for rate in settings.flip_rates:
        for method in settings.methods:
            per_seed = [method_at(r["runs"], method, rate) for r in seed_results]
            if any(p is None for p in per_seed):
                continue
            reward = mean_ci([p["reward"] for p in per_seed])
            gain = mean_ci([p["reward_gain"] for p in per_seed])
            win = mean_ci([p["win_rate"] for p in per_seed])
            entry = {
                "reward_mean": reward[0], "reward_sd": reward[1], "reward_ci95": reward[2],
                "gain_mean": gain[0], "gain_sd": gain[1],
                "win_rate_mean": win[0], "win_rate_ci95": win[2],
                "train_seconds_mean": float(np.mean([p["train_seconds"] for p in per_seed])),
            }
            if all("other_rewards" in p for p in per_seed):  # the other raters' rewards (style runs: fidelity)
                entry["other_rewards"] = {
                    name: mean_ci([p["other_rewards"][name]["tuned"] for p in per_seed])[:2]
                    for name in per_seed[0]["other_rewards"]
                }
                entry["other_rewards_base"] = {
                    name: float(np.mean([p["other_rewards"][name]["base"] for p in per_seed]))
                    for name in per_seed[0]["other_rewards"]
                }
            dpo = [method_at(r["runs"], "dpo", rate) for r in seed_results]
            oracle = [method_at(r["runs"], "oracle", rate) for r in seed_results]
            if rate > 0 and all(oracle) and all(dpo):
                gap = np.mean([o["reward"] for o in oracle]) - np.mean([d["reward"] for d in dpo])
                entry["gap_closed"] = float((reward[0] - np.mean([d["reward"] for d in dpo])) / gap) if gap > 0 else None
            for key in ("auroc_u_pair_mean", "auroc_u_per_step", "auroc_neg_logit_per_step", "auroc_neg_logit_pair_mean",
                        "auroc_wrong_share_pair_mean", "auroc_evidence_pair_mean"):
                values = [p["detection"].get(key) for p in per_seed]
                if values and all(v is not None for v in values):
                    entry[key] = float(np.mean(values))
            deciles = [p["detection"].get("flipped_share_by_u_decile") for p in per_seed]
            if deciles and all(d is not None for d in deciles):
                entry["flipped_share_by_u_decile"] = np.mean(deciles, axis=0).tolist()
            summary[f"{method}@{rate}"] = entry
    return summary
