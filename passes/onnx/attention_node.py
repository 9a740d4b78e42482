"""The canonical ONNX attention node, ``ai.rewriter::Attention``: where detection and lowering meet.

Both ONNX routes end in this one private node: the detector in an existing file replaces each
proven block with it (`passes.onnx.canonicalize_attention`), and `export_onnx` gets it from the
translation of ``torch.ops.rewriter.attention``. One lowering (`passes.onnx.lower_attention`)
turns it into the chosen target; it never reaches a saved file::

    q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv),
    [bias (B|1, H|1, Lq|1, Lk), float], [mask (B|1, H|1, Lq|1, Lk), bool, true = keep], leaves…
      ─ ai.rewriter::Attention(scale, softcap, mask_fill, causal, causal_offset,
                               zero_masked_rows, q_chunk, k_chunk, bias_program, mask_program,
                               fill_program)
      ─ out (B, H, Lq, Dv), row_stats

``bias_program`` / ``mask_program`` (JSON of `rewriter.kernels.score_program`, empty when absent)
give the bias or keep-mask as a function of (batch, head, query, key) over the trailing ``leaves``
inputs (any types and shapes); a program replaces the tensor of the same role, which is then absent.
``fill_program`` (with a mask only) gives each masked entry's value in place of ``mask_fill``
(`passes.core.fill_programs`: a model's bias added after a finite-fill mask).

Semantics are those of `rewriter.kernels.chunked_attention` (scale → soft-cap → +bias → keep-mask
→ causal); a row whose every key is masked gives NaN, or 0 with ``zero_masked_rows``. ``row_stats``
is what the torch op's backward reads; an inference graph never uses it.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir

__all__ = ["ATTENTION_OP", "LINEAR_ATTENTION_OP", "REWRITER_DOMAIN", "AttentionAttributes", "attention_attributes",
           "program_leaves", "register_schemas"]

REWRITER_DOMAIN = "ai.rewriter"
ATTENTION_OP, LINEAR_ATTENTION_OP = "Attention", "LinearAttention"
_LEAF_TYPES = ("float", "float16", "bfloat16", "double", "int64", "int32", "int16", "int8", "uint8", "bool")


@dataclasses.dataclass(frozen=True)
class AttentionAttributes:
    """The attributes of one ``ai.rewriter::Attention`` node, with the op's defaults."""

    scale: float = 1.0
    softcap: float = 0.0
    mask_fill: float = -math.inf
    causal: bool = False
    causal_offset: int = 0
    zero_masked_rows: bool = False
    q_chunk: int = 1024
    k_chunk: int = 4096
    bias_program: str = ""
    mask_program: str = ""
    fill_program: str = ""

    def as_onnx(self) -> dict:
        """The attributes as an ONNX node takes them (floats and ints)."""
        return {field.name: (int(value) if isinstance(value, bool) else value)
                for field in dataclasses.fields(self) for value in [getattr(self, field.name)]}


def attention_attributes(node: ir.Node) -> AttentionAttributes:
    """The attributes `node` sets, defaults for the rest."""
    kinds = {field.name: field.type for field in dataclasses.fields(AttentionAttributes)}
    values = {}
    for name, attribute in node.attributes.items():
        if name in kinds:
            value = attribute.value
            values[name] = bool(value) if kinds[name] == "bool" else value
    return AttentionAttributes(**values)


def program_leaves(node: ir.Node) -> list[ir.Value]:
    """The leaves the node's score programs read (its inputs after ``mask``)."""
    return list(node.inputs[5:])


def register_schemas() -> None:
    """Give ``ai.rewriter::Attention`` and ``::LinearAttention`` schemas, so onnxscript can trace calls to them."""
    from onnx import defs

    param, optional = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption.Optional
    variadic = defs.OpSchema.FormalParameterOption.Variadic
    kinds = defs.OpSchema.AttrType
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    lowered_by = "lowered by passes.onnx.lower_attention before saving"
    if not defs.has(ATTENTION_OP, REWRITER_DOMAIN):
        attribute_kinds = {"float": kinds.FLOAT, "int": kinds.INT, "bool": kinds.INT, "str": kinds.STRING}
        attributes = [defs.OpSchema.Attribute(field.name, attribute_kinds[field.type], "")
                      for field in dataclasses.fields(AttentionAttributes)]
        defs.register_schema(defs.OpSchema(
            ATTENTION_OP, REWRITER_DOMAIN, 1, doc=f"torch.ops.rewriter.attention; {lowered_by}",
            inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("bias", "T", param_option=optional),
                    param("mask", "B", param_option=optional),
                    param("leaves", "L", param_option=variadic, is_homogeneous=False, min_arity=0)],
            outputs=[param("out", "T"), param("row_stats", "S")],
            type_constraints=[("T", floats, ""), ("B", ["tensor(bool)"], ""), ("S", ["tensor(float)"], ""),
                              ("L", [f"tensor({name})" for name in _LEAF_TYPES], "")],
            attributes=attributes))
    if not defs.has(LINEAR_ATTENTION_OP, REWRITER_DOMAIN):
        attributes = [("feature_map", kinds.STRING), ("causal", kinds.INT), ("data_scale", kinds.FLOAT),
                      ("epsilon", kinds.FLOAT), ("normalizer_epsilon", kinds.FLOAT), ("stabilizer_grad", kinds.INT),
                      ("slice_size", kinds.INT), ("key_sum_epsilon", kinds.FLOAT)]
        defs.register_schema(defs.OpSchema(
            LINEAR_ATTENTION_OP, REWRITER_DOMAIN, 1, doc=f"torch.ops.rewriter.linear_attention; {lowered_by}",
            inputs=[param("q", "T"), param("k", "T"), param("v", "T"),
                    param("projection", "T", param_option=optional)],
            outputs=[param("out", "T"), param("state", "S"), param("key_max", "S")],
            type_constraints=[("T", floats, ""), ("S", ["tensor(float)", "tensor(double)"], "")],
            attributes=[defs.OpSchema.Attribute(name, kind, "") for name, kind in attributes]))
