"""The rate limiter a user writes by hand: redis.asyncio + a GCRA Lua script.

This is the `python-redis` case of the benchmark, written the usual way:
a pure-ASGI middleware (not ``BaseHTTPMiddleware``), one ``EVALSHA`` per
request through a ``redis.asyncio`` connection pool (``NOSCRIPT`` -> load and
retry), the very GCRA script rategate runs (``rategate._core.SCRIPT``, one
check per call) and the same key layout, the same response
headers (draft-6 RateLimit-*), and fail-closed 429s when Redis fails.  It is deliberately reasonable
code, not a straw man: rates are parsed and the script arguments built once,
headers are rendered without f-string churn where it matters.
"""

from __future__ import annotations

import hashlib
import math
import re

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from rategate._core import SCRIPT  # the same GCRA as rategate, byte for byte

SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
OP_HIT = 0  # the script's op code of a hit (enum rg_op in csrc/check.h)

_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
          "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rates(text: str) -> list[tuple[int, float]]:
    """'10/second; 1000/hour' -> [(10, 1.0), (1000, 3600.0)]"""
    out = []
    for part in re.split(r"[;,]", text):
        if not part.strip():
            continue
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", part)
        if not m or m.group(3) not in _UNITS:
            raise ValueError(f"bad rate {part!r}")
        out.append((int(m.group(1)), float(m.group(2) or 1) * _UNITS[m.group(3)]))
    return out


class PyRedisLimiter:
    """GCRA checks with one EVALSHA each, over a redis.asyncio pool."""

    def __init__(self, url: str, rates: str, prefix: str = "pyrg") -> None:
        self.redis = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.rates = parse_rates(rates)
        self.suffixes = [f"{limit}/{round(period * 1000)}" for limit, period in self.rates]
        self.prefix = prefix
        # the script's ARGV for one check (csrc/script.c), as rategate sends a
        # lone check: 1 check, read with MGET ("1"), then for one rate the
        # common form (one spec "=1": T, tau in µs, a hit's TTL in ms; the
        # check: the spec's name and the cost), for several the general
        # form (no spec; op 0 (a hit), the cost, the rates, T and tau each).
        # hit() appends the cost.
        if len(self.rates) == 1:
            limit, period = self.rates[0]
            t = period * 1e6 / limit
            self.argv: list = [1, "1", 1, "=1", repr(t), repr(limit * t), max(1, math.ceil(t / 1000)), "=1"]
        else:
            self.argv = [1, "0", 0, OP_HIT]
            self.tail: list = [len(self.rates)]
            for limit, period in self.rates:
                t = period * 1e6 / limit
                self.tail += [repr(t), repr(limit * t)]
        self.nkeys = len(self.rates)
        # RateLimit-Policy (draft-6), rendered once: "100;w=60, 1000;w=3600"
        self.policy = ", ".join(f"{limit};w={math.ceil(period)}" for limit, period in self.rates).encode()

    async def hit(self, key: str, cost: int = 1) -> list:
        """-> [allowed, rate index, remaining, reset_after_us, retry_after_us, block_us]"""
        keys = [f"{self.prefix}:{{{key}}}:{s}" for s in self.suffixes]
        args = [*self.argv, cost] if len(self.rates) == 1 else [*self.argv, cost, *self.tail]
        try:
            out = await self.redis.evalsha(SHA, self.nkeys, *keys, *args)
        except NoScriptError:
            await self.redis.script_load(SCRIPT)
            out = await self.redis.evalsha(SHA, self.nkeys, *keys, *args)
        # H = (allowed + 2) * 32 + rate, remaining, reset; retry and block when denied
        h = out[0]
        return [h // 32 - 2, h % 32, out[1], out[2], *(out[3:5] if len(out) >= 5 else (0, 0))]

    async def aclose(self) -> None:
        await self.redis.aclose()


_DENIED_BODY = b'{"detail":"Too Many Requests"}'


class PyRedisRateLimitMiddleware:
    """Pure ASGI: a check per HTTP request keyed by client IP; 429 or headers."""

    def __init__(self, app, limiter: PyRedisLimiter, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limiter = limiter
        self.exempt = frozenset(exempt)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        key = client[0] if client else "unknown"
        try:
            allowed, rate, remaining, reset_us, retry_us, _ = await self.limiter.hit(key)
            limit = self.limiter.rates[rate][0]
        except (RedisError, OSError):
            # fail closed, as rategate does by default
            allowed, limit, remaining, reset_us, retry_us = 0, self.limiter.rates[0][0], 0, 0, 1_000_000
        headers = [
            (b"ratelimit-limit", b"%d" % limit),
            (b"ratelimit-remaining", b"%d" % remaining),
            (b"ratelimit-reset", b"%d" % math.ceil(reset_us / 1e6)),
            (b"ratelimit-policy", self.limiter.policy),
        ]
        if not allowed:
            headers.append((b"retry-after", b"%d" % max(1, math.ceil(retry_us / 1e6))))
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", b"%d" % len(_DENIED_BODY)))
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": _DENIED_BODY})
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)
