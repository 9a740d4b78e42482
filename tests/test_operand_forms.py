"""Reports say, per block, whether its mask and bias became score programs (generated per block from
O(n) leaves) or stayed tensor operands (named), and a causal part the program holds while the causal
flag is off — in both IRs, in `summary()` and in the JSON."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import rewriter
from onnx_builders import attention_model


class _FilledCausalPadding(torch.nn.Module):
    """HF-style ``where(causal ∧ padding, 0, fill)`` added to the scores; -10000 is a finite fill."""

    def __init__(self, fill: float):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, attention_mask):
        positions = torch.arange(q.shape[2])
        keep = (positions[None, :] <= positions[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0 + torch.where(keep, 0.0, self.fill), -1) @ v


class _PairMask(torch.nn.Module):
    """A boolean (B, 1, L, L) input: data per query-key pair, which stays a tensor."""

    def forward(self, q, k, v, pairs):
        return torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~pairs, float("-inf")), -1) @ v


def _qkv():
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 16, 8, generator=generator) for _ in range(3))


@pytest.mark.parametrize("fill", [-10000.0, float("-inf")])
def test_fx_causal_padding_bias_is_a_program_whose_causal_part_is_reported(fill):
    padding = torch.ones(1, 16, dtype=torch.long)
    padding[0, :3] = 0
    _, report = rewriter.optimize_module(_FilledCausalPadding(fill), (*_qkv(), padding))
    [match] = report.matches
    spec = match.to_dict()["spec"]
    assert match.rewritten and not match.causal  # the causal flag is off: the program holds that part
    assert (spec["mask_source"], spec["bias_source"]) == (None, "program")
    assert spec["program_leaves"] == ["attention_mask"] and spec["dense_operands"] == []
    assert spec["causal_in_program"]
    line = report.summary().splitlines()[1]
    assert "bias: score program over attention_mask (generated per block, no n×n tensor)" in line
    assert "causal part held by the program" in line
    json.dumps(report.to_dict())


def test_fx_mask_of_data_per_pair_is_named_as_a_tensor_operand():
    pairs = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.3
    _, report = rewriter.optimize_module(_PairMask(), (*_qkv(), pairs))
    [match] = report.matches
    assert match.rewritten
    assert (match.spec.mask_source, match.spec.bias_source) == ("tensor", None)
    assert len(match.spec.dense_operands) == 1 and not match.spec.program_leaves and not match.spec.causal_in_program
    line = report.summary().splitlines()[1]
    assert f"mask: tensor operand {match.spec.dense_operands[0]} (as the model builds it)" in line
    assert "score program" not in line


def test_onnx_dense_operands_and_the_causal_flag():
    padding = rewriter.detect_onnx(attention_model(mask="padding")).matches[0].spec
    assert (padding.mask_source, padding.bias_source, padding.program_leaves) == (None, "tensor", ())
    assert len(padding.dense_operands) == 1
    causal = rewriter.detect_onnx(attention_model(causal="trilu")).matches[0].spec
    assert causal.causal and not causal.causal_in_program
    assert (causal.mask_source, causal.bias_source, causal.dense_operands) == (None, None, ())
    assert "operand" not in rewriter.detect_onnx(attention_model(causal="trilu")).summary()


def test_onnx_recovered_program_names_its_leaves():
    from test_onnx_score_programs import _exported

    report = rewriter.detect_onnx(onnx.load_from_string(_exported("window")))
    [match] = report.matches
    assert match.spec.bias_source == "program" and match.spec.dense_operands == ()
    assert set(match.spec.program_leaves) == {"slopes", "attention_mask"}
    assert "bias: score program over" in report.summary()
    assert report.to_dict()["matches"][0]["spec"]["bias_source"] == "program"
