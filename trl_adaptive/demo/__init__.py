"""`trl-adaptive demo`: the offline flipped-label reproduction on scikit-learn's digits.

The implementation lives in `trl_adaptive.benchmarks.digits`; this package is the entry point
(`python -m trl_adaptive.demo [--quick] [--seeds N]`, or `trl-adaptive demo` through the CLI).
"""

from ..benchmarks.digits import main

__all__ = ["main"]
