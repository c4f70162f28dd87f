"""How sure is a "gap closed" figure? A bootstrap over seeds for the digits benchmark's reports.

Reads one or more `results.json` files written by `trl-adaptive demo` (later files override earlier ones run by
run, so a rerun of some methods can be laid over an older report), keeps the seeds that have every run needed, and
prints for each method and flip rate the share of the DPO-to-oracle gap it closes, as the ratio of seed means
((method - DPO) / (oracle - DPO) of the mean gains, the figure docs/results.md reports), with a 95% percentile
bootstrap interval from resampling whole seeds; beside it the gain minus Diffusion-DPO's (at every flip rate, the
figure at 0% flips) with its interval, the worst seed and how many seeds ended below Diffusion-DPO.

    python benchmarks/gap_bootstrap.py docs/results/results.json docs/results/extra-seeds/results.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def load_runs(paths: list[str]) -> dict[int, dict[str, float]]:
    """Reward gain of every run, by seed and `method@rate` key."""
    runs: dict[int, dict[str, float]] = {}
    for path in paths:
        with open(path) as f:
            for entry in json.load(f)["per_seed"]:
                gains = {key: run["reward_gain"] for key, run in entry["runs"].items()}
                runs.setdefault(int(entry["seed"]), {}).update(gains)
    return runs


def gap_closed(method: np.ndarray, dpo: np.ndarray, oracle: np.ndarray) -> float:
    return float((method.mean() - dpo.mean()) / (oracle.mean() - dpo.mean()))


def gain_over_dpo(method: np.ndarray, dpo: np.ndarray, _reference: np.ndarray) -> float:
    return float(method.mean() - dpo.mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files of trl-adaptive demo")
    parser.add_argument("--methods", nargs="+", default=["filter", "filter_free", "adaptive"])
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's own random numbers")
    parser.add_argument("--per-seed", action="store_true",
                        help="instead: each seed's gain minus Diffusion-DPO's, per method and flip rate")
    args = parser.parse_args(argv)
    runs = load_runs(args.results)
    if args.per_seed:
        print_per_seed(runs, args.methods)
        return
    rng = np.random.default_rng(args.seed)
    print("| method | flips | seeds | gap closed (ratio of seed means) | 95% bootstrap interval | gain - DPO's | "
          "95% bootstrap interval | worst seed: gain - DPO's | seeds below DPO |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in args.methods:
        for rate in (0.0, 0.1, 0.2, 0.3):
            reference = "dpo" if rate == 0.0 else "oracle"
            seeds = sorted(s for s, r in runs.items() if all(f"{m}@{rate}" in r for m in (method, "dpo", reference)))
            if not seeds:
                continue
            table = np.array([[runs[s][f"{m}@{rate}"] for m in (method, "dpo", reference)] for s in seeds])
            resampled = [table[i] for i in rng.integers(0, len(seeds), (args.resamples, len(seeds)))]

            def estimate(statistic):
                low, high = np.percentile([statistic(*t.T) for t in resampled], [2.5, 97.5])
                return statistic(*table.T), low, high

            # The gain over Diffusion-DPO in reward units, with the worst seed (the "never below Diffusion-DPO"):
            # unlike the ratio it stays readable where the oracle's lead is small or noisy (the style rater).
            difference = estimate(gain_over_dpo)
            differences = table[:, 0] - table[:, 1]
            worst = f"{differences.min():+.4f} (seed {seeds[int(differences.argmin())]})"
            below = f"{int((differences < 0).sum())} of {len(seeds)}"
            columns = f"{difference[0]:+.4f} | [{difference[1]:+.4f}, {difference[2]:+.4f}] | {worst} | {below}"
            if rate == 0.0:  # no gap without flips
                print(f"| {method} | 0% | {len(seeds)} | - | - | {columns} |")
            else:
                point, low, high = estimate(gap_closed)
                print(f"| {method} | {rate:.0%} | {len(seeds)} | {point:.0%} | [{low:.0%}, {high:.0%}] | {columns} |")


def print_per_seed(runs: dict[int, dict[str, float]], methods: list[str]) -> None:
    """Gain minus Diffusion-DPO's gain (the same as reward minus Diffusion-DPO's) of every seed that has both runs."""
    seeds = sorted(runs)
    print("| method | flips | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in seeds) + " |")
    for method in methods:
        for rate in (0.0, 0.1, 0.2, 0.3):
            cells = [f"{runs[s][f'{method}@{rate}'] - runs[s][f'dpo@{rate}']:+.3f}"
                     if f"{method}@{rate}" in runs[s] and f"dpo@{rate}" in runs[s] else "-" for s in seeds]
            if any(c != "-" for c in cells):
                print(f"| {method} | {rate:.0%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
