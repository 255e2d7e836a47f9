"""Latency measurement: warm-up, pinned thread count, median and p90 over repeats.

`measure_latencies` times several models round-robin (one call of each per round), so a load
spike or clock drift on a shared machine hits every model alike and the ratios stay meaningful.
"""
from __future__ import annotations

import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Pin PyTorch's intra-op threads for the block (restored afterwards)."""
    old = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(old)


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    *,
    threads: int,
    warmup: int = 3,
    repeats: int = 20,
    shuffle_seed: int | None = None,
    progress: bool = False,
    desc: str = "timing",
) -> dict[str, list[float]]:
    """Milliseconds of every `fns[label]()` call, `repeats` rounds in which each model runs once.

    With `shuffle_seed` each round calls the models in a seeded random order (no model always runs
    right after the same neighbour); otherwise in dict order.

    >>> ts = interleaved_times({"a": lambda: None, "b": lambda: None}, threads=1, repeats=2, shuffle_seed=0)
    >>> sorted(ts), len(ts["a"])
    (['a', 'b'], 2)
    """
    times: dict[str, list[float]] = {label: [] for label in fns}
    rng = random.Random(shuffle_seed)
    with torch_threads(threads), torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in tqdm(range(repeats), desc=desc, disable=not progress, leave=False):
            order = list(fns)
            if shuffle_seed is not None:
                rng.shuffle(order)
            for label in order:
                t0 = time.perf_counter()
                fns[label]()
                times[label].append((time.perf_counter() - t0) * 1000.0)
    return times


def measure_latencies(
    fns: dict[str, Callable[[], Any]],
    *,
    threads: int,
    warmup: int = 3,
    repeats: int = 20,
    progress: bool = False,
    desc: str = "timing",
) -> dict[str, Latency]:
    """Time every `fns[label]()` `repeats` times, interleaved: each round calls each model once.

    >>> lat = measure_latencies({"a": lambda: None, "b": lambda: sum(range(100))}, threads=1, repeats=3)
    >>> sorted(lat), lat["a"].repeats
    (['a', 'b'], 3)
    """
    times = interleaved_times(fns, threads=threads, warmup=warmup, repeats=repeats, progress=progress, desc=desc)
    return {label: _summary(ts, threads) for label, ts in times.items()}


def _summary(times: list[float], threads: int) -> Latency:
    times = sorted(times)
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return Latency(statistics.median(times), p90, statistics.fmean(times), len(times), threads)
