"""Score programs in ONNX: the chunked Loop computes masks and biases per block, never n×n.

- the emitter (`rewriter.kernels.onnx_score_program`) inside the chunked Loop equals the torch op
  evaluating the same programs (grouped heads, odd chunks, every op family);
- `rewriter.export_onnx` of a module calling ``rewriter::attention`` with programs keeps them
  (the file's Loop reads the (B, L) leaves) and ORT equals the op, at a second length too;
- recovery from exported files (HF BERT eager/sdpa, LLaMA eager/sdpa with padding that hides whole
  rows, the T5 encoder replica of `model_families` with its bucket-table bias, a hand-written ALiBi +
  sliding-window block): the optimised graph has no n×n value and no
  mask producers left, ORT equals the original at two lengths, the report says rewritten;
- block skipping on HF eager LLaMA's ``where(mask, 0, finfo.min)``: the Loop runs the causal blocks
  only, and the skipped keys too in chunks where left padding hides every key of a row;
- near-misses: an n×n boolean input stays a tensor (and MultiHeadAttention may still take it);
  MultiHeadAttention refuses a program.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
import torch

import rewriter
import rewriter.kernels.attention_op  # noqa: F401
from model_families import T5EncoderModel
from onnx_builders import blocks_run
from passes.core.score_programs import ProgramBuilder
from rewriter.kernels.onnx_chunked_attention import build_chunked_attention
from rewriter.kernels.onnx_emitter import standalone_model

B, H, HKV, D = 2, 4, 2, 8


def _programs(offset: int = 0):
    """keep = (key ≤ query + offset) ∧ pad[b, key] ∧ ((key − query) % 3 ≠ 1 ∨ pad[1, key]) (a constant index);
    bias = table[min(|key − query| // 2, 7), head] − 0.5 · floor(key / 4) · (head + 1)."""
    builder = ProgramBuilder()
    query, key, batch, head = (builder.index(axis) for axis in ("query", "key", "batch", "head"))
    shifted = builder.add("add", (query, builder.const(offset, "int64")), dtype="int64")
    distance = builder.add("sub", (key, query), dtype="int64")
    stripe = builder.add("ne", (builder.add("remainder", (distance, builder.const(3, "int64")), dtype="int64"),
                                builder.const(1, "int64")), dtype="bool")
    keep = builder.add("logical_and", (builder.add("le", (key, shifted), dtype="bool"),
                                       builder.load("pad", [batch, key], "bool")), dtype="bool")
    stripe = builder.add("logical_or", (stripe, builder.load("pad", [builder.const(1, "int64"), key], "bool")),
                         dtype="bool")
    keep = builder.add("logical_and", (keep, stripe), dtype="bool")
    half = builder.add("floor_divide", (builder.add("abs", (distance,), dtype="int64"), builder.const(2, "int64")),
                       dtype="int64")
    bucket = builder.add("minimum", (half, builder.const(7, "int64")), dtype="int64")
    looked_up = builder.load("table", [bucket, head], "float32")
    quarter = builder.add("floor", (builder.add("div", (key, builder.const(4, "int64")), dtype="float32"),),
                          dtype="float32")
    slope = builder.add("mul", (builder.add("add", (head, builder.const(1, "int64")), dtype="int64"),
                                builder.const(-0.5, "float32")), dtype="float32")
    bias = builder.add("add", (looked_up, builder.add("mul", (quarter, slope), dtype="float32")), dtype="float32")
    assert builder.leaves == ["pad", "table"]
    return builder.program(bias).to_json(), builder.program(keep).to_json()


def _inputs(q_len, k_len, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, q_len, D, generator=generator)
    k, v = (torch.randn(B, HKV, k_len, D, generator=generator) for _ in range(2))
    pad = torch.ones(B, k_len, dtype=torch.bool)
    pad[1, :4] = False  # with the causal conjunct, batch 1's first rows see no key: NaN rows
    return q, k, v, pad, torch.randn(8, H, generator=generator)


def _op(q, k, v, pad, table, bias_program, mask_program, chunks=(3, 5), zero_rows=False):
    groups = H // HKV
    out, _ = torch.ops.rewriter.attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), None,
                                          None, [pad, table], 0.3, 0.0, -math.inf, False, 0, *chunks, zero_rows,
                                          bias_program, mask_program, "")
    return out


def _chunked_model(bias_program, mask_program, opset):
    q = ir.val("q", ir.DataType.FLOAT, ["batch", H, "q_len", D])
    k, v = (ir.val(name, ir.DataType.FLOAT, ["batch", HKV, "k_len", D]) for name in "kv")
    pad = ir.val("pad", ir.DataType.BOOL, ["batch", "k_len"])
    table = ir.val("table", ir.DataType.FLOAT, [8, H])
    tape = ir.tape.Tape()
    out = build_chunked_attention(tape, q, k, v, num_heads=H, num_kv_heads=HKV, scale=0.3, q_chunk=3, k_chunk=5,
                                  bias_program=bias_program, mask_program=mask_program, leaves=[pad, table],
                                  opset=opset)
    return standalone_model((q, k, v, pad, table), out, tape, "programs", {"": opset})


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("lengths", [(11, 11), (7, 13)])
def test_loop_evaluates_programs_like_the_op(opset, lengths):
    bias_program, mask_program = _programs(offset=lengths[1] - lengths[0])
    model = _chunked_model(bias_program, mask_program, opset)
    onnx.checker.check_model(model, full_check=True)
    session = onnxruntime.InferenceSession(model.SerializeToString())
    q, k, v, pad, table = _inputs(*lengths)
    got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "pad": pad.numpy(),
                             "table": table.numpy()})[0]
    want = _op(q, k, v, pad, table, bias_program, mask_program)
    assert np.isnan(want.numpy()).any() == (lengths[0] == lengths[1])  # bottom-right offset: every row sees a key
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5, equal_nan=True)


class _ProgramAttention(torch.nn.Module):
    """Calls the op with score programs over a (B, L) padding mask and a learned bucket table."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(8, H))
        self.bias_program, self.mask_program = _programs()

    def forward(self, q, k, v, pad):
        return _op(q, k, v, pad, self.table, self.bias_program, self.mask_program, zero_rows=True)


def test_export_keeps_programs(tmp_path):
    module = _ProgramAttention().eval()
    q, k, v, pad, _ = _inputs(12, 12)
    seq = torch.export.Dim("seq", min=2, max=64)
    path = tmp_path / "programs.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = rewriter.export_onnx(module, (q, k, v, pad), str(path),
                                      dynamic_shapes=({2: seq}, {2: seq}, {2: seq}, {1: seq}))
    model = onnx.load(str(path))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert "Loop" in {node.op_type for node in model.graph.node}
    session = onnxruntime.InferenceSession(str(path))
    for length in (12, 19):
        q, k, v, pad, _ = _inputs(length, length, seed=length)
        got = session.run(None, dict(zip([i.name for i in session.get_inputs()],
                                         (x.numpy() for x in (q, k, v, pad)))))[0]
        with torch.no_grad():
            want = module(q, k, v, pad).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert report is not None


# -- recovery from exported files ------------------------------------------------------------------
EXPORT_LEN, OTHER_LEN = 24, 37


class _HF(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask):
        return self.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state


def _hf_model(family: str, impl: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                          num_key_value_heads=2, num_hidden_layers=2, vocab_size=64,
                                          use_cache=False, attn_implementation=impl)
        return transformers.LlamaModel(config).eval()
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     num_hidden_layers=2, vocab_size=64, attn_implementation=impl)
    return transformers.BertModel(config).eval()


def _ids(length: int, seed: int = 0):
    generator = np.random.default_rng(seed)
    mask = np.ones((2, length), np.int64)
    mask[1, : length // 3] = 0  # left padding: with a causal mask these rows see no key at all
    return {"ids": generator.integers(0, 64, (2, length)), "attention_mask": mask}


class _Window(torch.nn.Module):
    """ALiBi (slope_h · (j − i)) plus a sliding window of 5 and key padding, as a hand-written block."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]).view(1, 4, 1, 1))

    def forward(self, ids, attention_mask):
        x = torch.nn.functional.one_hot(ids % 16, 16).float()
        q, k, v = (t.unflatten(-1, (4, -1)).transpose(1, 2) for t in self.proj(x).chunk(3, -1))
        positions = torch.arange(ids.shape[1])
        relative = positions[None, :] - positions[:, None]
        keep = (relative.abs() <= 5) & attention_mask.bool()[:, None, None, :]
        bias = self.slopes * relative + torch.where(keep, 0.0, float("-inf"))
        weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + bias, dim=-1)
        return (weights @ v).transpose(1, 2).flatten(2)


@functools.cache
def _exported(name: str) -> bytes:
    if name == "window":
        module = _Window().eval()
    elif name == "t5":  # HF's T5 does not export with torch 2.13's dynamo exporter; the replica does
        torch.manual_seed(0)
        module = T5EncoderModel(layers=2).eval()
    else:
        module = _HF(_hf_model(*name.split("-")))
    feeds = {key: torch.from_numpy(value) for key, value in _ids(EXPORT_LEN).items()}
    length = torch.export.Dim("length", min=2, max=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (feeds["ids"], feeds["attention_mask"]), dynamo=True,
                                    input_names=["ids", "attention_mask"],
                                    dynamic_shapes=({1: length}, {1: length}), verbose=False)
    return program.model_proto.SerializeToString()


def _outputs(model: bytes, length: int) -> np.ndarray:
    session = onnxruntime.InferenceSession(model)
    names = [i.name for i in session.get_inputs()]
    feeds = _ids(length, seed=length)
    return session.run(None, {name: feeds[key] for name, key in zip(names, ("ids", "attention_mask"))})[0]


def _square_values(model: onnx.ModelProto) -> list[str]:
    """Values of the top graph with two axes of the sequence length (n×n before the Loop)."""
    graph = ir.from_proto(model).graph
    symbol = graph.inputs[0].shape[1]
    return [f"{node.op_type}:{value.name}" for node in graph for value in node.outputs
            if value.shape is not None and sum(dim == symbol for dim in value.shape) >= 2]


@pytest.mark.parametrize("name", ["bert-eager", "bert-sdpa", "llama-eager", "llama-sdpa", "window", "t5"])
def test_recovered_programs_remove_the_square_mask(name):
    original = _exported(name)
    optimized, report = rewriter.optimize_onnx(onnx.load_from_string(original))
    assert report.matches and all(match.rewritten for match in report.matches), report.summary()
    assert all(match.target == "chunked" for match in report.matches)
    nodes = {node.op_type for node in optimized.graph.node}
    assert not nodes & {"GatherND", "LessOrEqual", "And", "Softmax", "Abs"}, nodes
    assert _square_values(optimized) == []
    assert _square_values(onnx.load_from_string(original)) != []
    for length in (EXPORT_LEN, OTHER_LEN):
        want = _outputs(original, length)
        got = _outputs(optimized.SerializeToString(), length)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)


class _DataMask(torch.nn.Module):
    """Key padding and a boolean (L, L) input: data per query-key pair, no function of the positions."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, ids, attention_mask, pairs):
        x = torch.nn.functional.one_hot(ids % 16, 16).float()
        q, k, v = (t.unflatten(-1, (4, -1)).transpose(1, 2) for t in self.proj(x).chunk(3, -1))
        keep = pairs & attention_mask.bool()[:, None, None, :]
        scores = (q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2)


def test_a_mask_of_data_per_pair_stays_a_tensor():
    feeds = _ids(EXPORT_LEN)
    pairs = np.random.default_rng(1).random((EXPORT_LEN, EXPORT_LEN)) < 0.8
    pairs[np.arange(EXPORT_LEN), np.arange(EXPORT_LEN)] = True
    length = torch.export.Dim("length", min=2, max=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_DataMask().eval(), (torch.from_numpy(feeds["ids"]),
                                                         torch.from_numpy(feeds["attention_mask"]),
                                                         torch.from_numpy(pairs)),
                                    dynamo=True, input_names=["ids", "attention_mask", "pairs"],
                                    dynamic_shapes=({1: length}, {1: length}, {0: length, 1: length}))
    original = program.model_proto
    optimized, report = rewriter.optimize_onnx(original)
    (match,) = report.matches
    assert match.rewritten and match.masked, report.summary()
    assert _square_values(optimized), "the (B, 1, L, L) mask is the block's tensor operand"
    feeds["pairs"] = pairs
    outputs = [onnxruntime.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
               for model in (original, optimized)]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-5, equal_nan=True)


def test_multi_head_attention_refuses_a_program():
    optimized, report = rewriter.optimize_onnx(onnx.load_from_string(_exported("bert-sdpa")), target="ort")
    assert not any(match.rewritten for match in report.matches)
    assert all("score program" in match.reason for match in report.matches), report.summary()
    # left alone, as a named target leaves what it cannot compute; the reason says what rewrites it
    assert all("--target auto" in match.reason for match in report.matches), report.summary()


def test_causal_blocks_of_a_finite_fill_bias_are_skipped(tmp_path):
    """HF eager LLaMA's where(causal ∧ padding, 0, finfo.min): each query chunk visits keys up to the
    diagonal; chunks where left padding hides every key of a row visit the others too (there the
    original averages V over all keys)."""
    optimized, report = rewriter.optimize_onnx(onnx.load_from_string(_exported("llama-eager")), chunk_size=(4, 4))
    assert all(match.rewritten for match in report.matches), report.summary()
    model, names = optimized.SerializeToString(), ("ids", "attention_mask")
    feeds = _ids(EXPORT_LEN)
    feeds["attention_mask"][:] = 1
    chunks = EXPORT_LEN // 4
    causal = sum(range(1, chunks + 1))  # chunk i (4 rows) visits keys 0:4(i + 1): i + 1 blocks
    assert blocks_run(model, dict(zip(names, feeds.values())), tmp_path, "chunked") == 2 * causal  # two layers
    feeds = _ids(EXPORT_LEN)  # batch 1 hides keys 0:8: its rows 0..7 keep none, in chunks 0 and 1
    revisited = (chunks - 1) + (chunks - 2)  # the keys past each chunk's diagonal
    assert blocks_run(model, dict(zip(names, feeds.values())), tmp_path, "chunked") == 2 * (causal + revisited)
    want = _outputs(_exported("llama-eager"), EXPORT_LEN)
    np.testing.assert_allclose(_outputs(model, EXPORT_LEN), want, rtol=1e-4, atol=1e-5, equal_nan=True)
