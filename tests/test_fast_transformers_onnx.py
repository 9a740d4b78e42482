"""fast-transformers' linear attention in ONNX files: found and rewritten in torch's plain exports, exactly.

The modules of `test_fast_transformers_linear.py` (`LinearAttention`, `CausalLinearAttention` with the causal
product as its pure-PyTorch prefix sum, and `PrefixSumCausal`, the causal product written as
einsum·cumsum in (N, L, H, D)) exported by `torch.onnx.export` (dynamo opset 18 and 23, TorchScript
opset 17), then `optimize_onnx`: every block rewritten, on ONNX Runtime equal to eager (fp32, 1e-4), no
CumSum or Einsum left; the near-misses of the FX tests are left alone in ONNX too.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch

import rewriter
from tests.test_fast_transformers_linear import (
    FEATURE_MAPS,
    FORMS,
    QUOTIENT_NEAR_MISSES,
    AllPrefixSumsNormaliser,
    AttentionLayer,
    CausalLinearAttention,
    LinearAttention,
    PrefixSumCausal,
    QueryFeaturesReturned,
    _nlhd,
    elu_feature_map,
    causal_linear,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EXPORTERS = {"dynamo18": {"dynamo": True, "opset_version": 18}, "dynamo23": {"dynamo": True, "opset_version": 23},
             "torchscript17": {"dynamo": False, "opset_version": 17}}


def _export(model, inputs, exporter: str, dynamic: bool = False, length_name: str = "length") -> onnx.ModelProto:
    buffer = io.BytesIO()
    names = [f"x{i}" for i in range(len(inputs))]
    options = dict(EXPORTERS[exporter])
    if dynamic and options["dynamo"]:
        length = torch.export.Dim(length_name)
        options["dynamic_shapes"] = tuple({1: length} for _ in inputs)
    elif dynamic:
        options["dynamic_axes"] = {name: {1: length_name} for name in names}
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buffer, input_names=names, **options)
    return onnx.load_from_string(buffer.getvalue())


def _ort(model: onnx.ModelProto, inputs) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {x.name: value.numpy() for x, value in zip(session.get_inputs(), inputs)})


def _optimize(model, inputs, exporter, **options):
    exported = _export(model, inputs, exporter, **options)
    optimized, report = rewriter.optimize_onnx(exported)
    return exported, optimized, report, [m for m in report.matches if m.kind == "performer"]


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
def test_export_is_rewritten(exporter, form, feature_map):
    model = FORMS[form](FEATURE_MAPS[feature_map]).eval()
    inputs = _nlhd(37, value_dim=5)
    exported, optimized, report, found = _optimize(model, inputs, exporter)
    assert len(found) == 1 and found[0].rewritten, report.summary()
    assert found[0].causal is (form != "bidirectional")
    assert not {"CumSum", "Einsum"} & {node.op_type for node in optimized.graph.node}
    [got] = _ort(optimized, inputs)
    np.testing.assert_allclose(got, model(*inputs).detach().numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got, _ort(exported, inputs)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo18", "torchscript17"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_layer_at_other_lengths(exporter, causal):
    """The whole layer (projections, (N, L, H, D) views) exported with a dynamic length, run at other lengths."""
    torch.manual_seed(3)
    model = AttentionLayer(CausalLinearAttention() if causal else LinearAttention()).eval()
    _, optimized, report, found = _optimize(model, (torch.randn(2, 40, 32),), exporter, dynamic=True)
    assert len(found) == 1 and found[0].rewritten, report.summary()
    for length in (1, 300):
        x = torch.randn(2, length, 32)
        np.testing.assert_allclose(_ort(optimized, (x,))[0], model(x).detach().numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo18", "torchscript17"])
@pytest.mark.parametrize("causal", [False, True])
def test_length_symbol_of_the_layout(exporter, causal):
    """The (N, L, H, D) block's length is its axis 1: a dim named `L` (not like a length) is the one the
    memory estimate binds, as for softmax blocks."""
    from rewriter.onnx_api import detect_onnx

    model = AttentionLayer(CausalLinearAttention() if causal else LinearAttention()).eval()
    exported = _export(model, (torch.randn(2, 40, 32),), exporter, dynamic=True, length_name="L")
    report = detect_onnx(exported)
    assert [m.spec.accepted for m in report.matches if m.kind == "performer"] == [True], report.summary()
    assert report.sequence_dims == ["L"]


def test_epsilon_is_exact():
    """A large ε shows that the ONNX rewrite adds it after φ(q)·Σφ(k), not to the key sum (the quotient: also none)."""
    for model in (LinearAttention(eps=0.5), CausalLinearAttention(eps=0.5), PrefixSumCausal(eps=0.5),
                  PrefixSumCausal(eps=0.5, divide=True), PrefixSumCausal(eps=None, divide=True, swapped=True)):
        inputs = _nlhd(19)
        _, optimized, report, found = _optimize(model.eval(), inputs, "dynamo18")
        assert found[0].rewritten, report.summary()
        np.testing.assert_allclose(_ort(optimized, inputs)[0], model(*inputs).numpy(), atol=1e-5, rtol=1e-5)


class _KeyNormaliser(torch.nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, queries, keys, values):
        Q, K = elu_feature_map(queries), elu_feature_map(keys)
        if self.causal:
            Z = 1 / (torch.einsum("nlhi,nlhi->nlh", K, K.cumsum(1)) + 1e-6)
            return causal_linear(Q, K, values) * Z[:, :, :, None]
        KV = torch.einsum("nshd,nshm->nhmd", K, values)
        Z = 1 / (torch.einsum("nlhd,nhd->nlh", K, K.sum(dim=1)) + 1e-6)
        return torch.einsum("nlhd,nhmd,nlh->nlhm", Q, KV, Z)


class _OtherFeatures(CausalLinearAttention):
    """Z built from the features of other inputs (the values) than the numerator's queries."""

    def forward(self, queries, keys, values):
        Q, K = self.feature_map(queries), self.feature_map(keys)
        Z = 1 / (torch.einsum("nlhi,nlhi->nlh", self.feature_map(values), K.cumsum(1)) + self.eps)
        return causal_linear(Q, K, values) * Z[:, :, :, None]


NEAR_MISSES = {
    "key sum over heads": (lambda: LinearAttention(key_axis=2), "keys"),
    "causal key sum over heads": (lambda: CausalLinearAttention(key_axis=2), "keys"),
    "context prefix-summed over heads": (lambda: PrefixSumCausal(context_axis=2), "keys"),
    "normaliser of every prefix sum": (AllPrefixSumsNormaliser, "two labels"),
    "normaliser of the keys": (lambda: _KeyNormaliser(False), "φ(q)"),
    "causal normaliser of the keys": (lambda: _KeyNormaliser(True), "φ(q)"),
    "normaliser of other features": (_OtherFeatures, "φ(q)"),
    "φ(q) used outside": (QueryFeaturesReturned, "also used"),
    **QUOTIENT_NEAR_MISSES,
}


@pytest.mark.parametrize("exporter", ["dynamo18", "torchscript17"])
@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
def test_near_miss_is_left_alone(exporter, case):
    factory, reason = NEAR_MISSES[case]
    model = factory().eval()
    inputs = _nlhd(3, heads=3)  # as many positions as heads, so that a wrong sum still fits
    exported, optimized, report, found = _optimize(model, inputs, exporter)
    assert found and not any(match.rewritten for match in found), report.summary()
    assert any(reason in (match.reason or "") for match in found), report.summary()
    assert [n.op_type for n in optimized.graph.node] == [n.op_type for n in exported.graph.node]


@pytest.mark.parametrize("causal", [False, True])
def test_key_length_mask_is_left_alone(causal):
    """A key-length mask (an input: data per key) multiplied into φ(k): the op has no such weights."""
    model = (CausalLinearAttention() if causal else LinearAttention()).eval()
    inputs = (*_nlhd(13), torch.ones(2, 13))
    exported, optimized, report, found = _optimize(model, inputs, "dynamo18")
    assert found and not any(match.rewritten for match in found), report.summary()
    assert [n.op_type for n in optimized.graph.node] == [n.op_type for n in exported.graph.node]
