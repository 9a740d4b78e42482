"""`rewriter.export_onnx` and `rewriter export`: PyTorch → ONNX → ONNX Runtime equals eager.

Each family's small model is exported once with a dynamic sequence axis; the file must pass the
full checker, hold no `ai.rewriter` node and no Softmax (so no n × n score matrix), and give
eager's outputs on ORT at the export length and at another length.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
import torch

import rewriter
from model_families import MAX_POSITIONS, BertModel, GPT2Model, LlamaModel
from performer_models import FastAttention
from passes.onnx.lower_rewriter_ops import LowerRewriterOps
from rewriter.cli import main
from rewriter.export import ExportVerificationError

EXPORT_LEN, OTHER_LEN = 16, 11
FAMILIES = {"gpt2": GPT2Model, "bert": BertModel, "llama": LlamaModel}


def tiny_gpt2(seq_len: int):
    """The CLI's factory: (model, example_inputs); one layer, to keep the export short."""
    torch.manual_seed(0)
    return GPT2Model(layers=1).eval(), GPT2Model.example_inputs(2, seq_len)


class CausalSelfAttention(torch.nn.Module):
    """SDPA with is_causal=True: the op's `causal` flag, which MultiHeadAttention's `unidirectional` takes."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(2))


def _dynamic(example_inputs) -> tuple:
    seq = torch.export.Dim("seq", min=2, max=MAX_POSITIONS - 1)
    return tuple({1: seq} for _ in example_inputs)


@functools.cache
def _exported(family: str, target: str = "chunked") -> tuple[bytes, object]:
    torch.manual_seed(0)
    cls = FAMILIES[family]
    model = cls().eval()
    example = cls.example_inputs(2, EXPORT_LEN)
    proto, report = rewriter.export.to_onnx(model, example, target=target, dynamic_shapes=_dynamic(example))
    return model, proto.SerializeToString(), report


def _ort_outputs(model_bytes: bytes, inputs: tuple) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    return session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})


def _op_types(model: onnx.ModelProto) -> list[tuple[str, str]]:
    graph = ir.serde.deserialize_model(model).graph
    return [(node.domain, node.op_type) for node in ir.traversal.RecursiveGraphIterator(graph)]


def _private_attention_model(causal: int, with_mask: bool, zero_masked_rows: int = 0) -> ir.Model:
    """q (B,4,Lq,8), k/v (B,2,Lk,8) [, mask (B,1,Lq,Lk)] → one ai.rewriter::Attention → out."""
    q = ir.val("q", ir.DataType.FLOAT, ["b", 4, "lq", 8])
    keys = "lq" if causal else "lk"  # MultiHeadAttention is causal only for provably equal lengths
    k = ir.val("k", ir.DataType.FLOAT, ["b", 2, keys, 8])
    v = ir.val("v", ir.DataType.FLOAT, ["b", 2, keys, 8])
    mask = ir.val("mask", ir.DataType.BOOL, ["b", 1, "lq", keys]) if with_mask else None
    out, stats = ir.val("out", ir.DataType.FLOAT, ["b", 4, "lq", 8]), ir.Value(name="row_stats")
    node = ir.node("Attention", [q, k, v, None, mask], domain="ai.rewriter", outputs=[out, stats],
                   attributes={"scale": 0.3, "softcap": 0.0, "mask_fill": float("-inf"), "causal": causal,
                               "causal_offset": 0, "zero_masked_rows": zero_masked_rows, "q_chunk": 3,
                               "k_chunk": 2})
    inputs = [x for x in (q, k, v, mask) if x is not None]
    graph = ir.Graph(inputs, [out], nodes=[node], opset_imports={"": 23, "ai.rewriter": 1}, name="private")
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("target", ["chunked", "onnx-attention", "ort"])
@pytest.mark.parametrize(("causal", "with_mask"), [(1, False), (0, True)])
def test_lowering_pass_matches_the_torch_op(target, causal, with_mask):
    model = _private_attention_model(causal, with_mask)
    lowering = LowerRewriterOps(target)
    assert lowering(model).modified
    if target == "onnx-attention" and with_mask:
        # The torch op gives NaN for a row whose every key is masked, Attention-23 gives 0: refused.
        (form, reason), = lowering.lowered
        assert form == "chunked" and "gives 0 for rows whose every key is masked" in reason
    else:
        assert lowering.lowered == [(target, None)]
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert "ai.rewriter" not in {entry.domain for entry in proto.opset_import}
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True  # no row without a key
    inputs = (q, k, v, mask) if with_mask else (q, k, v)
    (actual,) = _ort_outputs(proto.SerializeToString(), inputs)
    expected, _ = torch.ops.rewriter.attention(q, k, v, None, mask if with_mask else None, [], 0.3, 0.0,
                                               float("-inf"), bool(causal), 0, 3, 2, False, "", "", "")
    np.testing.assert_allclose(actual, expected.numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("target", ["chunked", "onnx-attention", "ort"])
def test_rows_every_key_masked_give_zero_on_every_target_when_the_node_says_so(target):
    model = _private_attention_model(0, with_mask=True, zero_masked_rows=1)
    lowering = LowerRewriterOps(target)
    lowering(model)
    assert lowering.lowered == [(target, None)]
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True
    mask[:, :, 2] = False  # row 2 hides every key
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    (actual,) = _ort_outputs(ir.serde.serialize_model(model).SerializeToString(), (q, k, v, mask))
    expected, _ = torch.ops.rewriter.attention(q, k, v, None, mask, [], 0.3, 0.0, float("-inf"), False, 0, 3, 2, False, "", "", "")
    assert np.isnan(expected.numpy()[:, :, 2]).all() and (actual[:, :, 2] == 0).all()
    np.testing.assert_allclose(np.delete(actual, 2, axis=2), np.delete(expected.numpy(), 2, axis=2), atol=1e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("seq_len", [EXPORT_LEN, OTHER_LEN])
def test_round_trip_equals_eager(family, seq_len):
    model, model_bytes, _ = _exported(family)
    inputs = FAMILIES[family].example_inputs(2, seq_len)
    with torch.no_grad():
        expected = model(*inputs)
    (actual,) = _ort_outputs(model_bytes, inputs)
    assert actual.shape == tuple(expected.shape)
    np.testing.assert_allclose(actual, expected.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_model_is_standard_onnx_without_score_matrix(family):
    _, model_bytes, report = _exported(family)
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model, full_check=True)
    ops = _op_types(model)
    assert not [op for op in ops if op[0] == "ai.rewriter"]
    assert "ai.rewriter" not in {entry.domain for entry in model.opset_import}
    assert ("", "Softmax") not in ops, "a softmax over full score rows is left"
    assert ("", "Loop") in ops
    assert report.rewritten_count == len(report.matches) == 2
    assert {match.target for match in report.matches} == {"chunked"}
    assert any(dim.dim_param for value in model.graph.input for dim in value.type.tensor_type.shape.dim)


def test_export_onnx_writes_verified_file_ort_target(tmp_path):
    torch.manual_seed(0)
    model, example = CausalSelfAttention().eval(), (torch.randn(2, EXPORT_LEN, 32),)
    path = tmp_path / "causal_sdpa.onnx"
    report = rewriter.export_onnx(model, example, str(path), target="ort", dynamic_shapes=_dynamic(example))
    assert [(match.target, match.causal) for match in report.matches] == [("com.microsoft.MultiHeadAttention", True)]
    saved = onnx.load(str(path))
    onnx.checker.check_model(saved, full_check=True)
    ops = _op_types(saved)
    assert ("com.microsoft", "MultiHeadAttention") in ops and ("", "Softmax") not in ops
    other = (torch.randn(2, OTHER_LEN, 32),)
    (actual,) = _ort_outputs(saved.SerializeToString(), other)
    with torch.no_grad():
        expected = model(*other)
    np.testing.assert_allclose(actual, expected.numpy(), atol=1e-4, rtol=1e-4)


class CausalSdpa(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_onnx_attention_target(tmp_path):
    torch.manual_seed(0)
    model, example = CausalSdpa().eval(), tuple(torch.randn(2, 4, EXPORT_LEN, 8) for _ in range(3))
    path = tmp_path / "attention23.onnx"
    seq = torch.export.Dim("seq", min=2, max=64)
    report = rewriter.export_onnx(model, example, str(path), target="onnx-attention",
                                  dynamic_shapes=tuple({2: seq} for _ in example))
    assert [match.target for match in report.matches] == ["Attention-23"]
    saved = onnx.load(str(path))
    onnx.checker.check_model(saved, full_check=True)
    assert {entry.domain: entry.version for entry in saved.opset_import}[""] == 23
    ops = _op_types(saved)
    assert ("", "Attention") in ops and ("", "Softmax") not in ops
    assert not [op for op in ops if op[0] == "ai.rewriter"]
    other = tuple(torch.randn(2, 4, OTHER_LEN, 8) for _ in range(3))
    (actual,) = _ort_outputs(saved.SerializeToString(), other)
    with torch.no_grad():
        expected = model(*other)
    np.testing.assert_allclose(actual, expected.numpy(), atol=1e-4, rtol=1e-4)


class FiniteFillPadding(torch.nn.Module):
    """A padding mask filled with finfo.min, as HF's eager models fill."""

    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-1, -2)) * 0.25
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        return torch.softmax(scores, -1) @ v


def test_onnx_attention_refuses_a_finite_fill(tmp_path):
    """A row whose every key holds the finite fill averages V in the model and is 0 in Attention-23,
    so the block is lowered to the chunked form, which keeps the fill."""
    example = tuple(torch.randn(2, 2, 12, 16) for _ in range(3)) + (torch.rand(2, 12) > 0.3,)
    report = rewriter.export_onnx(FiniteFillPadding().eval(), example, str(tmp_path / "padded.onnx"),
                                  target="onnx-attention", dynamic_shapes=None)
    assert [match.target for match in report.matches] == ["chunked"]


def test_causal_mask_with_a_finite_fill_is_causal_for_attention_23(tmp_path):
    """GPT-2's tril buffer filled with finfo.min hides no row entirely: it is the causal flag, which
    Attention-23 computes exactly."""
    model, example = tiny_gpt2(EXPORT_LEN)
    report = rewriter.export_onnx(model, example, str(tmp_path / "gpt2.onnx"), target="onnx-attention",
                                  dynamic_shapes=_dynamic(example))
    assert [match.target for match in report.matches] == ["Attention-23"]
    assert all(match.causal for match in report.matches)


class SoftCappedAttention(torch.nn.Module):
    def forward(self, q, k, v):
        scores = 30.0 * torch.tanh((q @ k.transpose(-1, -2)) * 0.25 / 30.0)
        return torch.softmax(scores, -1) @ v


def test_target_that_cannot_compute_it_falls_back_to_chunked(tmp_path):
    example = tuple(torch.randn(1, 2, 12, 16) for _ in range(3))
    seq = torch.export.Dim("seq", min=2, max=100)
    report = rewriter.export_onnx(SoftCappedAttention().eval(), example, str(tmp_path / "capped.onnx"), target="ort",
                                  dynamic_shapes=tuple({2: seq} for _ in example))
    assert [match.target for match in report.matches] == ["chunked"]  # MultiHeadAttention has no soft-cap
    ops = _op_types(onnx.load(str(tmp_path / "capped.onnx")))
    assert ("", "Loop") in ops and not [op for op in ops if op[0] in ("com.microsoft", "ai.rewriter")]


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(rewriter.export, "_compare", lambda *args: "output 0: max |difference| 1")
    model, example = tiny_gpt2(8)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportVerificationError, match="nothing written"):
        rewriter.export_onnx(model, example, str(path))
    assert not path.exists() and not os.listdir(tmp_path)


def test_unknown_target_is_refused(tmp_path):
    model, example = tiny_gpt2(8)
    with pytest.raises(ValueError, match="unknown target"):
        rewriter.export_onnx(model, example, str(tmp_path / "x.onnx"), target="tensorrt")


def _cli(*args: str) -> subprocess.CompletedProcess:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run([sys.executable, "-m", "rewriter", "export", *args], capture_output=True, text=True,
                          timeout=300, cwd=here)


@pytest.mark.parametrize("spec", ["no_colon", "no_such_module_xyz:f", "test_export_onnx:missing", "os:sep"])
def test_cli_bad_spec_exits_2(spec, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out.onnx"
    assert main(["export", spec, "-o", str(out), "--seq-len", "8"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0 and spec in stderr
    assert not out.exists()


def test_cli_exports(tmp_path):
    out = tmp_path / "out.onnx"
    result = _cli("test_export_onnx:tiny_gpt2", "-o", str(out), "--seq-len", str(EXPORT_LEN), "--target", "chunked")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and out.exists()
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert any(dim.dim_param for value in model.graph.input for dim in value.type.tensor_type.shape.dim)


def test_cli_exports_a_saved_program_keeping_its_dynamic_axes(tmp_path):
    model, example = tiny_gpt2(EXPORT_LEN)
    program = torch.export.export(model, example, dynamic_shapes=({1: torch.export.Dim("seq", min=2, max=63)},))
    saved, out = tmp_path / "gpt2.pt2", tmp_path / "out.onnx"
    torch.export.save(program, str(saved))
    result = _cli(str(saved), "-o", str(out), "--target", "chunked", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["matches"][0]["rewritten"]
    sequence_dims = [dim.dim_param for dim in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert sequence_dims[1] and not sequence_dims[0]  # the program's dynamic axis only


def test_cli_refuses_a_file_that_is_not_a_program(tmp_path, capsys):
    bogus, out = tmp_path / "model.pt2", tmp_path / "out.onnx"
    bogus.write_bytes(b"not a zip archive")
    assert main(["export", str(bogus), "-o", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0 and "not a saved torch.export program" in stderr
    assert not out.exists()


class PerformerThenSoftmax(torch.nn.Module):
    """A bidirectional Performer block, then plain softmax attention: the graph order differs from the report's."""

    def __init__(self):
        super().__init__()
        self.performer = FastAttention(8, nb_features=12)

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(self.performer(q, k, v), k, v)


def test_report_names_each_kind_with_its_own_lowering(tmp_path):
    """target ort: the softmax block becomes MultiHeadAttention, the bidirectional Performer block falls back to chunked."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    report = rewriter.export_onnx(PerformerThenSoftmax().eval(), (q, k, v), str(tmp_path / "mixed.onnx"), target="ort")
    targets = {match.kind: match.target for match in report.matches if match.rewritten}
    assert targets == {"softmax": "com.microsoft.MultiHeadAttention", "performer": "chunked"}, report.summary()


def test_export_check_spans_several_blocks_and_says_so(tmp_path, monkeypatch):
    model, example = tiny_gpt2(EXPORT_LEN)
    report = rewriter.export_onnx(model, example, str(tmp_path / "ok.onnx"), dynamic_shapes=({1: torch.export.Dim.AUTO},))
    # 64 positions: 16×32 blocks would need length 75, so 8×16 blocks are forced
    assert report.verification.endswith("a copy with 8×16 blocks at lengths 1, 25, 38"), report.verification
    assert report.verification in report.summary() and report.to_dict()["verification"] == report.verification

    from test_cli_onnx import _drop_accumulator_rescale

    _drop_accumulator_rescale(monkeypatch)  # wrong only once a row spans two key blocks
    with pytest.raises(ExportVerificationError, match=r"blocks\) at input shapes"):
        rewriter.export_onnx(model, example, str(tmp_path / "bad.onnx"), dynamic_shapes=({1: torch.export.Dim.AUTO},))
    assert not (tmp_path / "bad.onnx").exists()


def test_example_kwargs_are_refused_with_a_reason(tmp_path):
    example = tuple(torch.randn(1, 2, 12, 16) for _ in range(3))
    with pytest.raises(TypeError, match="positionally"):
        rewriter.export_onnx(SoftCappedAttention().eval(), example, str(tmp_path / "m.onnx"), example_kwargs={})
    assert not (tmp_path / "m.onnx").exists()


class _LengthAsPythonInt(torch.nn.Module):
    """Reshapes by `int(x.shape[1])`: torch.export fixes the length, the batch axis stays dynamic."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        length = int(x.shape[1])
        q, k, v = self.qkv(x).reshape(x.shape[0], length, 3, 4, 8).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(x.shape[0], length, 32)


def test_a_length_the_capture_fixes_is_said_and_not_called_the_length_checked(tmp_path, caplog):
    """One WARNING names the fixed axis by the captured input shape; the verification speaks of the batch
    sizes it checks as sizes, not lengths."""
    torch.manual_seed(0)
    model, x = _LengthAsPythonInt().eval(), torch.randn(2, 64, 32)
    with caplog.at_level("WARNING", logger="rewriter"):
        report = rewriter.export_onnx(model, (x,), str(tmp_path / "m.onnx"))
    assert any("torch.export fixed 1 of the 2 input axes asked to stay dynamic" in record.getMessage()
               and ", 64, 32) only" in record.getMessage() for record in caplog.records), caplog.text
    assert "at the example size 2" in report.verification and "length" not in report.verification
