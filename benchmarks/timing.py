"""Timing shared by the speed benchmarks: variants timed in turns on one device."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Callable, ContextManager, Mapping

import torch


def run_timing(run: Path) -> dict:
    """A train.py run's timing.json (callbacks/throughput.py) without its per-step list, for a benchmark's row."""
    timing = json.loads((Path(run) / "timing.json").read_text())
    timing.pop("step_s", None)
    return timing


def sync() -> None:
    """Wait for the GPU (nothing on a CPU), so a timer reads finished work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_in_turns(variants: Mapping[str, Callable[[], object]], repeats: int,
                  context: Callable[[str], ContextManager] | None = None) -> dict[str, float]:
    """Median seconds per call of each variant over `repeats` rounds after one warm-up round. The variants take
    turns within each round, so a drifting clock affects them alike; `context(name)` is entered around a
    variant's timed call (a setting it needs, outside the timer)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats + 1):
        for name, fn in variants.items():
            with context(name) if context else contextlib.nullcontext():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
