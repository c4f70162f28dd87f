"""One table from the JSON files of `benchmarks/gpu_step_time.sh`: every case's pairs/s, its ratio to the bare loop
(a), MFU and peak memory; each speed option's effect; the batch with the most pairs/s within memory.

Usage: python benchmarks/gpu_summary.py OUTPUT_DIR [--commit HASH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics


def load(folder: str) -> dict[str, dict]:
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            runs[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
    return runs


def ratio(results: dict, num: str, den: str, key: str = "round_values") -> float | None:
    """Median over rounds of num/den step times (as step_time.py's own ratios)."""
    if num not in results or den not in results:
        return None
    return statistics.median(n / d for n, d in zip(results[num][key], results[den][key]))


def mfu(result: dict, peak: float | None) -> str:
    return f"{result['achieved_flops'] / peak:.1%}" if peak and result.get("achieved_flops") else "n/a"


def peak_flops(settings: dict) -> float | None:
    """The card's dense bf16 peak that step_time.py used (None on a CPU or in fp32)."""
    value = settings.get("peak_flops", "None")
    return None if value == "None" else float(value)


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--commit", default="unknown")
    opts = parser.parse_args(argv)
    runs = load(opts.folder)
    machine = open(os.path.join(opts.folder, "machine.txt")).read().strip() if os.path.isfile(
        os.path.join(opts.folder, "machine.txt")) else ""
    any_settings = next(iter(runs.values()))["settings"] if runs else {}
    print(f"# GPU step time, commit {opts.commit}\n\n{machine}\n\ntorch {any_settings.get('torch_version', '?')}; "
          f"clock {any_settings.get('clock', '?')}; steps {any_settings.get('steps', '?')} timed after "
          f"{any_settings.get('warmup', '?')}, one round\n")
    print("| part | case | pairs/step | s/step (median) | pairs/s | x bare loop (a) | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    levers, sweeps = [], []
    for part, run in runs.items():
        results, settings = run["results"], run["settings"]
        peak = peak_flops(settings)
        if "sweep" in run:
            sweeps.append((part, run["sweep"], peak))
            continue
        for name, r in results.items():
            if "[" in name:
                base = name.split("[")[0]
                levers.append((part, name[len(base):], base, r, ratio(results, name, base)))
                continue
            vs_loop = ratio(results, "a", name)  # a's time / ours: > 1 means ours is faster
            print(f"| {part} | {name}: {r['description']} | {settings['batch']} | {r['seconds_used']:.3f} | "
                  f"{r['pairs_per_s']:.2f} | {'-' if vs_loop is None or name == 'a' else f'{vs_loop:.2f}x'} | "
                  f"{mfu(r, peak)} | {gib(r['peak_bytes'])} |")
    if levers:
        print("\nEach speed option switched from its default (ours, uncached), against the default:\n")
        print("| part | option | pairs/s | pairs/s x default |")
        print("|---|---|---|---|")
        for part, spec, base, r, value in levers:
            print(f"| {part} | {spec} | {r['pairs_per_s']:.2f} | {1 / value:.3f} |" if value else f"| {part} | {spec} | - | - |")
    for part, sweep, peak in sweeps:
        print(f"\n{part}: pairs per step against pairs/s (stops at the first size out of memory):\n")
        print("| pairs/step | case | pairs/s | MFU | peak GiB |")
        print("|---|---|---|---|---|")
        best = None
        for size, results in sweep.items():
            if results.get("out_of_memory"):
                print(f"| {size} | - | out of GPU memory | | |")
                continue
            for name, r in results.items():
                print(f"| {size} | {name} | {r['pairs_per_s']:.2f} | {mfu(r, peak)} | {gib(r['peak_bytes'])} |")
                if best is None or r["pairs_per_s"] > best[1]:
                    best = (size, r["pairs_per_s"], mfu(r, peak))
        if best:
            print(f"\nbest: {best[0]} pairs per step, {best[1]:.2f} pairs/s, MFU {best[2]}")


if __name__ == "__main__":
    main()
