"""Static peak-activation estimate: hand-computed liveness peaks, O(n²) vs chunked scaling, Loops,
unknown sizes, and a model from torch's exporter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.kernels.onnx_chunked_attention import make_chunked_attention_model
from rewriter.tools.memory_estimate import (
    MemoryEstimate,
    estimate_peak_activation_bytes,
    format_bytes,
    sequence_dims,
)

MiB = 2**20
HEAD_DIM = 64


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _int64(name, value):
    return numpy_helper.from_array(np.array(value, np.int64), name)


def _naive_attention(heads: int = 2) -> onnx.ModelProto:
    """q,k,v (batch, heads, seq, d): Transpose → MatMul → Mul(scale) → Softmax → MatMul."""
    shape = ["batch", heads, "seq", HEAD_DIM]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], name="transpose", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale"),
             helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["out"], name="pv")]
    scale = numpy_helper.from_array(np.array(0.125, np.float32), "scale")
    return _model(nodes, [_float(x, shape) for x in "qkv"], [_float("out", shape)], [scale])


def _loop_attention(block: int) -> onnx.ModelProto:
    """q,k,v (seq, d); a Loop over query blocks: Slice(q, i·block) → MatMul → Softmax → MatMul."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["i", "block"], ["start0"]),
         helper.make_node("Unsqueeze", ["start0", "zero_axis"], ["start"]),
         helper.make_node("Add", ["start", "block"], ["end"]),
         helper.make_node("Slice", ["q", "start", "end", "zero_axis"], ["qb"]),
         helper.make_node("MatMul", ["qb", "kt"], ["s"], name="block_scores"),
         helper.make_node("Softmax", ["s"], ["p"], name="block_softmax", axis=-1),
         helper.make_node("MatMul", ["p", "v"], ["ob"], name="block_out"),
         helper.make_node("Identity", ["cond"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _float("ob", None)])
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
             helper.make_node("Shape", ["q"], ["q_shape"]),
             helper.make_node("Gather", ["q_shape", "zero"], ["q_len"]),
             helper.make_node("Div", ["q_len", "block"], ["n_blocks"]),
             helper.make_node("Loop", ["n_blocks", ""], ["blocks"], name="query_loop", body=body),
             helper.make_node("Reshape", ["blocks", "out_shape"], ["out"])]
    consts = [_int64("block", block), _int64("zero", 0), _int64("zero_axis", [0]), _int64("out_shape", [-1, HEAD_DIM])]
    return _model(nodes, [_float(x, ["seq", HEAD_DIM]) for x in "qkv"], [_float("out", ["seq", HEAD_DIM])], consts)


def test_naive_attention_peak_is_two_score_matrices():
    n, heads = 1024, 2
    estimate = estimate_peak_activation_bytes(_naive_attention(heads), {"seq": n})
    scores = heads * n * n * 4
    # kt dies at the MatMul; at the Mul, scores and scaled scores are both alive.
    assert estimate == MemoryEstimate(peak_bytes=2 * scores, peak_node="scale", unknown_values=0)
    assert estimate.peak_bytes >= scores


def test_unsorted_nodes_are_sorted_before_the_sweep():
    model = _naive_attention()
    reference = estimate_peak_activation_bytes(model, {"seq": 1024})
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # consumers before producers: the checker would refuse it
    assert estimate_peak_activation_bytes(model, {"seq": 1024}) == reference


def test_a_cycle_is_refused():
    model = _naive_attention()
    model.graph.node[0].input[0] = "out"  # Transpose reads the graph's own output
    with pytest.raises(ValueError, match="cycle"):
        estimate_peak_activation_bytes(model, {"seq": 8})


def test_naive_attention_grows_quadratically():
    model = _naive_attention()
    small, large = (estimate_peak_activation_bytes(model, {"seq": n}).peak_bytes for n in (1024, 2048))
    assert large / small == pytest.approx(4, rel=0.01)


def test_loop_counts_one_block_not_the_score_matrix():
    n, block = 1024, 128
    model = _loop_attention(block)
    estimate = estimate_peak_activation_bytes(model, sequence_dims(model, n))
    kt = stacked_blocks = n * HEAD_DIM * 4
    block_scores = block * n * 4
    # Outer: kt (read inside the body) and the stacked Loop output; body: scores + probabilities
    # (+ the 1-byte loop condition).
    assert estimate.peak_bytes == pytest.approx(kt + stacked_blocks + 2 * block_scores, abs=16)
    assert estimate.peak_bytes < n * n * 4
    assert estimate.peak_node == "query_loop > block_softmax"
    assert estimate.unknown_values == 0
    double = estimate_peak_activation_bytes(model, sequence_dims(model, 2 * n)).peak_bytes
    assert double / estimate.peak_bytes == pytest.approx(2, rel=0.01)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_attention_rewrite_is_sized_by_its_blocks(causal):
    heads, n, q_chunk, k_chunk = 2, 4096, 256, 512
    model = make_chunked_attention_model(num_heads=heads, num_kv_heads=heads, head_dim=HEAD_DIM, scale=0.125,
                                         q_chunk=q_chunk, k_chunk=k_chunk, causal=causal)
    before = model.SerializeToString()
    estimate = estimate_peak_activation_bytes(model, sequence_dims(model, n))
    assert model.SerializeToString() == before
    assert estimate.unknown_values == 0
    block = heads * q_chunk * k_chunk * 4
    assert 2 * block <= estimate.peak_bytes < 16 * MiB < heads * n * n * 4
    assert estimate.peak_node.count(" > ") >= 2  # inside the key loop, inside the query loop


def test_unknown_sizes_count_zero_and_are_reported():
    nodes = [helper.make_node("NonZero", ["x"], ["where"]),  # data-dependent length
             helper.make_node("Cast", ["where"], ["out"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["x"], ["y"])]
    model = _model(nodes, [_float("x", [None, "seq"])], [_float("out", [1, None]), _float("y", [None, "seq"])])
    estimate = estimate_peak_activation_bytes(model, {"seq": 100}, default_dim=3)
    assert estimate.unknown_values == 2
    assert "2 values of unknown size" in str(estimate)
    assert estimate.peak_bytes == 3 * 100 * 4  # only y, with the unnamed dim bound to default_dim


def test_misnamed_dim_warns_and_takes_the_default(caplog):
    with caplog.at_level("WARNING", logger="rewriter.tools.memory_estimate"):
        estimate = estimate_peak_activation_bytes(_naive_attention(), {"seq_len": 4096})
    assert "seq_len" in caplog.text
    assert estimate.peak_bytes == 2 * HEAD_DIM * 4 + 2 * 4  # seq = default_dim = 1: kᵀ and 1×1 scores, 2 heads


def test_sequence_dims_picks_length_like_names():
    shape = ["batch", "q_len", "past_sequence_length", "num_tokens", "heads"]
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_float("x", shape)], [_float("y", shape)])
    assert sequence_dims(model, 7) == {"num_tokens": 7, "past_sequence_length": 7, "q_len": 7}


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (int(12.3 * MiB), "12.3 MiB"), (4 * 2**30, "4.0 GiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_torch_exported_attention():
    torch = pytest.importorskip("torch")

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    seq = torch.export.Dim("seq", min=2, max=8192)
    program = torch.onnx.export(Attention().eval(), (q, k, v), dynamo=True, verbose=False,
                                dynamic_shapes={name: {2: seq} for name in "qkv"})
    model = program.model_proto
    assert sequence_dims(model, 1) == {"seq": 1}
    estimate = estimate_peak_activation_bytes(model, sequence_dims(model, 1024))
    assert estimate.unknown_values == 0
    assert estimate.peak_bytes >= 2 * 1024 * 1024 * 4
    assert estimate.peak_bytes == pytest.approx(2 * 2 * 1024 * 1024 * 4, rel=0.05)


def _estimate_with_onnxscript_folder(model: onnx.ModelProto, dims: dict[str, int]) -> MemoryEstimate:
    """The estimate as it was made before `shape_arithmetic`: the same steps, with onnxscript's constant
    folder (and its node-by-node shape inference) folding the integer tensors."""
    import onnx_ir as ir
    import onnxscript.optimizer

    from rewriter.tools import memory_estimate

    work = ir.from_proto(model)
    work.graph.sort()
    memory_estimate._bind_inputs(work.graph, dims, 1)
    memory_estimate._pin_first_iteration(work.graph)
    work = memory_estimate._infer_shapes(work)
    integer = {ir.DataType.INT64, ir.DataType.INT32}
    for _ in range(memory_estimate._MAX_ROUNDS):
        onnxscript.optimizer.fold_constants(work, onnx_shape_inference=True, should_fold=lambda node: (
            None if node.outputs and all(v.dtype in integer for v in node.outputs) else False))
        if not memory_estimate._seed_loop_shapes(work.graph):
            break
    unknown = set()
    peak, node = memory_estimate._graph_peak(work.graph, unknown, count_inputs=False)
    return MemoryEstimate(peak, node, len(unknown))


@pytest.mark.parametrize("options", [{}, {"causal": "trilu"}, {"mask": "padding"}, {"causal": "range", "mask": "bias"},
                                     {"kv_heads": 1, "heads": 4}, {"rank": 3}])
@pytest.mark.parametrize("rewritten", [False, True])
def test_figures_are_those_of_onnxscript_folding(options, rewritten):
    """Folding shape arithmetic without onnxscript (it costs a sixth of a second of `rewriter inspect`)
    gives the figures onnxscript's folder gave: peak, peak node and unknown count, before and after the
    chunked rewrite (nested Loops, score programs), at a length that is not a multiple of the blocks."""
    import rewriter
    from onnx_builders import attention_model

    model = attention_model(**options)
    if rewritten:
        model, report = rewriter.optimize_onnx(model, target="chunked")
        assert all(match.rewritten for match in report.matches)
    for n in (1000, 4096):
        dims = sequence_dims(model, n)
        estimate = estimate_peak_activation_bytes(model, dims)
        assert estimate == _estimate_with_onnxscript_folder(model, dims)
        assert estimate.unknown_values == 0
