"""`rewriter demo`: a small causal transformer rewritten in PyTorch and as ONNX, verified, measured.

No downloads. The PyTorch path rewrites `TinyDecoder` with `optimize_module`; the ONNX path exports
it as a user would (`torch.onnx.export(dynamo=True)`, dynamic sequence length, into a temporary
directory) and rewrites the file with `optimize_onnx`. Each rewrite is checked against its original
at the demo's sequence length, then one forward pass of every model is measured in a fresh process
(`rewriter.tools.measure`: extra peak memory and wall time of the call). ONNX Runtime points run in an
interpreter that imports no torch (`rewriter.tools.bench_child`), after a warm-up run at 16 tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import tempfile
import warnings

import onnx
import torch
from torch import nn

import rewriter
from rewriter.tools.bench_child import run_point
from rewriter.tools.measure import Measurement, measure_in_fresh_process
from rewriter.tools.memory_estimate import sequence_dims
from rewriter.verify import VerifyResult, verify_onnx

__all__ = ["DemoResult", "OnnxDemoResult", "TinyDecoder", "export_tiny_decoder", "run_demo"]

logger = logging.getLogger(__name__)

VOCAB = 256
_EXPORT_SEQ_LEN = 64  # the example length of the export; the file's sequence length is dynamic
_ORT_WARMUP_SEQ_LEN = 16
_POINT_TIMEOUT_S = 600
_RTOL, _ATOL = 1e-4, 1e-5  # rewrite vs original, as `verify_onnx` compares


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

    def __init__(self, vocab: int = VOCAB, hidden: int = 64, heads: int = 4, layers: int = 2):
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


def _model_and_tokens(seq_len: int) -> tuple[TinyDecoder, torch.Tensor]:
    torch.manual_seed(0)
    return TinyDecoder().eval(), torch.randint(0, VOCAB, (1, seq_len))


def _forward_call(seq_len: int, rewritten: bool, threads: int):
    """Runs in a fresh process: builds (and rewrites) the model, returns its forward to measure.

    No warm-up run: the rewritten module is specialised to `seq_len`, so one would cost a whole
    forward, and the first call's one-off costs are small next to it.
    """
    torch.set_num_threads(threads)
    model, tokens = _model_and_tokens(seq_len)
    if rewritten:
        model, _ = rewriter.optimize_module(model, (tokens,), dynamic_shapes=None)  # measured at this length only

    def forward():
        with torch.no_grad():
            model(tokens)

    return forward


def _measure_onnx(path: str, dims: dict[str, int], threads: int) -> Measurement:
    """One ONNX Runtime run in a fresh interpreter that imports no torch (`rewriter.tools.bench_child`),
    after a warm-up run at a short length (kernels, thread pool)."""
    warmup = dict.fromkeys(dims, _ORT_WARMUP_SEQ_LEN)
    spec = {"kind": "onnx", "threads": threads, "path": path, "dims": dims, "warmup_dims": warmup}
    measured = run_point(spec, _POINT_TIMEOUT_S)
    return Measurement(round(measured["extra_peak_mib"] * 2**20), measured["seconds"], measured["cpu_seconds"])


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class OnnxDemoResult:
    report: rewriter.Report
    verify: VerifyResult
    exported: Measurement
    optimized: Measurement

    def to_dict(self) -> dict:
        return {"report": self.report.to_dict(), "verify": dataclasses.asdict(self.verify),
                "exported": dataclasses.asdict(self.exported), "optimized": dataclasses.asdict(self.optimized)}


@dataclasses.dataclass
class DemoResult:
    seq_len: int
    threads: int
    report: rewriter.Report
    max_abs_difference: float
    eager: Measurement
    rewritten: Measurement
    onnx: OnnxDemoResult

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len, "threads": self.threads, "report": self.report.to_dict(),
            "max_abs_difference": self.max_abs_difference,
            "eager": dataclasses.asdict(self.eager), "rewritten": dataclasses.asdict(self.rewritten),
            "onnx": self.onnx.to_dict(),
        }


# --------------------------------------------------------------------------- the two paths


def export_tiny_decoder(model: nn.Module, path: str) -> None:
    """`model` exported by torch's dynamo exporter with a dynamic sequence length, the exporter kept quiet."""
    tokens = torch.randint(0, VOCAB, (1, _EXPORT_SEQ_LEN))
    seq = torch.export.Dim("seq", min=2, max=1 << 20)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" lines
    try:
        # The exporter reports its progress on stdout, which --json keeps for the result.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (tokens,), path, dynamo=True, dynamic_shapes=({1: seq},),
                              input_names=["tokens"], output_names=["logits"], verbose=False)
    finally:
        exporter_log.setLevel(level)


def _torch_demo(model, tokens, threads: int, log):
    seq_len = tokens.shape[1]
    log(f"PyTorch: capturing and rewriting TinyDecoder (2 layers, 4 heads) at sequence length {seq_len} ...")
    # One length: captured at its shapes, where the tril mask is proven causal (blocks above the diagonal skipped).
    optimized, report = rewriter.optimize_module(model, (tokens,), dynamic_shapes=None)
    log(report.summary())
    with torch.no_grad():
        expected, actual = model(tokens), optimized(tokens)
    difference = (actual - expected).abs().max().item()
    log(f"max |rewritten - eager| on the logits: {difference:.2e}")
    if not torch.allclose(actual, expected, rtol=_RTOL, atol=_ATOL):
        raise RuntimeError(f"the rewritten module differs from eager (max |difference| {difference:.3g})")
    log("measuring eager and rewritten forward, each in a fresh process ...")
    eager = measure_in_fresh_process(_forward_call, seq_len, False, threads)
    rewritten = measure_in_fresh_process(_forward_call, seq_len, True, threads)
    return report, difference, eager, rewritten


def _onnx_demo(model, seq_len: int, threads: int, directory: str, log) -> OnnxDemoResult:
    exported_path = os.path.join(directory, "tiny_decoder.onnx")
    optimized_path = os.path.join(directory, "tiny_decoder.optimized.onnx")
    log("ONNX: exporting with torch.onnx.export(dynamo=True), dynamic sequence length ...")
    export_tiny_decoder(model, exported_path)
    exported_model = onnx.load(exported_path)
    optimized, report = rewriter.optimize_onnx(exported_model)
    log(report.summary())
    onnx.save(optimized, optimized_path)
    dims = sequence_dims(exported_model, seq_len)
    verify = verify_onnx(exported_model, optimized, dims, rtol=_RTOL, atol=_ATOL)
    log(f"ONNX Runtime, optimized vs exported at sequence length {seq_len}: {verify.message}")
    if not verify.ok:
        raise RuntimeError(f"the optimized ONNX model differs from the exported one: {verify.message}")
    log("measuring exported and optimized on ONNX Runtime, each in a fresh process ...")
    exported = _measure_onnx(exported_path, dims, threads)
    return OnnxDemoResult(report, verify, exported, _measure_onnx(optimized_path, dims, threads))


def run_demo(seq_len: int, threads: int = 2, log=print) -> DemoResult:
    """Rewrite TinyDecoder in PyTorch and as ONNX, check each rewrite against its original at
    `seq_len`, and measure the forward of all four models there."""
    torch.set_num_threads(threads)
    model, tokens = _model_and_tokens(seq_len)
    report, difference, eager, rewritten = _torch_demo(model, tokens, threads, log)
    with tempfile.TemporaryDirectory(prefix="rewriter-demo-") as directory:
        onnx_result = _onnx_demo(model, seq_len, threads, directory, log)
    return DemoResult(seq_len, threads, report, difference, eager, rewritten, onnx_result)
