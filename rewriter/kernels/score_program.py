"""Score programs: a mask or bias given as a function of (batch, head, query, key), never as an n×n tensor.

Real models build their masks and biases from O(n) pieces (a (B, L) padding mask, position aranges,
ALiBi slopes, a T5 bucket table); the front ends recover that function from the graph and the
kernels evaluate it one block at a time (`evaluate`), so nothing Lq × Lk is ever held. This is
FlexAttention's ``mask_mod``/``score_mod`` idea (Dong et al., 2024), recovered automatically.

A program is a tuple of steps in SSA form; step k reads only earlier steps, the last step is the
result, and every value broadcasts against (B, H, Lq, Lk)::

    ("index", (), axis, "int64")            position along axis "batch" | "head" | "query" | "key"
    ("const", (), value, dtype)             a scalar
    ("load", (s0, s1, …), leaf, dtype)      leaves[leaf][s0, s1, …], one index step per leaf axis;
                                            -1 reads position 0 of an axis of size 1
    (op, (a, b, …), None, dtype)            an elementwise op of `OPS`, with torch's broadcasting and
                                            type promotion, its result in `dtype`
    ("cast", (a,), None, dtype)             a conversion (float → int truncates toward zero)

A bias program whose model adds several terms to the scores one after another (``s + B₁ + B₂``)
marks those additions: ``("add", (a, b), "scores", dtype)`` (`SCORE_ADD`). Evaluated densely the
program is their sum; the kernels instead add each addend (`addend_steps`) to the scores in turn, as
the model rounds them (fl(fl(s + B₁) + B₂) is not fl(s + fl(B₁ + B₂)) for mid-size finite fills).
An add the model makes itself before adding the result to the scores (T5's bias + mask) is unmarked.

Leaves are the op's tensor operands: inputs, parameters and buffers of any size (they exist
already), and values the model computes that are O(n) or smaller. Programs travel as JSON text
(the torch op's and the ONNX node's string attribute); `parse` caches the decoded form. This
module imports no torch (ONNX-only paths read programs too); `score_program_torch` evaluates them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any


__all__ = ["AXES", "OPS", "SCORE_ADD", "Program", "Step", "addend_steps", "parse"]

AXES = ("batch", "head", "query", "key")

OPS = frozenset({
    "add", "sub", "mul", "div", "floor_divide", "remainder", "neg", "abs", "log", "exp", "floor", "ceil",
    "minimum", "maximum", "lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or", "logical_xor",
    "logical_not", "where",
})  # elementwise ops, with torch's semantics (`score_program_torch` evaluates them)


SCORE_ADD = "scores"  # the attr of an `add` that adds a score-chain addend (see the module docstring)


@dataclasses.dataclass(frozen=True)
class Step:
    op: str
    args: tuple[int, ...] = ()
    attr: Any = None
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Program:
    steps: tuple[Step, ...]

    def to_json(self) -> str:
        return json.dumps([[step.op, list(step.args), step.attr, step.dtype] for step in self.steps],
                          separators=(",", ":"))

    @property
    def dtype(self) -> str:
        return self.steps[-1].dtype

    @functools.cached_property
    def addends(self) -> tuple[int, ...]:
        """`addend_steps(self)`, computed once per program."""
        return addend_steps(self)

    @functools.cached_property
    def last_use(self) -> tuple[int, ...]:
        """For each step, the last step that reads it (its own index if none does)."""
        last = list(range(len(self.steps)))
        for position, step in enumerate(self.steps):
            for arg in step.args:
                if arg >= 0:
                    last[arg] = position
        return tuple(last)


@functools.lru_cache(maxsize=256)
def parse(text: str) -> Program:
    """The program `text` (from `Program.to_json`) encodes. Raises ValueError on a malformed one."""
    try:
        steps = tuple(Step(op, tuple(args), attr, dtype) for op, args, attr, dtype in json.loads(text))
    except (ValueError, TypeError) as error:
        raise ValueError(f"not a score program: {text[:80]!r}") from error
    for position, step in enumerate(steps):
        if step.op not in OPS and step.op not in ("index", "const", "load", "cast"):
            raise ValueError(f"score program step {position}: unknown op {step.op!r}")
        if any(arg >= position for arg in step.args):
            raise ValueError(f"score program step {position} reads a later step")
    if not steps:
        raise ValueError("empty score program")
    return Program(steps)


def addend_steps(program: Program) -> tuple[int, ...]:
    """The steps whose values the model adds to the scores, in its order: the operands of the chain of
    `SCORE_ADD` additions that ends at the program's output (the output alone where it is no such add)."""
    steps, chain = program.steps, []
    position = len(steps) - 1
    while steps[position].op == "add" and steps[position].attr == SCORE_ADD:
        chain.append(steps[position].args[1])
        position = steps[position].args[0]
    chain.append(position)
    return tuple(reversed(chain))
