"""The `rewriter` command: help on every command, the demo end to end, exit codes."""

from __future__ import annotations

import json
import re
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
    onnx = payload["onnx"]
    assert onnx["report"]["rewritten"] == onnx["report"]["found"] == 2
    assert onnx["verify"]["ok"] and onnx["verify"]["max_abs_difference"] < 1e-4
    assert onnx["exported"]["seconds"] > 0 and onnx["optimized"]["seconds"] > 0


def test_default_demo_checks_both_halves_and_saves_memory():
    result = rewriter_cli("demo")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "outputs equal" in result.stdout and "max |rewritten - eager|" in result.stdout
    for runtime, original in (("PyTorch", "eager"), ("ONNX Runtime", "as exported")):
        row = next(i for i, line in enumerate(lines) if re.match(rf"\s+{runtime}\s+{original}\s", line))
        after = lines[row + 1]
        found = re.search(r"([\d.]+)x less memory, ([\d.]+)x the time", after)
        assert found and float(found.group(1)) > 3, result.stdout


@pytest.mark.parametrize("command", [[], ["demo"]])
def test_help(command):
    result = rewriter_cli(*command, "--help")
    assert result.returncode == 0 and "usage: rewriter" in result.stdout


def test_bad_usage_exits_2_with_one_line():
    result = rewriter_cli("demo", "--seq-len", "0")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "seq-len" in result.stderr
