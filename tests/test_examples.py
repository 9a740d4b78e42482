"""The example scripts run as a user would run them, with small arguments."""

from __future__ import annotations

import os
import re
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True, text=True,
                          timeout=300)


def test_train_with_torch_compile_fits_where_naive_would_not():
    # Naive attention keeps 2 layers x 4 heads x 2048² fp32 = 128 MiB of probabilities alone.
    result = run_example("train_with_torch_compile.py", "--seq-len", "2048", "--memory-budget", "96MiB",
                         "--steps", "3", "--compiler", "eager")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at least 128.0 MiB" in result.stdout and "naive does not fit" in result.stdout
    assert "within the 96.0 MiB budget" in result.stdout
    assert "rewrote 2" in result.stderr  # the backend's report: both attention blocks rewritten
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([\d.]+)$", result.stdout, re.MULTILINE)]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5


def test_train_with_torch_compile_refuses_a_bad_budget():
    result = run_example("train_with_torch_compile.py", "--memory-budget", "lots")
    assert result.returncode == 2 and "--memory-budget" in result.stderr
