"""benchmarks/audit_then_retrain.py: its two rules for flagging audited pairs (the training itself is a benchmark)."""

import numpy as np


def test_flagging_rules(benchmark_script):
    script = benchmark_script("audit_then_retrain")
    # Shares of wrong-sign votes of 10 pairs. `threshold`: share > 0.5, at most 30% of the pairs.
    few = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.55, 0.9, 0.2])
    assert np.flatnonzero(script.flagged(few, "threshold")).tolist() == [7, 8]
    # Five pairs above 0.5: the cap raises the cut to the 70% quantile, leaving the three highest.
    many = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert np.flatnonzero(script.flagged(many, "threshold")).tolist() == [7, 8, 9]
    # `top30`: the three highest whatever their share, also when none exceeds 0.5 ...
    assert np.flatnonzero(script.flagged(many * 0.5, "top30")).tolist() == [7, 8, 9]
    # ... but pairs tied at the cut are kept (two pairs share 0.25, the 70% quantile of these): only two flagged.
    assert np.flatnonzero(script.flagged(few * 0.5, "top30")).tolist() == [7, 8]
