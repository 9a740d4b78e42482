"""The `rewriter` command: help on every command, the demo end to end, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def rewriter_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewriter", *args], capture_output=True, text=True, timeout=300)


def test_demo_rewrites_verifies_and_measures():
    result = rewriter_cli("demo", "--seq-len", "512", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["report"]["rewritten"] == payload["report"]["found"] == 2
    assert payload["max_abs_difference"] < 1e-4
    assert payload["eager"]["extra_peak_bytes"] > payload["rewritten"]["extra_peak_bytes"]


@pytest.mark.parametrize("command", [[], ["demo"]])
def test_help(command):
    result = rewriter_cli(*command, "--help")
    assert result.returncode == 0 and "usage: rewriter" in result.stdout


def test_bad_usage_exits_2_with_one_line():
    result = rewriter_cli("demo", "--seq-len", "0")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "seq-len" in result.stderr
