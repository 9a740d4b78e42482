"""Issue 10 items 1 and 6 in ONNX: a scale that is a graph input, and BLOOM's exported attention.

A graph input is never folded as a constant (initializers are: an ONNX file's weights are fixed);
both files are compared on ONNX Runtime at more than one input value.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import rewriter
from test_fx_batch_views import BloomHidden, _bloom
from test_fx_exactness import InputScale, Temperature
from test_onnx_score_programs import _square_values


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


@functools.cache
def _bloom_export(directory: str) -> tuple[str, onnx.ModelProto]:
    """HF BLOOM exported with a dynamic batch and length, and its optimised graph."""
    model = _bloom()
    embeds = model.word_embeddings(torch.randint(0, 64, (2, 9))).detach()
    path = os.path.join(directory, "bloom.onnx")
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    torch.onnx.export(BloomHidden(model), (embeds, torch.ones(2, 9, dtype=torch.long)), path, dynamo=True,
                      verbose=False, dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}))
    optimized, report = rewriter.optimize_onnx(path)
    assert report.rewritten_count == 2, report.summary()
    return path, optimized


@pytest.mark.parametrize("padded", [False, True])
def test_bloom_onnx_blocks_are_rewritten_exactly(padded, tmp_path_factory):
    """BLOOM's scores on (B·H) batches, viewed to (B, H, L, L) around the mask and softmax and back
    for P·V: both blocks are rewritten, ALiBi and the causal+padding mask become score programs (no
    value with two sequence axes is left), and ORT gives the original's outputs at two lengths,
    rows of left padding included."""
    path, optimized = _bloom_export(str(tmp_path_factory.getbasetemp()))
    assert _square_values(optimized) == [] and _square_values(onnx.load(path, load_external_data=False))
    model = _bloom()
    for length in (9, 14):
        mask = torch.ones(3, length, dtype=torch.long)
        if padded:
            mask[1, : length // 3] = 0
        embeds = model.word_embeddings(torch.randint(0, 64, (3, length))).detach()
        feeds = [embeds.numpy(), mask.numpy()]
        np.testing.assert_allclose(_run(optimized.SerializeToString(), feeds), _run(path, feeds),
                                   rtol=1e-4, atol=1e-5)
