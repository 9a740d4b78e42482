"""`export_onnx`'s default shapes: the batch and sequence axes `optimize_module` keeps dynamic are
symbolic in the file, head axes stay static, verification resizes only sequence axes, and where the
exporter cannot keep the axes the file takes the example's shapes with one WARNING."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime
import torch

import rewriter
from model_families import LlamaModel


def _dims(path) -> list[list]:
    return [[d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in onnx.load(str(path)).graph.input]


def _ort(path, *inputs) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    return session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})[0]


def test_default_export_takes_other_batch_sizes_and_lengths(tmp_path):
    torch.manual_seed(0)
    model = LlamaModel().eval()
    path = tmp_path / "llama.onnx"
    report = rewriter.export_onnx(model, model.example_inputs(2, 16), str(path))
    assert report.rewritten_count == 2
    (batch, length), = _dims(path)
    assert isinstance(batch, str) and isinstance(length, str) and batch != length
    # the check resized the length only (a batch of 75 would have been resized too before)
    assert report.verification.endswith("at lengths 1, 49, 75"), report.verification
    for shape in ((3, 11), (1, 40)):
        inputs = model.example_inputs(*shape)
        with torch.no_grad():
            expected = model(*inputs).numpy()
        np.testing.assert_allclose(_ort(path, *inputs), expected, rtol=1e-4, atol=1e-5)


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_heads_of_qkv_inputs_stay_static(tmp_path):
    q, k, v = (torch.randn(2, 3, 10, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    path = tmp_path / "sdpa.onnx"
    report = rewriter.export_onnx(_Attention().eval(), (q, k, v), str(path))
    assert report.rewritten_count == 1
    for batch, heads, length, dim in _dims(path):
        assert isinstance(batch, str) and isinstance(length, str) and (heads, dim) == (3, 8)
    q, k, v = (torch.randn(1, 3, 37, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    np.testing.assert_allclose(_ort(path, q, k, v), _Attention()(q, k, v).numpy(), rtol=1e-4, atol=1e-5)


def test_a_failing_dynamic_export_falls_back_to_static_with_one_warning(tmp_path, refuse_dynamic_shapes, caplog):
    refuse_dynamic_shapes(torch.onnx, "export", "no dynamic axes here")
    torch.manual_seed(0)
    model = LlamaModel(layers=1).eval()
    path = tmp_path / "static.onnx"
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        report = rewriter.export_onnx(model, model.example_inputs(2, 16), str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "takes only the example's shapes" in warnings[0]
    assert "RuntimeError: no dynamic axes here" in warnings[0]
    assert _dims(path) == [[2, 16]] and report.rewritten_count == 1


def test_static_when_asked(tmp_path):
    torch.manual_seed(0)
    model = LlamaModel(layers=1).eval()
    path = tmp_path / "static.onnx"
    rewriter.export_onnx(model, model.example_inputs(2, 16), str(path), dynamic_shapes=None)
    assert _dims(path) == [[2, 16]]


def test_batch_of_one_keeps_the_batch_static(tmp_path):
    torch.manual_seed(0)
    model = LlamaModel(layers=1).eval()
    path = tmp_path / "one.onnx"
    rewriter.export_onnx(model, model.example_inputs(1, 16), str(path))  # torch.export fixes sizes 0 and 1
    ((batch, length),) = _dims(path)
    assert batch == 1 and isinstance(length, str)
