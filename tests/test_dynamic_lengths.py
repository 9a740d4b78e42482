"""optimize_module's default capture: the result takes the lengths (and batch sizes) the original took.

The model is nanoGPT's: a causal mask sliced from a registered `tril` buffer, `bias[:, :, :T, :T]`.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from rewriter.dynamic_capture import CaptureError, InputShapeError

BLOCK_SIZE, EMBED, HEADS, VOCAB = 128, 32, 4, 50


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(EMBED, 3 * EMBED), nn.Linear(EMBED, EMBED)
        self.register_buffer("bias", torch.tril(torch.ones(BLOCK_SIZE, BLOCK_SIZE)).view(1, 1, BLOCK_SIZE, BLOCK_SIZE))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in self.c_attn(x).split(EMBED, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoGPT(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, EMBED), nn.Embedding(BLOCK_SIZE, EMBED)
        self.h = nn.ModuleList(CausalSelfAttention() for _ in range(layers))

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = x + block(x)
        return x


def _tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))


@pytest.fixture(scope="module")
def optimized():
    torch.manual_seed(0)
    model = NanoGPT().eval()
    gm, report = rewriter.optimize_module(model, (_tokens(2, 64),))
    return model, gm, report


@pytest.mark.parametrize("batch, length", [(2, 17), (3, 100), (1, 1)])
def test_nanogpt_optimised_at_one_length_runs_at_others(optimized, batch, length):
    model, gm, report = optimized
    assert report.rewritten_count == 2, report.summary()
    tokens = _tokens(batch, length)
    with torch.no_grad():
        torch.testing.assert_close(gm(tokens), model(tokens), atol=1e-5, rtol=1e-4)


def test_a_length_the_graph_cannot_take_is_an_error_in_words(optimized):
    _, gm, _ = optimized
    with pytest.raises(InputShapeError, match=r"shapes \(1, 200\).*requires idx.size\(\)\[1\] <= 128"):
        gm(_tokens(1, 200))  # longer than the tril buffer: the original fails too


def test_static_capture_takes_only_the_example_shape():
    model = NanoGPT(layers=1).eval()
    gm, _ = rewriter.optimize_module(model, (_tokens(2, 64),), dynamic_shapes=None)
    gm(_tokens(2, 64))
    with pytest.raises(InputShapeError, match=r"idx.size\(\)\[1\] == 64"):
        gm(_tokens(2, 32))


def test_failed_dynamic_capture_falls_back_with_one_warning(refuse_dynamic_shapes, caplog):
    refuse_dynamic_shapes(torch.export, "export", "Constraints violated (seq)!\nmore detail")
    with caplog.at_level(logging.WARNING, logger="rewriter.dynamic_capture"):
        gm, report = rewriter.optimize_module(NanoGPT(layers=1).eval(), (_tokens(2, 64),))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "only the example's shapes" in warnings[0] and "Constraints violated (seq)!" in warnings[0]
    assert report.rewritten_count == 1 and gm(_tokens(2, 64)).shape == (2, 64, EMBED)


def test_a_model_whose_code_fixes_the_length_warns(caplog):
    class FixedLength(nn.Module):
        def forward(self, x):
            return x.reshape(x.size(0), 64 * EMBED)  # only one length fits

    with caplog.at_level(logging.WARNING, logger="rewriter.dynamic_capture"):
        rewriter.optimize_module(FixedLength(), (torch.randn(1, 64, EMBED),))
    assert any("fixed every input axis" in r.getMessage() for r in caplog.records), caplog.records


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5"])
def test_hf_style_families_run_at_another_length(name):
    import rewriter.kernels.attention_op  # noqa: F401  (the op the graph calls)
    from test_model_families import BATCH, FAMILIES, SEQ

    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    gm, report = rewriter.optimize_module(model, model.example_inputs(BATCH, SEQ))
    assert report.rewritten_count == len(report.matches) == 2, report.summary()
    for batch, length in ((BATCH, SEQ - 5), (1, SEQ + 7)):
        inputs = model.example_inputs(batch, length)
        with torch.no_grad():
            torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


def test_sdpa_with_is_causal_from_the_length_falls_back_to_static(caplog):
    """HF's SDPA path computes is_causal = q_len > 1, a SymBool torch.export cannot pass to SDPA."""
    from model_families import GPT2SdpaModel

    model = GPT2SdpaModel().eval()
    with caplog.at_level(logging.WARNING, logger="rewriter.dynamic_capture"):
        gm, report = rewriter.optimize_module(model, model.example_inputs(2, 16))
    assert report.rewritten_count == 2 and report.matches[0].causal
    assert any("is_causal" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputShapeError, match=r"== 16"):
        gm(*model.example_inputs(2, 12))


def test_a_block_proven_only_at_fixed_shapes_keeps_the_fixed_capture(caplog):
    """performer-pytorch's chunked causal form is one block only at a known length: captured with
    dynamic axes it would be left alone, so the example's shapes are kept, with a warning."""
    from performer_models import FastAttention

    model = FastAttention(8, nb_features=12, causal=True, chunk_size=3, chunk_eps=0.0, learned_projection=True).eval()
    inputs = tuple(torch.randn(1, 2, 10, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with caplog.at_level(logging.WARNING, logger="rewriter.torch_api"):
        gm, report = rewriter.optimize_module(model, inputs)
    assert report.rewritten_count == 1, report.summary()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "only the example's shapes" in warning and "1 more can" in warning, warning
    torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


class FloatPaddingMask(torch.nn.Module):
    """Older model code: a float (B, L) padding mask, used as (1 − m)·(−10000)."""

    def forward(self, q, k, v, m):
        scores = q @ k.transpose(-1, -2) * 0.25 + (1.0 - m[:, None, None, :]) * -10000.0
        return scores.softmax(-1) @ v


def test_a_float_input_whose_last_axis_looks_like_a_length_warns(caplog):
    """The last axis of a float input is captured static (a feature axis); a float padding mask's is the
    key length, so the result takes only that length: one WARNING names the input (new-user trial)."""
    q, k, v = (torch.randn(2, 4, 40, 16) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="rewriter.dynamic_capture"):
        rewriter.optimize_module(FloatPaddingMask(), (q, k, v, torch.ones(2, 40)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'m' (size 40)" in warnings[0] and "dynamic_shapes=" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rewriter.dynamic_capture"):
        rewriter.optimize_module(FloatPaddingMask(), (q, k, v, torch.ones(2, 40)),
                        dynamic_shapes=({2: torch.export.Dim.AUTO},) * 3 + ({1: torch.export.Dim.AUTO},))
    assert not caplog.records


class _BranchOnValue(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_a_branch_on_a_tensors_value_is_refused_in_one_line():
    """In eval mode no training-state hint: the line says how to write the branch so torch.export can capture it."""
    with pytest.raises(CaptureError, match=r"^torch.export cannot capture _BranchOnValue: its forward branches on a "
                                           r"tensor's value \(.*\); write that branch with torch.where or torch.cond$"):
        rewriter.optimize_module(_BranchOnValue().eval(), (torch.randn(2, 8, 4),))
