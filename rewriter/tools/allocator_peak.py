"""Peak of torch's own allocator above what was allocated before one call, CPU or CUDA.

Unlike extra peak RSS (`rewriter.tools.measure.measure_call`), this counts only tensor storage
that torch's allocator hands out and takes back, so heap the C library keeps after a free (or a
CUDA caching allocator's reserve) does not enter:

    cuda  `torch.cuda.max_memory_allocated()` after the call (peak statistics reset just before)
          minus `torch.cuda.memory_allocated()` before it, on the current device;
    cpu   `torch.profiler` with `profile_memory=True` records every allocation and free of torch's
          CPU allocator (`ProfiledCPUMemoryReporter`): the peak of their running sum, in time order.
          Frees of storages allocated before the profiler started are not reported by torch, so
          they do not lower the sum (the figure never undercounts the call's own working set).

Both are bytes. The CPU profiler slows the call down, so its time is not a measurement; run it in a
fresh process of its own (`measure_in_fresh_process(setup, ..., measure=allocator_peak_bytes)`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["allocator_peak_bytes", "peak_of_allocation_events"]

logger = logging.getLogger(__name__)


def peak_of_allocation_events(sizes_in_time_order) -> int:
    """Peak (≥ 0) of the running sum of allocation sizes (frees negative), in bytes."""
    running = peak = 0
    for size in sizes_in_time_order:
        running += size
        peak = max(peak, running)
    return peak


def _allocation_events(result):
    """(start ns, bytes) of every allocator event in a profiler result's event tree."""
    from torch._C._profiler import _EventType

    stack, events = list(result.experimental_event_tree()), []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return sorted(events)


def _cpu_peak(call: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = _allocation_events(prof.profiler.kineto_results)
    logger.debug("%d CPU allocator events", len(events))
    return peak_of_allocation_events(size for _, size in events)


def _cuda_peak(call: Callable[[], object]) -> int:
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before)


def allocator_peak_bytes(call: Callable[[], object], device: str = "cpu") -> int:
    """Run `call` once on `device` ("cpu" or "cuda"); the allocator's peak above its state before, bytes.

    Raises ValueError for another device and RuntimeError for "cuda" without a CUDA device.
    """
    import torch

    if device == "cpu":
        return _cpu_peak(call)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("allocator_peak_bytes: no CUDA device (torch.cuda.is_available() is false)")
        return _cuda_peak(call)
    raise ValueError(f"allocator_peak_bytes: device must be 'cpu' or 'cuda', got {device!r}")
