"""The one timer of the benchmarks: the median of repeated calls after a warm-up call (which also compiles).

On CUDA each call is timed between two CUDA events (device time of the work it enqueues); elsewhere by the wall
clock. Calls repeat at least `min_reps` times and until `min_time` seconds have passed, at most `max_reps`.
Imported by the scripts beside it (`python benchmarks/NAME.py` puts this folder on the path).
"""

from __future__ import annotations

import time

import torch


def median_ms(fn, reps: int | None = None, *, min_reps: int = 3, max_reps: int = 200, min_time: float = 0.0,
              device: str = "cuda") -> float:
    """Median milliseconds of fn(); reps fixes the number of timed calls (min_reps = max_reps = reps)."""
    if reps is not None:
        min_reps = max_reps = reps
    cuda = device == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - started < min_time):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    times.sort()
    return times[len(times) // 2]
