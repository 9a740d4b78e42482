"""A block the requested target refuses at lowering is lowered to chunked with one WARNING per run,
although `rewriter optimize --verify` and `export_onnx` lower a verification copy of it too."""

from __future__ import annotations

import logging
import warnings

import onnx
import pytest
import torch

import rewriter
from performer_models import FastAttention
from rewriter.cli import main
from test_export_onnx import PerformerThenSoftmax

_FALLBACK = "lowered to chunked instead"


def _fallbacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and _FALLBACK in r.getMessage()]


@pytest.fixture(scope="module")
def performer_with_symbolic_heads(tmp_path_factory) -> str:
    """A causal Performer block on (1, H, L, 8) inputs, H symbolic: LinearAttention needs static heads."""
    torch.manual_seed(0)
    model = FastAttention(8, nb_features=12, causal=True).eval()
    heads, length = torch.export.Dim("H", min=2, max=16), torch.export.Dim("L", min=2, max=512)
    path = str(tmp_path_factory.mktemp("models") / "performer.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, tuple(torch.randn(1, 2, 10, 8) for _ in range(3)), dynamo=True,
                                    dynamic_shapes=({1: heads, 2: length},) * 3, opset_version=18, verbose=False)
    onnx.save(program.model_proto, path)
    return path


def test_optimize_verify_tells_a_fallback_once(performer_with_symbolic_heads, tmp_path, caplog, capsys):
    output = str(tmp_path / "out.onnx")
    # blocks of 4096: too large to span, so --verify rebuilds a copy with small blocks (lowered again)
    argv = ["optimize", performer_with_symbolic_heads, "-o", output, "--target", "ort", "--verify",
            "--chunk-size", "4096"]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "a copy with" in capsys.readouterr().out
    [told] = _fallbacks(caplog)
    assert "static head count" in told


def test_separate_runs_each_tell_their_fallback(performer_with_symbolic_heads, caplog):
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            rewriter.optimize_onnx(performer_with_symbolic_heads, target="ort")
    assert len(_fallbacks(caplog)) == 2


def test_export_tells_a_fallback_once(tmp_path, caplog):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    with caplog.at_level(logging.WARNING):
        report = rewriter.export_onnx(PerformerThenSoftmax().eval(), (q, k, v), str(tmp_path / "m.onnx"),
                                      target="ort")
    assert "a copy with" in report.verification  # the copy was lowered as well
    [told] = _fallbacks(caplog)
    assert "causal only" in told
