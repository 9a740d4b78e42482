"""`rewriter.tools.allocator_peak`: torch's own allocator peak above what was allocated before a call."""

from __future__ import annotations

import functools

import pytest
import torch

from rewriter.tools.allocator_peak import allocator_peak_bytes, peak_of_allocation_events
from rewriter.tools.measure import measure_in_fresh_process

MIB = 2**20


def test_running_sum_peak_of_events():
    assert peak_of_allocation_events([4, 8, -4, 2, -10]) == 12
    assert peak_of_allocation_events([-8, 4]) == 0  # frees of older storage never make a negative peak
    assert peak_of_allocation_events([]) == 0


def overlapping_allocations():
    """4 MiB, then 8 MiB while the first is alive, then 6 MiB after both are freed: peak 12 MiB."""
    first = torch.ones(MIB, dtype=torch.float32)
    second = torch.ones(2 * MIB, dtype=torch.float32)
    del first, second
    return torch.ones(MIB * 3 // 2, dtype=torch.float32).sum()


def test_cpu_peak_counts_storages_alive_at_once():
    peak = allocator_peak_bytes(overlapping_allocations)
    assert 12 * MIB <= peak < 12 * MIB + 64 * 1024


def test_storage_freed_inside_the_call_but_allocated_before_does_not_lower_the_peak():
    older = [torch.ones(4 * MIB // 4)]

    def call():
        older.clear()  # frees 4 MiB allocated before the profiler started
        return torch.ones(MIB // 2).sum()  # 2 MiB

    assert 2 * MIB <= allocator_peak_bytes(call) < 2 * MIB + 64 * 1024


def test_unknown_device_and_missing_cuda_are_errors():
    with pytest.raises(ValueError, match="device must be"):
        allocator_peak_bytes(overlapping_allocations, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            allocator_peak_bytes(overlapping_allocations, device="cuda")


def prepare_overlapping():
    return overlapping_allocations


def test_fresh_process_with_the_allocator_measure():
    peak = measure_in_fresh_process(prepare_overlapping, measure=functools.partial(allocator_peak_bytes, device="cpu"))
    assert 12 * MIB <= peak < 12 * MIB + 64 * 1024
