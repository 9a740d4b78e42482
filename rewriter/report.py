"""What a run found and did: one entry per attention candidate, and its JSON form."""

from __future__ import annotations

import dataclasses

from passes.attention_spec import AttentionSpec

__all__ = ["MatchReport", "Report"]


@dataclasses.dataclass
class MatchReport:
    spec: AttentionSpec
    rewritten: bool
    target: str | None = None
    chunk_sizes: tuple[int, int] | None = None

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
            "kind": self.kind, "rewritten": self.rewritten, "target": self.target, "reason": self.reason,
            "causal": self.causal, "masked": self.masked,
            "chunk_sizes": list(self.chunk_sizes) if self.chunk_sizes else None, "spec": self.spec.to_dict(),
        }


@dataclasses.dataclass
class Report:
    source: str
    matches: list[MatchReport] = dataclasses.field(default_factory=list)

    @property
    def rewritten_count(self) -> int:
        return sum(match.rewritten for match in self.matches)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "found": len(self.matches),
            "rewritten": self.rewritten_count,
            "matches": [match.to_dict() for match in self.matches],
        }

    def summary(self) -> str:
        """Human-readable lines: one per candidate."""
        lines = [f"found {len(self.matches)} attention blocks, rewrote {self.rewritten_count}"]
        for index, match in enumerate(self.matches):
            spec = match.spec
            traits = [spec.kind] + ["causal"] * spec.causal + ([spec.mask_kind + " mask"] if spec.masked else [])
            if spec.softcap:
                traits.append(f"softcap {spec.softcap:g}")
            if spec.num_kv_heads and spec.num_heads and spec.num_kv_heads != spec.num_heads:
                traits.append(f"{spec.num_heads}/{spec.num_kv_heads} heads")
            where = spec.nodes[0] if spec.nodes else "?"
            if match.rewritten:
                outcome = f"-> {match.target}"
            else:
                outcome = "accepted" if spec.accepted else f"left alone: {match.reason}"
            lines.append(f"  [{index}] {where}: {', '.join(traits)} {outcome}")
        return "\n".join(lines)
