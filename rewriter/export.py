"""`export_onnx`: a PyTorch module to an ONNX file whose attention never holds Lq × Lk.

    module ─optimize_module→ GraphModule with rewriter::attention / rewriter::linear_attention
           ─torch.onnx.export(dynamo=True)→ one ai.rewriter::Attention / ::LinearAttention node per block
           ─LowerRewriterOps→ chunked standard ops ─check, verify on ORT vs eager→ save (atomic)

The private node carries the op's scalar arguments as attributes; it exists only between the
exporter and the lowering pass, and never reaches the file. Performer blocks become Loops over
slices carrying only the (M, Dv + 1) state (never the L × M × Dv of the cumsum form).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import torch

from passes.onnx.attention_node import REWRITER_DOMAIN, AttentionAttributes, register_schemas
from passes.onnx.lower_attention import CHUNKED, ONNX_ATTENTION, ORT, TARGET_OPS
from passes.onnx.lower_rewriter_ops import LowerRewriterOps, fallback_warnings_once
from passes.onnx.canonicalize_linear_attention import LINEAR_TARGET_OPS
from passes.onnx.raise_opset import raise_opset
from passes.core.planner import TARGETS
from rewriter.dynamic_capture import AUTO, cache_off_kwargs
from rewriter.export_axes import export_dynamic_shapes, sequence_axes
from rewriter.onnx_io import check_output_path, save_model
from rewriter.report import Report
from rewriter.torch_api import optimize_module
from rewriter.verify import ort_failure, ort_session
from rewriter.verify_blocks import CHECK_CHUNK_CHOICES, lengths_spanning_blocks, with_check_blocks

__all__ = ["ExportVerificationError", "export_onnx", "to_onnx"]

logger = logging.getLogger(__name__)



class ExportVerificationError(ValueError):
    """The exported model's ONNX Runtime outputs differ from the eager module's; nothing was written."""


def _translate_attention(q, k, v, bias=None, mask=None, leaves=(), scale=1.0, softcap=0.0, mask_fill=-math.inf,
                         causal=False, causal_offset=0, q_chunk=1024, k_chunk=4096, zero_masked_rows=False,
                         bias_program="", mask_program="", fill_program=""):
    """torch.ops.rewriter.attention → one ai.rewriter::Attention node (traced by onnxscript)."""
    import onnxscript  # only when exporting: importing it costs about a second

    attributes = AttentionAttributes(float(scale), float(softcap), float(mask_fill), bool(causal), int(causal_offset),
                                     bool(zero_masked_rows), int(q_chunk), int(k_chunk), str(bias_program),
                                     str(mask_program), str(fill_program))
    # The leaves go by keyword: torch's exporter (2.13) binds a variadic input given positionally to
    # every positional argument, q included.
    return onnxscript.values.Opset(REWRITER_DOMAIN, 1).Attention(q, k, v, bias, mask, leaves=list(leaves),
                                                                 **attributes.as_onnx())


def _translate_linear_attention(q, k, v, projection, feature_map, causal, data_scale, epsilon, normalizer_epsilon,
                                stabilizer_grad, slice_size, key_sum_epsilon=0.0):
    """torch.ops.rewriter.linear_attention → one ai.rewriter::LinearAttention node (out, state, key_max)."""
    import onnxscript

    return onnxscript.values.Opset(REWRITER_DOMAIN, 1).LinearAttention(
        q, k, v, projection, feature_map=str(feature_map), causal=int(bool(causal)), data_scale=float(data_scale),
        epsilon=float(epsilon), normalizer_epsilon=float(normalizer_epsilon),
        stabilizer_grad=int(bool(stabilizer_grad)), slice_size=int(slice_size), key_sum_epsilon=float(key_sum_epsilon),
        _num_outputs=3)


def _positional_shapes(module, example_inputs: tuple, dynamic_shapes):
    """`dynamic_shapes` as one entry per positional input (a dict keyed by argument name is reordered)."""
    if dynamic_shapes is None or not isinstance(dynamic_shapes, dict):
        return None if dynamic_shapes is None else tuple(dynamic_shapes)
    names = list(inspect.signature(module.forward).parameters)[: len(example_inputs)]
    unknown = set(dynamic_shapes) - set(names)
    if unknown:
        raise ValueError(f"dynamic_shapes names unknown inputs {sorted(unknown)}; inputs are {names}")
    return tuple(dynamic_shapes.get(name) for name in names)


def _dynamic_axes(spec) -> list[int]:
    if spec is None:
        return []
    items = spec.items() if isinstance(spec, dict) else enumerate(spec)
    return [axis for axis, dim in items if dim is not None]


def _resized(example_inputs: tuple, shapes, length: int) -> tuple:
    """The example inputs with every dynamic axis at `length`: cut, or repeated and cut."""
    resized = []
    for value, spec in zip(example_inputs, shapes or (None,) * len(example_inputs)):
        for axis in _dynamic_axes(spec):
            if isinstance(value, torch.Tensor) and value.size(axis) != length:
                copies = -(-length // value.size(axis))
                value = torch.cat([value] * copies, dim=axis).narrow(axis, 0, length)
        resized.append(value)
    return tuple(resized)


def _axis_word(shapes) -> str:
    """How the checked axes are spoken of: "length" for the blocks' sequence axes (`sequence_axes`
    marks them so), "size" for other dynamic axes (a batch axis, where the length was fixed)."""
    return "length" if any(dim == "length" for spec in shapes or () if isinstance(spec, dict)
                           for dim in spec.values()) else "size"


def _example_length(example_inputs: tuple, shapes) -> int | None:
    return next((value.size(axis) for value, spec in zip(example_inputs, shapes or ())
                 for axis in _dynamic_axes(spec) if isinstance(value, torch.Tensor)), None)


def _check_blocks(module, example_inputs: tuple, shapes) -> tuple[tuple[int, int], list[int]] | None:
    """Small blocks, and lengths spanning several of them, at which the eager module runs (the
    first of `CHECK_CHUNK_CHOICES` whose longest length the module takes: it may have a position table)."""
    for chunks in CHECK_CHUNK_CHOICES:
        lengths = lengths_spanning_blocks(*chunks)
        try:
            with torch.no_grad():
                module(*_resized(example_inputs, shapes, lengths[-1]))
        except Exception as error:  # noqa: BLE001 - a model raises anything at a length it cannot take
            logger.debug("the module does not run at length %d: %s", lengths[-1], error)
            continue
        return chunks, lengths
    return None


def _run_ort(model: onnx.ModelProto, inputs: tuple) -> list[np.ndarray]:
    session = ort_session(model, log_severity=4)
    tensors = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"the exported model takes {len(names)} inputs, the example has {len(tensors)} tensors")
    return session.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)})


def _compare(module, model: onnx.ModelProto, inputs: tuple, atol: float, rtol: float) -> str | None:
    """None when ORT's outputs equal eager's within tolerance (NaN equals NaN), else why not (ORT's
    own failure to run the model included)."""
    with torch.no_grad():
        expected = [t for t in torch.utils._pytree.tree_leaves(module(*inputs)) if isinstance(t, torch.Tensor)]
    try:
        actual = _run_ort(model, inputs)
    except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
        return (f"ONNX Runtime cannot run it ({ort_failure(error)}); if the model runs only at the example's "
                "shapes, export them with dynamic_shapes=None")
    if len(expected) != len(actual):
        return f"{len(actual)} outputs instead of {len(expected)}"
    for index, (want, got) in enumerate(zip(expected, actual)):
        want = want.detach().cpu().float().numpy()
        if want.shape != got.shape:
            return f"output {index}: shape {got.shape} instead of {want.shape}"
        if not np.allclose(got.astype(np.float64), want, rtol=rtol, atol=atol, equal_nan=True):
            worst = float(np.nanmax(np.abs(got.astype(np.float64) - want)))
            return (f"output {index}: max |difference| {worst:.3g} (atol {atol:g}, rtol {rtol:g}; where eager itself "
                    "is that far from exact, as float64 shows, pass larger atol=/rtol=)")
    return None


def to_onnx(module, example_inputs, *, target: str = "auto", dynamic_shapes=AUTO, opset: int = 18,
            **options) -> tuple[onnx.ModelProto, Report]:
    """The checked ONNX model of `module` with attention lowered to `target`, and the report; nothing saved."""
    model_ir, report, lowered, _ = _export_unlowered(module, example_inputs, target, dynamic_shapes, opset, **options)
    return _lower(model_ir, report, lowered), report


def _onnx_program(gm, example_inputs: tuple, kwargs: dict | None, shapes, opset: int, name: str, auto: bool):
    """torch.onnx.export (dynamo) of the rewritten `gm`; under `auto`, at the example's shapes with one
    WARNING where the exporter cannot keep `shapes` symbolic. Returns (program, the shapes it kept)."""
    translations = {torch.ops.rewriter.attention.default: _translate_attention,
                    torch.ops.rewriter.linear_attention.default: _translate_linear_attention}
    for attempt in ([shapes, None] if auto and shapes else [shapes]):
        try:
            with warnings.catch_warnings():
                # The captured GraphModule reports training mode whatever the module's was (it cannot .eval()).
                warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
                # one entry per input, keyword inputs (constants) included
                spec = (*attempt, *[None] * len(kwargs)) if attempt is not None and kwargs else attempt
                return torch.onnx.export(gm, example_inputs, kwargs=kwargs, dynamo=True, dynamic_shapes=spec,
                                         opset_version=opset, verbose=False,
                                         custom_translation_table=translations), attempt
        except Exception as error:  # noqa: BLE001 - any failure of the dynamic export falls back to static
            if attempt is None or not auto:
                raise
            cause = error.__cause__ or error  # torch.onnx wraps torch.export's error in a page of advice
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            logger.warning("export_onnx(%s): the file takes only the example's shapes: exporting with dynamic batch "
                           "and sequence axes failed (%s: %s); pass dynamic_shapes= to choose the axes", name,
                           type(cause).__name__, reason)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _export_unlowered(module, example_inputs, target, dynamic_shapes, opset, **options):
    """(the exported onnx_ir model with its ai.rewriter nodes, the report, the form to lower them to, the
    axes a check resizes: one entry per positional input, None for a file with static shapes)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if opset < 18:
        raise ValueError(f"export needs opset 18 or newer (got {opset})")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    auto = isinstance(dynamic_shapes, str) and dynamic_shapes == AUTO
    shapes = None if auto else _positional_shapes(module, example_inputs, dynamic_shapes)
    gm, report = optimize_module(module, example_inputs, dynamic_shapes=AUTO if auto else shapes, **options)
    if auto:  # the axes the capture kept symbolic (optimize_module warned about any it could not)
        shapes = export_dynamic_shapes(gm, example_inputs)
    register_schemas()
    if getattr(module, "training", False):
        logger.warning("exporting %s in training mode (dropout stays in the graph); call .eval() first",
                       type(module).__name__)
    # use_cache=False, where optimize_module added it: the captured graph takes it as a constant
    program, shapes = _onnx_program(gm, example_inputs, cache_off_kwargs(module, example_inputs, None), shapes, opset,
                                    type(module).__name__, auto)
    # auto is chunked: on ORT's CPU provider MultiHeadAttention and Attention-23 hold n × n
    # whenever there is a mask, a bias or causality, the chunked form never does.
    lowered = target if target in (ONNX_ATTENTION, ORT) else CHUNKED
    model_ir = program.model
    symbolic = any(value.shape is not None and value.shape.is_dynamic() for value in model_ir.graph.inputs)
    # Checked at other lengths along the blocks' sequence axes only (a batch axis keeps its size).
    lengths = (sequence_axes(gm, example_inputs) or shapes) if symbolic else None
    if lowered == ONNX_ATTENTION:
        # Raised after export: torch's opset-23 export fuses rotary embeddings into a
        # RotaryEmbedding node that ONNX Runtime 1.32 rejects for Llama-style caches.
        model_ir = raise_opset(model_ir, 23)
    return model_ir, report, lowered, lengths


def _lower(model_ir: ir.Model, report: Report | None, lowered: str) -> onnx.ModelProto:
    """`model_ir` with its ai.rewriter nodes lowered to `lowered`, checked; the report says each block's form."""
    lowering = LowerRewriterOps(lowered)
    lowering(model_ir)
    if report is None:
        return ir.serde.serialize_model(model_ir)
    # Exported nodes of each kind keep the FX graph's order; should the counts differ, the requested
    # form is reported.
    for kind in ("softmax", "performer"):
        rewritten = [match for match in report.matches if match.rewritten and match.kind == kind]
        forms = [done for done, done_kind in zip(lowering.lowered, lowering.kinds) if done_kind == kind]
        if len(forms) != len(rewritten):
            forms = [(lowered, None)] * len(rewritten)
        names = TARGET_OPS if kind == "softmax" else LINEAR_TARGET_OPS
        for match, (form, _fallback) in zip(rewritten, forms):
            match.target = names[form]
    model = ir.serde.serialize_model(model_ir)
    onnx.checker.check_model(model, full_check=True)
    return model


@fallback_warnings_once()  # the verification copy is lowered too: each fallback is told once
def export_onnx(module, example_inputs, path: str, *, target: str = "auto", dynamic_shapes=AUTO, opset: int = 18,
                verify: bool = True, atol: float = 1e-4, rtol: float = 1e-3, **options) -> Report:
    """Export `module` to `path` with every proven attention block in chunked, O(n)-memory form.

    `dynamic_shapes="auto"` (default) exports symbolic the batch and sequence axes that `optimize_module`
    keeps dynamic (`rewriter.export_axes`); where the exporter cannot, the example's shapes, with one
    WARNING. None exports the example's shapes; a torch.export spec chooses the axes.
    `options` go to `optimize_module` (`memory_budget`, `chunk_size`); keyword inputs of the model are not
    taken (pass them positionally; `example_kwargs` raises TypeError). With `verify`, ONNX Runtime's
    outputs are compared with the eager module's at the example inputs, and those of a copy lowered
    with small blocks (`rewriter.verify_blocks`) at length 1 and at lengths spanning two and three
    blocks of each axis (inputs cut or repeated along their sequence axes; at the example's shapes for
    a static export); `Report.verification` says which. A difference raises `ExportVerificationError`
    and nothing is written.
    """
    if "example_kwargs" in options:
        raise TypeError("export_onnx takes the model's inputs positionally in example_inputs, not example_kwargs")
    check_output_path(path)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    model_ir, report, lowered, shapes = _export_unlowered(module, example_inputs, target, dynamic_shapes, opset,
                                                          **options)
    cache_off = cache_off_kwargs(module, example_inputs, None)  # eager is compared without its cache, as exported
    eager = module if cache_off is None else functools.partial(module, **cache_off)
    forced = _check_blocks(eager, example_inputs, shapes) if verify and report.rewritten_count else None
    check_ir = with_check_blocks(model_ir, REWRITER_DOMAIN, forced[0]) if forced else None
    model = _lower(model_ir, report, lowered)
    if verify:
        length, word = _example_length(example_inputs, shapes), _axis_word(shapes)
        checks = [("the exported model", model, [example_inputs], f"at the example {word} {length}" if length else
                   "at the example's shapes")]
        if forced:
            (q_chunk, k_chunk), lengths = forced
            copy = _lower(check_ir, None, lowered)
            if shapes:
                checks.append((f"a copy with {q_chunk}×{k_chunk} blocks", copy,
                               [_resized(example_inputs, shapes, n) for n in lengths],
                               f"at {word}s " + ", ".join(map(str, lengths))))
            else:
                checks.append((f"a copy with {q_chunk}×{k_chunk} blocks", copy, [example_inputs],
                               "at the example's shapes"))
        for name, checked, cases, spoken in checks:
            for inputs in cases:
                problem = _compare(eager, checked, inputs, atol, rtol)
                if problem:
                    shapes_text = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
                    raise ExportVerificationError(f"ONNX Runtime check against eager failed ({name}) at input "
                                                  f"shapes {shapes_text}: {problem}; nothing written")
        report.verification = "verified on ONNX Runtime against eager: " + " and ".join(
            f"{name} {spoken}" for name, _, _, spoken in checks)
    save_model(model, path)
    logger.info("wrote %s: %s", path, report.summary())
    return report
