"""Performer / linear attention in exported ONNX files: detection, near-misses, rewrite parity on ORT.

Models come from `tests/performer_models.py` (written like performer-pytorch) and are exported in the
test: the TorchScript exporter for the many small FastAttention variants (it is fast), the dynamo
exporter (opset 18) for the causal and bidirectional blocks and whole models, one with a dynamic
sequence length. Exported Performer files do not load in ONNX Runtime as written (its Einsum rejects
the ellipsis of `…id,…jd->…ij` against the 2-D projection), so the original runs on ONNX Runtime
after `spelt_out` (same computation, explicit labels), and both are compared with eager.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rewriter
from passes.onnx.detect_linear_attention import detect_linear_attention
from passes.onnx.einsum_ellipsis import explicit_equation, spelt_out
from passes.onnx.onnx_match import AnalysisContext
from rewriter.cli import main as cli_main
from rewriter.tools.memory_estimate import estimate_peak_activation_bytes, sequence_dims
from tests.performer_models import (
    FastAttention,
    FeaturesReused,
    PerformerEncoder,
    PerformerLM,
    SwappedBatchAxes,
    linear_attention,
)

NAMES = ["q", "k", "v"]


def _qkv(length, batch=2, heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, dim, generator=generator) for _ in range(3))


def _export(model, inputs, names=NAMES, dynamo=False, dynamic_shapes=None) -> onnx.ModelProto:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, inputs, dynamo=True, opset_version=18, input_names=names,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=18, input_names=names)
        return onnx.load_from_string(buffer.getvalue())


def _feeds(model: onnx.ModelProto, inputs) -> dict:
    return {value.name: x.numpy() for value, x in zip(model.graph.input, inputs)}


def _run_ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def _performer(report):
    return [match for match in report.matches if match.kind == "performer"]


def _assert_rewritten_parity(model, proto, inputs, *, atol=2e-5):
    """Rewrite `proto`; on ORT the result equals the original and eager PyTorch."""
    optimized, report = rewriter.optimize_onnx(proto)
    feeds = _feeds(proto, inputs)
    got, original = _run_ort(optimized, feeds), _run_ort(spelt_out(proto), feeds)
    np.testing.assert_allclose(got, original, atol=atol, rtol=1e-4)
    np.testing.assert_allclose(got, model(*inputs).detach().numpy(), atol=atol, rtol=1e-4)
    return optimized, report


class _EluPlusOne(nn.Module):
    """Katharopoulos et al.: φ(x) = elu(x) + 1, no projection, bidirectional."""

    def forward(self, q, k, v):
        q, k = (torch.nn.functional.elu(t) + 1 for t in (q, k))
        return linear_attention(q, k, v)


# --------------------------------------------------------------------------- FastAttention blocks

_VARIANTS = {
    "favor causal": dict(causal=True),
    "relu causal": dict(causal=True, generalized_attention=True),
    "favor bidirectional": {},
    "relu bidirectional": dict(generalized_attention=True),
    "relu without projection": dict(generalized_attention=True, near_miss="no_projection"),
    "favor matmul form": dict(variant="matmul"),
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_torchscript_export_of_each_form_is_rewritten_exactly(variant):
    options = _VARIANTS[variant]
    model = FastAttention(8, nb_features=12, **options).eval()
    inputs = _qkv(19)
    optimized, report = _assert_rewritten_parity(model, _export(model, inputs), inputs)
    [match] = _performer(report)
    assert match.rewritten and match.target == "chunked", match.reason
    assert match.spec.causal == bool(options.get("causal"))
    assert match.spec.feature_map == ("relu" if options.get("generalized_attention") else "favor_softmax")
    assert match.spec.scale == pytest.approx(8 ** -0.25)
    assert not {"CumSum", "Einsum"} & _ops(optimized)


def test_elu_plus_one_features():
    model, inputs = _EluPlusOne(), _qkv(13)
    _, report = _assert_rewritten_parity(model, _export(model, inputs), inputs)
    [match] = _performer(report)
    assert match.rewritten and match.spec.feature_map == "elu_plus_one" and match.spec.scale == 1.0


def test_dynamo_causal_block_loses_its_prefix_sums():
    model = FastAttention(8, nb_features=12, causal=True).eval()
    inputs = _qkv(23, seed=1)
    proto = _export(model, inputs, dynamo=True)
    assert "CumSum" in _ops(proto)
    optimized, report = _assert_rewritten_parity(model, proto, inputs)
    [match] = _performer(report)
    assert match.rewritten and match.spec.causal and match.chunk_sizes == (256, 256)
    assert "CumSum" not in _ops(optimized)


@pytest.mark.parametrize("features,chunks,length", [("favor", 3, 10), ("relu", 4, 37), ("favor", 1, 9)])
def test_chunked_causal_form_is_one_block(features, chunks, length):
    model = FastAttention(8, nb_features=12, causal=True, chunk_size=chunks, chunk_eps=0.0,
                          generalized_attention=features == "relu").eval()
    inputs = _qkv(length, seed=length)
    optimized, report = _assert_rewritten_parity(model, _export(model, inputs, dynamo=True), inputs)
    [match] = _performer(report)
    assert match.rewritten and match.spec.causal, match.reason
    assert not {"CumSum", "Einsum"} & _ops(optimized)


@pytest.mark.parametrize("target", ["chunked", "ort"])
def test_chunked_form_with_epsilon_inside_the_prefix_sum(target):
    """φ(q)·(Σφ(k) + ε): the replacement's key_sum_epsilon (ORT: + ε·Σφ(q) after its recurrence)."""
    model = FastAttention(8, nb_features=12, causal=True, chunk_size=3, chunk_eps=0.25).eval()
    inputs = _qkv(10)
    proto = _export(model, inputs, dynamo=True)
    optimized, report = rewriter.optimize_onnx(proto, target=target)
    [match] = _performer(report)
    assert match.rewritten, match.reason
    np.testing.assert_allclose(_run_ort(optimized, _feeds(optimized, inputs)), model(*inputs).detach().numpy(),
                               atol=2e-5, rtol=1e-4)


def test_slice_size_follows_chunk_size_and_ort_target_takes_causal_blocks_only():
    causal = FastAttention(8, nb_features=12, causal=True).eval()
    inputs = _qkv(21, seed=2)
    proto = _export(causal, inputs)
    optimized, report = rewriter.optimize_onnx(proto, chunk_size=5)
    assert _performer(report)[0].chunk_sizes == (5, 5)
    np.testing.assert_allclose(_run_ort(optimized, _feeds(proto, inputs)), causal(*inputs).numpy(), atol=2e-5, rtol=1e-4)
    optimized, report = rewriter.optimize_onnx(proto, target="ort")
    assert _performer(report)[0].target == "com.microsoft.LinearAttention"
    np.testing.assert_allclose(_run_ort(optimized, _feeds(proto, inputs)), causal(*inputs).numpy(), atol=2e-5, rtol=1e-4)
    bidirectional = FastAttention(8, nb_features=12).eval()
    _, report = rewriter.optimize_onnx(_export(bidirectional, inputs), target="ort")
    [match] = _performer(report)
    assert not match.rewritten and "causal Performer attention only" in match.reason


@settings(max_examples=8, deadline=None)
@given(length=st.integers(1, 40), heads=st.integers(1, 3), dim=st.sampled_from([4, 8]), features=st.integers(2, 16),
       kind=st.sampled_from(["favor", "relu"]), causal=st.booleans(), slice_size=st.sampled_from([1, 7, 256]))
def test_random_shapes_and_variants(length, heads, dim, features, kind, causal, slice_size):
    model = FastAttention(dim, nb_features=features, causal=causal, generalized_attention=kind == "relu").eval()
    inputs = _qkv(length, heads=heads, dim=dim, seed=length)
    proto = _export(model, inputs)
    optimized, report = rewriter.optimize_onnx(proto, chunk_size=slice_size)
    [match] = _performer(report)
    assert match.rewritten, match.reason
    feeds = _feeds(proto, inputs)
    np.testing.assert_allclose(_run_ort(optimized, feeds), model(*inputs).numpy(), atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- whole models


def test_causal_lm_with_dynamic_length_is_rewritten_at_two_lengths():
    torch.manual_seed(0)
    features, heads, dim = 64, 2, 32
    model = PerformerLM(vocab=50, dim=dim, depth=2, heads=heads, max_len=128, nb_features=features).eval()
    tokens = torch.randint(0, 50, (2, 24))
    seq = torch.export.Dim("seq", min=2, max=128)
    proto = _export(model, (tokens,), names=["tokens"], dynamo=True, dynamic_shapes=({1: seq},))
    optimized, report = rewriter.optimize_onnx(proto)
    performer = _performer(report)
    assert len(performer) == 2 and all(m.rewritten and m.spec.causal for m in performer), report.summary()
    assert report.sequence_dims == ["seq"]  # the length axis of the blocks' q and k
    assert "CumSum" not in _ops(optimized)
    for length in (24, 37):
        tokens = torch.randint(0, 50, (2, length), generator=torch.Generator().manual_seed(length))
        got = _run_ort(optimized, {"tokens": tokens.numpy()})
        np.testing.assert_allclose(got, model(tokens).detach().numpy(), atol=5e-5, rtol=1e-4)
    # The original holds the prefix-summed context, B·H·L·M·Dv floats, per block; the rewrite far less.
    length = 4096
    context_bytes = 2 * heads * length * features * (dim // heads) * 4
    before, after = (estimate_peak_activation_bytes(m, sequence_dims(m, length))
                     for m in (spelt_out(proto), optimized))
    assert before.unknown_values == after.unknown_values == 0, (before, after)
    assert before.peak_bytes >= context_bytes > 8 * after.peak_bytes, (before, after, context_bytes)


def test_bidirectional_encoder_is_rewritten():
    torch.manual_seed(0)
    model = PerformerEncoder(dim=32, depth=2, heads=2, nb_features=12).eval()
    x = torch.randn(2, 29, 32)
    proto = _export(model, (x,), names=["x"], dynamo=True)
    optimized, report = rewriter.optimize_onnx(proto)
    performer = _performer(report)
    assert len(performer) == 2 and all(m.rewritten and not m.spec.causal for m in performer), report.summary()
    np.testing.assert_allclose(_run_ort(optimized, {"x": x.numpy()}), model(x).detach().numpy(), atol=5e-5, rtol=1e-4)


# --------------------------------------------------------------------------- near-misses


_NEAR_MISSES = {
    "global_stabiliser": (lambda: FastAttention(8, nb_features=12, near_miss="global_stabiliser"),
                          "stabiliser '", "reduces axes [0, 1, 2, 3]"),
    "normaliser_axis": (lambda: FastAttention(8, nb_features=12, near_miss="normaliser_axis"), "key", "sum"),
    "features_reused": (FeaturesReused, "is also used by", ""),
    "swapped_batch_axes": (SwappedBatchAxes, "key axis", ""),
}


@pytest.mark.parametrize("case", list(_NEAR_MISSES))
def test_near_misses_are_reported_and_left_unchanged(case):
    factory, *reasons = _NEAR_MISSES[case]
    model = factory().eval()
    inputs = _qkv(10, seed=3)
    proto = _export(model, inputs)
    optimized, report = rewriter.optimize_onnx(proto)
    performer = _performer(report)
    assert performer and not any(m.rewritten for m in performer)
    assert any(all(r in (m.reason or "") for r in reasons) for m in performer), [m.reason for m in performer]
    assert optimized.SerializeToString() == proto.SerializeToString()


def test_projection_passed_as_input_is_not_constant():
    model = FastAttention(8, nb_features=12).eval()  # forward(q, k, v, projection)
    inputs = _qkv(10) + (torch.randn(12, 8),)
    proto = _export(model, inputs, names=NAMES + ["projection"])
    [match] = _performer(rewriter.detect_onnx(proto))
    assert not match.spec.accepted and "not a constant initializer" in match.reason


def test_queries_and_keys_of_different_lengths_are_left_alone():
    model = FastAttention(8, nb_features=12).eval()
    q, k, v = _qkv(10)[0], *_qkv(14, seed=5)[1:]
    [match] = _performer(rewriter.detect_onnx(_export(model, (q, k, v))))
    assert not match.spec.accepted and "same length" in match.reason


@pytest.mark.parametrize("attribute", ["exclusive", "reverse"])
def test_exclusive_or_reversed_prefix_sum_is_not_causal_attention(attribute):
    model = FastAttention(8, nb_features=12, causal=True, generalized_attention=True).eval()
    proto = _export(model, _qkv(10))
    cumsum = next(node for node in proto.graph.node if node.op_type == "CumSum")
    cumsum.attribute.append(onnx.helper.make_attribute(attribute, 1))
    [match] = _performer(rewriter.detect_onnx(proto))
    assert not match.spec.accepted and "exclusive or reversed prefix sum" in match.reason


def test_prefix_sum_over_the_features_is_not_causal_attention():
    model = FastAttention(8, nb_features=12, causal=True, generalized_attention=True).eval()
    proto = ir.from_proto(_export(model, _qkv(10)))
    cumsum = next(node for node in proto.graph if node.op_type == "CumSum")
    last_axis = ir.Value(name="last_axis", const_value=ir.tensor(np.array(-1, np.int64)))
    proto.graph.register_initializer(last_axis)
    cumsum.replace_input_with(1, last_axis)
    [match] = detect_linear_attention(AnalysisContext(proto))
    assert not match.spec.accepted and "over an axis other than the keys" in match.spec.reason


# --------------------------------------------------------------------------- einsum ellipsis


def test_uneven_ellipsis_is_spelt_out_right_aligned():
    assert explicit_equation("...id,...jd->...ij", [4, 2]) == "abid,jd->abij"
    assert explicit_equation("...nd,...d->...n", [3, 1]) == "and,d->an"
    assert explicit_equation("...nd,...d->...n", [4, 2]) == "abnd,bd->abn"  # numpy right-aligns batch axes
    assert explicit_equation("...nd,...ne->...nde", [4, 4]) is None  # even: left alone
    assert explicit_equation("bnd,bne->bde", [3, 3]) is None


# --------------------------------------------------------------------------- report and CLI


def test_inspect_and_optimize_list_performer_blocks(tmp_path, capsys):
    model = FastAttention(8, nb_features=12, causal=True).eval()
    path, output = tmp_path / "performer.onnx", tmp_path / "out.onnx"
    onnx.save(_export(model, _qkv(10)), path)
    assert cli_main(["inspect", str(path)]) == 0
    assert "performer, causal would become chunked" in capsys.readouterr().out
    assert cli_main(["optimize", str(path), "-o", str(output), "--verify", "--json", "--seq-len", "4096"]) == 0
    captured = capsys.readouterr()
    assert "performer, causal -> chunked" in captured.err
    report = json.loads(captured.out)
    assert report["verify"]["ok"]
    memory = report["memory_estimate"]  # the original's estimate needs its einsums spelt out to see the context
    assert memory["before_bytes"] > memory["after_bytes"]
    assert "CumSum" not in _ops(onnx.load(output))
