"""`Report.summary()`: the memory estimate line says when the rewrite's estimate is the larger one."""

from __future__ import annotations

import pytest

from rewriter.report import MemoryComparison, Report


@pytest.mark.parametrize(("before", "after", "remark"), [(4 << 20, 1 << 20, False), (208 << 10, 391 << 10, True)])
def test_the_estimate_line_explains_a_larger_after(before, after, remark):
    report = Report("model.onnx", memory=MemoryComparison({}, before, after))
    [line] = [line for line in report.summary().splitlines() if line.startswith("estimated peak")]
    assert line.startswith("estimated peak activation memory at static shapes: ")
    assert line.endswith("(more: at this size the rewrite's per-block buffers outweigh the tensors it removes)") \
        == remark
