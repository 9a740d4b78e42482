"""Peak memory and time of one call, measured in a fresh process.

Memory is the process's peak resident set during the call minus its resident set just before
(Linux: VmHWM is reset through /proc/self/clear_refs), so model weights and inputs built before
the call do not count. A fresh process per measurement keeps allocator caches of earlier runs out.

`limit_extra_memory` caps what a measuring process may allocate from then on (its address space),
so that a configuration too large for the machine fails with an allocation error that
`is_out_of_memory` recognises, instead of driving the machine into swap or the kernel's OOM killer.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import multiprocessing
import queue as queue_module
import re
import resource
import time
from collections.abc import Callable

__all__ = ["Measurement", "is_out_of_memory", "limit_extra_memory", "measure_call", "measure_in_fresh_process",
           "peak_rss_bytes"]


@dataclasses.dataclass(frozen=True)
class Measurement:
    extra_peak_bytes: int
    seconds: float
    cpu_seconds: float  # over all threads: unlike wall time, barely moved by other load
    baseline_bytes: int = 0  # RSS just before the call: `peak_rss_bytes()` read inside it minus this is its peak so far

    @property
    def extra_peak_mib(self) -> float:
        return self.extra_peak_bytes / 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_bytes() -> int:
    """The process's peak resident set since `measure_call` started (or since the process started)."""
    return _status_kib("VmHWM") * 1024


_OUT_OF_MEMORY = re.compile(r"can't allocate memory|cannot allocate memory|bad_alloc|bad allocation|"
                            r"failed to allocate|out of memory", re.IGNORECASE)


def limit_extra_memory(extra_bytes: int) -> None:
    """Let this process map at most `extra_bytes` more address space than it has mapped now (RLIMIT_AS).

    Address space bounds resident memory from above, so a call that would need more than
    `extra_bytes` of RSS fails with an allocation error (torch: RuntimeError "can't allocate memory",
    numpy: MemoryError, ONNX Runtime: a failed-allocation error) before the machine runs out.
    """
    hard_limit = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft_limit = _status_kib("VmSize") * 1024 + extra_bytes
    if hard_limit != resource.RLIM_INFINITY:
        soft_limit = min(soft_limit, hard_limit)
    resource.setrlimit(resource.RLIMIT_AS, (soft_limit, hard_limit))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is an allocation failure (as `limit_extra_memory`
    provokes) from torch, numpy or ONNX Runtime."""
    while error is not None:
        if isinstance(error, MemoryError) or _OUT_OF_MEMORY.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def measure_call(call: Callable[[], object]) -> Measurement:
    """Run `call` once; its extra peak RSS and wall time."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # hand freed heap (e.g. tracing leftovers) back: a fair baseline
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    call()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return Measurement(max(0, _status_kib("VmHWM") - before) * 1024, seconds, cpu_seconds, before * 1024)


def _child(queue, setup, args, measure) -> None:
    try:
        queue.put(measure(setup(*args)))
    except BaseException as error:  # reported to the parent, which raises it
        queue.put(error)


def measure_in_fresh_process(setup: Callable[..., Callable[[], object]], *args,
                             measure: Callable[[Callable[[], object]], object] = measure_call):
    """`setup(*args)` runs in a new process and returns the call to measure there; `measure(call)`'s
    result (by default `measure_call`'s `Measurement`) comes back.

    `setup` and `measure` must be picklable (module-level functions, or partials of them): the
    child is spawned, not forked.
    A child that dies without reporting (killed for memory, say) raises `ChildProcessError`.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, setup, args, measure))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive():  # killed (e.g. out of memory) before it could report
                raise ChildProcessError(f"the measuring process died with exit code {process.exitcode}") from None
    process.join()
    if isinstance(result, BaseException):
        raise result
    return result
