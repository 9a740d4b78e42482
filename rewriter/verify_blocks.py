"""Verification that exercises the blocks: lengths that span several query and key blocks.

A chunked rewrite is only checked where the loop over blocks runs more than once: the carried
running max and sum, the rescaling of the accumulator and causal block skipping all act between
blocks. A check at one short length (shorter than one block of 1024 × 4096) would pass a wrong
multi-block lowering. So a check runs at length 1, at a length just over one block and at one over
two blocks, none a multiple of either block size; where the written model's blocks are too large for
that to be cheap against the naive original, a copy of the rewrite with small blocks
(`CHECK_CHUNKS`) is checked at those lengths as well: the same lowering, forced to span several
blocks, while the written model is checked at length 1 and at one short length.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import onnx
import onnx_ir as ir

from rewriter.tools.bench import bind_dims
from rewriter.report import Report
from rewriter.verify import ort_session, random_inputs, verify_onnx

__all__ = ["CHECK_CHUNKS", "CHECK_CHUNK_CHOICES", "BlockCheck", "lengths_spanning_blocks", "verify_rewrite", "with_check_blocks"]

logger = logging.getLogger(__name__)

CHECK_CHUNKS = (16, 32)  # (queries, keys): lengths spanning several such blocks are cheap to run naively
# CHECK_CHUNKS, then smaller blocks for models that cannot take the lengths it needs (64 positions, say).
CHECK_CHUNK_CHOICES = (CHECK_CHUNKS, (8, 16), (4, 8), (2, 4))
_LARGEST_DIRECT_BLOCK = 256  # a written model with blocks up to this is checked at its own multi-block lengths
_SHORT_LENGTHS = (64, 32, 16, 8, 2)  # the written model's own check when its blocks are large: the first it takes


def lengths_spanning_blocks(q_chunk: int, k_chunk: int) -> list[int]:
    """[1, a length just over one block, one over two blocks]; neither of the last two a multiple
    of `q_chunk` or `k_chunk`, so the last block of each axis is a partial one."""
    block = max(q_chunk, k_chunk)
    lengths = [1]
    for length in (block + block // 2 + 1, 2 * block + block // 3 + 1):
        while length % q_chunk == 0 or length % k_chunk == 0:
            length += 1
        lengths.append(length)
    return lengths


@dataclasses.dataclass(frozen=True)
class BlockCheck:
    """What was verified, and the outcome: `text` says it in words (lengths, blocks, result)."""

    ok: bool
    max_abs_difference: float
    text: str
    lengths: tuple[int, ...]
    original_error: str | None = None  # why ONNX Runtime could not run the original (nothing compared)


def _chunked_blocks(report: Report) -> list[tuple[int, int]]:
    return [tuple(match.chunk_sizes) for match in report.matches if match.rewritten and match.chunk_sizes]


def _symbolic(model: onnx.ModelProto) -> bool:
    return any(dim.dim_param for value in model.graph.input for dim in value.type.tensor_type.shape.dim)


def _takes(original: onnx.ModelProto, length: int) -> bool:
    """Whether the original model runs at `length` (a model may have a maximum: a position table)."""
    try:
        ort_session(original, log_severity=4).run(None, random_inputs(original, bind_dims(original, length), length))
    except ImportError:
        raise  # no ONNX Runtime: the CLI says how to install it
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises several kinds for a length a model cannot take
        logger.debug("the original does not run at length %d: %s", length, error)
        return False
    return True


def _plan(original, report: Report) -> list[tuple[str, tuple[int, int] | None, list[int]]]:
    """(what, forced blocks or None for the written model, lengths) to check, for symbolic inputs."""
    blocks = _chunked_blocks(report)
    largest = max(blocks, key=max) if blocks else None
    if largest is not None and max(largest) <= _LARGEST_DIRECT_BLOCK and _takes(original, lengths_spanning_blocks(*largest)[-1]):
        return [("the written model", None, lengths_spanning_blocks(*largest))]
    short = next((n for n in _SHORT_LENGTHS if _takes(original, n)), 1)
    plan = [("the written model", None, sorted({1, short}))]
    if blocks:
        for chunks in CHECK_CHUNK_CHOICES:
            lengths = lengths_spanning_blocks(*chunks)
            if _takes(original, lengths[-1]):
                plan.append((f"a copy with {chunks[0]}×{chunks[1]} blocks", chunks, lengths))
                break
        else:
            logger.warning("verify: the original takes no length spanning two blocks of %s; checked at short lengths only",
                           "×".join(map(str, CHECK_CHUNK_CHOICES[-1])))
    return plan


def verify_rewrite(original: onnx.ModelProto, rewritten: onnx.ModelProto, report: Report,
                   rebuild: Callable[[tuple[int, int]], onnx.ModelProto], seed: int = 0) -> BlockCheck:
    """Check `rewritten` against `original` on ONNX Runtime at lengths that span several blocks.

    `rebuild(chunk_size)` rewrites the original again with those blocks (called when the written
    model's blocks are too large to span cheaply). Symbolic dims are bound as `rewriter bench`
    binds them (batch 1, everything else the length); lengths the original cannot run at (beyond
    its position table, say) are avoided by forcing smaller blocks. A model without symbolic input
    dims is checked at its fixed shapes, plus a copy with `CHECK_CHUNKS` blocks.
    """
    if _symbolic(original):
        plan, where = _plan(original, report), None
    else:
        plan = [("the written model", None, [1])]  # the length binds nothing here
        if _chunked_blocks(report):
            plan.append((f"a copy with {CHECK_CHUNKS[0]}×{CHECK_CHUNKS[1]} blocks", CHECK_CHUNKS, [1]))
        where = "at the model's fixed input shapes"
    parts, worst, used = [], 0.0, []
    for name, chunks, lengths in plan:
        model = rewritten if chunks is None else rebuild(chunks)
        for length in lengths:
            at = f" at length {length}" if where is None else ""
            try:
                result = verify_onnx(original, model, bind_dims(original, length), default_dim=length, seed=seed)
            except ImportError:
                raise
            except Exception as error:  # noqa: BLE001 - the rewrite failing to run is a failed check, not a crash
                return BlockCheck(False, worst, f"{name} fails to run{at}: {type(error).__name__}: {error}", ())
            if result.original_error is not None:
                return BlockCheck(False, worst, result.message, (), result.original_error)
            worst = max(worst, result.max_abs_difference)
            if not result.ok:
                return BlockCheck(False, worst, f"{name} differs{at}: {result.message}", ())
        used += [length for length in lengths if length not in used and where is None]
        parts.append(f"{name} {where or 'at lengths ' + ', '.join(map(str, lengths))}")
    text = f"verified {' and '.join(parts)}: outputs equal (max |difference| {worst:.3g})"
    return BlockCheck(True, worst, text, tuple(sorted(used)))


def with_check_blocks(model: ir.Model, domain: str, chunks: tuple[int, int] = CHECK_CHUNKS) -> ir.Model:
    """A copy of `model` whose `domain`::Attention nodes use `chunks` blocks (and ::LinearAttention
    nodes slices of the key chunk), so a check at short lengths spans several blocks."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for node in copy.graph:
        if node.domain != domain:
            continue
        names = {"q_chunk": chunks[0], "k_chunk": chunks[1]} if node.op_type == "Attention" else {"slice_size": chunks[1]}
        for name, value in names.items():
            if name in node.attributes:
                node.attributes[name] = ir.AttrInt64(name, value)
    return copy
