"""The report: the markdown table, the plots, results.json / results.md, and merging earlier runs' results."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from .methods import METHOD_LABELS
from .settings import BenchmarkSettings
from .statistics import summarise


#: What the scorers reported beside the rater's reward measure (style runs: `cli.main`).
OTHER_SCORERS = {
    "digit_rater": "prompt fidelity, where reward hacking would show",
    "ink_z": "mean offset of the standardised ink from the style target: a drift to heavy (+) or light (-) strokes",
    "ink_abs_z": "mean size of that offset: how far images miss the target either way",
}


def markdown_table(summary: dict, settings: BenchmarkSettings, num_seeds: int) -> str:
    def fmt(x, spec):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    other = sorted({name for e in summary.values() for name in e.get("other_rewards", {})})
    rater = getattr(settings, "rater", "fidelity")
    lines = [
        *([f"Rater: {rater} (ranks the pairs and rates the runs); beside it, the means of other scorers: "
           + ", ".join(f"{n} ({OTHER_SCORERS.get(n, 'another rater')}; base model "
                       f"{next(iter(summary.values()))['other_rewards_base'][n]:.4f})" for n in other)
           + ".", ""] if other else []),
        f"Mean rater reward of held-out generations (mean +- sd over {num_seeds} seed(s)); gap closed = "
        "(method - DPO) / (oracle - DPO); win rate vs the base model with 95% CI over seeds; AUROC of the method's "
        "per-pair mean minority score u against `flipped` (Adaptive-DPO runs), and of the per-pair mean of -l / rms(l) "
        "(the minority filter's evidence, recorded in every run).",
        "",
        "| flips | method | reward | gain vs base | gap closed | win rate | AUROC u | AUROC -l |"
        + "".join(f" {name} |" for name in other),
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(other),
    ]
    for rate in settings.flip_rates:
        for method in settings.methods:
            e = summary.get(f"{method}@{rate}")
            if e is None or (rate == 0.0 and method in ("cdpo", "oracle")):  # identical to Diffusion-DPO there
                continue
            reward = f"{e['reward_mean']:.4f} +- {fmt(e['reward_sd'], '.4f')}"
            win = f"{e['win_rate_mean']:.3f} +- {fmt(e['win_rate_ci95'], '.3f')}"
            gap = fmt(e.get("gap_closed"), ".0%") if rate > 0 else "-"
            lines.append(f"| {rate:.0%} | {METHOD_LABELS[method]} | {reward} | {e['gain_mean']:+.4f} | {gap} | {win} | "
                         f"{fmt(e.get('auroc_u_pair_mean'), '.3f')} | {fmt(e.get('auroc_evidence_pair_mean'), '.3f')} |"
                         + "".join(f" {e['other_rewards'][n][0]:.4f} +- {fmt(e['other_rewards'][n][1], '.4f')} |"
                                   if n in e.get("other_rewards", {}) else " - |" for n in other))
    return "\n".join(lines) + "\n"


def make_plots(summary: dict, seed_results: list[dict], settings: BenchmarkSettings, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in settings.methods:
        rates = [r for r in settings.flip_rates if f"{method}@{r}" in summary]
        if not rates:
            continue
        entries = [summary[f"{method}@{r}"] for r in rates]
        for ax, key, err in ((axes[0], "reward_mean", "reward_sd"), (axes[1], "win_rate_mean", "win_rate_ci95")):
            errors = [0.0 if math.isnan(e[err]) else e[err] for e in entries]
            ax.errorbar([100 * r for r in rates], [e[key] for e in entries], yerr=errors, marker="o", capsize=3,
                        label=METHOD_LABELS[method])
    axes[0].axhline(np.mean([r["base_reward"] for r in seed_results]), color="grey", ls=":", label="base model")
    axes[0].set(xlabel="flipped labels (%)", ylabel="mean rater reward (held-out)", title="Reward vs flip rate (+- sd)")
    axes[1].axhline(0.5, color="grey", ls=":")
    axes[1].set(xlabel="flipped labels (%)", ylabel="win rate vs base", title="Win rate vs base (95% CI)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "reward_vs_flip_rate.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for rate in settings.flip_rates:
        for method in ("adaptive", "adaptive_amortised"):
            shares = summary.get(f"{method}@{rate}", {}).get("flipped_share_by_u_decile")
            if shares:
                ax.plot(range(1, 11), shares, marker="o", label=f"{METHOD_LABELS[method]}, {rate:.0%} flips")
                plotted = True
    ax.set(xlabel="decile of per-pair mean u (1 = lowest)", ylabel="share of flipped pairs",
           title="Flipped pairs per decile of the minority score")
    if plotted:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "flipped_share_by_u_decile.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    samples = seed_results[0]["samples"]
    digits = seed_results[0]["eval_digits"]
    if samples:
        top = max(settings.flip_rates)
        names = [n for n in samples if n == "base" or float(n.partition("@")[2]) == top]
        per_class = min(8, int(np.sum(digits == 0)))
        fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3.6))  # panels side by side
        axes = np.atleast_1d(axes)
        for ax, name in zip(axes, names):
            rows = []
            for d in range(10):
                idx = np.flatnonzero(digits == d)[:per_class]
                rows.append(np.concatenate(list(samples[name][idx]), axis=1))
            ax.imshow(np.concatenate(rows, axis=0), cmap="gray_r", vmin=0, vmax=255)
            method, _, rate = name.partition("@")
            ax.set_title(METHOD_LABELS.get(method, "base model") + (f",\n{float(rate):.0%} flips" if rate else ""), fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "samples.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def merge_reports(args, argv) -> dict:
    """Combine the per-seed runs of several earlier outputs (grid parts run in parallel) into one report."""
    start = time.perf_counter()
    per_seed: dict[int, dict] = {}
    first = None
    samples, samples_seed = None, None
    for folder in args.merge:
        with open(os.path.join(folder, "results.json")) as f:
            report = json.load(f)
        first = first or report
        for entry in report["per_seed"]:
            merged = per_seed.setdefault(entry["seed"], {**entry, "runs": {}})
            merged["runs"].update(entry["runs"])
        if os.path.isfile(os.path.join(folder, "samples.npz")) and report["seeds"][0] == min(report["seeds"]):
            # sample grids of the first seed only (same evaluation noise in every part), union of their methods
            found = dict(np.load(os.path.join(folder, "samples.npz")))
            if samples is None or int(report["seeds"][0]) < samples_seed:
                samples, samples_seed = found, int(report["seeds"][0])
            elif int(report["seeds"][0]) == samples_seed:
                samples.update(found)
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in first["settings"].items()}
    stored.setdefault("filter_overrides", first["filter_overrides"])  # older reports kept it beside the settings
    settings = BenchmarkSettings(**stored)
    keys = [key for entry in per_seed.values() for key in entry["runs"]]
    settings.flip_rates = tuple(sorted({float(k.split("@")[1]) for k in keys}))
    settings.methods = tuple(m for m in METHOD_LABELS if any(k.split("@")[0] == m for k in keys))
    seed_results = [per_seed[s] for s in sorted(per_seed)]
    for r in seed_results:
        r["samples"], r["eval_digits"] = {}, None
    if samples is not None:
        seed_results[0]["eval_digits"] = samples.pop("eval_digits")
        seed_results[0]["samples"] = samples
    wall = sum(json.load(open(os.path.join(d, "results.json")))["wall_seconds"] for d in args.merge)
    return write_report(args, argv, settings, sorted(per_seed), seed_results, first["rater_held_out_accuracy"],
                        first["base_model"], start, summed_wall=wall)


#: The packages whose float rounding a run depends on: the style runs move by 0.1-0.3 when a few pairs change, and
#: another release of these can change the rounding (docs/results.md), so a report says which it ran on.
RECORDED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "scikit-learn")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def write_report(args, argv, settings, seeds, seed_results, rater_accuracy, base_folder, start, summed_wall=None):
    summary = summarise(seed_results, settings)
    table = markdown_table(summary, settings, len(seeds))
    plots = make_plots(summary, seed_results, settings, args.output_dir)
    wall = summed_wall if summed_wall is not None else time.perf_counter() - start
    report = {
        "command": "trl-adaptive demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings.__dict__,
        "filter_overrides": settings.filter_overrides,
        "seeds": seeds,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "packages": package_versions()},
        "rater_held_out_accuracy": rater_accuracy,
        "base_model": base_folder,
        "wall_seconds": wall,
        "summary": summary,
        "per_seed": [{k: v for k, v in r.items() if k not in ("samples", "eval_digits")} for r in seed_results],
        "plots": plots,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(f"# Flipped-label benchmark on load_digits\n\nCommand: `{report['command']}`; "
                f"wall time {wall / 60:.1f} min.\n\n{table}")
    print(table)
    print(f"Wrote {args.output_dir}/results.md, results.json and {len(plots)} plots in {wall / 60:.1f} min")
    return report
