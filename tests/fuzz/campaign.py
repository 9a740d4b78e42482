"""Run many fuzz cases through hypothesis and count the outcomes."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from hypothesis import HealthCheck, Phase, given, seed, settings

from .check import Outcome, run_case, run_onnx_case
from .programs import Case, cases

__all__ = ["run_campaign"]

logger = logging.getLogger(__name__)


def run_campaign(count: int, random_seed: int = 0, onnx_every: int = 0,
                 report: Callable[[Case, Outcome], None] | None = None,
                 counts: collections.Counter | None = None) -> collections.Counter:
    """Counts of outcome kinds over `count` generated cases (plus ``onnx_*`` for the ORT subset).

    Deterministic for a given `random_seed`. Every `onnx_every`-th case (0: none) is also
    exported and compared on ONNX Runtime. `report(case, outcome)` sees every outcome. Pass
    `counts` to read the counts so far when the campaign is interrupted.
    """
    counts = collections.Counter() if counts is None else counts

    @seed(random_seed)
    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def one(case: Case) -> None:
        index = sum(counts[kind] for kind in counts if not kind.startswith("onnx_"))
        outcomes = [("", run_case(case))]
        if onnx_every and index % onnx_every == 0:
            outcomes.append(("onnx_", run_onnx_case(case)))
        for prefix, outcome in outcomes:
            counts[prefix + outcome.kind] += 1
            if report is not None:
                report(case, outcome)

    one()
    return counts
