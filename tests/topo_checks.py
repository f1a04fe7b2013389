"""Checks through rategate shared by the Sentinel and Cluster tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import rategate


async def traffic(lim: rategate.Limiter, stop: asyncio.Event, log: list[tuple[Any, ...]],
                  keys: Callable[[int], str], rate: str = "10/day", pause: float = 0.003) -> None:
    """Steady checks on keys(0), keys(1), ... until stop:
    (start, end, allowed, error, key) each."""
    i = 0
    while not stop.is_set():
        key = keys(i)
        t0 = time.monotonic()
        d = await lim.hit(key, rate)
        log.append((t0, time.monotonic(), d.allowed, d.error, key))
        i += 1
        await asyncio.sleep(pause)


async def exact(url: str, keys: Sequence[str], per_key: int, limit: int) -> None:
    """per_key concurrent checks on each key at limit/minute: exactly limit
    allowed for each, and no failure decision."""
    lim = rategate.Limiter(url, timeout=5.0, threads=2)
    try:
        res = await asyncio.gather(*[lim.hit(k, f"{limit}/minute") for k in keys for _ in range(per_key)])
        assert not [d for d in res if d.error], lim.stats()["last_error"]
        per: dict[int, int] = {}
        for i, d in enumerate(res):
            per[i // per_key] = per.get(i // per_key, 0) + d.allowed
        assert set(per.values()) == {limit}
    finally:
        await lim.aclose()


async def fails_fast(url: str, timeout: float, slack: float) -> str:
    """Three checks against a storage with no usable server: each gets the
    failure decision within its deadline (plus slack); the limiter's
    last_error, for the caller to check it names the cause."""
    lim = rategate.Limiter(url, timeout=timeout)
    try:
        for _ in range(3):
            t0 = time.monotonic()
            d = await lim.hit("nowhere", "5/minute")
            assert not d.allowed and d.error is not None
            assert time.monotonic() - t0 < timeout + slack
        return str(lim.stats()["last_error"])
    finally:
        await lim.aclose()
