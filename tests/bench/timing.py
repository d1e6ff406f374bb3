"""Timing helper shared by the in-process micro-benchmarks."""

from __future__ import annotations

import timeit
from typing import Callable


def per_call_us(fn: Callable[[], object], number: int = 100_000) -> float:
    """Best of five runs of ``number`` calls, in microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6
