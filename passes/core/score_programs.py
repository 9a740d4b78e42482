"""Building score programs from a graph, and the proofs made on them (never on an n×n tensor).

Front ends translate the producers of a mask or bias operand into a `Program`
(`rewriter.kernels.score_program`) with a `ProgramBuilder`; the proofs here read only the program,
so optimising costs O(graph) at any sequence length:

- `causal_split`: a keep-mask ``(key ≤ query + o) ∧ rest`` becomes the kernels' causal flag with
  offset o, and the program of `rest` (or none). Offsets are read from affine integer forms of the
  index steps, e.g. HF's ``kv_idx <= q_idx``, GPT-2's ``tril`` slice, ``triu(full(−∞), 1)``.
- `fill_mask`: a bias ``where(keep, 0, f)`` with a fill f ≤ −1e30 is the keep-mask ``keep`` with
  fill f (the score is lost in ``s + f`` in fp32, as in the model).
- `reads_both_positions`: whether a value varies along both the query and the key axis, i.e. would
  be n×n if the model computed it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from passes.core.mask_semantics import EFFECTIVELY_NEG_INF
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
        return _reachable(self.steps, output)


def _reachable(steps, output: int) -> Program:
    needed, stack = set(), [output]
    while stack:
        position = stack.pop()
        if position >= 0 and position not in needed:
            needed.add(position)
            stack.extend(steps[position].args)
    order = sorted(needed)
    renumber = {old: new for new, old in enumerate(order)}
    renumber[-1] = -1
    return Program(tuple(dataclasses.replace(steps[old], args=tuple(renumber[a] for a in steps[old].args))
                         for old in order))


def axes_read(program: Program) -> set[str]:
    return {step.attr for step in program.steps if step.op == "index"}


def reads_both_positions(program: Program) -> bool:
    return {"query", "key"} <= axes_read(program)


@dataclasses.dataclass(frozen=True)
class Affine:
    """query·q + key·k + constant, over integer index steps."""

    query: int = 0
    key: int = 0
    constant: int = 0

    def __add__(self, other: Affine) -> Affine:
        return Affine(self.query + other.query, self.key + other.key, self.constant + other.constant)

    def scaled(self, factor: int) -> Affine:
        return Affine(self.query * factor, self.key * factor, self.constant * factor)


_INTEGER = ("int64", "int32", "int16", "int8", "uint8")


def _affine(steps: tuple[Step, ...], position: int) -> Affine | None:
    step = steps[position]
    if step.op == "index":
        return {"query": Affine(query=1), "key": Affine(key=1)}.get(step.attr)
    if step.op == "const":
        value = step.attr
        return Affine(constant=int(value)) if isinstance(value, (int, float)) and value == int(value) else None
    if step.dtype not in _INTEGER:
        return None
    parts = [_affine(steps, arg) for arg in step.args]
    if any(part is None for part in parts):
        return None
    if step.op == "cast":
        return parts[0]
    if step.op == "add":
        return parts[0] + parts[1]
    if step.op == "sub":
        return parts[0] + parts[1].scaled(-1)
    if step.op == "neg":
        return parts[0].scaled(-1)
    if step.op == "mul":
        constant = [part for part in parts if part.query == part.key == 0]
        if constant:
            other = parts[1] if constant[0] is parts[0] else parts[0]
            return other.scaled(constant[0].constant)
    return None


# comparison → (sign, strict): "a op b" holds iff sign·(b − a) ≥ 0 (> 0 when strict)
_COMPARISONS = {"le": (1, False), "lt": (1, True), "ge": (-1, False), "gt": (-1, True)}
_NEGATED = {"le": "gt", "lt": "ge", "ge": "lt", "gt": "le"}


def _causal_offset(steps: tuple[Step, ...], position: int) -> int | None:
    """o when step `position` is exactly ``key ≤ query + o``, over integers."""
    step = steps[position]
    if step.op == "logical_not" and steps[step.args[0]].op in _NEGATED:
        compared = steps[step.args[0]]
        step = dataclasses.replace(compared, op=_NEGATED[compared.op])
    if step.op not in _COMPARISONS:
        return None
    left, right = (_affine(steps, arg) for arg in step.args)
    if left is None or right is None:
        return None
    sign, strict = _COMPARISONS[step.op]
    difference = (right + left.scaled(-1)).scaled(sign)  # ≥ 0 (or > 0) where kept
    if difference.query != 1 or difference.key != -1:
        return None
    return difference.constant - (1 if strict else 0)  # q − k + c ≥ 0  ⇔  k ≤ q + c


def _conjuncts(steps: tuple[Step, ...], position: int) -> list[int]:
    step = steps[position]
    if step.op == "logical_and":
        return [part for arg in step.args for part in _conjuncts(steps, arg)]
    return [position]


def causal_split(program: Program) -> tuple[int | None, Program | None]:
    """(causal offset, program of the rest) for a keep-mask program; (None, program) when not causal.

    The rest is None when the mask is exactly causal. Two different causal offsets are not split.
    """
    steps = program.steps
    conjuncts = _conjuncts(steps, len(steps) - 1)
    offsets = {position: _causal_offset(steps, position) for position in conjuncts}
    causal = {offset for offset in offsets.values() if offset is not None}
    if len(causal) != 1:
        return None, program
    rest = [position for position, offset in offsets.items() if offset is None]
    if not rest:
        return causal.pop(), None
    builder_steps = list(steps)
    output = rest[0]
    for position in rest[1:]:
        builder_steps.append(Step("logical_and", (output, position), None, "bool"))
        output = len(builder_steps) - 1
    return causal.pop(), _reachable(builder_steps, output)


def fill_mask(program: Program) -> tuple[Program, float] | None:
    """(keep-mask program, fill) when the bias `program` is ``where(keep, 0, f)`` or ``where(hide, f, 0)``
    with f ≤ −1e30 (``triu(full(−∞), 1)`` is the latter)."""
    steps = list(program.steps)
    last = steps[-1]
    if last.op != "where" or steps[last.args[0]].dtype != "bool":
        return None
    condition, first, second = last.args
    constants = [steps[arg].attr if steps[arg].op == "const" else None for arg in (first, second)]
    if constants[0] == 0 and constants[1] is not None and float(constants[1]) <= EFFECTIVELY_NEG_INF:
        return _reachable(steps, condition), float(constants[1])
    if constants[1] == 0 and constants[0] is not None and float(constants[0]) <= EFFECTIVELY_NEG_INF:
        steps.append(Step("logical_not", (condition,), None, "bool"))
        return _reachable(steps, len(steps) - 1), float(constants[0])
    return None
