"""Lookups in score-program recovery: an index tensor becomes the position of the table it reads.

A mixin of `score_program_recovery.ProgramTranslator` (which gives it `translate`, `builder`,
`_dims`, `_leaf`): ``Gather`` (T5's bucket table, an embedding), ``GatherElements``,
``GatherND`` with ``batch_dims`` 0 (HF's ``mask[batch_arange, kv_arange]``) and ``Concat`` read at
a constant position of its joined axis (GatherND's stacked index columns). The table is read
through its own producers only where every position is an in-range axis position; otherwise it is
a leaf, whose load wraps negative positions as the lookup does.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from passes.core.score_programs import ProgramError
from passes.onnx.graph_values import attribute, const_array

__all__ = ["LookupTranslations"]

logger = logging.getLogger(__name__)


class LookupTranslations:
    """The lookup ops of `ProgramTranslator`."""

    def _read(self, data: ir.Value, positions: list[int]) -> int:
        """data[positions]: through its producers where every position is an in-range axis position,
        else as a leaf (whose load wraps negative positions as the lookup does)."""
        plain = all(p < 0 or self.builder.steps[p].op == "index" for p in positions)
        if plain and data.producer() is not None and const_array(data) is None:
            try:
                return self.translate(data, positions)
            except ProgramError:
                pass
        return self._leaf(data, positions)

    def _op_Concat(self, node, value, positions):
        axis = int(attribute(node, "axis", 0)) % len(positions)
        entry = positions[axis]
        if entry >= 0 and self.builder.steps[entry].op != "const":
            raise ProgramError(f"Concat '{value.name}' read at a varying position of its joined axis")
        wanted, start = (int(self.builder.steps[entry].attr) if entry >= 0 else 0), 0
        for part in node.inputs:
            size = self._dims(part)[axis]
            if not isinstance(size, int):
                raise ProgramError(f"Concat '{value.name}' joins parts of dynamic size")
            if wanted < start + size:
                inner = list(positions)
                inner[axis] = -1 if size == 1 else self.builder.const(wanted - start, "int64")
                return self.translate(part, inner)
            start += size
        raise ProgramError(f"Concat '{value.name}' read past its end")

    def _op_Gather(self, node, value, positions):
        data, indices = node.inputs
        axis = int(attribute(node, "axis", 0)) % len(self._dims(data))
        count = len(self._dims(indices))
        gathered = self.translate(indices, positions[axis:axis + count])
        return self._read(data, positions[:axis] + [self._indexing(gathered)] + positions[axis + count:])

    def _op_GatherElements(self, node, value, positions):
        data, indices = node.inputs
        axis = int(attribute(node, "axis", 0)) % len(positions)
        inner = list(positions)
        inner[axis] = self._indexing(self.translate(indices, positions))
        return self._read(data, inner)

    def _op_GatherND(self, node, value, positions):
        data, indices = node.inputs
        if attribute(node, "batch_dims", 0):
            raise ProgramError("GatherND with batch_dims")
        depth = self._dims(indices)[-1]
        if not isinstance(depth, int):
            raise ProgramError("GatherND with a dynamic index depth")
        lead = len(self._dims(indices)) - 1
        picked = [self._indexing(self.translate(indices, positions[:lead] + [self.builder.const(j, "int64")]))
                  for j in range(depth)]
        return self._read(data, picked + positions[lead:])

    def _indexing(self, step: int) -> int:
        """An index value as an int64 position."""
        if self.builder.steps[step].dtype == "int64":
            return step
        return self.builder.add("cast", (step,), dtype="int64")
