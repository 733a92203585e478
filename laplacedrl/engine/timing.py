"""Wall-time estimates for ``--print-config``: a few timed steps, and durations people read."""
from __future__ import annotations

import time


def time_steps(step, n: int = 3, budget: float = 20.0) -> float | None:
    """Seconds per call of ``step()``: one untimed call, then the mean of up to ``n`` timed ones
    (fewer once ``budget`` seconds have gone). None if a step fails (e.g. out of memory)."""
    try:
        step()
        times, start = [], time.perf_counter()
        while len(times) < n and time.perf_counter() - start < budget:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return sum(times) / len(times)
    except (RuntimeError, MemoryError):
        return None


def format_duration(seconds: float | None) -> str:
    """``'2 h 05 min'``, ``'12 min'``, ``'40 s'``; ``'unknown'`` for None."""
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def timed_here() -> str:
    """Where an estimate's steps were timed: ``'timed here on 2 threads'``."""
    import torch
    n = torch.get_num_threads()
    return f"timed on this machine with {n} thread{'s' if n != 1 else ''}"
