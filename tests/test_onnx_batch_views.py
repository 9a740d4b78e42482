"""Issue 10 item 6 in ONNX: Reshapes inside a block that only split or merge batch and head axes.

The hand-written neighbours of `test_fx_batch_views` exported with the dynamo exporter: views on
the scores, on the probabilities, around a mask or a bias (merged or split, broadcast or not), are
part of the block and rewritten exactly (ORT, original vs optimised); views that move a score to
another row or regroup batch and heads are left alone with a reason. HF BLOOM itself, with a
dynamic batch and length, is in `test_onnx_exactness`.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import rewriter
from test_fx_batch_views import B, H, L, D, MergedProducts, Regrouped, RowMoving, SplitProducts


def _run(model, feeds):
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))[0]


def _rewritten(module, inputs, tmp_path, rewrites: int, target: str = "auto"):
    path = tmp_path / "model.onnx"
    torch.onnx.export(module.eval(), tuple(inputs), str(path), dynamo=True, verbose=False)
    optimized, report = rewriter.optimize_onnx(str(path), chunk_size=4, target=target)
    assert report.rewritten_count == rewrites, report.summary()
    feeds = [x.numpy() for x in inputs]
    np.testing.assert_allclose(_run(optimized.SerializeToString(), feeds), _run(str(path), feeds),
                               rtol=1e-5, atol=1e-5, equal_nan=True)
    return report


@pytest.mark.parametrize("target", ["auto", "ort"])
@pytest.mark.parametrize("where", ["merged_output", "split_output", "probabilities"])
def test_merged_batch_views_are_part_of_the_block(where, target, tmp_path):
    torch.manual_seed(0)
    keep = torch.rand(B, 1, L, L) > 0.3
    keep[..., 0] = True
    inputs = [torch.randn(B * H, L, D) for _ in range(3)] + [keep]
    _rewritten(MergedProducts(where), inputs, tmp_path, rewrites=1, target=target)


@pytest.mark.parametrize("bias_shape", [(B * H, L, L), (B * H, 1, L), (1, L, L), (L,)])
def test_split_products_merged_around_a_bias(bias_shape, tmp_path):
    torch.manual_seed(1)
    inputs = [torch.randn(B, H, L, D) for _ in range(3)] + [torch.randn(*bias_shape)]
    _rewritten(SplitProducts(), inputs, tmp_path, rewrites=1)


class TwiceApplied(nn.Module):
    """One bias added to the scores on (B·H) batches and again after their (B, H) view."""

    def forward(self, q, k, v):
        bias = torch.linspace(-1.0, 1.0, L)
        scores = (q @ k.transpose(-1, -2)).reshape(B * H, L, L) + bias
        return torch.softmax(scores.view(B, H, L, L) + bias, -1) @ v


@pytest.mark.parametrize("module, reason", [(Regrouped(), "more than the batch and head axes"),
                                            (RowMoving(), "moves scores between query rows or keys"),
                                            (TwiceApplied(), "both before and after a batch view")])
def test_views_that_move_scores_are_left_alone(module, reason, tmp_path):
    torch.manual_seed(2)
    inputs = [torch.randn(B, H, L, D) for _ in range(3)]
    report = _rewritten(module, inputs, tmp_path, rewrites=0)
    assert reason in report.matches[0].reason, report.matches[0].reason


def test_a_view_whose_target_is_data_is_left_alone():
    """The (B, H, L, L) target is a graph input: nothing proves what the Reshape does to the scores."""
    from onnx import TensorProto, helper

    merged = [B * H, L, D]
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["q", "kt"], ["scores"]),
         helper.make_node("Reshape", ["scores", "target"], ["split"]),
         helper.make_node("Softmax", ["split"], ["probs"], axis=-1),
         helper.make_node("Reshape", ["probs", "merged"], ["flat"]),
         helper.make_node("MatMul", ["flat", "v"], ["out"])],
        "view_of_data",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, merged) for name in "qkv"]
        + [helper.make_tensor_value_info("target", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, merged)],
        [helper.make_tensor("merged", TensorProto.INT64, [3], [B * H, L, L])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    optimized, report = rewriter.optimize_onnx(model)
    assert report.rewritten_count == 0 and "cannot prove what the reshape" in report.matches[0].reason, \
        report.summary()
    torch.manual_seed(3)
    feeds = [torch.randn(*merged).numpy() for _ in range(3)] + [np.array([B, H, L, L], np.int64)]
    np.testing.assert_allclose(_run(optimized.SerializeToString(), feeds), _run(model.SerializeToString(), feeds))
