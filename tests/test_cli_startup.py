"""The CLI's ONNX-only commands never import torch (it costs seconds of start-up), `--help` imports
no ONNX library either, and no command imports networkx (only a fallback sort used it); timings live in
benchmarks/cli_startup.py, not here.

`inspect` and `optimize` import no onnxscript either (the memory estimate they print folds shape
arithmetic on its own, `rewriter.tools.shape_arithmetic`). sympy is still imported: onnx-ir (the IR
detection runs on) imports it at the top of `onnx_ir._core`, which every part of onnx-ir imports.
"""

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
heavy = {m.partition(".")[0] for m in sys.modules} & {"torch", "onnx", "onnx_ir", "sympy", "onnxscript", "networkx"}
print(json.dumps({"code": code, "heavy": sorted(heavy)}))
"""
_ONNX_LIBRARIES = {"onnx", "onnx_ir", "sympy", "onnxscript"}


@pytest.fixture(scope="module")
def attention_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("models") / "attention.onnx")
    onnx.save(attention_model(heads=2, head_dim=16), path)
    return path


@pytest.mark.parametrize("command, forbidden", [
    (["--help"], {"torch", "networkx", *_ONNX_LIBRARIES}),
    (["inspect", "{model}"], {"torch", "networkx", "onnxscript"}),
    (["optimize", "{model}", "-o", "{out}", "--verify"], {"torch", "networkx", "onnxscript"}),
    (["bench", "{model}", "--lengths", "32", "--out-dir", "{dir}"], {"torch", "networkx", "onnxscript"})])
def test_onnx_commands_import_only_what_they_use(command, forbidden, attention_path, tmp_path):
    argv = [arg.format(model=attention_path, out=tmp_path / "out.onnx", dir=tmp_path) for arg in command]
    result = subprocess.run([sys.executable, "-c", _RUN_AND_LIST_MODULES, *argv], capture_output=True, text=True,
                            timeout=600)
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 0, result.stderr
    assert not forbidden & set(outcome["heavy"]), outcome
