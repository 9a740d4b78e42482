"""What a score program proves about the keys it keeps, read from the program alone.

`causal_split` finds the conjunct ``key ≤ query + o`` of a keep-mask program (from affine integer
forms of the index steps: HF's ``kv_idx <= q_idx``, GPT-2's ``tril`` slice, ``triu(full(−∞), 1)``
negated) and returns o with the program of the other conjuncts; front ends use it to set the op's
causal flag. `key_bounds` also finds a sliding window's far edge ``key ≥ query + o``; the kernels
use both to visit only the keys a chunk of rows can see and to build most of a chunk's mask from
the other conjuncts alone. Never evaluates a tensor.
"""

from __future__ import annotations

import dataclasses

from rewriter.kernels.score_program import Program, Step

__all__ = ["Affine", "causal_split", "key_bounds", "reachable"]


def reachable(steps, output: int) -> Program:
    """The steps `output` depends on, renumbered, with `output` last."""
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


def _key_bound(steps: tuple[Step, ...], position: int) -> tuple[str, int] | None:
    """("upper", o) when step `position` is exactly ``key ≤ query + o``, ("lower", o) when it is
    ``key ≥ query + o`` (a sliding window's far edge), over integers; else None."""
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
    margin = 1 if strict else 0
    if difference.query == 1 and difference.key == -1:  # q − k + c ≥ 0  ⇔  k ≤ q + c
        return "upper", difference.constant - margin
    if difference.query == -1 and difference.key == 1:  # k − q + c ≥ 0  ⇔  k ≥ q − c
        return "lower", margin - difference.constant
    return None


def _conjuncts(steps: tuple[Step, ...], position: int) -> list[int]:
    step = steps[position]
    if step.op == "logical_and":
        return [part for arg in step.args for part in _conjuncts(steps, arg)]
    return [position]


def _split(program: Program, kinds: tuple[str, ...]) -> tuple[dict[str, int], Program | None]:
    """The bounds of the `kinds` the keep-mask's conjuncts state (one offset each; where two differ,
    the tighter), and the program of the other conjuncts (None when there are none)."""
    steps = program.steps
    bounds: dict[str, int] = {}
    rest = []
    for position in _conjuncts(steps, len(steps) - 1):
        bound = _key_bound(steps, position)
        if bound is None or bound[0] not in kinds:
            rest.append(position)
            continue
        kind, offset = bound
        tighter = min if kind == "upper" else max
        bounds[kind] = tighter(bounds[kind], offset) if kind in bounds else offset
    if not rest:
        return bounds, None
    extended = list(steps)
    output = rest[0]
    for position in rest[1:]:
        extended.append(Step("logical_and", (output, position), None, "bool"))
        output = len(extended) - 1
    return bounds, reachable(extended, output)


def causal_split(program: Program) -> tuple[int | None, Program | None]:
    """(causal offset o, program of the rest) for a keep-mask ``(key ≤ query + o) ∧ rest``;
    (None, program) when no conjunct is causal. The rest is None when the mask is exactly causal."""
    bounds, rest = _split(program, ("upper",))
    if "upper" not in bounds:
        return None, program
    return bounds["upper"], rest


def key_bounds(program: Program) -> tuple[int | None, int | None, Program | None]:
    """(upper, lower, rest): the keep-mask keeps only keys with ``query + lower ≤ key ≤ query + upper``
    (None: no such bound) and where `rest` (None: always) holds."""
    bounds, rest = _split(program, ("upper", "lower"))
    return bounds.get("upper"), bounds.get("lower"), rest
