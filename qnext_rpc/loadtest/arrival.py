"""When requests start: a fixed number in flight (closed loop), or Poisson arrivals at a rate (open loop).

Closed loop: `concurrency` workers, each sends its next request when its previous one ends, so the load adapts
to the server's speed. Open loop: requests start at the times of a Poisson process (exponential gaps of mean
1 / rate) whatever the server does, which is how independent users arrive; in-flight requests then pile up
when the server falls behind. rate = inf sends everything at once.

Both stop taking new requests when `next_request()` returns None (the request count or the duration is
reached); requests already in flight run to their end.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Load:
    kind: str  # "concurrency" | "rate"
    value: float  # requests in flight, or requests per second

    def __post_init__(self) -> None:
        assert self.kind in ("concurrency", "rate"), self.kind
        if not self.value > 0:
            raise ValueError(f"must be > 0, got {self.value:g}")
        if self.kind == "concurrency" and self.value != int(self.value):
            raise ValueError(f"must be an integer, got {self.value:g}")

    @property
    def label(self) -> str:
        return f"concurrency={int(self.value)}" if self.kind == "concurrency" else f"rate={self.value:g}/s"


def poisson_gaps(rate: float, rng: random.Random) -> Iterator[float]:
    """Seconds between successive arrivals of a Poisson process of `rate` per second (0 for rate = inf)."""
    while True:
        yield 0.0 if math.isinf(rate) else rng.expovariate(rate)


async def closed_loop(concurrency: int, next_request: Callable[[], T | None],
                      send: Callable[[T], Awaitable[R]]) -> list[R]:
    results: list[R] = []

    async def worker() -> None:
        while (item := next_request()) is not None:
            results.append(await send(item))
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return results


async def open_loop(rate: float, rng: random.Random, next_request: Callable[[], T | None],
                    send: Callable[[T], Awaitable[R]]) -> list[R]:
    tasks: list[asyncio.Task[R]] = []
    due = time.perf_counter()
    for gap in poisson_gaps(rate, rng):
        # Sleep until an absolute due time, so event-loop lateness does not accumulate into a lower rate.
        due += gap
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        item = next_request()
        if item is None:
            break
        tasks.append(asyncio.create_task(send(item)))
    return list(await asyncio.gather(*tasks))


async def drive(load: Load, next_request: Callable[[], T | None], send: Callable[[T], Awaitable[R]],
                seed: int = 0) -> list[R]:
    if load.kind == "concurrency":
        return await closed_loop(int(load.value), next_request, send)
    return await open_loop(load.value, random.Random(seed), next_request, send)
