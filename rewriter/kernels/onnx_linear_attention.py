"""Exact linear (Performer / FAVOR+) attention as a subgraph of standard ONNX ops (opset 13+).

Semantics are those of `torch.ops.rewriter.linear_attention`'s forward (`rewriter.kernels.
linear_attention`): φ is formed from q, k and the (M, D) projection Ω one slice of `slice_size`
positions at a time, and what crosses slices is only the state (Σφ(k)vᵀ | Σφ(k)), (M, Dv + 1) per
(batch, kv head); v gets a column of ones so that numerator and denominator come out of one
product. Query heads are grouped as (B, Hkv, G, L, D) against (B, Hkv, 1, L, D) keys, so grouped
K/V heads are never expanded. Nothing of size L × M × Dv (nor L × M) is formed::

    s = min(slice_size, L)        n = ceil(L / s)         i-th slice: rows i·s : min(i·s + s, L)
    favor_softmax only:  Loop i < n  carries kmax = −∞:  kmax = max(kmax, max over the slice of c·k·Ωᵀ)
    bidirectional:       Loop i < n  carries state = 0:  state += φ(k_i)ᵀ·[v_i | 1]
                         Loop i < n  scan: num = φ(q_i)·state
    causal:              Loop i < n  carries state = 0, scan:
                         num = φ(q_i)·state + Trilu(φ(q_i)·φ(k_i)ᵀ)·[v_i | 1]   state += φ(k_i)ᵀ·[v_i | 1]
    out block = num[:, :Dv] / (num[:, Dv:] + normalizer_epsilon), padded to s rows
    (the state's Σφ(k) column starts at `key_sum_epsilon`, not 0: φ(q)·(Σφ(k) + ε))
    (n, B,Hkv,G,s,Dv) ─Transpose─Reshape→ (B,H,n·s,Dv) ─Slice(:L)→ out (B,H,L,Dv)

`target="ort"` (causal only) instead feeds φ(Q), φ(K) (formed whole: L × M per head) and [v | 1]
to ONNX Runtime's `com.microsoft.LinearAttention` (update_rule "linear", scale 1), whose CPU
kernel carries the (M, Dv + 1) state without materialising L × M × Dv (measured on ORT 1.32:
extra peak = its (B, L, H·(Dv + 1)) output).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from rewriter.kernels import FEATURE_MAPS
from rewriter.kernels.onnx_emitter import Emitter, standalone_model, typed

__all__ = ["LINEAR_TARGETS", "build_linear_attention", "make_linear_attention_model"]

logger = logging.getLogger(__name__)

LINEAR_TARGETS = ("chunked", "ort")
_INT64, _BOOL = ir.DataType.INT64, ir.DataType.BOOL


class _LinearBuilder:
    """Options, and the outer-scope values (constants, lengths, grouped operands) the loop bodies read."""

    def __init__(self, emit: Emitter, q, k, v, projection, *, feature_map: str, data_scale: float,
                 epsilon: float, normalizer_epsilon: float, slice_size: int, key_sum_epsilon: float = 0.0):
        e = self.e = emit
        self.dtype = ir.DataType.DOUBLE if q.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
        self.np_dtype = self.dtype.numpy()
        self.kind, self.out_dtype = feature_map, q.dtype
        self.data_scale, self.epsilon, self.normalizer_epsilon = data_scale, epsilon, normalizer_epsilon
        self.key_sum_epsilon = key_sum_epsilon
        self.zero, self.one = e.const([0]), e.const([1])
        self.q, self.k, self.v = q, k, v
        self.projection_t = None if projection is None else e("Transpose", self.cast(e, projection), perm=[1, 0])
        self.ratio = self._feature_ratio(projection) if feature_map == "favor_softmax" else None
        self.length = e.shape(q, start=2, end=3)
        self.slice = e("Max", e("Min", self.length, e.const([slice_size])), self.one)
        self.n_slices = e("Squeeze", e("Div", e("Sub", e("Add", self.length, self.slice), self.one), self.slice))

    def const(self, value) -> ir.Value:
        return self.e.const(value, self.np_dtype)

    def cast(self, e: Emitter, x: ir.Value) -> ir.Value:
        return x if x.dtype == self.dtype else e("Cast", x, to=self.dtype)

    def feature_count(self, e: Emitter) -> ir.Value:
        """[M], from the projection (or D without one)."""
        return e.shape(self.projection_t, start=1) if self.projection_t is not None else e.shape(self.k, start=3)

    # ----------------------------------------------------------------------- feature maps

    def pre_activation(self, e: Emitter, x: ir.Value) -> ir.Value:
        """c·x·Ωᵀ (or c·x without a projection) of rows x in the compute dtype."""
        a = e("Mul", x, self.const(self.data_scale))
        return a if self.projection_t is None else e("MatMul", a, self.projection_t)

    def features(self, e: Emitter, x: ir.Value, key_max: ir.Value | None = None,
                 a: ir.Value | None = None) -> ir.Value:
        """φ(x) row by row; `key_max` is the FAVOR+ key stabiliser (queries use their row max)."""
        a = self.pre_activation(e, x) if a is None else a
        if self.kind == "relu":
            return e("Add", e("Relu", a), self.const(self.epsilon))
        if self.kind == "identity":
            return e("Add", a, self.const(self.epsilon))
        if self.kind == "elu_plus_one":
            return e("Add", e("Add", e("Elu", a, alpha=1.0), self.const(1.0)), self.const(self.epsilon))
        sum_sq = e("ReduceSum", e("Mul", x, x), e.const([-1]), keepdims=1)
        diag = e("Mul", e("Div", sum_sq, self.const(2.0)), self.const(self.data_scale**2))
        stab = e.reduce_max(a, [-1]) if key_max is None else key_max
        exp = e("Exp", e("Sub", e("Sub", a, diag), stab))
        return e("Mul", e("Add", exp, self.const(self.epsilon)), self.ratio)

    # ----------------------------------------------------------------------- operands

    def grouped(self, x: ir.Value, is_query: bool) -> ir.Value:
        """(B, H, L, ·) as (B, Hkv, G, L, ·) for queries, (B, Hkv, 1, L, ·) for keys and values."""
        e = self.e
        if not is_query:
            return e("Unsqueeze", x, e.const([2]))
        split = e("Concat", e.shape(x, end=1), e.shape(self.k, start=1, end=2), e.const([-1]),
                  e.shape(x, start=2), axis=0)
        return e("Reshape", x, split)

    def block(self, e: Emitter, x: ir.Value, start: ir.Value, stop: ir.Value) -> ir.Value:
        return self.cast(e, e("Slice", x, start, stop, e.const([3])))

    def with_ones(self, e: Emitter, v_block: ir.Value, rank: int = 5, fill: float = 1.0) -> ir.Value:
        """[v | 1] (or [v | fill]): numerator and denominator from one product.

        Pads are spelled out for every axis: ORT 1.32's transpose optimizer mis-permutes a Pad's
        `axes` input when it moves a Transpose (from the model's head split) through the Pad.
        """
        return e("Pad", v_block, e.const([0] * (2 * rank - 1) + [1]), self.const(fill))

    def bounds(self, e: Emitter, i: ir.Value) -> tuple[ir.Value, ir.Value]:
        start = e("Mul", i, self.slice)
        return start, e("Min", e("Add", start, self.slice), self.length)

    def rows_out(self, e: Emitter, num: ir.Value, start, stop) -> ir.Value:
        """num[:, :Dv] / (num[:, Dv:] + normalizer_epsilon) in the output dtype, padded to s rows."""
        minus_one, last = e.const([-1]), e.const([np.iinfo(np.int64).max])
        den = e("Add", e("Slice", num, minus_one, last, minus_one), self.const(self.normalizer_epsilon))
        rows = e("Div", e("Slice", num, self.zero, minus_one, minus_one), den)
        if self.out_dtype != self.dtype:
            rows = e("Cast", rows, to=self.out_dtype)
        pads = e("Concat", e.const([0] * 8), e("Sub", self.slice, e("Sub", stop, start)), self.zero, axis=0)
        return typed(e("Pad", rows, pads), self.out_dtype)

    # ----------------------------------------------------------------------- loops

    def body(self) -> tuple[Emitter, ir.Value, ir.Value]:
        b = self.e.subgraph()
        return b, ir.val(b.name("i"), _INT64, []), ir.val(b.name("cond"), _BOOL, [])

    def key_max(self, kg: ir.Value) -> ir.Value:
        """(B, Hkv, 1, 1, 1) max of c·k·Ωᵀ over all positions and features, one slice at a time."""
        e = self.e
        b, i, cond = self.body()
        running = ir.val(b.name("key_max"), self.dtype, [None] * 5)
        a = self.pre_activation(b, self.block(b, kg, *self.bounds(b, i)))
        new = b("Max", running, b.reduce_max(a, [-2, -1]))
        graph = b.graph([i, cond, running], [typed(b("Identity", cond), _BOOL), typed(new, self.dtype)], "key_max")
        shape = e("Concat", e.shape(kg, end=2), e.const([1, 1, 1]), axis=0)
        start = e("ConstantOfShape", shape, value=ir.tensor(np.array([-np.inf], self.np_dtype)))
        return e("Loop", self.n_slices, None, start, body=graph)

    def zero_state(self, kg: ir.Value) -> ir.Value:
        """The state before any key: zeros, and `key_sum_epsilon` in the Σφ(k) column."""
        e = self.e
        shape = e("Concat", e.shape(kg, end=3), self.feature_count(e), e.shape(self.v, start=3), axis=0)
        zeros = e("ConstantOfShape", shape, value=ir.tensor(np.array([0.0], self.np_dtype)))
        return self.with_ones(e, zeros, fill=self.key_sum_epsilon)

    def key_state(self, kg, vg, key_max) -> ir.Value:
        """Bidirectional: Σ over all slices of φ(k)ᵀ·[v | 1]."""
        b, i, cond = self.body()
        state = ir.val(b.name("state"), self.dtype, [None] * 5)
        start, stop = self.bounds(b, i)
        phi_k = self.features(b, self.block(b, kg, start, stop), key_max)
        vb = self.with_ones(b, self.block(b, vg, start, stop))
        new = b("Add", state, b("MatMul", b("Transpose", phi_k, perm=[0, 1, 2, 4, 3]), vb))
        graph = b.graph([i, cond, state], [typed(b("Identity", cond), _BOOL), typed(new, self.dtype)], "key_state")
        return self.e("Loop", self.n_slices, None, self.zero_state(kg), body=graph)

    def output_loop(self, qg, kg, vg, key_max, state: ir.Value | None) -> ir.Value:
        """Output blocks (n, B, Hkv, G, s, Dv); causal when `state` is None (it is carried from zero)."""
        b, i, cond = self.body()
        start, stop = self.bounds(b, i)
        phi_q = self.features(b, self.block(b, qg, start, stop))
        carried = []
        if state is None:
            running = ir.val(b.name("state"), self.dtype, [None] * 5)
            phi_k = self.features(b, self.block(b, kg, start, stop), key_max)
            vb = self.with_ones(b, self.block(b, vg, start, stop))
            phi_k_t = b("Transpose", phi_k, perm=[0, 1, 2, 4, 3])
            scores = b.lower_triangle(b("MatMul", phi_q, phi_k_t), self.dtype)  # keys after the query: 0
            num = b("Add", b("MatMul", phi_q, running), b("MatMul", scores, vb))
            new = b("Add", running, b("MatMul", phi_k_t, vb))
            carried = [(running, typed(new, self.dtype))]
        else:
            num = b("MatMul", phi_q, state)
        rows = self.rows_out(b, num, start, stop)
        outputs = [typed(b("Identity", cond), _BOOL), *(new for _, new in carried), rows]
        graph = b.graph([i, cond, *(old for old, _ in carried)], outputs, "linear_slice")
        initial = [self.zero_state(kg)] if state is None else []
        results = self.e("Loop", self.n_slices, None, *initial, body=graph, outputs=1 + len(initial))
        return results[-1] if initial else results

    def build(self, causal: bool) -> ir.Value:
        e = self.e
        qg, kg, vg = self.grouped(self.q, True), self.grouped(self.k, False), self.grouped(self.v, False)
        key_max = self.key_max(kg) if self.kind == "favor_softmax" else None
        state = None if causal else self.key_state(kg, vg, key_max)
        blocks = self.output_loop(qg, kg, vg, key_max, state)
        out_shape = e("Concat", e.shape(self.q, end=2), e.const([-1]), e.shape(self.v, start=3), axis=0)
        out = e("Reshape", e("Transpose", blocks, perm=[1, 2, 3, 0, 4, 5]), out_shape)
        return e("Slice", out, self.zero, self.length, e.const([2]))

    def _feature_ratio(self, projection: ir.Value) -> ir.Value:
        """M^-½, a constant when the projection's shape says M."""
        rows = projection.shape[0] if projection.shape is not None and len(projection.shape) == 2 else None
        if isinstance(rows, int):
            return self.const(rows**-0.5)
        e = self.e
        return e("Reciprocal", e("Sqrt", e("Cast", self.feature_count(e), to=self.dtype)))

    def build_ort(self, heads: int, kv_heads: int) -> ir.Value:
        """Causal: com.microsoft.LinearAttention on φ(Q), φ(K), [v | 1] packed as (B, L, heads · ·)."""
        e = self.e
        k = self.cast(e, self.k)
        key_pre = self.pre_activation(e, k)
        key_max = e.reduce_max(key_pre, [-2, -1]) if self.kind == "favor_softmax" else None
        phi_k = self.features(e, k, key_max, a=key_pre)
        phi_q = self.features(e, self.cast(e, self.q))
        v = self.with_ones(e, self.cast(e, self.v), rank=4)

        def packed(x: ir.Value) -> ir.Value:
            return e("Reshape", e("Transpose", x, perm=[0, 2, 1, 3]), e.const([0, 0, -1]))

        name = e.name("LinearAttention")
        num, _state = e.tape.op_multi_out(
            "LinearAttention", [packed(phi_q), packed(phi_k), packed(v)],
            {"q_num_heads": heads, "kv_num_heads": kv_heads, "scale": 1.0, "update_rule": "linear"},
            outputs=[ir.Value(name=f"{name}_{i}") for i in range(2)], domain="com.microsoft", name=name)
        num = e("Transpose", e("Reshape", num, e.const([0, 0, heads, -1])), perm=[0, 2, 1, 3])
        minus_one, last = e.const([-1]), e.const([np.iinfo(np.int64).max])
        den = e("Add", e("Slice", num, minus_one, last, minus_one), self.const(self.normalizer_epsilon))
        if self.key_sum_epsilon:  # φ(q)·(Σφ(k) + ε) = φ(q)·Σφ(k) + ε·Σφ(q)
            added = e("ReduceSum", phi_q, e.const([-1]), keepdims=1)
            den = e("Add", den, e("Mul", added, self.const(self.key_sum_epsilon)))
        out = e("Div", e("Slice", num, self.zero, minus_one, minus_one), den)
        return out if self.out_dtype == self.dtype else e("Cast", out, to=self.out_dtype)


def _static_heads(x: ir.Value, role: str) -> int:
    heads = x.shape[1] if x.shape is not None and len(x.shape) == 4 else None
    if not isinstance(heads, int):
        raise ValueError(f"target 'ort' needs a static head count for {role}, got shape {x.shape}")
    return heads


def build_linear_attention(tape: ir.tape.Tape, q: ir.Value, k: ir.Value, v: ir.Value, projection: ir.Value | None, *,
                           feature_map: str, causal: bool, data_scale: float, epsilon: float,
                           normalizer_epsilon: float, slice_size: int, name: str = "linear_attention",
                           target: str = "chunked", key_sum_epsilon: float = 0.0, opset: int = 18) -> ir.Value:
    """Append linear attention over q (B,H,L,D), k (B,Hkv,L,D), v (B,Hkv,L,Dv) to `tape`; returns out (B,H,L,Dv).

    `projection` is the (M, D) random-feature matrix Ω, or None for "relu" / "elu_plus_one" /
    "identity" applied to c·x directly. Arithmetic is in fp32 (float64 for double q); the output has q's dtype. Batch
    and length may be symbolic. `target="ort"` (causal only) uses `com.microsoft.LinearAttention`
    and needs static head counts. `key_sum_epsilon` is added to every (prefix-)summed key feature
    of the normaliser (performer-pytorch's `k_cumsum + eps`). Values are named `<name>/...`, so `name` must be unique.
    """
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature map {feature_map!r} is not one of {', '.join(FEATURE_MAPS)}")
    if feature_map == "favor_softmax" and projection is None:
        raise ValueError("feature map 'favor_softmax' needs a projection")
    if slice_size < 1:
        raise ValueError(f"slice_size must be positive, got {slice_size}")
    if target not in LINEAR_TARGETS:
        raise ValueError(f"target must be one of {LINEAR_TARGETS}, got {target!r}")
    if target == "ort" and not causal:
        raise ValueError("target 'ort' (com.microsoft.LinearAttention) computes causal linear attention only")
    if q.dtype is None or not q.dtype.is_floating_point():
        raise ValueError(f"q must be floating point, got {q.dtype}")
    logger.debug("linear attention %s: %s, causal=%s, slice %d, target %s", name, feature_map, causal, slice_size, target)
    builder = _LinearBuilder(Emitter(tape, name, opset=opset), q, k, v, projection, feature_map=feature_map, data_scale=data_scale,
                             epsilon=epsilon, normalizer_epsilon=normalizer_epsilon, slice_size=slice_size,
                             key_sum_epsilon=key_sum_epsilon)
    if target == "ort":
        out = builder.build_ort(_static_heads(q, "q"), _static_heads(k, "k"))
    else:
        out = builder.build(causal)
    out.dtype = q.dtype
    if q.shape is not None and v.shape is not None:
        out.shape = ir.Shape([q.shape[0], q.shape[1], q.shape[2], v.shape[3]])
    return out


def make_linear_attention_model(*, num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
                                features: int | None = None, dtype: ir.DataType = ir.DataType.FLOAT,
                                opset: int = 18, **options) -> onnx.ModelProto:
    """A standalone model: inputs q, k, v (+ projection (features, head_dim) when `features`), output `out`.

    Batch is the symbolic dim "batch", the sequence length "seq_len". `options` are the keywords
    of `build_linear_attention`.
    """
    q = ir.val("q", dtype, ["batch", num_heads, "seq_len", head_dim])
    k = ir.val("k", dtype, ["batch", num_kv_heads, "seq_len", head_dim])
    v = ir.val("v", dtype, ["batch", num_kv_heads, "seq_len", v_head_dim or head_dim])
    projection = None if features is None else ir.val("projection", dtype, [features, head_dim])
    tape = ir.tape.Tape()
    out = build_linear_attention(tape, q, k, v, projection, opset=opset, **options)
    imports = {"": opset, **({"com.microsoft": 1} if options.get("target") == "ort" else {})}
    return standalone_model((q, k, v, projection), out, tape, "linear_attention", imports)
