"""The ONNX entry points: find attention in a model and rewrite it for a target runtime.

``optimize_onnx`` detects every candidate (`passes.onnx`), picks a target per accepted match,
raises the opset where a target needs it, rewrites, and reports every candidate. Targets:

- ``chunked``: standard-op Loop subgraph (`build_chunked_attention`), memory bounded by chunks.
- ``ort``: ``com.microsoft.MultiHeadAttention`` where its semantics are exactly the match's.
- ``onnx-attention``: opset-23 ``Attention`` where exact and the opset can be raised to 23.
- ``auto``: on CPU, MultiHeadAttention for blocks without masks, bias or causality (its flash
  path), chunked otherwise; with ``provider="cuda"``, MultiHeadAttention wherever it is exact.

Performer (linear attention) blocks are found alongside (`detect_linear_attention`) and become the
slice loop of `build_linear_attention` (target ``chunked``) under ``auto`` and ``chunked``; under
``ort`` a causal block becomes ``com.microsoft.LinearAttention``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Callable

import onnx
import onnx_ir as ir
import onnx_ir.passes

from passes.core.planner import TARGETS, default_slice_size, plan_chunk_sizes
from passes.onnx.canonicalize_attention import (
    CanonicalizeAttention,
    PlannedRewrite,
    UndoAnnotations,
    block_facts_of_match,
)
from passes.onnx.detect_fused_attention import detect_fused_attention
from passes.onnx.detect_linear_attention import OnnxLinearAttentionMatch, detect_linear_attention
from passes.onnx.detect_softmax_attention import detect_softmax_attention
from passes.onnx.graph_values import is_op
from passes.onnx.lower_attention import CHUNKED, ONNX_ATTENTION, ORT, TARGET_OPS, refusal
from passes.onnx.lower_rewriter_ops import LowerRewriterOps
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch
from passes.onnx.raise_opset import raise_opset
from passes.onnx.sequence_symbols import sequence_symbols
from passes.onnx.canonicalize_linear_attention import CanonicalizeLinearAttention, LINEAR_ORT, PlannedLinearRewrite
from rewriter.module_paths import annotate_modules, onnx_node_scopes
from rewriter.report import MatchReport, Report

__all__ = ["detect_onnx", "optimize_onnx"]

logger = logging.getLogger(__name__)

_PROVIDERS = ("cpu", "cuda")
# Default-domain opsets: every lowering emits ops valid in the model's own opset from 13 on, so a model
# is raised (once, before it is analysed) only to 13, or to 23 when Attention-23 is the requested target.
_MIN_OPSET, _ONNX_ATTENTION_OPSET = 13, 23


def _load(model_or_path) -> tuple[onnx.ModelProto, str]:
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(os.fspath(model_or_path)), os.path.basename(os.fspath(model_or_path))
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "model"
    if isinstance(model_or_path, ir.Model):
        return ir.serde.serialize_model(model_or_path), model_or_path.graph.name or "model"
    raise TypeError(f"expected an onnx.ModelProto, onnx_ir.Model or a path, got {type(model_or_path).__name__}")


def _as_written(original: onnx.ModelProto, model: ir.Model) -> onnx.ModelProto:
    """`model` as a proto, without the serialization-only differences from `original`.

    onnx_ir writes value_info for initializers and spells the default domain out; neither is a
    change the rewrite made, so the original's opset list and value_info set are kept where they
    still apply.
    """
    proto = ir.serde.serialize_model(model)
    if {(o.domain or "", o.version) for o in proto.opset_import} == {(o.domain or "", o.version)
                                                                     for o in original.opset_import}:
        del proto.opset_import[:]
        proto.opset_import.extend(original.opset_import)
    described = {info.name for info in original.graph.value_info}
    initializers = {init.name for init in proto.graph.initializer}
    infos = [info for info in proto.graph.value_info if info.name in described or info.name not in initializers]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(infos)
    return proto


def _graph_order(ctx: AnalysisContext):
    """A sort key placing any candidate (softmax, fused or Performer) at its block's position in the graph."""
    order = {node: index for index, node in enumerate(ir.traversal.RecursiveGraphIterator(ctx.model.graph))}

    def position(match: OnnxAttentionMatch | OnnxLinearAttentionMatch) -> int:
        if isinstance(match, OnnxLinearAttentionMatch):
            return min((order.get(node, len(order)) for node in match.nodes or [match.anchor]), default=len(order))
        anchor = match.fused or (match.nodes[-1] if match.nodes else None)
        return order.get(anchor, len(order))

    return position


def _detect(ctx: AnalysisContext) -> list[OnnxAttentionMatch]:
    """All candidates (softmax patterns and fused nodes) in graph order."""
    return sorted(detect_softmax_attention(ctx) + detect_fused_attention(ctx), key=_graph_order(ctx))


def _choose(ctx: AnalysisContext, match: OnnxAttentionMatch, target: str, provider: str) -> tuple[str | None, str | None]:
    """(target, None) for the rewrite to do, or (None, reason) to leave the block alone."""
    facts = block_facts_of_match(ctx, match)
    if target != "auto":
        if is_op(match.fused, "MultiHeadAttention", domain="com.microsoft") and target == ORT:
            return None, "already com.microsoft.MultiHeadAttention"
        if is_op(match.fused, "Attention") and target == ONNX_ATTENTION:
            return None, "already an Attention-23 node"
        reason = refusal(facts, target)
        if reason is not None and refusal(facts, CHUNKED) is None:  # a named target leaves the block alone
            reason += "; target auto or chunked (--target auto) rewrites it as the chunked loop"
        return (target, None) if reason is None else (None, reason)
    fused_mha = is_op(match.fused, "MultiHeadAttention", domain="com.microsoft")
    mha_reason = "already com.microsoft.MultiHeadAttention" if fused_mha else refusal(facts, ORT)
    if provider == "cuda" and mha_reason is None:
        return ORT, None
    if facts.flash_eligible:
        if fused_mha:
            return None, "already com.microsoft.MultiHeadAttention on its flash path"
        if mha_reason is None:
            return ORT, None
    reason = refusal(facts, CHUNKED)
    return (CHUNKED, None) if reason is None else (None, reason)


def _plan(ctx, matches, target, provider, memory_budget, chunk_size):
    plans, reasons = [], {}
    for index, match in enumerate(matches):
        if not match.spec.accepted:
            continue
        chosen, reason = _choose(ctx, match, target, provider)
        if chosen is None:
            reasons[index] = reason
            continue
        chunks = plan_chunk_sizes(match.spec, memory_budget, chunk_size) if chosen == CHUNKED else None
        plans.append((index, PlannedRewrite(match, chosen, chunks)))
    return plans, reasons


def _plan_linear(matches: list[OnnxLinearAttentionMatch], target: str, chunk_size):
    """Performer blocks: the slice loop under auto/chunked, LinearAttention for causal ones under ort."""
    plans, reasons = [], {}
    for index, match in enumerate(matches):
        if not match.spec.accepted:
            continue
        if target in ("auto", "chunked"):
            chosen = CHUNKED
        elif target == "ort" and match.causal:
            chosen = LINEAR_ORT
        else:
            reasons[index] = (f"{LINEAR_ORT} computes causal Performer attention only" if target == "ort" else
                              f"no {target} form for Performer attention") + "; use --target auto or chunked"
            continue
        slice_size = chunk_size[1] if chunk_size else default_slice_size(match.spec)
        plans.append((index, PlannedLinearRewrite(match, chosen, slice_size)))
    return plans, reasons


@dataclasses.dataclass
class _Analysis:
    """Candidates of one model and what to do with them: softmax/fused and Performer kept apart."""

    ctx: AnalysisContext
    matches: list[OnnxAttentionMatch]
    plans: list[tuple[int, PlannedRewrite]]
    reasons: dict[int, str]
    linear: list[OnnxLinearAttentionMatch]
    linear_plans: list[tuple[int, PlannedLinearRewrite]]
    linear_reasons: dict[int, str]
    position: Callable[[object], int]  # sort key over candidates, taken before any rewrite changes the graph

    @property
    def targets(self) -> list[str]:
        return [plan.target for _, plan in self.plans + self.linear_plans]


def _analyse(model: ir.Model, target, provider, memory_budget, chunk_size) -> _Analysis:
    ctx = AnalysisContext(model)
    matches = _detect(ctx)
    plans, reasons = _plan(ctx, matches, target, provider, memory_budget, chunk_size)
    linear = detect_linear_attention(ctx)
    linear_plans, linear_reasons = _plan_linear(linear, target, chunk_size)
    return _Analysis(ctx, matches, plans, reasons, linear, linear_plans, linear_reasons, _graph_order(ctx))


def _entries(matches, plans, reasons) -> list[tuple[object, MatchReport]]:
    planned = dict(plans)
    entries = []
    for index, match in enumerate(matches):
        spec, plan = match.spec, planned.get(index)
        if index in reasons:
            spec = spec.rejected(reasons[index])
        elif plan is not None and not plan.done:
            spec = spec.rejected(plan.failure or "not rewritten")
        done = plan is not None and plan.done
        if isinstance(plan, PlannedLinearRewrite):
            chunks = (plan.slice_size, plan.slice_size) if done and plan.target == CHUNKED else None
        else:
            chunks = (plan.chunks.query, plan.chunks.key) if done and plan.chunks else None
        entries.append((match, MatchReport(spec, done, TARGET_OPS.get(plan.target, plan.target) if done else None,
                                           chunks)))
    return entries


def _report(analysis: _Analysis, source: str) -> Report:
    """Every candidate, softmax and Performer, in graph order."""
    entries = _entries(analysis.matches, analysis.plans, analysis.reasons) + \
        _entries(analysis.linear, analysis.linear_plans, analysis.linear_reasons)
    return Report(source, [entry for _, entry in sorted(entries, key=lambda pair: analysis.position(pair[0]))])


def _chunk_pair(chunk_size) -> tuple[int, int] | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, int):
        return chunk_size, chunk_size
    query, key = chunk_size
    return int(query), int(key)


def detect_onnx(model_or_path) -> Report:
    """What `optimize_onnx` would find, without changing anything."""
    proto, source = _load(model_or_path)
    ctx = AnalysisContext(ir.serde.deserialize_model(proto))
    position = _graph_order(ctx)
    matches = sorted(_detect(ctx) + detect_linear_attention(ctx), key=position)
    report = Report(source, [MatchReport(match.spec, False) for match in matches],
                    sequence_dims=sequence_symbols(ctx, matches))
    return annotate_modules(report, onnx_node_scopes(proto)).as_dry_run()


def _raised(model: ir.Model, opset: int) -> tuple[ir.Model, str | None]:
    """`model` at default-domain `opset` at least, or unchanged with the reason it cannot be raised."""
    try:
        return raise_opset(model, opset), None
    except onnx_ir.passes.PassError as error:
        return model, str(error)


def _refuse_all(plans: list, reasons: dict[int, str], reason: str) -> None:
    """Turn every plan into a near-miss with `reason`."""
    reasons.update({index: reason for index, _ in plans})
    plans.clear()


def optimize_onnx(model_or_path, *, target: str = "auto", provider: str = "cpu", chunk_size=None,
                  memory_budget=None) -> tuple[onnx.ModelProto, Report]:
    """Rewrite every proven attention block for `target`; report every candidate.

    `chunk_size` (an int or (query, key)) fixes the chunked blocks; otherwise `memory_budget`
    (bytes or '256MiB') bounds each block's working set. The input model is never modified.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if provider not in _PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(_PROVIDERS)}")
    chunk_size = _chunk_pair(chunk_size)
    original, source = _load(model_or_path)
    model = ir.serde.deserialize_model(original)
    model, raise_error = _raised(model, _ONNX_ATTENTION_OPSET if target == ONNX_ATTENTION else _MIN_OPSET)
    analysis = _analyse(model, target, provider, memory_budget, chunk_size)
    lengths = sequence_symbols(analysis.ctx, analysis.matches + analysis.linear)  # before the rewrite changes the graph
    if raise_error:
        _refuse_all(analysis.plans, analysis.reasons, raise_error)
        _refuse_all(analysis.linear_plans, analysis.linear_reasons, raise_error)
    # Every block becomes its canonical node; one lowering (the pass export_onnx uses) turns each into its target.
    softmax = CanonicalizeAttention(analysis.ctx, [plan for _, plan in analysis.plans])
    linear = CanonicalizeLinearAttention(analysis.ctx, [plan for _, plan in analysis.linear_plans])
    lowering = LowerRewriterOps(targets=collections.ChainMap(softmax.targets, linear.targets))
    modified = onnx_ir.passes.Sequential(softmax, linear, lowering, UndoAnnotations(softmax, linear))(model).modified
    for _, plan in analysis.linear_plans:  # a target that refused a block lowered it to the slice loop
        if plan.node is not None and lowering.forms.get(plan.node) == CHUNKED:
            plan.target = CHUNKED
    report = annotate_modules(_report(analysis, source), onnx_node_scopes(original))
    report.sequence_dims = lengths
    logger.info(report.summary())
    if not modified:
        unchanged = onnx.ModelProto()
        unchanged.CopyFrom(original)
        return unchanged, report
    return _as_written(original, model), report
