"""Rows whose every key is masked: each rewrite reproduces its own original's rows, in both IRs.

SDPA and ``aten._safe_softmax`` give 0 there (PyTorch 2.13), a hand-written ``masked_fill(-inf)``
followed by softmax gives NaN; forward and gradients, and on ONNX Runtime for every lowering target.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from parity import op_count

Q_LEN, K_LEN = 4, 6


def _mask(fully_masked_row: int = 2) -> torch.Tensor:
    mask = torch.rand(1, 1, Q_LEN, K_LEN, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    mask[..., fully_masked_row, :] = False
    return mask


class SdpaBoolMask(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SdpaFloatMask(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(mask.shape).masked_fill(~mask, -math.inf))


class SafeSoftmax(nn.Module):
    def forward(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, -math.inf)
        return torch.ops.aten._safe_softmax.default(scores, -1) @ v


class HandWritten(nn.Module):
    def forward(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)) / 8**0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


class HandWrittenAdditive(nn.Module):
    """An additive −∞ mask: on a row whose every key it hides, NaN reaches the scores' gradients too."""

    def forward(self, q, k, v, mask):
        additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        return ((q @ k.transpose(-1, -2)) / 8**0.5 + additive).softmax(-1) @ v


def _inputs():
    torch.manual_seed(0)
    q = torch.randn(2, 4, Q_LEN, 8)
    k, v = torch.randn(2, 4, K_LEN, 8), torch.randn(2, 4, K_LEN, 8)
    return q, k, v, _mask()


def _outputs_and_grads(module, inputs):
    leaves = [x.clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    out = module(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).nan_to_num().sum(), [x for x in leaves if x.requires_grad])
    return [out.detach(), *grads]


@pytest.mark.parametrize(("module", "row_value"), [(SdpaBoolMask(), 0.0), (SdpaFloatMask(), 0.0),
                                                   (SafeSoftmax(), 0.0), (HandWritten(), math.nan),
                                                   (HandWrittenAdditive(), math.nan)])
@pytest.mark.parametrize("chunks", [(2, 4), (1, 4)])  # (1, 4): the masked row is a block of its own
def test_fully_masked_rows_match_the_original_forward_and_backward(module, row_value, chunks):
    inputs = _inputs()
    gm, report = rewriter.optimize_module(module, inputs, chunk_size=chunks, dynamic_shapes=None)
    assert op_count(gm) == 1, report.summary()
    expected, actual = _outputs_and_grads(module, inputs), _outputs_and_grads(gm, inputs)
    row = expected[0][:, :, 2]
    assert (row.isnan().all() if math.isnan(row_value) else (row == row_value).all())
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)
    if not math.isnan(row_value):
        assert not any(grad.isnan().any() for grad in actual[1:])  # the gradient of V is not NaN


@pytest.mark.parametrize("target", ["chunked", "ort", "onnx-attention"])
@pytest.mark.parametrize("module", [SdpaBoolMask(), HandWritten()], ids=["sdpa", "hand-written"])
def test_fully_masked_rows_on_onnx_runtime(module, target, tmp_path):
    inputs = _inputs()
    path = tmp_path / "m.onnx"
    report = rewriter.export_onnx(module, inputs, str(path), target=target, opset=23, verify=False,
                                  chunk_size=(2, 4), dynamic_shapes=None)
    assert [match.rewritten for match in report.matches] == [True]
    if target == "onnx-attention":  # Attention-23 gives 0: taken for SDPA, refused for NaN rows
        assert (report.matches[0].target == "Attention-23") == isinstance(module, SdpaBoolMask)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    (actual,) = session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})
    with torch.no_grad():
        expected = module(*inputs).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-4, equal_nan=True)


class ScaledAfterFiniteFill(nn.Module):
    """finfo.min, then a scale that takes it past fp32's range: eager's fill becomes −∞."""

    def forward(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, torch.finfo(torch.float32).min) / 0.5
        return scores.softmax(-1) @ v


def test_a_fill_scaled_past_the_float_range_is_minus_infinity():
    inputs = _inputs()
    gm, report = rewriter.optimize_module(ScaledAfterFiniteFill(), inputs, chunk_size=(1, 4), dynamic_shapes=None)
    assert op_count(gm) == 1, report.summary()
    expected, actual = _outputs_and_grads(ScaledAfterFiniteFill(), inputs), _outputs_and_grads(gm, inputs)
    assert expected[0][:, :, 2].isnan().all()
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)


class PaddedCausal(nn.Module):
    """Causal attention with a (B, L) key padding mask (left padding hides every key of the first rows),
    as SDPA (0 on those rows), a −∞ fill (NaN) or a finfo.min fill (V averaged over all keys)."""

    def __init__(self, fill: str):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, pad):
        positions = torch.arange(q.shape[-2])
        keep = (positions[None, :] <= positions[:, None]) & pad[:, None, None, :]
        if self.fill == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        value = float("-inf") if self.fill == "-inf" else torch.finfo(torch.float32).min
        return ((q @ k.transpose(-1, -2)) / 8**0.5).masked_fill(~keep, value).softmax(-1) @ v


@pytest.mark.parametrize("fill, row_value", [("sdpa", 0.0), ("-inf", math.nan), ("finfo.min", None)])
def test_fully_masked_rows_of_a_skipping_loop(fill, row_value, tmp_path):
    """The chunked Loop visits only keys up to the diagonal (the mask is a program of the padding input);
    rows keeping no key still give the original's value: 0, NaN, or V's mean over all keys."""
    from onnx_builders import blocks_run

    module, length = PaddedCausal(fill), 7
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, length, 8) for _ in range(3))
    pad = torch.ones(2, length, dtype=torch.bool)
    pad[1, :3] = False  # batch 1, rows 0..2: no key
    path = tmp_path / "m.onnx"
    report = rewriter.export_onnx(module, (q, k, v, pad), str(path), target="chunked", verify=False,
                                  chunk_size=(2, 3), dynamic_shapes=None)
    assert [match.rewritten for match in report.matches] == [True], report.summary()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip([value.name for value in session.get_inputs()], (x.numpy() for x in (q, k, v, pad))))
    (actual,) = session.run(None, feeds)
    with torch.no_grad():
        expected = module(q, k, v, pad).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-4, equal_nan=True)
    rows = actual[1, :, :3]
    if row_value is None:
        np.testing.assert_allclose(rows, np.broadcast_to(v[1].mean(-2, keepdim=True).numpy(), rows.shape), rtol=1e-5)
    else:
        assert (np.isnan(rows).all() if math.isnan(row_value) else (rows == row_value).all())
    grid = math.ceil(length / 2) * math.ceil(length / 3)
    assert blocks_run(path.read_bytes(), feeds, tmp_path, "chunked") < grid


class RelativeBiasPaddingCausal(nn.Module):
    """A learned relative bias, a padding `masked_fill(-inf)`, then causal: as a `masked_fill` (the flag
    hides keys passing no gradient on) or as an added −∞ (which passes a key-less row's NaN on)."""

    def __init__(self, causal_added: bool):
        super().__init__()
        self.relative = nn.Embedding(65, 4)
        self.causal_added = causal_added

    def forward(self, q, k, v, keep):
        length = q.size(-2)
        position = torch.arange(length)
        buckets = (position[None] - position[:, None]).clamp(-32, 32) + 32
        scores = q @ k.transpose(-1, -2) * 0.25 + self.relative(buckets).permute(2, 0, 1)[None]
        scores = scores.masked_fill(~keep[:, None, None, :], -math.inf)
        if self.causal_added:
            scores = scores + torch.full((length, length), -math.inf).triu(1)
        else:
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf)
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("causal_added", [False, True])
def test_rows_with_no_key_keep_the_original_gradient_nan_pattern(causal_added):
    """Left padding before causal hides every key of the first rows; a loss that leaves their NaN out
    gets finite gradients from the masked_fill form and NaN from the added form, in both the original
    and the rewrite (new-user trial: the flag passed NaN on where the model's masked_fill gives 0)."""
    torch.manual_seed(0)
    model = RelativeBiasPaddingCausal(causal_added)
    q, k, v = (torch.randn(2, 4, 40, 16, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, :3] = False
    optimized, report = rewriter.optimize_module(copy.deepcopy(model), (q, k, v, keep))
    assert op_count(optimized) == 1, report.summary()
    grads = []
    for module in (model, optimized):
        out = module(q, k, v, keep)
        params = [q, k, v, dict(module.named_parameters())["relative.weight"]]
        grads.append((out, torch.autograd.grad(out.masked_fill(out.isnan(), 0).sum(), params)))
    (want, want_grads), (got, got_grads) = grads
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-3, equal_nan=True)


def test_a_sliding_window_bias_with_small_chunks():
    """An added −∞ sliding window, then a causal masked_fill, at chunks smaller than the length: a part
    of a chunk with nothing added there crashed the fused rows' bias check (new-user trial)."""

    class Window(nn.Module):
        def forward(self, q, k, v):
            length = q.size(-2)
            position = torch.arange(length)
            window = torch.zeros(length, length).masked_fill(position[:, None] - position[None, :] >= 37, -math.inf)
            scores = (q @ k.transpose(-1, -2) * 0.25 + window).masked_fill(
                torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf)
            return scores.softmax(-1) @ v

    q, k, v = (torch.randn(2, 4, 100, 16, requires_grad=True) for _ in range(3))
    optimized, report = rewriter.optimize_module(Window(), (q, k, v), chunk_size=(32, 64))
    assert op_count(optimized) == 1, report.summary()
    got, want = optimized(q, k, v), Window()(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got_grad, want_grad in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-3)
