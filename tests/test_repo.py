"""Repository wiring: CI runs the README's test command; the console script points at a real function."""

import os
import re

from tiny_setup import REPO_ROOT


def readme_commands():
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    demo, test = readme_commands()
    assert demo.endswith("trl-adaptive demo") and "pytest" in test
    ci = REPO_ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    script = ci.read_text()
    assert "set -euo pipefail" in script
    assert test in script.splitlines()


def test_console_script_entry_point_exists():
    setup = (REPO_ROOT / "setup.py").read_text()
    assert '"trl-adaptive=trl_adaptive.cli:main"' in setup
    from trl_adaptive.cli import main

    assert callable(main)
