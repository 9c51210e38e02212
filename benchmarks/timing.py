"""Alternating timing shared by the benchmarks that compare against torch."""

from __future__ import annotations

import time

import numpy as np

# Before each timed call: torch's OpenMP threads spin for milliseconds after
# each parallel region, and would slow whichever call comes next.
SETTLE_S = 0.05


def alternate(fns, repeats: int) -> list[float]:
  """Median seconds of each of `fns`, called in turn `repeats` times, so
  that a busy machine slows all of them alike (warm them up first)."""
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, t in zip(fns, times):
      time.sleep(SETTLE_S)
      t0 = time.perf_counter()
      fn()
      t.append(time.perf_counter() - t0)
  return [float(np.median(t)) for t in times]
