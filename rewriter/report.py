"""What a run found and did: one entry per attention candidate, and its JSON form."""

from __future__ import annotations

import dataclasses

from passes.core.attention_spec import AttentionSpec
from passes.core.operand_forms import describe_operands

__all__ = ["MatchReport", "MemoryComparison", "Report"]


@dataclasses.dataclass
class MatchReport:
    spec: AttentionSpec
    rewritten: bool
    target: str | None = None
    chunk_sizes: tuple[int, int] | None = None
    module: str | None = None  # the module path the block comes from ("" the root), when the graph records it

    @property
    def node(self) -> str | None:
        """The block's first graph node: where it is when no module path is recorded."""
        return self.spec.nodes[0] if self.spec.nodes else None

    @property
    def where(self) -> str:
        """The module path, with the node name as the secondary name: ``h.1.attn (node matmul_2)``."""
        if self.module is None:
            return self.node or "?"
        return f"{self.module or '<root module>'} (node {self.node})"

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def reason(self) -> str | None:
        return self.spec.reason

    @property
    def causal(self) -> bool:
        return self.spec.causal

    @property
    def masked(self) -> bool:
        return self.spec.masked

    def to_dict(self) -> dict:
        return {
            "module": self.module, "node": self.node, "kind": self.kind, "rewritten": self.rewritten, "target": self.target, "reason": self.reason,
            "causal": self.causal, "masked": self.masked,
            "chunk_sizes": list(self.chunk_sizes) if self.chunk_sizes else None, "spec": self.spec.to_dict(),
        }


@dataclasses.dataclass(frozen=True)
class MemoryComparison:
    """Estimated peak live activation bytes before and after the rewrite, at given input dims."""

    dims: dict[str, int]  # the dims bound to the sequence length
    before_bytes: int
    after_bytes: int
    attention_dims: tuple[str, ...] = ()  # those of `dims` that are an attention block's query/key length
    other_dims: tuple[str, ...] = ()  # the other symbolic input dims, taken as 1

    def describe(self) -> str:
        """Which dims were bound, and why: ``s1=4096 (attention query/key length), batch=1``."""
        def why(name: str) -> str:
            return " (attention query/key length)" if name in self.attention_dims else " (named like a length)"

        bound = [f"{name}={size}{why(name)}" for name, size in self.dims.items()]
        return ", ".join(bound + [f"{name}=1" for name in self.other_dims]) or "static shapes"


@dataclasses.dataclass
class Report:
    source: str
    matches: list[MatchReport] = dataclasses.field(default_factory=list)
    memory: MemoryComparison | None = None
    sequence_dims: list[str] = dataclasses.field(default_factory=list)  # ONNX: symbolic dims that are attention lengths
    dry_run: bool = False  # a look (`inspect`, `detect_module`): nothing was changed
    verification: str | None = None  # what was verified, in words, where a check ran

    def as_dry_run(self) -> Report:
        """This report as an inspection's: each block says what optimising would make of it."""
        for match in self.matches:
            match.rewritten = False
        self.dry_run = True
        return self

    @property
    def would_rewrite_count(self) -> int:
        return sum(match.spec.accepted for match in self.matches)

    @property
    def rewritten_count(self) -> int:
        return sum(match.rewritten for match in self.matches)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "found": len(self.matches),
            "rewritten": self.rewritten_count,
            "dry_run": self.dry_run,
            "would_rewrite": self.would_rewrite_count if self.dry_run else None,
            "matches": [match.to_dict() for match in self.matches],
            "memory_estimate": dataclasses.asdict(self.memory) if self.memory else None,
            "sequence_dims": self.sequence_dims,
            "verification": self.verification,
        }

    def summary(self) -> str:
        """Human-readable lines: one per candidate."""
        found = f"found {len(self.matches)} attention block{'' if len(self.matches) == 1 else 's'}"
        if self.dry_run:
            would = self.would_rewrite_count
            lines = [f"{found}: {would} would be rewritten, {len(self.matches) - would} would be left alone "
                     "(inspection only: nothing was changed)"]
        else:
            lines = [f"{found}, rewrote {self.rewritten_count}"]
        for index, match in enumerate(self.matches):
            spec = match.spec
            traits = [spec.kind] + ["causal"] * spec.causal + ([spec.mask_kind + " mask"] if spec.masked else [])
            if spec.softcap:
                traits.append(f"softcap {spec.softcap:g}")
            if spec.num_kv_heads and spec.num_heads and spec.num_kv_heads != spec.num_heads:
                traits.append(f"{spec.num_heads}/{spec.num_kv_heads} heads")
            if spec.accepted:
                traits += describe_operands(spec)
            if match.rewritten:
                outcome = f"-> {match.target}"
            elif spec.accepted:
                outcome = f"would become {match.target}" if match.target else "would be rewritten"
            else:
                outcome = f"left alone: {match.reason}"
            lines.append(f"  [{index}] {match.where}: {', '.join(traits)} {outcome}")
        if self.memory:
            from rewriter.tools.memory_estimate import format_bytes

            more = self.memory.after_bytes > self.memory.before_bytes
            lines.append(f"estimated peak activation memory at {self.memory.describe()}: "
                         f"{format_bytes(self.memory.before_bytes)}"
                         f" before, {format_bytes(self.memory.after_bytes)} after"
                         + (" (more: at this size the rewrite's per-block buffers outweigh the tensors it removes)"
                            if more else ""))
        if self.verification:
            lines.append(self.verification)
        return "\n".join(lines)
