"""`export_onnx`: a PyTorch module to an ONNX file whose attention never holds Lq × Lk.

    module ─optimize_module→ GraphModule with rewriter::attention / rewriter::linear_attention
           ─torch.onnx.export(dynamo=True)→ one ai.rewriter::Attention / ::LinearAttention node per block
           ─LowerRewriterOps→ chunked standard ops ─check, verify on ORT vs eager→ save (atomic)

The private node carries the op's scalar arguments as attributes; it exists only between the
exporter and the lowering pass, and never reaches the file. Performer blocks become Loops over
slices carrying only the (M, Dv + 1) state (never the L × M × Dv of the cumsum form).
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import defs

from passes.onnx.lower_rewriter_ops import CHUNKED, ONNX_ATTENTION, ORT, REWRITER_DOMAIN, LowerRewriterOps
from passes.onnx.raise_opset import RaiseOpsetPass
from rewriter.onnx_api import TARGET_NAMES
from rewriter.onnx_io import check_output_path, save_model
from rewriter.report import Report
from rewriter.torch_api import optimize_module

__all__ = ["ExportVerificationError", "export_onnx", "to_onnx"]

logger = logging.getLogger(__name__)

TARGETS = tuple(TARGET_NAMES)


class ExportVerificationError(ValueError):
    """The exported model's ONNX Runtime outputs differ from the eager module's; nothing was written."""


def _register_schema() -> None:
    """Give `ai.rewriter::Attention` and `::LinearAttention` schemas, so that onnxscript can trace calls to them."""
    param, optional = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption.Optional
    kinds = defs.OpSchema.AttrType
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    lowered_by = "lowered by passes.onnx.lower_rewriter_ops before saving"
    if not defs.has("Attention", REWRITER_DOMAIN):
        attributes = [("scale", kinds.FLOAT), ("softcap", kinds.FLOAT), ("mask_fill", kinds.FLOAT),
                      ("causal", kinds.INT), ("causal_offset", kinds.INT), ("q_chunk", kinds.INT), ("k_chunk", kinds.INT)]
        defs.register_schema(defs.OpSchema(
            "Attention", REWRITER_DOMAIN, 1, doc=f"torch.ops.rewriter.attention; {lowered_by}",
            inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("bias", "T", param_option=optional),
                    param("mask", "B", param_option=optional)],
            outputs=[param("out", "T"), param("row_stats", "S")],
            type_constraints=[("T", floats, ""), ("B", ["tensor(bool)"], ""), ("S", ["tensor(float)"], "")],
            attributes=[defs.OpSchema.Attribute(name, kind, "") for name, kind in attributes]))
    if not defs.has("LinearAttention", REWRITER_DOMAIN):
        attributes = [("feature_map", kinds.STRING), ("causal", kinds.INT), ("data_scale", kinds.FLOAT),
                      ("epsilon", kinds.FLOAT), ("normalizer_epsilon", kinds.FLOAT), ("stabilizer_grad", kinds.INT),
                      ("slice_size", kinds.INT), ("key_sum_epsilon", kinds.FLOAT)]
        defs.register_schema(defs.OpSchema(
            "LinearAttention", REWRITER_DOMAIN, 1, doc=f"torch.ops.rewriter.linear_attention; {lowered_by}",
            inputs=[param("q", "T"), param("k", "T"), param("v", "T"),
                    param("projection", "T", param_option=optional)],
            outputs=[param("out", "T"), param("state", "S"), param("key_max", "S")],
            type_constraints=[("T", floats, ""), ("S", ["tensor(float)", "tensor(double)"], "")],
            attributes=[defs.OpSchema.Attribute(name, kind, "") for name, kind in attributes]))


def _translate_attention(q, k, v, bias=None, mask=None, scale=1.0, softcap=0.0, mask_fill=-math.inf,
                         causal=False, causal_offset=0, q_chunk=1024, k_chunk=4096):
    """torch.ops.rewriter.attention → one ai.rewriter::Attention node (traced by onnxscript)."""
    import onnxscript  # only when exporting: importing it costs about a second

    return onnxscript.values.Opset(REWRITER_DOMAIN, 1).Attention(q, k, v, bias, mask, scale=float(scale), softcap=float(softcap),
                            mask_fill=float(mask_fill), causal=int(bool(causal)), causal_offset=int(causal_offset),
                            q_chunk=int(q_chunk), k_chunk=int(k_chunk))


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


def _shorter_inputs(example_inputs: tuple, shapes) -> tuple | None:
    """The example inputs cut along their dynamic axes (to about 2/3), to check a second length."""
    if not shapes:
        return None
    sliced, changed = [], False
    for value, spec in zip(example_inputs, shapes):
        for axis in _dynamic_axes(spec):
            if isinstance(value, torch.Tensor) and value.size(axis) > 2:
                value = value.narrow(axis, 0, max(2, value.size(axis) * 2 // 3))
                changed = True
        sliced.append(value)
    return tuple(sliced) if changed else None


def _has_symbolic_inputs(model: onnx.ModelProto) -> bool:
    """Whether any input kept a symbolic dim (torch.export may specialise a dim marked AUTO)."""
    return any(dim.dim_param for value in model.graph.input for dim in value.type.tensor_type.shape.dim)


def _run_ort(model: onnx.ModelProto, inputs: tuple) -> list[np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    tensors = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"the exported model takes {len(names)} inputs, the example has {len(tensors)} tensors")
    return session.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)})


def _compare(module, model: onnx.ModelProto, inputs: tuple, atol: float, rtol: float) -> str | None:
    """None when ORT's outputs equal eager's within tolerance (NaN equals NaN), else why not."""
    with torch.no_grad():
        expected = [t for t in torch.utils._pytree.tree_leaves(module(*inputs)) if isinstance(t, torch.Tensor)]
    actual = _run_ort(model, inputs)
    if len(expected) != len(actual):
        return f"{len(actual)} outputs instead of {len(expected)}"
    for index, (want, got) in enumerate(zip(expected, actual)):
        want = want.detach().cpu().float().numpy()
        if want.shape != got.shape:
            return f"output {index}: shape {got.shape} instead of {want.shape}"
        if not np.allclose(got.astype(np.float64), want, rtol=rtol, atol=atol, equal_nan=True):
            worst = float(np.nanmax(np.abs(got.astype(np.float64) - want)))
            return f"output {index}: max |difference| {worst:.3g}"
    return None


def to_onnx(module, example_inputs, *, target: str = "auto", dynamic_shapes=None, opset: int = 18,
            **options) -> tuple[onnx.ModelProto, Report]:
    """The checked ONNX model of `module` with attention lowered to `target`, and the report; nothing saved."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if opset < 18:
        raise ValueError(f"export needs opset 18 or newer (got {opset})")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    shapes = _positional_shapes(module, example_inputs, dynamic_shapes)
    gm, report = optimize_module(module, example_inputs, dynamic_shapes=shapes, **options)
    _register_schema()
    if getattr(module, "training", False):
        logger.warning("exporting %s in training mode (dropout stays in the graph); call .eval() first",
                       type(module).__name__)
    with warnings.catch_warnings():
        # The captured GraphModule reports training mode whatever the module's was (it cannot .eval()).
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        program = torch.onnx.export(
            gm, example_inputs, dynamo=True, dynamic_shapes=shapes, opset_version=opset, verbose=False,
            custom_translation_table={torch.ops.rewriter.attention.default: _translate_attention,
                                      torch.ops.rewriter.linear_attention.default: _translate_linear_attention})
    # auto is chunked: on ORT's CPU provider MultiHeadAttention and Attention-23 hold n × n
    # whenever there is a mask, a bias or causality, the chunked form never does.
    lowered = target if target in (ONNX_ATTENTION, ORT) else CHUNKED
    model_ir = program.model
    if lowered == ONNX_ATTENTION:
        # Raised after export: torch's opset-23 export fuses rotary embeddings into a
        # RotaryEmbedding node that ONNX Runtime 1.32 rejects for Llama-style caches.
        model_ir = RaiseOpsetPass(23)(model_ir).model
    lowering = LowerRewriterOps(lowered)
    lowering(model_ir)
    # Exported nodes of each kind keep the FX graph's order; should the counts differ, the requested
    # form is reported.
    for kind in ("softmax", "performer"):
        rewritten = [match for match in report.matches if match.rewritten and match.kind == kind]
        forms = [done for done, done_kind in zip(lowering.lowered, lowering.kinds) if done_kind == kind]
        if len(forms) != len(rewritten):
            forms = [(lowered, None)] * len(rewritten)
        for match, (form, _fallback) in zip(rewritten, forms):
            match.target = form
    model = ir.serde.serialize_model(model_ir)
    onnx.checker.check_model(model, full_check=True)
    return model, report


def export_onnx(module, example_inputs, path: str, *, target: str = "auto", dynamic_shapes=None, opset: int = 18,
                verify: bool = True, atol: float = 1e-4, rtol: float = 1e-3, **options) -> Report:
    """Export `module` to `path` with every proven attention block in chunked, O(n)-memory form.

    `options` go to `optimize_module` (`memory_budget`, `chunk_size`). With `verify`, ONNX Runtime's
    outputs are compared with the eager module's at the example inputs and, when `dynamic_shapes`
    is given, at inputs cut to a shorter length; a difference raises `ExportVerificationError`
    and nothing is written.
    """
    check_output_path(path)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    model, report = to_onnx(module, example_inputs, target=target, dynamic_shapes=dynamic_shapes, opset=opset,
                            **options)
    if verify:
        checks = [example_inputs]
        shorter = _shorter_inputs(example_inputs, _positional_shapes(module, example_inputs, dynamic_shapes))
        if shorter is not None and _has_symbolic_inputs(model):
            checks.append(shorter)
        for inputs in checks:
            problem = _compare(module, model, inputs, atol, rtol)
            if problem:
                lengths = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
                raise ExportVerificationError(f"ONNX Runtime differs from eager at input shapes {lengths}: {problem};"
                                              f" nothing written")
    save_model(model, path)
    logger.info("wrote %s: %s", path, report.summary())
    return report
