"""The IR-neutral record of one attention candidate, shared by the FX and ONNX passes.

Detectors fill an `AttentionSpec` for every candidate they look at: an accepted match
(``reason is None``) or a rejected near-miss (``reason`` says why, in words a user can act on).
Planners and emitters read it; neither needs to know which IR it came from.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

__all__ = ["AttentionSpec", "ChunkSizes", "MaskKind", "layout_name"]

MaskKind = Literal["none", "boolean", "additive", "boolean+additive"]


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What was matched (or why not).

    Layout strings name the axes of each operand as the model holds it: ``B`` batch, ``H`` heads,
    ``L`` sequence, ``D`` head dim, ``(BH)`` a fused batch·heads axis; e.g. K stored already
    transposed in a heads-first model is ``"BHDL"``.
    """

    kind: Literal["softmax", "performer"]
    nodes: tuple[str, ...]
    reason: str | None = None
    causal: bool = False
    causal_offset: int = 0
    scale: float | None = None
    mask_kind: MaskKind = "none"
    mask_fill: float = -math.inf
    softcap: float | None = None
    dropout: float = 0.0
    batch_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    q_layout: str | None = None
    k_layout: str | None = None
    v_layout: str | None = None
    out_layout: str | None = None
    seq_len_q: int | None = None
    seq_len_k: int | None = None
    head_dim: int | None = None
    value_head_dim: int | None = None
    feature_map: str | None = None
    # What the mask and bias became (`passes.core.operand_forms`): "program" (generated per block from
    # `program_leaves`), "tensor" (the `dense_operands`, passed as the model builds them) or None.
    mask_source: str | None = None
    bias_source: str | None = None
    dense_operands: tuple[str, ...] = ()
    program_leaves: tuple[str, ...] = ()
    causal_in_program: bool = False  # a program holds a causal part the causal flag does not carry

    @property
    def accepted(self) -> bool:
        return self.reason is None

    @property
    def masked(self) -> bool:
        return self.mask_kind != "none"

    def rejected(self, reason: str) -> AttentionSpec:
        """The same candidate, turned into a near-miss with `reason`."""
        return dataclasses.replace(self, reason=reason)

    def to_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        for key in ("nodes", "dense_operands", "program_leaves"):
            fields[key] = list(fields[key])
        for key in ("mask_fill", "scale", "softcap"):
            value = fields[key]
            if isinstance(value, float) and not math.isfinite(value):
                fields[key] = str(value)
        return fields


@dataclasses.dataclass(frozen=True)
class ChunkSizes:
    """The planner's choice for one match: queries and keys per block."""

    query: int
    key: int


def layout_name(labels: str, order: str) -> str:
    """The layout string of an operand whose axes carry `labels`, for the kernel order `order`
    (batch…, sequence, dim): e.g. ``"BHDL"`` for K stored transposed, ``"(BH)LD"`` for a fused batch·heads axis."""
    batch, seq, dim = order[:-2], order[-2], order[-1]
    names = {seq: "L", dim: "D"}
    names.update(zip(batch, ("B", "H") if len(batch) == 2 else ("(BH)",)))
    return "".join(names.get(label, "?") for label in labels)
