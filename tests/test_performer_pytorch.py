"""The `performer-pytorch` package's own modules (1.1.4): every Performer block found and rewritten, exactly.

`SelfAttention`, `FastAttention` and `PerformerLM`, causal and bidirectional, with the FAVOR+
`softmax_kernel`, the `generalized_attention` ReLU kernel and `no_projection`, with and without local heads, through
`optimize_module`: outputs and gradients (inputs and parameters) equal to eager, fp32, 1e-4 / 1e-3;
`export_onnx`, and `optimize_onnx` on the package's own ONNX exports (dynamo opset 18 and 23,
TorchScript opset 17), on ONNX Runtime against eager.
The causal blocks are the package's CPU path as shipped (`causal_linear_attention_noncuda`: 128
chunks carrying running sums, ε added to every prefix-summed key feature).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import rewriter
from passes.onnx.einsum_ellipsis import spelt_out
from rewriter.dynamic_capture import CaptureError
from rewriter.export import ExportVerificationError
from rewriter.torch_api import optimize_module
from rewriter.verify import verify_onnx
from tests.parity import assert_module_parity

performer_pytorch = pytest.importorskip("performer_pytorch")

pytestmark = pytest.mark.usefixtures("one_thread")

OP = torch.ops.rewriter.linear_attention.default
KERNELS = {"favor": {}, "relu": {"generalized_attention": True}, "no_projection": {"no_projection": True}}


def _quiet(factory, **kwargs):
    """Build a package module; its causal modules print that the CUDA kernel is missing."""
    with contextlib.redirect_stdout(io.StringIO()):
        return factory(**kwargs)


def _op_calls(gm) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if node.target is OP]


def _performer_matches(report):
    return [match for match in report.matches if match.kind == "performer"]


def _assert_all_rewritten(report, gm, blocks: int):
    found = _performer_matches(report)
    assert len(found) == blocks and all(match.rewritten for match in found), report.summary()
    assert len(_op_calls(gm)) == blocks, gm.graph


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 37, 300])
def test_self_attention(kernel, causal, length):
    torch.manual_seed(0)
    model = _quiet(performer_pytorch.SelfAttention, dim=32, heads=2, dim_head=16, causal=causal, nb_features=24,
                   **KERNELS[kernel]).eval()
    x = torch.randn(2, length, 32)
    gm, report = optimize_module(model, (x,), dynamic_shapes=None)  # the blocks at these shapes
    _assert_all_rewritten(report, gm, 1)
    assert _op_calls(gm)[0].args[5] is causal
    # The module's one-input cat (global heads joined to absent local heads) copied the output: dropped.
    assert not [node for node in gm.graph.nodes if node.target is torch.ops.aten.cat.default], gm.graph
    assert assert_module_parity(model, gm, (x,), atol=1e-4, grad_atol=1e-3) > 0


def test_self_attention_takes_other_lengths_by_default():
    """`SelfAttention.forward(self, *args, …)` collects its input in ``*args``: the default dynamic
    capture gives that parameter one tuple of specs (it fell back to the example's length)."""
    torch.manual_seed(0)
    model = _quiet(performer_pytorch.SelfAttention, dim=32, heads=2, dim_head=16, nb_features=24).eval()
    gm, report = optimize_module(model, (torch.randn(2, 64, 32),))
    _assert_all_rewritten(report, gm, 1)
    for length in (100, 37):
        x = torch.randn(3, length, 32)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("causal", [False, True])
def test_fast_attention(kernel, causal):
    torch.manual_seed(1)
    model = _quiet(performer_pytorch.FastAttention, dim_heads=16, nb_features=24, causal=causal,
                   **KERNELS[kernel]).eval()
    generator = torch.Generator().manual_seed(2)
    qkv = tuple(torch.randn(2, 3, 150, 16, generator=generator) for _ in range(3))
    gm, report = optimize_module(model, qkv, dynamic_shapes=None)  # the blocks at these shapes
    _assert_all_rewritten(report, gm, 1)
    call = _op_calls(gm)[0]
    assert call.kwargs.get("key_sum_epsilon", call.args[-1]) == (1e-6 if causal else 0.0)
    assert_module_parity(model, gm, qkv, atol=1e-4, grad_atol=1e-3)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("local_heads", [0, 1])
def test_performer_lm(kernel, causal, local_heads):
    """Every Performer layer is rewritten; the local heads (softmax windows) stay exact whatever happens to them."""
    torch.manual_seed(3)
    model = _quiet(performer_pytorch.PerformerLM, num_tokens=50, max_seq_len=128, dim=32, depth=2, heads=2,
                   dim_head=16, causal=causal, nb_features=16, local_attn_heads=local_heads, local_window_size=16,
                   **KERNELS[kernel]).eval()
    model.fix_projection_matrices_()
    tokens = torch.randint(0, 50, (2, 96), generator=torch.Generator().manual_seed(4))
    gm, report = optimize_module(model, (tokens,), dynamic_shapes=None)  # the blocks at these shapes
    _assert_all_rewritten(report, gm, 2)
    assert assert_module_parity(model, gm, (tokens,), atol=1e-4, grad_atol=1e-3) > 0


@pytest.mark.parametrize("causal", [False, True])
def test_no_projection_features_reach_the_op_as_the_model_computes_them(causal):
    """`no_projection=True`: softmax over the head dim for q; exp for causal k, softmax over the keys for
    bidirectional k ("efficient attention", Shen et al.). These features are L × D, no larger than q and k:
    they stay in the graph and reach the op unchanged (feature map "identity", no projection). exp(k) is
    unstabilised: where it overflows, the rewrite gives NaN and inf exactly where the package does."""
    torch.manual_seed(10)
    model = _quiet(performer_pytorch.SelfAttention, dim=32, heads=2, dim_head=16, causal=causal,
                   no_projection=True).eval()
    x = torch.randn(1, 200, 32)
    gm, report = optimize_module(model, (x,), dynamic_shapes=None)  # the blocks at these shapes
    _assert_all_rewritten(report, gm, 1)
    [call] = _op_calls(gm)
    q, k, projection, feature_map = call.args[0], call.args[1], call.args[3], call.args[4]
    assert projection is None and feature_map == "identity"
    assert q.target is torch.ops.aten.softmax.int and q.args[1] == -1
    assert (k.target, k.args[1:]) == ((torch.ops.aten.exp.default, ()) if causal else (torch.ops.aten.softmax.int, (-2,)))
    assert assert_module_parity(model, gm, (x,), atol=1e-4, grad_atol=1e-3) > 0
    x[0, 150:] *= 300.0  # exp(k) overflows from row 150 on: inf / inf
    with torch.no_grad():
        expected, got = model(x), gm(x)
    assert expected.isnan().any() == causal
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, equal_nan=True)


class _MixedFeatures(nn.Module):
    """The package's `linear_attention` on softmax(q) and relu(k) + ε: two different maps, one of them the op's own."""

    def forward(self, q, k, v):
        return performer_pytorch.performer_pytorch.linear_attention(q.softmax(dim=-1), torch.relu(k) + 1e-3, v)


class _RawFeatures(nn.Module):
    """The package's `linear_attention` on tanh(q): features of either sign, no map the op knows."""

    def forward(self, q, k, v):
        return performer_pytorch.performer_pytorch.linear_attention(torch.tanh(q), k.softmax(dim=-2), v)


@pytest.mark.parametrize(("model", "reason"), [(_MixedFeatures(), "different feature maps"),
                                               (_RawFeatures(), "not a known feature map")])
def test_features_that_are_not_the_models_own_positive_map_are_left_alone(model, reason):
    qkv = tuple(torch.randn(1, 2, 30, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    gm, report = optimize_module(model, qkv, dynamic_shapes=None)
    [match] = _performer_matches(report)
    assert not match.rewritten and reason in match.reason, match.reason
    assert not _op_calls(gm)
    optimized, onnx_report = rewriter.optimize_onnx(_module_export(model, qkv))
    [onnx_match] = _performer_matches(onnx_report)
    assert not onnx_match.rewritten and reason in onnx_match.reason, onnx_match.reason


def test_training_mode_with_its_redraw_counter_is_refused_in_one_line():
    """In training mode the package's forward compares its redraw counter (a buffer) with the interval: torch.export
    cannot capture that branch, and `optimize_module` says so in one line with what to try."""
    model = _quiet(performer_pytorch.PerformerLM, num_tokens=40, max_seq_len=64, dim=32, depth=1, heads=2, dim_head=16,
                   nb_features=16).train()
    tokens = torch.randint(0, 40, (1, 64), generator=torch.Generator().manual_seed(6))
    with pytest.raises(CaptureError, match=r"^torch.export cannot capture PerformerLM: its forward branches on a "
                                           r"tensor's value \(Could not guard .*try module.eval\(\)") as raised:
        optimize_module(model, (tokens,), dynamic_shapes=None)
    assert "\n" not in str(raised.value)
    gm, report = optimize_module(model.eval(), (tokens,), dynamic_shapes=None)
    _assert_all_rewritten(report, gm, 1)


def test_training_mode_with_redraw_fixed():
    """In training mode the package would redraw Ω every `feature_redraw_interval` calls: fixed, the rewrite matches."""
    torch.manual_seed(5)
    model = _quiet(performer_pytorch.PerformerLM, num_tokens=40, max_seq_len=64, dim=32, depth=1, heads=2, dim_head=16,
                   causal=True, nb_features=16, feature_redraw_interval=1)
    model.fix_projection_matrices_()
    tokens = torch.randint(0, 40, (1, 64), generator=torch.Generator().manual_seed(6))
    gm, report = optimize_module(model.eval(), (tokens,), dynamic_shapes=None)  # the blocks at these shapes
    _assert_all_rewritten(report, gm, 1)
    before = model.performer.net.layers[0][0].fn.fast_attention.projection_matrix.clone()
    model.train()
    for _ in range(3):
        model(tokens)
    assert torch.equal(model.performer.net.layers[0][0].fn.fast_attention.projection_matrix, before)
    assert_module_parity(model.eval(), gm, (tokens,), atol=1e-4, grad_atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_projection_is_an_operand(causal):
    """Ω is read by the op from the module (buffer or parameter), never folded: changing it changes the output."""
    torch.manual_seed(7)
    model = _quiet(performer_pytorch.SelfAttention, dim=32, heads=2, dim_head=16, causal=causal, nb_features=24).eval()
    fast = model.fast_attention
    projection = nn.Parameter(fast.projection_matrix.clone())
    del fast.projection_matrix
    fast.projection_matrix = projection
    x = torch.randn(1, 40, 32)
    gm, report = optimize_module(model, (x,), dynamic_shapes=None)  # the blocks at these shapes
    _assert_all_rewritten(report, gm, 1)
    operand = _op_calls(gm)[0].args[3]
    assert operand.op == "get_attr", operand
    graph_projection = gm.get_parameter(operand.target)
    assert_module_parity(model, gm, (x,), atol=1e-4, grad_atol=1e-3)
    torch.testing.assert_close(graph_projection.grad, projection.grad, atol=1e-3, rtol=1e-4)
    with torch.no_grad():
        projection.copy_(fast.create_projection())
        graph_projection.copy_(projection)
    torch.testing.assert_close(gm(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["favor", "no_projection"])
@pytest.mark.parametrize("causal", [False, True])
def test_compile_backend(causal, kernel):
    """Under torch.compile the projection buffer is a graph input: still the op's operand, block rewritten.

    After `redraw_projection_matrix` the compiled model reads the new buffer (it is an input, not a constant)."""
    torch.manual_seed(9)
    model = _quiet(performer_pytorch.SelfAttention, dim=32, heads=2, dim_head=16, causal=causal, nb_features=24,
                   **KERNELS[kernel]).eval()
    compiled = torch.compile(model, backend="rewriter", options={"compiler": "eager"}, dynamic=False)
    rewriter.compile_reports(clear=True)
    x = torch.randn(2, 37, 32)
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = model(eager_x), compiled(compiled_x)
    [report] = rewriter.compile_reports()
    found = _performer_matches(report)
    assert len(found) == 1 and found[0].rewritten, report.summary()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, atol=1e-3, rtol=1e-4)
    model.fast_attention.redraw_projection_matrix(x.device)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- ONNX

EXPORTERS = {"dynamo18": {"dynamo": True, "opset_version": 18}, "dynamo23": {"dynamo": True, "opset_version": 23},
             "torchscript17": {"dynamo": False, "opset_version": 17}}


def _language_model(causal: bool, kernel: str = "favor", depth: int = 1):
    torch.manual_seed(8)
    model = _quiet(performer_pytorch.PerformerLM, num_tokens=50, max_seq_len=256, dim=32, depth=depth, heads=2,
                   dim_head=16, causal=causal, nb_features=16, **KERNELS[kernel]).eval()
    model.fix_projection_matrices_()
    return model


def _package_export(model, tokens, exporter: str) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (tokens,), buffer, input_names=["tokens"], **EXPORTERS[exporter])
    return onnx.load_from_string(buffer.getvalue())


def _module_export(model, inputs) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buffer, dynamo=True, opset_version=18)
    return onnx.load_from_string(buffer.getvalue())


def _ort(model: onnx.ModelProto, tokens) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0]


def _tokens(length: int):
    return torch.randint(0, 50, (1, length), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("target", ["chunked", "ort"])
@pytest.mark.parametrize("causal", [False, True])
def test_export_onnx(tmp_path, causal, target):
    if target == "ort" and not causal:
        pytest.skip("com.microsoft.LinearAttention is causal only")
    model, tokens = _language_model(causal, depth=2), _tokens(80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # at the example's shapes: torch.export fixes every axis of this model, and the default's dynamic
        # attempt would capture it twice (83 s instead of 38 s for the causal one)
        report = rewriter.export_onnx(model, (tokens,), str(tmp_path / "lm.onnx"), target=target, dynamic_shapes=None)
    found = _performer_matches(report)
    assert len(found) == 2 and all(match.rewritten for match in found), report.summary()
    got = _ort(onnx.load(str(tmp_path / "lm.onnx")), tokens)
    np.testing.assert_allclose(got, model(tokens).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_export_of_a_model_that_onnx_runtime_runs_only_at_the_example_length(tmp_path):
    """The causal `SelfAttention` chunks the sequence by 128 with `chunk`: exported with a dynamic length, ONNX
    Runtime cannot run it at the verification's other lengths. One line says so (not ORT's raw error), nothing is
    written; at the example's shapes the export is verified and written."""
    torch.manual_seed(0)
    model = _quiet(performer_pytorch.SelfAttention, dim=32, heads=2, dim_head=16, causal=True,
                   no_projection=True).eval()
    x, path = torch.randn(1, 128, 32), tmp_path / "attention.onnx"
    with pytest.raises(ExportVerificationError, match=r"ONNX Runtime cannot run it \(Reshape node .*"
                                                      r"export them with dynamic_shapes=None; nothing written$"):
        rewriter.export_onnx(model, (x,), str(path))
    assert not path.exists()
    report = rewriter.export_onnx(model, (x,), str(path), dynamic_shapes=None)
    assert all(match.rewritten for match in _performer_matches(report)), report.summary()
    np.testing.assert_allclose(_ort(onnx.load(str(path)), x), model(x).detach().numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
@pytest.mark.parametrize("causal,kernel", [(False, "favor"), (True, "favor"), (True, "relu"), (False, "no_projection"),
                                           (True, "no_projection")])
def test_optimize_the_package_export(exporter, causal, kernel):
    """Every block of the package's own export found and rewritten; on ORT equal to eager (and the original)."""
    # TorchScript's export runs on ORT only with exactly 128 chunks (see the test below)
    model, tokens = _language_model(causal, kernel), _tokens(128 if exporter == "torchscript17" else 40)
    exported = _package_export(model, tokens, exporter)
    optimized, report = rewriter.optimize_onnx(exported)
    found = _performer_matches(report)
    assert len(found) == 1 and all(match.rewritten for match in found), report.summary()
    assert not {"CumSum", "SplitToSequence", "SequenceAt"} & {node.op_type for node in optimized.graph.node}
    got, eager = _ort(optimized, tokens), model(tokens).detach().numpy()
    np.testing.assert_allclose(got, eager, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got, _ort(spelt_out(exported), tokens), atol=1e-4, rtol=1e-4)


def test_torchscript_causal_export_that_ort_refuses(tmp_path):
    """At a length with fewer than 128 chunks TorchScript's export writes a negative split size: ORT refuses
    the original, the rewrite runs and equals eager PyTorch, and `optimize --verify` says all that."""
    model, tokens = _language_model(True), _tokens(96)
    exported = _package_export(model, tokens, "torchscript17")
    with pytest.raises(Exception, match="split"):
        _ort(exported, tokens)
    optimized, report = rewriter.optimize_onnx(exported)
    assert all(match.rewritten for match in _performer_matches(report)), report.summary()
    feeds, eager = {"tokens": tokens.numpy()}, [model(tokens).detach().numpy()]
    checked = verify_onnx(exported, optimized, feeds=feeds, reference=eager)
    assert checked.ok and checked.compared_against == "reference outputs", checked.message
    unchecked = verify_onnx(exported, optimized, feeds=feeds)
    assert not unchecked.ok and unchecked.compared_against == "nothing"
    assert "SplitToSequence" in unchecked.original_error and "the rewritten model runs" in unchecked.message
    path, output = tmp_path / "ts.onnx", tmp_path / "ts_opt.onnx"
    onnx.save(exported, str(path))
    run = subprocess.run([sys.executable, "-m", "rewriter", "optimize", str(path), "-o", str(output), "--verify"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and not output.exists()
    assert "the original does not run on ONNX Runtime (SplitToSequence" in run.stdout + run.stderr
    assert "the rewritten model runs" in run.stdout + run.stderr
