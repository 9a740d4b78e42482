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
import functools
import math

from rewriter.kernels.score_program import Program, Step

# A finite fill at or below this hides a key as −∞ does once its row keeps one real score: exp(fill − max)
# underflows to exactly 0 in every float type for scores of any realistic magnitude (< 1e29).
EFFECTIVELY_NEG_INF = -1e30

__all__ = ["EFFECTIVELY_NEG_INF", "Affine", "added_fill", "affine", "ancestors", "bias_fill", "causal_split", "fill_mask",
           "filled_bias_bounds", "filled_keep", "key_bounds", "reachable", "relative_steps"]


def ancestors(steps, output: int) -> set[int]:
    """`output` and the steps it reads, directly or not."""
    needed, stack = set(), [output]
    while stack:
        position = stack.pop()
        if position >= 0 and position not in needed:
            needed.add(position)
            stack.extend(steps[position].args)
    return needed


def reachable(steps, output: int) -> Program:
    """The steps `output` depends on, renumbered, with `output` last."""
    order = sorted(ancestors(steps, output))
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


def affine(steps: tuple[Step, ...], position: int) -> Affine | None:
    step = steps[position]
    if step.op == "index":
        return {"query": Affine(query=1), "key": Affine(key=1)}.get(step.attr)
    if step.op == "const":
        value = step.attr
        return Affine(constant=int(value)) if isinstance(value, (int, float)) and value == int(value) else None
    if step.dtype not in _INTEGER:
        return None
    parts = [affine(steps, arg) for arg in step.args]
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
    left, right = (affine(steps, arg) for arg in step.args)
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


def _split(steps: list[Step], output: int, kinds: tuple[str, ...]) -> tuple[dict[str, int], int | None]:
    """The bounds of the `kinds` that the keep-mask at step `output` states as conjuncts (one offset
    each; where two differ, the tighter), and the step of the other conjuncts' conjunction (None
    when there are none), appended to `steps` where needed."""
    bounds: dict[str, int] = {}
    rest = []
    for position in _conjuncts(steps, output):
        bound = _key_bound(steps, position)
        if bound is None or bound[0] not in kinds:
            rest.append(position)
            continue
        kind, offset = bound
        tighter = min if kind == "upper" else max
        bounds[kind] = tighter(bounds[kind], offset) if kind in bounds else offset
    if not rest:
        return bounds, None
    conjunction = rest[0]
    for position in rest[1:]:
        steps.append(Step("logical_and", (conjunction, position), None, "bool"))
        conjunction = len(steps) - 1
    return bounds, conjunction


def causal_split(program: Program) -> tuple[int | None, Program | None]:
    """(causal offset o, program of the rest) for a keep-mask ``(key ≤ query + o) ∧ rest``;
    (None, program) when no conjunct is causal. The rest is None when the mask is exactly causal."""
    steps = list(program.steps)
    bounds, rest = _split(steps, len(steps) - 1, ("upper",))
    if "upper" not in bounds:
        return None, program
    return bounds["upper"], None if rest is None else reachable(steps, rest)


def key_bounds(program: Program) -> tuple[int | None, int | None, Program | None]:
    """(upper, lower, rest): the keep-mask keeps only keys with ``query + lower ≤ key ≤ query + upper``
    (None: no such bound) and where `rest` (None: always) holds."""
    steps = list(program.steps)
    bounds, rest = _split(steps, len(steps) - 1, ("upper", "lower"))
    return bounds.get("upper"), bounds.get("lower"), None if rest is None else reachable(steps, rest)


def _filled(steps: list[Step], at_most: float = EFFECTIVELY_NEG_INF) -> tuple[int, int, float] | None:
    """(keep step, kept-value step, fill) when the last step is ``where(keep, x, f)`` or ``where(hide, f, x)``
    with a constant f ≤ `at_most` (a ``logical_not`` of `hide` is appended)."""
    last = steps[-1]
    if last.op != "where" or steps[last.args[0]].dtype != "bool":
        return None
    condition, first, second = last.args
    fills = [float(steps[arg].attr) if steps[arg].op == "const" else None for arg in (first, second)]
    if fills[1] is not None and fills[1] <= at_most:
        return condition, first, fills[1]
    if fills[0] is not None and fills[0] <= at_most:
        steps.append(Step("logical_not", (condition,), None, "bool"))
        return len(steps) - 1, second, fills[0]
    return None


def filled_keep(program: Program) -> Program | None:
    """The keep-mask of a bias ``where(keep, x, c)`` / ``where(hide, c, x)`` with a constant c of any value."""
    steps = list(program.steps)
    found = _filled(steps, at_most=math.inf)
    return None if found is None else reachable(steps, found[0])


def fill_mask(program: Program) -> tuple[Program, float] | None:
    """(keep-mask program, fill) when the bias `program` is ``where(keep, 0, f)`` or ``where(hide, f, 0)``
    with f ≤ −1e30 (``triu(full(−∞), 1)`` is the latter)."""
    steps = list(program.steps)
    found = _filled(steps)
    if found is None:
        return None
    keep, kept, fill = found
    if steps[kept].op != "const" or steps[kept].attr != 0:
        return None
    return reachable(steps, keep), fill


def added_fill(program: Program) -> tuple[Program, Program, float] | None:
    """(x, keep-mask program, f) when the bias `program` is ``x + where(keep, 0, f)`` (either operand
    order; the fill term as `fill_mask` reads it, f ≤ −1e30) with x, the fill term and the sum of one
    dtype: HF T5's bucket bias plus its padding mask. The bias is x where `keep` holds (x + 0 is x,
    up to the sign of a zero, which no score sees) and x + f elsewhere; else None."""
    steps = program.steps
    last = steps[-1]
    if last.op != "add":
        return None
    for fill_term, x in ((last.args[1], last.args[0]), (last.args[0], last.args[1])):
        found = fill_mask(reachable(steps, fill_term))
        if found is not None and steps[fill_term].dtype == steps[x].dtype == last.dtype:
            return reachable(steps, x), found[0], found[1]
    return None


def filled_bias_bounds(program: Program) -> tuple[int | None, int | None, Program | None] | None:
    """For a bias ``where(keep, x, f)`` (f ≤ −1e30) whose keep-mask has key bounds: (upper, lower, the
    bias inside them, ``where(rest, x, f)``, or x alone, None for a constant 0); else None.

    Outside the bounds every score is f: in a row that keeps a key anywhere, exactly 0 after exp().
    """
    steps = list(program.steps)
    found = _filled(steps)
    if found is None:
        return None
    keep, kept, fill = found
    bounds, rest = _split(steps, keep, ("upper", "lower"))
    if not bounds:
        return None
    if rest is None:
        inner = None if steps[kept].op == "const" and steps[kept].attr == 0 else reachable(steps, kept)
    else:
        steps.append(Step("const", (), fill, program.dtype))
        steps.append(Step("where", (rest, kept, len(steps) - 1), None, program.dtype))
        inner = reachable(steps, len(steps) - 1)
    return bounds.get("upper"), bounds.get("lower"), inner


@functools.lru_cache(maxsize=256)
def relative_steps(program: Program) -> tuple[dict[int, int], frozenset[int]]:
    """The steps that depend on the query and key indices only through ``key − query`` (T5's buckets,
    ALiBi's distances): ({step: c} for those that are exactly ``key − query + c``, all such steps).

    Such a value is Toeplitz in (query, key), so a block of rows × cols needs it only on the
    rows + cols − 1 differences the block spans (`score_program_torch.evaluate`).
    """
    steps = program.steps
    reads: list[set[str]] = []
    for step in steps:
        reads.append({step.attr} if step.op == "index" else set().union(*(reads[arg] for arg in step.args if arg >= 0)))
    roots: dict[int, int] = {}
    relative: set[int] = set()
    for position, step in enumerate(steps):
        if not {"query", "key"} & reads[position]:
            continue
        form = affine(steps, position)
        if form is not None and form.query == -1 and form.key == 1:
            roots[position] = form.constant
            relative.add(position)
        elif step.op != "index" and all(arg < 0 or arg in relative or not {"query", "key"} & reads[arg]
                                        for arg in step.args):
            relative.add(position)
    return roots, frozenset(relative)


def bias_fill(program: Program) -> float | None:
    """f when the bias `program` is ``where(keep, x, f)`` or ``where(hide, f, x)`` with a constant
    f ≤ `EFFECTIVELY_NEG_INF` (the score of every key it hides), else None."""
    found = _filled(list(program.steps))
    return None if found is None else found[2]
