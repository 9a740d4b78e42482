"""ONNX detection and rewrite on hand-built graphs: variants, near-misses, fused nodes, subgraphs.

Every accepted variant is rewritten for every target that can compute it exactly and compared
with the original on ONNX Runtime at two sets of dynamic sizes; every near-miss is left untouched
with a reason a user can act on.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import rewriter.onnx_api as onnx_api
from onnx_builders import (
    GraphBuilder,
    assert_close,
    assert_parity,
    attention_model,
    check_valid,
    op_types,
    random_feeds,
    run,
)

SIZES = [dict(batch=2, batch_heads=4, q_len=5, k_len=7), dict(batch=1, batch_heads=2, q_len=9, k_len=6)]
ALL_TARGETS = ("chunked", "ort", "onnx-attention", "auto")
NOT_ORT = {"ort"}
NOT_ONNX_ATTENTION = {"onnx-attention"}

# (variant, expected spec fields, targets that must leave it alone)
VARIANTS = {
    "plain": (dict(), dict(scale=1 / math.sqrt(8)), set()),
    "k_permuted": (dict(kt="permute"), dict(k_layout="BLHD"), set()),
    "k_stored_transposed": (dict(kt="input"), dict(k_layout="BHDL"), set()),
    "k_reshape_chain": (dict(kt="reshape"), dict(k_layout="BHLD"), set()),
    "scale_mul": (dict(scale="mul"), dict(scale=0.3), set()),
    "scale_on_q_and_k": (dict(scale="qk"), dict(scale=0.3), set()),
    "unscaled": (dict(scale=None), dict(scale=1.0), set()),
    "additive_bias": (dict(mask="bias"), dict(mask_kind="additive"), NOT_ONNX_ATTENTION),
    "padding_10000": (dict(mask="padding"), dict(mask_kind="additive"), NOT_ONNX_ATTENTION),
    "where_inf": (dict(mask="where_inf"), dict(mask_kind="boolean"), NOT_ONNX_ATTENTION),
    "where_min": (dict(mask="where_min"), dict(mask_kind="boolean"), NOT_ONNX_ATTENTION),
    "causal_trilu": (dict(causal="trilu"), dict(causal=True, mask_kind="none"), set()),
    "causal_range": (dict(causal="range"), dict(causal=True, mask_kind="none"), set()),
    "causal_buffer": (dict(causal="bias"), dict(causal=True, mask_kind="none"), set()),
    "causal_and_padding": (dict(causal="trilu", mask="where_min"), dict(causal=True, mask_kind="boolean"),
                           NOT_ONNX_ATTENTION),
    "upcast": (dict(upcast=True), dict(), set()),
    "log_softmax_exp": (dict(log_softmax=True), dict(), set()),
    "eval_dropout": (dict(dropout="eval"), dict(), set()),
    "fused_heads_3d": (dict(rank=3), dict(q_layout="(BH)LD", num_heads=1), set()),
    "fused_heads_3d_bias": (dict(rank=3, mask="bias"), dict(mask_kind="additive"), NOT_ONNX_ATTENTION),
    "cross_attention": (dict(k_len="k_len"), dict(), set()),
    "cross_attention_causal": (dict(k_len="k_len", causal="range"), dict(causal=True), NOT_ORT),
    "gqa_expand": (dict(heads=4, kv_heads=2), dict(num_heads=4, num_kv_heads=2), set()),
    "mqa_stored_transposed": (dict(heads=4, kv_heads=1, kt="input"), dict(num_kv_heads=1), set()),
    "gqa_tile_kept_expanded": (dict(heads=4, kv_heads=2, gqa="tile"), dict(num_kv_heads=4), set()),
    "einsum": (dict(product="einsum", mask="where_min"), dict(k_layout="BHLD"), NOT_ONNX_ATTENTION),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_is_found_and_rewritten_exactly(name):
    kwargs, fields, refused = VARIANTS[name]
    model = attention_model(**kwargs)
    report = onnx_api.detect_onnx(model)
    assert len(report.matches) == 1 and report.matches[0].spec.accepted, report.summary()
    spec = report.matches[0].spec
    for field, expected in fields.items():
        got = getattr(spec, field)
        assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected, (field, got)
    for target in ALL_TARGETS:
        rewrites = 0 if target in refused else 1
        _, target_report = assert_parity(model, SIZES, target=target, rewrites=rewrites, chunk_size=(2, 3))
        if not rewrites:
            assert target_report.matches[0].reason, target_report.summary()


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_rows_whose_every_key_holds_a_finite_fill_average_v(target):
    """A finite fill (finfo.min) on every key of a row: the model averages V there; Attention-23 would
    give 0, so it is refused; every target that is taken keeps the average."""
    model = attention_model(mask="where_min")
    feeds = random_feeds(model, SIZES[0])
    feeds["keep"][0] = False  # batch 0: every key masked
    optimized, report = onnx_api.optimize_onnx(model, target=target, chunk_size=(2, 3))
    assert report.matches[0].rewritten == (target != "onnx-attention"), report.summary()
    if target == "onnx-attention":  # left alone, with what would rewrite it
        assert report.matches[0].reason.endswith("(--target auto) rewrites it as the chunked loop")
    assert_close(run(optimized, feeds), run(model, feeds))


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_half_precision_block(target):
    model = attention_model(float_type=np.float16, causal="trilu")
    optimized, report = onnx_api.optimize_onnx(model, target=target, chunk_size=(2, 3))
    assert report.rewritten_count == 1, report.summary()
    check_valid(optimized)
    feeds = random_feeds(model, SIZES[0])
    (got,), (want,) = run(optimized, feeds), run(model, feeds)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-2, atol=2e-3)


def test_targets_are_named_in_the_report():
    model = attention_model(mask="bias")
    names = {target: onnx_api.optimize_onnx(model, target=target)[1].matches[0].target
             for target in ("chunked", "ort")}
    assert names == {"chunked": "chunked", "ort": "com.microsoft.MultiHeadAttention"}
    assert onnx_api.optimize_onnx(attention_model(), target="onnx-attention")[1].matches[0].target == "Attention-23"


def test_auto_picks_multihead_attention_only_without_masks_on_cpu():
    unmasked, _ = onnx_api.optimize_onnx(attention_model(), target="auto")
    masked, _ = onnx_api.optimize_onnx(attention_model(causal="trilu"), target="auto")
    assert "MultiHeadAttention" in op_types(unmasked) and "Loop" not in op_types(unmasked)
    assert "Loop" in op_types(masked) and "MultiHeadAttention" not in op_types(masked)
    cuda, _ = onnx_api.optimize_onnx(attention_model(causal="trilu"), target="auto", provider="cuda")
    assert "MultiHeadAttention" in op_types(cuda)


NEAR_MISSES = {
    "softmax_over_queries": (dict(softmax_axis=-2), "softmax is not over the axis P·V contracts"),
    "softmax_over_heads": (dict(softmax_axis=1), "softmax is not over the key axis"),
    "scores_used_elsewhere": (dict(scores_extra_user=True), "has other users"),
    "probabilities_used_elsewhere": (dict(probs_extra_user=True), "attention probabilities"),
    "non_scalar_scale": (dict(scale="vector"), "non-scalar or non-constant"),
    "negated_scores": (dict(mask="negated"), "negates the scores"),
    "training_dropout": (dict(dropout="train"), "training mode"),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_miss_is_left_alone_with_reason(name):
    kwargs, reason = NEAR_MISSES[name]
    model = attention_model(**kwargs)
    report = onnx_api.detect_onnx(model)
    assert len(report.matches) == 1 and not report.matches[0].spec.accepted
    assert reason in report.matches[0].reason
    for target in ALL_TARGETS:
        optimized, target_report = onnx_api.optimize_onnx(model, target=target)
        assert target_report.rewritten_count == 0 and reason in target_report.matches[0].reason
        assert [n.name for n in optimized.graph.node] == [n.name for n in model.graph.node]


def test_a_mask_causal_only_at_equal_lengths_stays_a_mask():
    """Evaluated at distinct query and key lengths the mask is not causal: it is not the causal flag."""
    model = attention_model(causal="range_if_square", k_len="k_len")
    optimized, report = onnx_api.optimize_onnx(model, target="chunked", chunk_size=(2, 3))
    (match,) = report.matches
    assert match.rewritten and not match.causal and match.masked, report.summary()
    assert_close(run(optimized, random_feeds(model, SIZES[0])), run(model, random_feeds(model, SIZES[0])))


def test_softmax_without_products_is_not_a_candidate():
    b = GraphBuilder()
    x = b.input("x", TensorProto.FLOAT, ["n", 5])
    b.op("Softmax", x, axis=-1)
    b.nodes[-1].output[0] = "y"
    assert onnx_api.detect_onnx(b.model([("y", ["n", 5])])).matches == []


def test_classifier_softmax_is_not_a_candidate():
    b = GraphBuilder()
    x = b.input("x", TensorProto.FLOAT, ["n", 16])
    b.op("Softmax", b.op("MatMul", x, b.const(np.ones((16, 4)))), axis=-1)
    b.nodes[-1].output[0] = "y"
    assert onnx_api.detect_onnx(b.model([("y", ["n", 4])])).matches == []


def _stacked_model() -> onnx.ModelProto:
    """attention(attention(q, kv, kv), kv, kv): the second block's Q is the first block's output."""
    b = GraphBuilder()
    q = b.input("q", TensorProto.FLOAT, ["batch", 2, "q_len", 8])
    kv = b.input("kv", TensorProto.FLOAT, ["batch", 2, "k_len", 8])
    kt = b.op("Transpose", kv, perm=[0, 1, 3, 2])
    for _ in range(2):
        scores = b.op("Mul", b.op("MatMul", q, kt), b.const(0.35))
        q = b.op("MatMul", b.op("Softmax", scores, axis=-1), kv)
    b.nodes[-1].output[0] = "out"
    return b.model([("out", ["batch", 2, "q_len", 8])])


@pytest.mark.parametrize("target", ["chunked", "ort"])
def test_stacked_blocks_follow_earlier_rewrites(target):
    assert_parity(_stacked_model(), SIZES, target=target, rewrites=2, chunk_size=(2, 2))


# ---------------------------------------------------------------------------------------------
# Fused nodes already in the graph.


def _fused_model(op: str, *, rank=4, heads=4, kv_heads=2, mask=None, opset=23, k_len="k_len", **attrs):
    b = GraphBuilder()
    lead = ["batch", heads] if rank == 4 else ["batch"]
    kv_lead = ["batch", kv_heads] if rank == 4 else ["batch"]
    d = 8
    tail_q = ["q_len", d] if rank == 4 else ["q_len", heads * d]
    tail_kv = [k_len, d] if rank == 4 else [k_len, kv_heads * d]
    inputs = [b.input("q", TensorProto.FLOAT, lead + tail_q), b.input("k", TensorProto.FLOAT, kv_lead + tail_kv),
              b.input("v", TensorProto.FLOAT, kv_lead + tail_kv)]
    if op == "Attention":
        if mask is not None:
            inputs.append(b.input("mask", TensorProto.BOOL if mask == "bool" else TensorProto.FLOAT,
                                  ["batch", 1, "q_len", k_len]))
        b.op("Attention", *inputs, **attrs)
        extra = ()
    else:
        inputs += ["", "", b.input("bias", TensorProto.FLOAT, ["batch", heads, "q_len", k_len])] if mask else []
        b.op("MultiHeadAttention", *inputs, domain="com.microsoft", num_heads=heads, **attrs)
        extra = (("com.microsoft", 1),)
    b.nodes[-1].output[0] = "out"
    shape = lead + tail_q if rank == 4 or op == "Attention" else ["batch", "q_len", heads * d]
    return b.model([("out", shape)], opset=opset, extra_opsets=extra)


def _fully_masked_row(model, sizes, seed):
    feeds = random_feeds(model, sizes, seed)
    if "mask" in feeds:
        feeds["mask"][0, :, 1, :] = False
    return feeds


@pytest.mark.parametrize("attrs", [
    dict(mask="bool", is_causal=1, softcap=2.0, scale=0.4),
    dict(mask="float"),
    dict(rank=3, q_num_heads=4, kv_num_heads=2),
], ids=["bool_mask_causal_softcap", "float_mask", "packed_3d"])
def test_onnx_attention_node_becomes_chunked(attrs):
    model = _fused_model("Attention", **attrs)
    optimized, report = onnx_api.optimize_onnx(model, target="chunked", chunk_size=(2, 3))
    assert report.rewritten_count == 1 and "Attention" not in op_types(optimized), report.summary()
    check_valid(optimized)
    sizes = dict(batch=2, q_len=5, k_len=5)
    for seed in range(2):
        feeds = _fully_masked_row(model, sizes, seed)
        assert_close(run(optimized, feeds), run(model, feeds))


def test_onnx_attention_node_with_cache_is_left_alone():
    b = GraphBuilder()
    inputs = [b.input(n, TensorProto.FLOAT, ["batch", 2, "len", 8]) for n in ("q", "k", "v", "past_k", "past_v")]
    b.op("Attention", inputs[0], inputs[1], inputs[2], "", inputs[3], inputs[4], outputs=3)
    model = b.model([(b.nodes[-1].output[0], ["batch", 2, "len", 8])], opset=23)
    report = onnx_api.detect_onnx(model)
    assert "cache" in report.matches[0].reason


def test_multihead_attention_node_with_bias_and_causality_becomes_chunked():
    model = _fused_model("MultiHeadAttention", rank=3, kv_heads=4, mask=True, opset=18, k_len="q_len",
                         unidirectional=1, scale=0.3)
    optimized, report = onnx_api.optimize_onnx(model, target="auto", chunk_size=(2, 3))
    assert report.matches[0].target == "chunked" and "MultiHeadAttention" not in op_types(optimized)
    check_valid(optimized)
    feeds = random_feeds(model, dict(batch=2, q_len=6, k_len=6))
    assert_close(run(optimized, feeds), run(model, feeds))


def test_unmasked_multihead_attention_stays_on_its_flash_path():
    model = _fused_model("MultiHeadAttention", rank=3, kv_heads=4, opset=18)
    _, report = onnx_api.optimize_onnx(model, target="auto")
    assert report.rewritten_count == 0 and "flash path" in report.matches[0].reason


def test_multihead_attention_with_key_padding_mask_is_left_alone():
    b = GraphBuilder()
    q, k, v = (b.input(n, TensorProto.FLOAT, ["batch", "len", 16]) for n in "qkv")
    pad = b.input("pad", TensorProto.INT32, ["batch", "len"])
    b.op("MultiHeadAttention", q, k, v, "", pad, domain="com.microsoft", num_heads=2)
    model = b.model([(b.nodes[-1].output[0], ["batch", "len", 16])], extra_opsets=(("com.microsoft", 1),))
    assert "key_padding_mask" in onnx_api.detect_onnx(model).matches[0].reason


# ---------------------------------------------------------------------------------------------
# Subgraphs, opsets, what stays untouched, the API.


def _in_if_branch(inner: onnx.ModelProto) -> onnx.ModelProto:
    out_shape = ["batch", 2, "q_len", 8]
    then_graph = helper.make_graph(list(inner.graph.node), "then", [],
                                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
                                   list(inner.graph.initializer))
    else_graph = helper.make_graph([helper.make_node("Identity", ["q"], ["q_copy"])], "else", [],
                                   [helper.make_tensor_value_info("q_copy", TensorProto.FLOAT, out_shape)])
    node = helper.make_node("If", ["cond"], ["result"], name="branch", then_branch=then_graph, else_branch=else_graph)
    inputs = list(inner.graph.input) + [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    graph = helper.make_graph([node], "main", inputs, [helper.make_tensor_value_info("result", TensorProto.FLOAT,
                                                                                      out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("target", ["chunked", "ort", "onnx-attention"])
def test_attention_inside_an_if_branch(target):
    # Attention-23 takes no mask whose rows the model fills differently from it (NaN or an average of V).
    mask = None if target == "onnx-attention" else "where_min"
    model = _in_if_branch(attention_model(causal="trilu", mask=mask))
    optimized, report = onnx_api.optimize_onnx(model, target=target, chunk_size=(2, 3))
    assert report.rewritten_count == 1 and report.matches[0].causal, report.summary()
    check_valid(optimized)
    for cond in (True, False):
        feeds = random_feeds(model, dict(batch=2, q_len=6), 1)
        feeds["cond"] = np.array(cond)
        assert_close(run(optimized, feeds), run(model, feeds))


@pytest.mark.parametrize("opset", [13, 14, 17])
@pytest.mark.parametrize("target", ["chunked", "ort"])
def test_a_model_keeps_its_own_opset_from_13_on(opset, target):
    """The lowerings emit ops valid in the model's opset (Shape without start/end before 15, ReduceMax
    with an axes attribute before 18), so nothing else in the model is converted."""
    model = attention_model(mask="bias" if target == "chunked" else None, opset=opset)
    b = GraphBuilder()
    extra = b.op("ReduceMean", "q", axes=[-1], keepdims=1)  # axes moved to an input in opset 18
    model.graph.node.extend(b.nodes)
    model.graph.output.append(helper.make_tensor_value_info(extra, TensorProto.FLOAT, ["batch", 2, "q_len", 1]))
    optimized, _ = assert_parity(model, SIZES, target=target, rewrites=1, chunk_size=(2, 3))
    assert optimized.opset_import[0].version == opset
    onnx.checker.check_model(optimized, full_check=True)


def test_opset_23_is_raised_to_only_for_attention_23():
    model = attention_model(opset=17)
    optimized, report = onnx_api.optimize_onnx(model, target="onnx-attention")
    assert report.matches[0].target == "Attention-23"
    assert {entry.version for entry in optimized.opset_import if entry.domain in ("", "ai.onnx")} == {23}


def test_everything_else_is_left_as_it_was():
    model = attention_model(mask="bias")
    model.doc_string, model.producer_name = "a model", "builder"
    helper.set_model_props(model, {"owner": "tests"})
    model.graph.node.append(helper.make_node("Identity", ["q"], ["q_out"], name="keep_me", doc_string="kept"))
    model.graph.output.append(helper.make_tensor_value_info("q_out", TensorProto.FLOAT, ["batch", 2, "q_len", 8]))
    before = model.SerializeToString()
    optimized, _ = onnx_api.optimize_onnx(model, target="chunked")
    assert model.SerializeToString() == before  # the input is never modified
    assert (optimized.doc_string, optimized.producer_name) == ("a model", "builder")
    assert {p.key: p.value for p in optimized.metadata_props} == {"owner": "tests"}
    assert [i.name for i in optimized.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in optimized.graph.output] == ["out", "q_out"]
    kept = [node for node in optimized.graph.node if node.name == "keep_me"]
    assert len(kept) == 1 and kept[0].doc_string == "kept"
    original_names = {node.name for node in model.graph.node}
    assert all(node.name in original_names or node.name.startswith("out/") for node in optimized.graph.node)
    assert [o.domain for o in optimized.opset_import] == [""]


def test_detect_from_a_path_and_report_json(tmp_path):
    path = tmp_path / "attention.onnx"
    onnx.save(attention_model(causal="range"), path)
    report = onnx_api.detect_onnx(path)
    assert report.source == "attention.onnx" and report.matches[0].causal
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["found"] == 1 and payload["matches"][0]["spec"]["causal"] is True
    optimized, report = onnx_api.optimize_onnx(str(path), target="chunked", memory_budget="1MiB", chunk_size=4)
    assert report.matches[0].chunk_sizes == (4, 4)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="target"):
        onnx_api.optimize_onnx(attention_model(), target="flash")
    with pytest.raises(ValueError, match="provider"):
        onnx_api.optimize_onnx(attention_model(), provider="tpu")


@settings(max_examples=15, deadline=None)
@given(
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
    lengths=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kt=st.sampled_from(["transpose", "input", "reshape", "permute"]),
    scale=st.sampled_from(["div", "mul", "qk", None]),
    masking=st.sampled_from([{}, dict(mask="bias"), dict(mask="where_min"), dict(causal="trilu"),
                             dict(causal="range", mask="where_inf")]),
    chunks=st.tuples(st.integers(1, 5), st.integers(1, 5)),
)
def test_chunked_rewrite_matches_on_random_variants(heads, lengths, kt, scale, masking, chunks):
    causal = "causal" in masking
    q_len, k_len = lengths
    if causal:
        k_len = q_len  # self-attention lengths, so every row keeps a key
    kwargs = dict(heads=heads[0], kv_heads=heads[1], kt=kt, scale=scale, k_len=None if causal else "k_len")
    model = attention_model(**kwargs, **masking)
    assert_parity(model, [dict(batch=2, q_len=q_len, k_len=k_len)], target="chunked", rewrites=1, chunk_size=chunks)


def test_a_model_with_nothing_to_rewrite_comes_back_byte_for_byte():
    model = attention_model(mask="bias")
    optimized, report = onnx_api.optimize_onnx(model, target="onnx-attention")
    assert report.rewritten_count == 0 and optimized.SerializeToString() == model.SerializeToString()
