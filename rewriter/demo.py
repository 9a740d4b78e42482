"""`rewriter demo`: a small causal transformer, rewritten, verified and measured, no downloads."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

import rewriter
from rewriter.measure import Measurement, measure_in_fresh_process

__all__ = ["TinyDecoder", "DemoResult", "run_demo"]


class _CausalSelfAttention(nn.Module):
    """Attention as most model code writes it: it materialises the n × n scores."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x):
        batch, length, hidden = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.out((probs @ v).transpose(1, 2).reshape(batch, length, hidden))


class TinyDecoder(nn.Module):
    """A GPT-style decoder: embeddings, pre-norm blocks, a language-model head."""

    def __init__(self, vocab: int = 256, hidden: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(hidden), "attn": _CausalSelfAttention(hidden, heads),
                           "mlp": nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                                nn.Linear(4 * hidden, hidden))})
            for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block["attn"](block["norm"](x))
            x = x + block["mlp"](x)
        return self.head(x)


def _model_and_tokens(seq_len: int):
    torch.manual_seed(0)
    return TinyDecoder().eval(), torch.randint(0, 256, (1, seq_len))


def _forward_call(seq_len: int, rewritten: bool, threads: int):
    """Runs in a fresh process: builds (and rewrites) the model, returns its forward to measure."""
    torch.set_num_threads(threads)
    model, tokens = _model_and_tokens(seq_len)
    if rewritten:
        model, _ = rewriter.optimize_module(model, (tokens,))

    def forward():
        with torch.no_grad():
            model(tokens)

    return forward


@dataclasses.dataclass
class DemoResult:
    seq_len: int
    report: rewriter.Report
    max_abs_difference: float
    eager: Measurement
    rewritten: Measurement

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len, "report": self.report.to_dict(), "max_abs_difference": self.max_abs_difference,
            "eager": dataclasses.asdict(self.eager), "rewritten": dataclasses.asdict(self.rewritten),
        }


def run_demo(seq_len: int = 4096, threads: int = 2, log=print) -> DemoResult:
    """Rewrite TinyDecoder, check it against eager at `seq_len`, and measure both there."""
    model, tokens = _model_and_tokens(seq_len)
    log(f"capturing TinyDecoder (2 layers, 4 heads) at sequence length {seq_len} ...")
    optimized, report = rewriter.optimize_module(model, (tokens,))
    log(report.summary())
    with torch.no_grad():
        difference = (optimized(tokens) - model(tokens)).abs().max().item()
    log(f"max |rewritten - eager| on the logits: {difference:.2e}")
    log("measuring eager and rewritten forward, each in a fresh process ...")
    eager = measure_in_fresh_process(_forward_call, seq_len, False, threads)
    rewritten = measure_in_fresh_process(_forward_call, seq_len, True, threads)
    return DemoResult(seq_len, report, difference, eager, rewritten)
