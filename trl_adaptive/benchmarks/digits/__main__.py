"""`python -m trl_adaptive.benchmarks.digits`: the demo's command line (as `trl-adaptive demo`)."""

from .cli import main

if __name__ == "__main__":
    main()
