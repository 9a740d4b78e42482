"""The CLI's ONNX-only commands never import torch (it costs seconds of start-up); timings live in
benchmarks/cli_startup.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from onnx_builders import attention_model

_RUN_AND_LIST_MODULES = """
import json, sys
from rewriter.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


@pytest.fixture(scope="module")
def attention_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("models") / "attention.onnx")
    onnx.save(attention_model(heads=2, head_dim=16), path)
    return path


@pytest.mark.parametrize("command", [["--help"], ["inspect", "{model}"], ["optimize", "{model}", "-o", "{out}", "--verify"],
                                     ["bench", "{model}", "--lengths", "32", "--out-dir", "{dir}"]])
def test_onnx_commands_do_not_import_torch(command, attention_path, tmp_path):
    argv = [arg.format(model=attention_path, out=tmp_path / "out.onnx", dir=tmp_path) for arg in command]
    result = subprocess.run([sys.executable, "-c", _RUN_AND_LIST_MODULES, *argv], capture_output=True, text=True,
                            timeout=600)
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"code": 0, "torch": []}, result.stderr
