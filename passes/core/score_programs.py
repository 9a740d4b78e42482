"""Building score programs from a graph, and the proofs made on them (never on an n×n tensor).

Front ends translate the producers of a mask or bias operand into a `Program`
(`rewriter.kernels.score_program`) with a `ProgramBuilder`; the proofs here read only the program,
so optimising costs O(graph) at any sequence length:

- `causal_split` (from `rewriter.kernels.program_proofs`, which the kernels use too): a keep-mask
  ``(key ≤ query + o) ∧ rest`` becomes the kernels' causal flag with offset o, and the program of
  `rest` (or none).
- `fill_mask` (also from `program_proofs`): a bias ``where(keep, 0, f)`` with a fill f ≤ −1e30 is the
  keep-mask ``keep`` with fill f in the forward (the score is lost in ``s + f`` in fp32, as in the model).
- `reads_both_positions`: whether a value varies along both the query and the key axis, i.e. would
  be n×n if the model computed it.
"""

from __future__ import annotations

from typing import Any

from rewriter.kernels.program_proofs import Affine, causal_split, fill_mask, reachable
from rewriter.kernels.score_program import Program, Step

__all__ = ["ProgramBuilder", "ProgramError", "Affine", "causal_split", "fill_mask", "reads_both_positions",
           "axes_read"]


class ProgramError(Exception):
    """A mask or bias is not a function the program vocabulary expresses; the text says why."""


class ProgramBuilder:
    """Steps and leaves of one block's score programs; equal steps and leaves are shared.

    Leaves are the IR's values (FX nodes, ONNX values), numbered in order of first use; they become
    the op's ``leaves`` operand.
    """

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self._positions: dict[Step, int] = {}
        self.leaves: list[Any] = []

    def add(self, op: str, args: tuple[int, ...] = (), attr: Any = None, dtype: str = "float32") -> int:
        step = Step(op, tuple(args), attr, dtype)
        if step not in self._positions:
            self._positions[step] = len(self.steps)
            self.steps.append(step)
        return self._positions[step]

    def index(self, axis: str) -> int:
        return self.add("index", (), axis, "int64")

    def const(self, value, dtype: str) -> int:
        return self.add("const", (), value, dtype)

    def load(self, leaf: Any, indices: list[int], dtype: str) -> int:
        if not any(leaf is known for known in self.leaves):
            self.leaves.append(leaf)
        number = next(position for position, known in enumerate(self.leaves) if known is leaf)
        return self.add("load", tuple(indices), number, dtype)

    def program(self, output: int) -> Program:
        """The steps `output` depends on, renumbered, with `output` last."""
        return reachable(self.steps, output)


def axes_read(program: Program) -> set[str]:
    return {step.attr for step in program.steps if step.op == "index"}


def reads_both_positions(program: Program) -> bool:
    return {"query", "key"} <= axes_read(program)
