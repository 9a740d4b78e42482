"""The PyTorch entry points: find attention in a module and replace it with `rewriter::attention`."""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

from passes.fx.detect_softmax_attention import FxAttentionMatch, detect_softmax_attention
from passes.fx.detect_linear_attention import detect_linear_attention
from passes.fx.rewrite_attention import RewriteSoftmaxAttention
from passes.fx.rewrite_linear_attention import RewriteLinearAttention
from rewriter.dynamic_capture import (
    AUTO,
    cache_off_kwargs,
    dynamic_input_axes,
    explain_guard_failures,
    export_program,
    export_static,
    pass_cache_off,
)
from rewriter.module_paths import annotate_modules, fx_node_scopes
from rewriter.operand_dtypes import check_operand_dtypes
from passes.core.planner import plan_chunk_sizes
from rewriter.report import MatchReport, Report

__all__ = ["capture", "detect_module", "optimize_module", "rewrite_graph_module"]

logger = logging.getLogger(__name__)

TORCH_TARGET = "rewriter::attention"
LINEAR_TARGET = "rewriter::linear_attention"


def capture(module, example_inputs, example_kwargs=None, dynamic_shapes=AUTO) -> GraphModule:
    """An ATen-level GraphModule of `module` (an nn.Module, GraphModule or ExportedProgram).

    `dynamic_shapes`: "auto" (default) keeps batch and sequence axes dynamic where torch.export can
    (`rewriter.dynamic_capture`), None captures the example's shapes, anything else goes to torch.export.
    A call at shapes the graph cannot take raises `InputShapeError`. A `transformers` model whose config
    asks for a key/value cache is captured with ``use_cache=False`` (`cache_off_kwargs`, one WARNING).
    """
    if isinstance(module, torch.export.ExportedProgram):
        return module.module()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected an nn.Module or ExportedProgram, got {type(module).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    cache_off = cache_off_kwargs(module, example_inputs, example_kwargs)
    if cache_off is not None:
        logger.warning("optimize_module(%s): captured with use_cache=False (a key/value cache cannot be an output "
                       "of the captured graph); the result returns no cache (past_key_values is None) and takes "
                       "use_cache=False only", type(module).__name__)
        example_kwargs = cache_off
    program = export_program(module, example_inputs, example_kwargs, dynamic_shapes)
    gm = explain_guard_failures(program.module())
    if isinstance(dynamic_shapes, str) and dynamic_shapes == AUTO and dynamic_input_axes(program):
        gm = _static_if_it_rewrites_more(gm, module, example_inputs, example_kwargs)
    return gm if cache_off is None else pass_cache_off(gm)


def _accepted(gm: GraphModule) -> tuple[int, list[str]]:
    """How many candidates of `gm` detection accepts, and the reasons of those it refuses."""
    specs = [match.spec for match in detect_softmax_attention(gm) + detect_linear_attention(gm)]
    return sum(spec.accepted for spec in specs), [spec.reason for spec in specs if not spec.accepted]


def _static_if_it_rewrites_more(gm: GraphModule, module, example_inputs, example_kwargs) -> GraphModule:
    """`gm` (dynamic axes), or the capture at the example's shapes when that proves more blocks: some
    proofs (a performer-pytorch chunked causal block, say) need the concrete length."""
    accepted, refused = _accepted(gm)
    if not refused:
        return gm
    static = explain_guard_failures(export_static(module, example_inputs, example_kwargs).module())
    static_accepted, _ = _accepted(static)
    if static_accepted <= accepted:
        return gm
    logger.warning("optimize_module(%s): the result takes only the example's shapes: with dynamic axes %d "
                   "attention block(s) could not be rewritten (%s), at the example's shapes %d more can; pass "
                   "dynamic_shapes= to choose", type(module).__name__, len(refused), refused[0],
                   static_accepted - accepted)
    return static


def _report(matches: list[FxAttentionMatch], planned: dict[int, tuple[int, int]], source: str,
            linear_matches=(), linear_rewritten: bool = False) -> Report:
    entries = []
    for index, match in enumerate(matches):
        chunks = planned.get(index)
        entries.append(MatchReport(match.spec, chunks is not None, TORCH_TARGET if chunks else None, chunks))
    for match in linear_matches:
        taken = linear_rewritten and match.spec.accepted
        entries.append(MatchReport(match.spec, taken, LINEAR_TARGET if taken else None))
    return Report(source, entries)


def detect_module(module, example_inputs, **capture_options) -> Report:
    """What `optimize_module` would find, without changing anything."""
    gm = capture(module, example_inputs, **capture_options)
    report = _report(detect_softmax_attention(gm), {}, type(module).__name__, detect_linear_attention(gm))
    return annotate_modules(report, fx_node_scopes(gm)).as_dry_run()


def rewrite_graph_module(gm: GraphModule, memory_budget=None, chunk_size=None, source: str = "graph",
                         score_programs: bool = True) -> Report:
    """Detect, plan and rewrite the attention of an ATen-level GraphModule in place.

    `score_programs=False` keeps every mask and bias a tensor operand of the op (no programs).
    """
    scopes = fx_node_scopes(gm)  # before the rewrite removes the blocks' nodes
    matches = detect_softmax_attention(gm, score_programs)
    planned = {}
    for index, match in enumerate(matches):
        if match.spec.accepted:
            chunks = plan_chunk_sizes(match.spec, memory_budget, chunk_size)
            planned[index] = (chunks.query, chunks.key)
    RewriteSoftmaxAttention(matches, lambda spec: plan_chunk_sizes(spec, memory_budget, chunk_size))(gm)
    linear_matches = detect_linear_attention(gm)
    RewriteLinearAttention(linear_matches)(gm)
    report = _report(matches, planned, source, linear_matches, linear_rewritten=True)
    scopes.update(fx_node_scopes(gm))  # linear blocks are found after the softmax rewrite made new nodes
    return annotate_modules(report, scopes)


def optimize_module(
    module, example_inputs, *, memory_budget=None, chunk_size=None, example_kwargs=None, dynamic_shapes=AUTO,
    score_programs: bool = True,
) -> tuple[GraphModule, Report]:
    """Capture `module`, replace every proven attention block, and report every candidate.

    `memory_budget` (bytes or '256MiB') bounds each block's working set; `chunk_size` (q, k) fixes
    the blocks instead. The returned GraphModule takes the same inputs as `module`: with
    `dynamic_shapes="auto"` (default) at other batch sizes and sequence lengths too, where
    torch.export can keep those axes dynamic (else one WARNING says why not); `None` captures the
    example's shapes only; a torch.export `dynamic_shapes` spec chooses the axes. A call at shapes
    the graph cannot take raises `rewriter.dynamic_capture.InputShapeError`. Masks and biases the
    model builds from O(n) pieces reach the op as score programs (`score_programs=False`: as tensors).
    A call whose mask or bias input has another dtype than the example's raises
    `rewriter.operand_dtypes.OperandDtypeError`. A module whose forward branches on a tensor's value
    (which torch.export cannot capture) raises `rewriter.dynamic_capture.CaptureError`.
    """
    gm = capture(module, example_inputs, example_kwargs, dynamic_shapes)
    report = rewrite_graph_module(gm, memory_budget, chunk_size, type(module).__name__, score_programs)
    logger.info(report.summary())
    return check_operand_dtypes(gm), report
