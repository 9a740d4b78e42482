"""Performer (linear) attention in ONNX: `build_linear_attention`, its lowering, and `export_onnx`.

The builder's model runs on ONNX Runtime against `torch.ops.rewriter.linear_attention` (FAVOR+,
ReLU and elu+1 maps, with and without a projection; causal and bidirectional; grouped KV heads;
slices that divide L and that do not; L = 1), one model per variant at several lengths. The
memory claim is checked from ORT's profile, which lists the output size of every node run,
loop bodies included: no tensor of L × M × Dv may appear (a hand-built naive cumsum graph shows
that the check sees one), and in a child process the extra peak RSS stays far below it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewriter.kernels.linear_attention_op  # noqa: F401  (registers the torch op)
from passes.onnx.lower_rewriter_ops import LowerRewriterOps, LoweringError
from performer_models import PerformerEncoder, PerformerLM
from rewriter.export import to_onnx
from rewriter.kernels.onnx_linear_attention import build_linear_attention, make_linear_attention_model

HEADS, KV_HEADS, HEAD_DIM, V_DIM, FEATURES = 4, 2, 8, 6, 16
# (feature map, with a projection, epsilon)
MAPS = [("favor_softmax", True, 1e-4), ("relu", True, 1e-3), ("relu", False, 1e-3),
        ("elu_plus_one", True, 0.0), ("elu_plus_one", False, 0.0), ("identity", False, 0.0)]


def _session(model: onnx.ModelProto, profile_prefix: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _inputs(length: int, seed: int, with_projection: bool, batch: int = 2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator, dtype=dtype)
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=generator, dtype=dtype)
    v = torch.randn(batch, KV_HEADS, length, V_DIM, generator=generator, dtype=dtype)
    projection = torch.randn(FEATURES, HEAD_DIM, generator=generator, dtype=dtype) if with_projection else None
    return q, k, v, projection


def _model(feature_map, with_projection, epsilon, causal, slice_size, target="chunked", dtype=ir.DataType.FLOAT,
           opset=18):
    return make_linear_attention_model(
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, v_head_dim=V_DIM, dtype=dtype,
        features=FEATURES if with_projection else None, feature_map=feature_map, causal=causal,
        data_scale=HEAD_DIM**-0.25, epsilon=epsilon, normalizer_epsilon=1e-6, slice_size=slice_size, target=target,
        opset=opset)


def _check_lengths(model, feature_map, with_projection, epsilon, causal, slice_size, lengths, seed=0, atol=2e-5):
    session = _session(model)
    for length in lengths:
        q, k, v, projection = _inputs(length, seed + length, with_projection)
        if feature_map == "identity":  # features the model computed itself: positive, as softmax and exp give
            q, k = q.exp(), k.exp()
        expected = torch.ops.rewriter.linear_attention(q, k, v, projection, feature_map, causal, HEAD_DIM**-0.25,
                                                       epsilon, 1e-6, False, slice_size)[0]
        feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
        if projection is not None:
            feeds["projection"] = projection.numpy()
        (actual,) = session.run(None, feeds)
        assert actual.shape == tuple(expected.shape)
        np.testing.assert_allclose(actual, expected.numpy(), atol=atol, rtol=1e-4, err_msg=f"L={length}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("feature_map", "with_projection", "epsilon"), MAPS)
def test_builder_matches_the_torch_op_at_several_lengths(feature_map, with_projection, epsilon, causal):
    # One model (symbolic L) at L = 1, L a multiple of the slice, L not a multiple, L below one slice.
    model = _model(feature_map, with_projection, epsilon, causal, slice_size=4)
    _check_lengths(model, feature_map, with_projection, epsilon, causal, 4, lengths=(1, 12, 13, 3))


@pytest.mark.parametrize("opset", [13, 14, 17])
@pytest.mark.parametrize("causal", [False, True])
def test_builder_is_valid_in_older_opsets(opset, causal):
    """Shape without start/end, ReduceMax with an axes attribute, and (opset 13) no Trilu."""
    model = _model("favor_softmax", True, 1e-4, causal, slice_size=4, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    _check_lengths(model, "favor_softmax", True, 1e-4, causal, 4, lengths=(1, 13))


@pytest.mark.parametrize(("feature_map", "with_projection", "epsilon"), MAPS)
def test_ort_linear_attention_target_matches_the_torch_op(feature_map, with_projection, epsilon):
    model = _model(feature_map, with_projection, epsilon, causal=True, slice_size=4, target="ort")
    assert ("com.microsoft", "LinearAttention") in {(n.domain, n.op_type) for n in model.graph.node}
    _check_lengths(model, feature_map, with_projection, epsilon, True, 4, lengths=(1, 13))


@settings(max_examples=12, deadline=None)
@given(feature=st.sampled_from(MAPS), causal=st.booleans(), slice_size=st.integers(1, 9),
       length=st.integers(1, 20), seed=st.integers(0, 99))
def test_builder_matches_the_torch_op_on_random_shapes(feature, causal, slice_size, length, seed):
    feature_map, with_projection, epsilon = feature
    model = _model(feature_map, with_projection, epsilon, causal, slice_size)
    _check_lengths(model, feature_map, with_projection, epsilon, causal, slice_size, lengths=(length,), seed=seed)


def test_double_inputs_give_double_output_to_double_precision():
    model = _model("favor_softmax", True, 1e-4, True, 5, dtype=ir.DataType.DOUBLE)
    q, k, v, projection = _inputs(11, 3, True, dtype=torch.float64)
    expected = torch.ops.rewriter.linear_attention(q, k, v, projection, "favor_softmax", True, HEAD_DIM**-0.25,
                                                   1e-4, 1e-6, False, 5)[0]
    (actual,) = _session(model).run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(),
                                           "projection": projection.numpy()})
    assert actual.dtype == np.float64
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-10, atol=1e-12)


def test_projection_with_a_symbolic_feature_count():
    q = ir.val("q", ir.DataType.FLOAT, ["b", HEADS, "l", HEAD_DIM])
    k = ir.val("k", ir.DataType.FLOAT, ["b", KV_HEADS, "l", HEAD_DIM])
    v = ir.val("v", ir.DataType.FLOAT, ["b", KV_HEADS, "l", V_DIM])
    projection = ir.val("projection", ir.DataType.FLOAT, ["m", HEAD_DIM])
    tape = ir.tape.Tape()
    out = build_linear_attention(tape, q, k, v, projection, feature_map="favor_softmax", causal=True,
                                 data_scale=HEAD_DIM**-0.25, epsilon=1e-4, normalizer_epsilon=1e-6, slice_size=4)
    out.name = "out"
    graph = ir.Graph([q, k, v, projection], [out], nodes=tape.nodes, opset_imports={"": 18}, name="symbolic_m")
    _check_lengths(ir.to_proto(ir.Model(graph, ir_version=10)), "favor_softmax", True, 1e-4, True, 4, lengths=(7,))


@pytest.mark.parametrize(("options", "message"), [
    ({"feature_map": "favor_softmax", "projection": False}, "needs a projection"),
    ({"feature_map": "cosine"}, "is not one of"),
    ({"slice_size": 0}, "slice_size must be positive"),
    ({"target": "ort", "causal": False}, "causal linear attention only"),
    ({"target": "mha"}, "target must be one of"),
])
def test_rejects_bad_arguments(options, message):
    options = {"feature_map": "relu", "causal": True, "slice_size": 4, "target": "chunked", "projection": True,
               **options}
    q = ir.val("q", ir.DataType.FLOAT, ["b", 2, "l", 8])
    k, v = ir.val("k", ir.DataType.FLOAT, ["b", 2, "l", 8]), ir.val("v", ir.DataType.FLOAT, ["b", 2, "l", 8])
    projection = ir.val("p", ir.DataType.FLOAT, [4, 8]) if options.pop("projection") else None
    with pytest.raises(ValueError, match=message):
        build_linear_attention(ir.tape.Tape(), q, k, v, projection, data_scale=1.0, epsilon=0.0,
                               normalizer_epsilon=0.0, **options)


# --------------------------------------------------------------------------- memory


def _largest_node_output(model: onnx.ModelProto, feeds: dict, tmp_path) -> int:
    """Bytes of the largest output any node (loop bodies included) produced in one ORT run."""
    session = _session(model, profile_prefix=str(tmp_path / "profile"))
    session.run(None, feeds)
    with open(session.end_profiling()) as profile:
        events = json.load(profile)
    sizes = [int(event["args"]["output_size"]) for event in events
             if event.get("cat") == "Node" and "output_size" in event.get("args", {})]
    assert sizes, "ORT profiled no node"
    return max(sizes)


def _naive_causal_model() -> onnx.ModelProto:
    """performer-pytorch's `causal_linear_attention_noncuda` on given φ(q), φ(k): CumSum over L × M × Dv."""
    h = onnx.helper
    inputs = [h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in ("phi_q", "phi_k", "v")]
    nodes = [h.make_node("Constant", [], ["axis"], value=h.make_tensor("a", onnx.TensorProto.INT64, [], [2])),
             h.make_node("Einsum", ["phi_k", "v"], ["context"], equation="bhnd,bhne->bhnde"),
             h.make_node("CumSum", ["context", "axis"], ["prefix"]),
             h.make_node("Einsum", ["prefix", "phi_q"], ["out"], equation="bhnde,bhnd->bhne")]
    graph = h.make_graph(nodes, "naive", inputs, [h.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("causal", [False, True])
def test_no_tensor_of_length_times_features_times_value_dim(causal, tmp_path):
    length = 200
    q, k, v, projection = _inputs(length, 0, True, batch=1)
    context_bytes = 1 * KV_HEADS * length * FEATURES * V_DIM * 4
    naive = _naive_causal_model()
    phi = np.random.default_rng(0).random((1, KV_HEADS, length, FEATURES), dtype=np.float32)
    assert _largest_node_output(naive, {"phi_q": phi, "phi_k": phi, "v": v.numpy()}, tmp_path) >= context_bytes
    model = _model("favor_softmax", True, 1e-4, causal, slice_size=16)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "projection": projection.numpy()}
    largest = _largest_node_output(model, feeds, tmp_path)
    # The largest is the q input regrouped or the (padded) output, as for any attention.
    output_bytes = q.numel() // HEAD_DIM * V_DIM * 4
    assert largest <= max(q.numel() * 4, 2 * output_bytes), (largest, output_bytes)
    assert largest < context_bytes / 4, (largest, context_bytes)


_PEAK_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
options = ort.SessionOptions()
options.enable_cpu_mem_arena, options.intra_op_num_threads = False, 2
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
def feeds(length):
    q, k, v = (rng.standard_normal((1, 2, length, 64), dtype=np.float32) for _ in range(3))
    return dict(q=q, k=k, v=v, projection=rng.standard_normal((64, 64), dtype=np.float32))
session.run(None, feeds(64))
x = feeds({length})
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")
before = status("VmRSS")
session.run(None, x)
print(status("VmHWM") - before)
"""


@pytest.mark.parametrize("target", ["chunked", "ort"])
def test_peak_memory_stays_far_below_the_cumsum_context(target, tmp_path):
    length = 4096
    path = tmp_path / "linear.onnx"
    model = make_linear_attention_model(num_heads=2, num_kv_heads=2, head_dim=64, features=64,
                                        feature_map="favor_softmax", causal=True, data_scale=64**-0.25,
                                        epsilon=1e-4, normalizer_epsilon=0.0, slice_size=256, target=target)
    onnx.save(model, path)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed blocks go back at once (see chunked test)
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT.format(length=length), str(path)],
                            capture_output=True, text=True, check=True, timeout=120, env=env)
    growth = int(result.stdout.split()[-1])
    context_bytes = 2 * length * 64 * 64 * 4  # 128 MiB
    assert growth < context_bytes / 8, f"peak RSS grew by {growth / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- lowering and export


def _private_linear_model(causal: int, used_output: str | None = None) -> ir.Model:
    """q (B,4,L,8), k (B,2,L,8), v (B,2,L,6), Ω (16,8) → one ai.rewriter::LinearAttention → out [, state|key_max]."""
    q = ir.val("q", ir.DataType.FLOAT, ["b", HEADS, "l", HEAD_DIM])
    k = ir.val("k", ir.DataType.FLOAT, ["b", KV_HEADS, "l", HEAD_DIM])
    v = ir.val("v", ir.DataType.FLOAT, ["b", KV_HEADS, "l", V_DIM])
    projection = ir.val("projection", ir.DataType.FLOAT, [FEATURES, HEAD_DIM])
    outputs = [ir.val("out", ir.DataType.FLOAT, ["b", HEADS, "l", V_DIM]), ir.Value(name="state"),
               ir.Value(name="key_max")]
    node = ir.node("LinearAttention", [q, k, v, projection], domain="ai.rewriter", outputs=outputs,
                   attributes={"feature_map": "favor_softmax", "causal": causal, "data_scale": HEAD_DIM**-0.25,
                               "epsilon": 1e-4, "normalizer_epsilon": 1e-6, "stabilizer_grad": 0, "slice_size": 4})
    graph_outputs = [outputs[0]] + [value for value in outputs[1:] if value.name == used_output]
    graph = ir.Graph([q, k, v, projection], graph_outputs, nodes=[node], opset_imports={"": 18, "ai.rewriter": 1},
                     name="private")
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("target", "causal", "form", "fallback"), [
    ("chunked", 1, "chunked", None), ("chunked", 0, "chunked", None), ("ort", 1, "ort", None),
    ("ort", 0, "chunked", "causal only"), ("onnx-attention", 1, "chunked", "no linear-attention op"),
])
def test_lowering_pass_matches_the_torch_op(target, causal, form, fallback):
    model = _private_linear_model(causal)
    if target == "onnx-attention":
        model.graph.opset_imports[""] = 23
    lowering = LowerRewriterOps(target)
    assert lowering(model).modified
    [(lowered, reason)] = lowering.lowered
    assert lowered == form and (reason is None if fallback is None else fallback in reason)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert "ai.rewriter" not in {entry.domain for entry in proto.opset_import}
    _check_lengths(proto, "favor_softmax", True, 1e-4, bool(causal), 4, lengths=(1, 9))


@pytest.mark.parametrize("used_output", ["state", "key_max"])
def test_lowering_refuses_a_node_whose_state_or_key_max_is_used(used_output):
    with pytest.raises(LoweringError, match=f"its {used_output} output is used"):
        LowerRewriterOps("chunked")(_private_linear_model(1, used_output))


def _loop_and_no_cumsum(model: onnx.ModelProto) -> None:
    graph = ir.serde.deserialize_model(model).graph
    ops = [(node.domain, node.op_type) for node in ir.traversal.RecursiveGraphIterator(graph)]
    assert ("", "Loop") in ops and ("", "CumSum") not in ops
    assert not any(domain == "ai.rewriter" for domain, _ in ops)


@pytest.mark.parametrize("module", ["lm", "encoder"])
def test_export_round_trip_equals_eager_at_two_lengths(module, tmp_path):
    torch.manual_seed(0)
    if module == "lm":  # causal
        model, example = PerformerLM(depth=1).eval(), torch.randint(0, 50, (2, 24))
    else:  # bidirectional
        model, example = PerformerEncoder(depth=1).eval(), torch.randn(2, 24, 32)
    seq = torch.export.Dim("seq", min=2, max=127)
    proto, report = to_onnx(model, (example,), dynamic_shapes=({1: seq},))
    assert [(match.kind, match.rewritten, match.target) for match in report.matches] == [("performer", True, "chunked")]
    _loop_and_no_cumsum(proto)
    for length in (24, 17):
        inputs = example[:, :length]
        with torch.no_grad():
            expected = model(inputs).numpy()
        (actual,) = _session(proto).run(None, {proto.graph.input[0].name: inputs.numpy()})
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-4, err_msg=f"L={length}")
    # No node, loop bodies included, outputs anything near B·H·L·M·Dv (M = 44 features, Dv = 16).
    context_bytes = 2 * 2 * 24 * model_features(model) * 16 * 4
    largest = _largest_node_output(proto, {proto.graph.input[0].name: example.numpy()}, tmp_path)
    assert largest < context_bytes / 4, (largest, context_bytes)


def model_features(model: torch.nn.Module) -> int:
    return next(m.nb_features for m in model.modules() if hasattr(m, "nb_features"))
