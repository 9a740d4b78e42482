"""Issue 10 items 1 and 6 in ONNX: a scale that is a graph input, and BLOOM's exported attention.

A graph input is never folded as a constant (initializers are: an ONNX file's weights are fixed);
both files are compared on ONNX Runtime at more than one input value.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import rewriter
from test_fx_batch_views import BloomHidden, _bloom
from test_fx_exactness import InputScale, Temperature


def _run(model, feeds):
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))[0]


def _export(module, inputs, tmp_path):
    path = tmp_path / "model.onnx"
    torch.onnx.export(module.eval(), tuple(inputs), str(path), dynamo=True, verbose=False)
    return str(path)


def test_scale_graph_input_is_not_folded(tmp_path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    path = _export(InputScale(), (q, k, v, torch.tensor(0.2)), tmp_path)
    optimized, report = rewriter.optimize_onnx(path)
    reason = report.matches[0].reason
    assert report.rewritten_count == 0 and "'scale'" in reason and "non-constant" in reason, reason
    for scale in (0.2, 0.7):
        feeds = [x.numpy() for x in (q, k, v, torch.tensor(scale))]
        np.testing.assert_allclose(_run(optimized.SerializeToString(), feeds), _run(path, feeds), atol=1e-5)


def test_parameter_scale_is_an_initializer_in_an_onnx_file(tmp_path):
    torch.manual_seed(0)
    inputs = [torch.randn(2, 4, 32, 16) for _ in range(3)]
    path = _export(Temperature("multiply"), inputs, tmp_path)
    optimized, report = rewriter.optimize_onnx(path)
    assert report.rewritten_count == 1, report.summary()
    feeds = [x.numpy() for x in inputs]
    np.testing.assert_allclose(_run(optimized.SerializeToString(), feeds), _run(path, feeds), atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_bloom_onnx_export_stays_exact(padded, tmp_path):
    """The exporter folds P·V to a 4-D MatMul and keeps one Reshape on the scores: the ONNX
    detector does not walk through it yet, so the block is left alone with a reason."""
    model = _bloom()
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    embeds = model.word_embeddings(torch.randint(0, 64, (2, 9))).detach()
    path = _export(BloomHidden(model), (embeds, mask), tmp_path)
    optimized, report = rewriter.optimize_onnx(path)
    assert all(match.reason for match in report.matches if not match.rewritten)
    feeds = [embeds.numpy(), mask.numpy()]
    np.testing.assert_allclose(_run(optimized.SerializeToString(), feeds), _run(path, feeds), atol=1e-5)
