"""benchmarks/gap_bootstrap.py on a hand-made report: later files override runs, the point values are the ratio of
seed means, and seeds missing a needed run are left out."""

import json


def _report(path, per_seed):
    runs = [{"seed": s, "runs": {k: {"reward_gain": g} for k, g in r.items()}} for s, r in per_seed.items()]
    with open(path, "w") as f:
        json.dump({"per_seed": runs}, f)
    return str(path)


def test_gap_closed_from_overlaid_reports(tmp_path, capsys, benchmark_script):
    gap_bootstrap = benchmark_script("gap_bootstrap")
    first = _report(tmp_path / "a.json", {
        0: {"dpo@0.2": 0.02, "oracle@0.2": 0.10, "filter@0.2": 0.0, "dpo@0.0": 0.10, "filter@0.0": 0.12},
        1: {"dpo@0.2": 0.04, "oracle@0.2": 0.12, "filter@0.2": 0.08, "dpo@0.0": 0.14, "filter@0.0": 0.10},
        2: {"dpo@0.2": 0.05, "filter@0.2": 0.5},  # no oracle run: left out at 20%
    })
    second = _report(tmp_path / "b.json", {0: {"filter@0.2": 0.06}})  # a rerun of seed 0 replaces its filter run
    gap_bootstrap.main([first, second, "--methods", "filter", "--resamples", "200"])
    lines = capsys.readouterr().out.splitlines()
    # 20%: mean filter 0.07, DPO 0.03, oracle 0.11 -> (0.07 - 0.03) / (0.11 - 0.03) = 50%, over seeds 0 and 1;
    # gain over DPO 0.07 - 0.03 = +0.04, per seed +0.04 and +0.04 (seed 0 first among equals).
    row = next(line for line in lines if line.startswith("| filter | 20% |"))
    assert row.startswith("| filter | 20% | 2 | 50% |") and row.endswith("| +0.0400 (seed 0) | 0 of 2 |"), row
    assert "| +0.0400 | [+0.0400, +0.0400] |" in row
    # 0%: mean filter 0.11 - mean DPO 0.12 = -0.01; per seed +0.02 and -0.04: the worst is seed 1.
    row = next(line for line in lines if line.startswith("| filter | 0% |"))
    assert row.startswith("| filter | 0% | 2 | - | - | -0.0100 | [") and row.endswith("| -0.0400 (seed 1) | 1 of 2 |"), row
    assert not any("| filter | 30% |" in line for line in lines)


def test_per_seed_differences(tmp_path, capsys, benchmark_script):
    gap_bootstrap = benchmark_script("gap_bootstrap")
    report = _report(tmp_path / "a.json", {
        0: {"dpo@0.2": 0.02, "filter@0.2": 0.06, "dpo@0.0": 0.10},
        1: {"dpo@0.2": 0.04, "filter@0.2": 0.01, "filter@0.0": 0.3},  # no Diffusion-DPO run at 0%: no cell
    })
    gap_bootstrap.main([report, "--methods", "filter", "--per-seed"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| method | flips | seed 0 | seed 1 |"
    assert "| filter | 20% | +0.040 | -0.030 |" in lines
    assert not any(line.startswith("| filter | 0% |") for line in lines)
