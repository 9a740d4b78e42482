"""Hand-built ONNX attention graphs (onnx.helper) and the checks the ONNX tests share.

`GraphBuilder` writes nodes the way exporters and ORT's optimizer do; `attention_model` composes
one attention block from named variants (layout, how Kᵀ is made, scale, mask, causal mask, grouped
heads, casts), so each test names the variant it checks instead of copying a graph. `assert_parity`
runs the original and the rewritten model on ONNX Runtime and compares every output.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import rewriter.onnx_api as onnx_api

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL,
               np.dtype(np.int32): TensorProto.INT32}


class GraphBuilder:
    """Nodes, inputs and initializers of one graph; `op` returns the output name(s)."""

    def __init__(self, name: str = "g", float_type=np.float32):
        self.name, self.float_type = name, float_type
        self.nodes, self.inputs, self.initializers = [], [], []
        self._ids = itertools.count()

    def input(self, name: str, elem_type: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def const(self, value, dtype=np.float32) -> str:
        name = f"const_{next(self._ids)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def fconst(self, value) -> str:
        """A constant of the graph's float type."""
        return self.const(value, self.float_type)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        base = f"{op_type.lower()}_{next(self._ids)}"
        names = [base] if outputs == 1 else [f"{base}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=base, domain=domain or None, **attrs))
        return names[0] if outputs == 1 else names

    def graph(self, outputs: list[tuple[str, list]], elem_type=None) -> onnx.GraphProto:
        """`outputs`: (name, shape) pairs."""
        elem_type = elem_type or _NP_TO_ONNX[np.dtype(self.float_type)]
        infos = [helper.make_tensor_value_info(name, elem_type, shape) for name, shape in outputs]
        return helper.make_graph(self.nodes, self.name, self.inputs, infos, self.initializers)

    def model(self, outputs: list[tuple[str, list]], opset: int = 18, extra_opsets=()) -> onnx.ModelProto:
        imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        model = helper.make_model(self.graph(outputs), opset_imports=imports)
        model.ir_version = min(model.ir_version, 10 if opset < 23 else 11)
        return model


def attention_model(*, heads=2, kv_heads=None, head_dim=8, q_len="q_len", k_len=None, rank=4, kt="transpose",
                    scale="div", mask=None, causal=None, gqa="expand", upcast=False, log_softmax=False,
                    softmax_axis=-1, opset=18, scores_extra_user=False, probs_extra_user=False,
                    dropout=None, product="matmul", float_type=np.float32) -> onnx.ModelProto:
    """One attention block over inputs q, k, v (and `mask` inputs) with output `out`.

    rank 4: q (batch, heads, q_len, d); rank 3: q (batch·heads, q_len, d) — fused heads.
    kt: "transpose" (Transpose(0,1,3,2)), "permute" (K given as (B, L, H, D), Transpose(0,2,3,1)),
    "input" (K given already transposed), "reshape" (torch's Reshape/Transpose/Reshape).
    scale: "div" (÷√d), "mul" (×0.3), "qk" (×√0.3 on Q and on Kᵀ), "vector" (× a per-key
    constant: a near-miss), None.
    mask: "bias", "padding" ((1−m)·−10000 from an int64 mask), "where_inf", "where_min"
    (Where(bool mask, S, fill)), "negated" (Sub(bias, S): a near-miss).
    causal: "trilu" (Trilu of ones, Where −inf), "range" (Range/LessOrEqual keep mask), "bias"
    (constant additive −inf buffer sliced to the lengths).
    gqa: how K/V are repeated when kv_heads < heads: "expand" (Unsqueeze/Expand/Reshape), "tile".
    dropout: "eval" / "train": a Dropout on the probabilities with training_mode false / true.
    product: "matmul", or "einsum" (rank 4: Einsum over K itself, no transpose).
    float_type: of the inputs, output and float constants.
    """
    b = GraphBuilder(float_type=float_type)
    elem = _NP_TO_ONNX[np.dtype(float_type)]
    k_len = k_len or q_len
    kv_heads = kv_heads or heads
    lead = ["batch", heads] if rank == 4 else ["batch_heads"]
    kv_lead = ["batch", kv_heads] if rank == 4 else ["batch_heads"]
    q = b.input("q", elem, lead + [q_len, head_dim])
    if kt == "input":
        k = b.input("k", elem, kv_lead + [head_dim, k_len])
    elif kt == "permute":
        k = b.input("k", elem, ["batch", k_len, kv_heads, head_dim])
    else:
        k = b.input("k", elem, kv_lead + [k_len, head_dim])
    v = b.input("v", elem, kv_lead + [k_len, head_dim])
    if kt == "permute":
        k = b.op("Transpose", k, perm=[0, 2, 1, 3])
    if kv_heads != heads:
        k, v = (_repeat_heads(b, x, heads // kv_heads, gqa, transposed=kt == "input" and x is k) for x in (k, v))
    if product == "einsum":
        kt_value = k
    elif kt in ("transpose", "permute"):
        kt_value = b.op("Transpose", k, perm=list(range(rank - 2)) + [rank - 1, rank - 2])
    elif kt == "reshape":
        shape = b.op("Shape", k)
        merged = b.op("Concat", b.const([-1], np.int64), b.op("Slice", shape, b.const([-2], np.int64),
                                                              b.const([10], np.int64)), axis=0)
        flat = b.op("Transpose", b.op("Reshape", k, merged), perm=[0, 2, 1])
        back = b.op("Concat", b.op("Slice", shape, b.const([0], np.int64), b.const([-2], np.int64)),
                    b.op("Slice", shape, b.const([-1], np.int64), b.const([10], np.int64)),
                    b.op("Slice", shape, b.const([-2], np.int64), b.const([-1], np.int64)), axis=0)
        kt_value = b.op("Reshape", flat, back)
    else:
        kt_value = k
    if scale == "qk":
        root = b.fconst(math.sqrt(0.3))
        q, kt_value = b.op("Mul", q, root), b.op("Mul", kt_value, root)
    if product == "einsum":
        scores = b.op("Einsum", q, kt_value, equation="bhqd,bhkd->bhqk")
    else:
        scores = b.op("MatMul", q, kt_value)
    outputs = []
    row_shape = lead + [q_len, 1]
    if scores_extra_user:
        outputs.append((b.op("ReduceSum", scores, b.const([-1], np.int64)), row_shape))
    if scale == "div":
        scores = b.op("Div", scores, b.fconst(math.sqrt(head_dim)))
    elif scale == "mul":
        scores = b.op("Mul", scores, b.fconst(0.3))
    elif scale == "vector":
        scores = b.op("Mul", scores, b.fconst(np.linspace(0.1, 0.5, 7)))
    scores = _apply_mask(b, scores, mask, rank, q_len, k_len)
    scores = _apply_causal(b, scores, causal, q, kt_value)
    if upcast:
        scores = b.op("Cast", scores, to=TensorProto.DOUBLE)
    if log_softmax:
        probs = b.op("Exp", b.op("LogSoftmax", scores, axis=softmax_axis))
    else:
        probs = b.op("Softmax", scores, axis=softmax_axis)
    if upcast:
        probs = b.op("Cast", probs, to=elem)
    if dropout:
        probs = b.op("Dropout", probs, b.fconst(0.1), b.const(dropout == "train", np.bool_))
    if probs_extra_user:
        outputs.append((b.op("ReduceMax", probs, b.const([-1], np.int64)), row_shape))
    if product == "einsum":
        b.op("Einsum", probs, v, equation="bhqk,bhkd->bhqd")
    else:
        b.op("MatMul", probs, v)
    b.nodes[-1].output[0] = "out"
    return b.model([("out", lead + [q_len, head_dim])] + outputs, opset=opset)


def _repeat_heads(b: GraphBuilder, x: str, groups: int, how: str, transposed: bool) -> str:
    shape = b.op("Shape", x)
    batch, kv_heads, rest = (b.op("Slice", shape, b.const([s], np.int64), b.const([e], np.int64))
                             for s, e in ((0, 1), (1, 2), (2, 4)))
    if how == "tile":
        return b.op("Tile", x, b.const([1, groups, 1, 1], np.int64))
    expanded = b.op("Expand", b.op("Unsqueeze", x, b.const([2], np.int64)),
                    b.op("Concat", batch, kv_heads, b.const([groups], np.int64), rest, axis=0))
    heads = b.op("Mul", kv_heads, b.const([groups], np.int64))
    return b.op("Reshape", expanded, b.op("Concat", batch, heads, rest, axis=0))


def _apply_mask(b: GraphBuilder, scores: str, mask, rank: int, q_len, k_len) -> str:
    if mask is None:
        return scores
    key_axis = ["batch", 1, 1, k_len] if rank == 4 else ["batch_heads", 1, k_len]
    if mask == "bias":
        bias = b.input("bias", _NP_TO_ONNX[np.dtype(b.float_type)], ["batch", 1, q_len, k_len] if rank == 4 else
                       ["batch_heads", q_len, k_len])
        return b.op("Add", scores, bias)
    if mask == "negated":
        bias = b.input("bias", _NP_TO_ONNX[np.dtype(b.float_type)], ["batch", 1, q_len, k_len])
        return b.op("Sub", bias, scores)
    if mask == "padding":
        ids = b.input("attention_mask", TensorProto.INT64, ["batch", k_len])
        extended = b.op("Cast", b.op("Unsqueeze", ids, b.const([1, 2], np.int64)),
                        to=_NP_TO_ONNX[np.dtype(b.float_type)])
        return b.op("Add", scores, b.op("Mul", b.op("Sub", b.fconst(1.0), extended), b.fconst(-10000.0)))
    keep = b.input("keep", TensorProto.BOOL, key_axis)
    fill = b.fconst(-np.inf if mask == "where_inf" else np.finfo(b.float_type).min)
    return b.op("Where", keep, scores, fill)


def _lengths(b: GraphBuilder, q: str, kt: str) -> tuple[str, str]:
    return (b.op("Shape", q, start=-2, end=-1), b.op("Shape", kt, start=-1))


def _apply_causal(b: GraphBuilder, scores: str, causal, q: str, kt: str) -> str:
    if causal is None:
        return scores
    q_len, k_len = _lengths(b, q, kt)
    if causal == "trilu":
        ones = b.op("Expand", b.const(1.0), b.op("Concat", q_len, k_len, axis=0))
        keep = b.op("Cast", b.op("Trilu", ones, upper=0), to=TensorProto.BOOL)
        return b.op("Where", keep, scores, b.fconst(-np.inf))
    if causal == "range":
        zero, one = b.const(0, np.int64), b.const(1, np.int64)
        rows = b.op("Unsqueeze", b.op("Range", zero, b.op("Squeeze", q_len), one), b.const([1], np.int64))
        cols = b.op("Range", zero, b.op("Squeeze", k_len), one)
        return b.op("Where", b.op("LessOrEqual", cols, rows), scores, b.fconst(-np.inf))
    if causal == "range_if_square":  # causal only while the query and key lengths are equal
        zero, one = b.const(0, np.int64), b.const(1, np.int64)
        rows = b.op("Unsqueeze", b.op("Range", zero, b.op("Squeeze", q_len), one), b.const([1], np.int64))
        cols = b.op("Range", zero, b.op("Squeeze", k_len), one)
        keep = b.op("Or", b.op("LessOrEqual", cols, rows), b.op("Not", b.op("Equal", q_len, k_len)))
        return b.op("Where", keep, scores, b.fconst(-np.inf))
    if causal == "bias":
        buffer = np.triu(np.full((64, 64), -np.inf, b.float_type), 1)
        rows = b.op("Slice", b.fconst(buffer), b.const([0], np.int64), q_len, b.const([0], np.int64))
        window = b.op("Slice", rows, b.const([0], np.int64), k_len, b.const([1], np.int64))
        return b.op("Add", scores, window)
    raise ValueError(causal)


def random_feeds(model: onnx.ModelProto, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for `model`: symbolic dims from `sizes`; masks keep most keys and key 0."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in model.graph.input:
        tensor = info.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param] for d in tensor.shape.dim]
        if tensor.elem_type == TensorProto.BOOL:
            value = rng.random(shape) < 0.75
            if value.ndim:
                value[..., 0] = True
        elif tensor.elem_type == TensorProto.INT64:
            value = (rng.random(shape) < 0.8).astype(np.int64)
            value[..., 0] = 1
            if "ids" in info.name:
                value = rng.integers(0, 90, shape)
        else:
            dtype = np.float16 if tensor.elem_type == TensorProto.FLOAT16 else np.float32
            value = rng.standard_normal(shape).astype(dtype)
        feeds[info.name] = value
    return feeds


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def check_valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


def assert_close(got: list[np.ndarray], want: list[np.ndarray], rtol=1e-4, atol=1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True)


def assert_parity(model: onnx.ModelProto, sizes_list, *, target: str, rewrites: int, **options):
    """Optimize for `target`, check `rewrites` blocks changed, then outputs at every size set."""
    optimized, report = onnx_api.optimize_onnx(model, target=target, **options)
    assert report.rewritten_count == rewrites, report.summary()
    if rewrites:
        check_valid(optimized)
    for seed, sizes in enumerate(sizes_list):
        feeds = random_feeds(model, sizes, seed)
        assert_close(run(optimized, feeds), run(model, feeds))
    return optimized, report


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def blocks_run(model: bytes, feeds: dict, tmp_path, name_part: str = "") -> int:
    """Key blocks the chunked Loops run, from ONNX Runtime's profile: it lists every node run inside
    Loop bodies, and a block runs two MatMuls (Q·Kᵀ and P·V). With `name_part`, only MatMuls whose
    name holds it count (the model's own projections are MatMuls too)."""
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "profile")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    with open(session.end_profiling()) as profile:
        events = json.load(profile)
    matmuls = sum(1 for event in events if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                  and "MatMul" in event["name"] and name_part in event["name"])
    assert matmuls % 2 == 0
    return matmuls // 2
