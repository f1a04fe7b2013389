"""Limits that depend on the request: ``limits=callable(scope) -> rates | None``.

The tiered example of the README (free: 10/minute, pro: 1000/minute, the plan
read from a header or from ``scope["state"]``), in the middleware (the default
and a rule) and in the FastAPI dependency, on memory:// and a real Redis.
Across four uvicorn workers: tests/test_uvicorn_features.py.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

import rategate
from rategate.middleware import _DYNAMIC_MAX, RateLimitMiddleware, Rule

TIERS = {b"free": "10/minute", b"pro": "1000/minute"}


def plan_limits(scope: Any) -> Any:
    """The README's example: the plan from a header; internal traffic unlimited."""
    headers = dict(scope["headers"])
    if headers.get(b"x-internal") == b"1":
        return None
    return TIERS.get(headers.get(b"x-plan", b"free"), TIERS[b"free"])


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def client(app: Any, ip: str = "203.0.113.7") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 1)), base_url="http://t")


async def statuses(c: httpx.AsyncClient, n: int, path: str = "/api", **headers: str) -> list[int]:
    return [(await c.get(path, headers=headers)).status_code for _ in range(n)]


@pytest.mark.asyncio
async def test_tiers_from_a_header(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    mw = RateLimitMiddleware(ok_app, limiter=lim, limits=plan_limits)
    async with client(mw, "203.0.113.1") as free, client(mw, "203.0.113.2") as pro:
        assert await statuses(free, 11) == [200] * 10 + [429]
        r = await pro.get("/api", headers={"x-plan": "pro"})
        assert r.headers["ratelimit-limit"] == "1000" and r.headers["ratelimit-policy"] == "1000;w=60"
        assert await statuses(pro, 30, **{"x-plan": "pro"}) == [200] * 30
        # An unknown plan is the free one (never unlimited).
        assert await statuses(pro, 10, **{"x-plan": "gold"}) == [200] * 10 + [429] * 0
        assert await statuses(pro, 1, **{"x-plan": "gold"}) == [429]
        # None: not limited, no headers.
        r = await free.get("/api", headers={"x-internal": "1"})
        assert r.status_code == 200 and "ratelimit-limit" not in r.headers
    # Each plan compiled once, whatever the number of requests.
    assert len(mw.default.dynamic.cache) == 2  # type: ignore[union-attr]
    rules = lim.stats()["rules"]
    assert rules["default"]["allowed"] == 10 + 1 + 30 + 10
    assert rules["default"]["denied"] + rules["default"]["denied_cached"] == 2


@pytest.mark.asyncio
async def test_a_rule_with_the_plan_in_scope_state(storage_url: str, make_limiter: Any) -> None:
    """A JWT middleware (here: a stand-in) puts the plan in scope["state"]."""

    def from_state(scope: Any) -> Any:
        return {"free": "2/minute", "pro": ["5/minute", rategate.Rate(100, 3600)]}[scope["state"]["plan"]]

    lim = make_limiter(storage_url)
    mw = RateLimitMiddleware(ok_app, limiter=lim, limits="100/minute",
                             rules=[Rule("/api", from_state, name="api")])

    def with_plan(plan: str) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("state", {})["plan"] = plan
            await mw(scope, receive, send)
        return app

    async with client(with_plan("free")) as free, client(with_plan("pro"), "203.0.113.8") as pro:
        assert await statuses(free, 3) == [200, 200, 429]
        assert (await free.get("/other")).headers["ratelimit-limit"] == "100"  # the default, static
        r = await pro.get("/api")
        assert r.headers["ratelimit-policy"] == "5;w=60, 100;w=3600"
        assert await statuses(pro, 5) == [200] * 4 + [429]
    # A list of rates (unhashable) is cached by its items.
    assert len(mw.rule_for("/api").dynamic.cache) == 2  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_tiers_are_separate_counters_in_redis(redis_server: Any, redis_url: str, make_limiter: Any) -> None:
    mw = RateLimitMiddleware(ok_app, limiter=make_limiter(redis_url), limits=plan_limits)
    async with client(mw, "203.0.113.3") as c:
        await c.get("/", headers={"x-plan": "free"})
        await c.get("/", headers={"x-plan": "pro"})
    keys = sorted(k.decode() for k in redis_server.client().keys("*"))
    assert keys == ["rg:{default|203.0.113.3}:10/60000", "rg:{default|203.0.113.3}:1000/60000"]


@pytest.mark.asyncio
async def test_bad_rates_from_the_callable_are_a_clear_error(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    for bad, words in (("10/fortnight", "unknown unit 'fortnight'"), (10, "rates must be a string"),
                       (["1/s", 3], "a rate must be a string or a Rate")):
        mw = RateLimitMiddleware(ok_app, limiter=lim, limits=lambda scope, bad=bad: bad)
        async with client(mw) as c:
            with pytest.raises(ValueError, match=re.escape(words)) as e:
                await c.get("/")
        assert "rule 'default': the limits function returned" in str(e.value)
        assert "or None (not limited)" in str(e.value)


@pytest.mark.asyncio
async def test_the_cache_of_compiled_limits_is_bounded(make_limiter: Any) -> None:
    mw = RateLimitMiddleware(ok_app, limiter=make_limiter("memory://"),
                             limits=lambda scope: f"{int(scope['path'][1:]) + 1}/minute")
    async with client(mw) as c:
        for i in range(_DYNAMIC_MAX + 50):
            r = await c.get(f"/{i}")
            assert r.headers["ratelimit-limit"] == str(i + 1)
    cache = mw.default.dynamic.cache  # type: ignore[union-attr]
    assert len(cache) == _DYNAMIC_MAX
    assert "1/minute" not in cache and f"{_DYNAMIC_MAX + 50}/minute" in cache  # oldest dropped first


@pytest.mark.asyncio
async def test_dependency_with_tiers(storage_url: str, make_limiter: Any) -> None:
    from fastapi import Depends, FastAPI

    lim = make_limiter(storage_url)
    app = FastAPI()

    @app.get("/items/{i}", dependencies=[Depends(rategate.RateLimit(plan_limits, limiter=lim))])
    async def item(i: int) -> dict[str, int]:
        return {"i": i}

    async with client(app) as c:
        assert [(await c.get(f"/items/{i}")).status_code for i in range(11)] == [200] * 10 + [429]
        r = await c.get("/items/1", headers={"x-plan": "pro"})
        assert r.status_code == 200 and r.headers["ratelimit-limit"] == "1000"
        r = await c.get("/items/1", headers={"x-internal": "1"})
        assert r.status_code == 200 and "ratelimit-limit" not in r.headers
    counts = lim.stats()["rules"]["dep:GET /items/{i}"]
    assert counts["allowed"] == 11 and counts["denied"] + counts["denied_cached"] == 1
