"""The FastAPI dependency: Depends(RateLimit("10/minute", limiter=...)), keyed by route template."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

import rategate
from rategate.fastapi import RateLimit
from rategate.keys import header

BOUND = 10.0  # seconds: only a hang fails on it


@pytest.fixture
async def limiter(storage_url: str) -> AsyncIterator[rategate.Limiter]:
    lim = rategate.Limiter(storage_url)
    yield lim
    await lim.aclose()


def client(app: Any, ip: str = "203.0.113.9") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 1)), base_url="http://t")


def make_app(dep: RateLimit) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}", dependencies=[Depends(dep)])
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.post("/items/{item_id}", dependencies=[Depends(dep)])
    async def post_item(item_id: int) -> dict[str, int]:
        return {"posted": item_id}

    @app.get("/users/{name}", dependencies=[Depends(dep)])
    async def user(name: str) -> dict[str, str]:
        return {"name": name}

    @app.get("/free")
    async def free() -> dict[str, bool]:
        return {"free": True}

    return app


@pytest.mark.asyncio
async def test_keyed_by_route_template_with_429(limiter: Any) -> None:
    app = make_app(RateLimit("2/minute", limiter=limiter))
    async with client(app) as c:
        r = await c.get("/items/1")
        assert r.status_code == 200 and r.json() == {"item_id": 1}
        assert r.headers["ratelimit-limit"] == "2" and r.headers["ratelimit-remaining"] == "1"
        assert r.headers["ratelimit-policy"] == "2;w=60"
        r = await c.get("/items/2")  # another path, the same template: the same counter
        assert r.status_code == 200 and r.headers["ratelimit-remaining"] == "0"
        r = await c.get("/items/3")
        assert r.status_code == 429
        assert r.json() == {"detail": "Too Many Requests"}
        assert 29 <= int(r.headers["retry-after"]) <= 30
        assert r.headers["ratelimit-remaining"] == "0" and r.headers["ratelimit-limit"] == "2"
        # Other templates and methods have their own counters; undecorated routes none.
        assert (await c.get("/users/bob")).status_code == 200
        assert (await c.post("/items/1")).status_code == 200
        assert "ratelimit-limit" not in (await c.get("/free")).headers
    async with client(app, ip="198.51.100.7") as c:
        assert (await c.get("/items/1")).status_code == 200  # another client


@pytest.mark.asyncio
async def test_redis_key_is_the_template(redis_server: Any, redis_url: str) -> None:
    lim = rategate.Limiter(redis_url)
    try:
        async with client(make_app(RateLimit("5/minute", limiter=lim))) as c:
            await c.get("/items/1")
            await c.get("/items/99")
            await c.get("/users/x")
    finally:
        await lim.aclose()
    keys = sorted(k.decode() for k in redis_server.client().keys("rg:*"))
    assert keys == [
        "rg:{dep:GET /items/%7Bitem_id%7D|203.0.113.9}:5/60000",
        "rg:{dep:GET /users/%7Bname%7D|203.0.113.9}:5/60000",
    ]


@pytest.mark.asyncio
async def test_a_name_shares_one_counter(limiter: Any) -> None:
    app = make_app(RateLimit("2/minute", limiter=limiter, name="shared", headers="draft-11"))
    async with client(app) as c:
        r = await c.get("/items/1")
        assert r.headers["ratelimit"] == '"shared";r=1;t=30'
        assert r.headers["ratelimit-policy"] == '"shared";q=2;w=60'
        assert (await c.get("/users/a")).status_code == 200
        assert (await c.post("/items/1")).status_code == 429


@pytest.mark.asyncio
async def test_key_cost_and_none(limiter: Any) -> None:
    app = make_app(RateLimit("4/minute", limiter=limiter, key=header("x-api-key", fallback=None), cost=2,
                             headers="x-ratelimit"))
    async with client(app) as c:
        for _ in range(5):
            r = await c.get("/items/1")
            assert r.status_code == 200 and "x-ratelimit-limit" not in r.headers
        a = {"x-api-key": "alice"}
        r = await c.get("/items/1", headers=a)
        assert r.headers["x-ratelimit-remaining"] == "2"
        assert (await c.get("/items/1", headers=a)).status_code == 200
        r = await c.get("/items/1", headers=a)
        assert r.status_code == 429 and "x-ratelimit-reset" in r.headers
        assert (await c.get("/items/1", headers={"x-api-key": "bob"})).status_code == 200


@pytest.mark.asyncio
async def test_headers_none_and_shadow(limiter: Any, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(RateLimit("1/minute", limiter=limiter, headers=None))
    async with client(app) as c:
        r = await c.get("/items/1")
        assert r.status_code == 200 and not any("ratelimit" in k for k in r.headers)
        r = await c.get("/items/1")
        assert r.status_code == 429 and 59 <= int(r.headers["retry-after"]) <= 60
    app = make_app(RateLimit("1/minute", limiter=limiter, shadow=True))
    async with client(app) as c:
        assert [(await c.get("/users/x")).status_code for _ in range(3)] == [200] * 3
    assert any("would deny" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_router_level_dependency_is_per_route(limiter: Any) -> None:
    app = FastAPI()
    router = APIRouter(prefix="/v1", dependencies=[Depends(RateLimit("1/minute", limiter=limiter))])

    @router.get("/a")
    async def a() -> dict[str, str]:
        return {"a": "a"}

    @router.get("/b/{x}")
    async def b(x: str) -> dict[str, str]:
        return {"b": x}

    app.include_router(router)
    async with client(app) as c:
        assert [(await c.get("/v1/a")).status_code for _ in range(2)] == [200, 429]
        assert [(await c.get(f"/v1/b/{i}")).status_code for i in range(2)] == [200, 429]


@pytest.mark.asyncio
async def test_endpoint_returning_its_own_response(limiter: Any) -> None:
    app = FastAPI()

    @app.get("/raw", dependencies=[Depends(RateLimit("1/minute", limiter=limiter))])
    async def raw() -> PlainTextResponse:
        return PlainTextResponse("raw")

    async with client(app) as c:
        assert (await c.get("/raw")).text == "raw"
        r = await c.get("/raw")
        assert r.status_code == 429 and "retry-after" in r.headers


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"limits": "1/fortnight"}, ValueError, "unknown unit"),
        ({"limits": "1/minute", "headers": "draft-99"}, ValueError, "unknown header style"),
        ({"limits": "1/minute", "key": "ip"}, TypeError, "key must be a callable"),
        ({"limits": "1/minute", "cost": -2}, ValueError, "cost must be an int >= 0"),
        ({"limits": "1/minute", "name": ""}, ValueError, "name must be a non-empty str"),
        ({"limits": "1/minute", "limiter": object()}, TypeError, "limiter must be a rategate.Limiter"),
    ],
)
def test_config_errors(kwargs: dict[str, Any], error: type, words: str) -> None:
    kwargs.setdefault("limiter", "memory://")
    with pytest.raises(error, match=re.escape(words)):
        RateLimit(**kwargs)


async def test_incident_line_names_the_cause(own_redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Issue 8 #13 for the dependency as for the middleware: the opening line
    # of an outage says why (the limiter's last error), not only the kind.
    lim = rategate.Limiter(own_redis.url, timeout=0.2)
    caplog.set_level(logging.WARNING, logger="rategate")
    try:
        async with client(make_app(RateLimit("100/minute", limiter=lim))) as c:
            assert (await c.get("/items/1")).status_code == 200
            own_redis.stop()
            for _ in range(50):
                if (await c.get("/items/1")).status_code == 429:
                    break
                await asyncio.sleep(0.02)
        lines = [r.getMessage() for r in caplog.records if "failed (" in r.getMessage()]
        assert lines and f"127.0.0.1:{own_redis.port}" in lines[0], lines
    finally:
        await lim.aclose()


# -- issue 12: concurrency and charge through the dependency -------------------------------
def quota_app(lim: Any, gate: asyncio.Event) -> tuple[FastAPI, dict[str, int]]:
    app = FastAPI()
    inside = {"now": 0, "max": 0}

    @app.get("/slow", dependencies=[Depends(RateLimit("100/minute", limiter=lim, concurrency=3))])
    async def slow() -> dict[str, bool]:
        inside["now"] += 1
        inside["max"] = max(inside["max"], inside["now"])
        try:
            await gate.wait()
            return {"ok": True}
        finally:
            inside["now"] -= 1

    one = RateLimit(None, limiter=lim, concurrency=1, name="one")

    @app.get("/boom", dependencies=[Depends(one)])
    async def boom() -> None:
        raise RuntimeError("the endpoint failed")

    @app.get("/teapot", dependencies=[Depends(one)])
    async def teapot() -> None:
        raise HTTPException(418)

    tokens = RateLimit("100/hour", limiter=lim, cost=10, charge=True, name="tokens")

    @app.get("/tokens", dependencies=[Depends(tokens)])
    async def used(request: Request, n: int, fail: bool = False) -> dict[str, bool]:
        rategate.set_cost(request, n)
        if fail:
            raise RuntimeError("failed after the model call")
        return {"ok": True}

    @app.get("/stream", dependencies=[Depends(tokens)])
    async def stream(request: Request) -> StreamingResponse:
        async def gen() -> Any:
            for _ in range(3):
                yield b"chunk"
            rategate.set_cost(request, 50)  # known only once the stream is done

        return StreamingResponse(gen())

    return app, inside


@pytest.mark.asyncio
async def test_dependency_concurrency(limiter: Any) -> None:
    from test_quota import settle

    gate = asyncio.Event()
    app, inside = quota_app(limiter, gate)
    async with client(app) as c:
        # Eight slow requests of one key at once, limit 3: three get in, the
        # others are answered 429 at once (while the three are still inside).
        first = [asyncio.ensure_future(c.get("/slow")) for _ in range(8)]
        while sum(f.done() for f in first) < 5:
            await asyncio.sleep(0.01)
        denied = [f.result() for f in first if f.done()]
        assert [r.status_code for r in denied] == [429] * 5 and inside["now"] == 3
        assert denied[0].headers["ratelimit-policy"].startswith('3;qu="concurrent-requests"')
        assert denied[0].headers["retry-after"] == "1"
        assert limiter.stats()["slots_held"] == 3
        gate.set()
        codes = [(await f).status_code for f in first]
        assert sorted(codes) == [200] * 3 + [429] * 5
        assert limiter.stats()["slots_held"] == 0
        await settle(limiter)
        r = await c.get("/slow")
        assert r.status_code == 200 and r.headers["ratelimit-policy"] == '100;w=60, 3;qu="concurrent-requests"'
        # The endpoint raises (an error, or an HTTPException): the slot comes back all the same.
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await c.get("/boom")
            assert limiter.stats()["slots_held"] == 0
            await settle(limiter)
            assert (await c.get("/teapot")).status_code == 418
            await settle(limiter)
    assert inside["max"] == 3


@pytest.mark.asyncio
async def test_dependency_rate_and_concurrency_in_one_check(limiter: Any) -> None:
    from test_quota import settle

    gate = asyncio.Event()
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(RateLimit("2/minute", limiter=limiter, concurrency=1))])
    async def x() -> dict[str, bool]:
        await gate.wait()
        return {"ok": True}

    async with client(app) as c:
        held = asyncio.ensure_future(c.get("/x"))
        while limiter.stats()["slots_held"] < 1:
            await asyncio.sleep(0.01)
        # Denied by the concurrency limit: no token of the rate is taken.
        assert (await c.get("/x")).status_code == 429
        gate.set()
        assert (await held).headers["ratelimit-remaining"] == "1"
        await settle(limiter)
        assert (await c.get("/x")).headers["ratelimit-remaining"] == "0"
        await settle(limiter)
        r = await c.get("/x")  # denied by the rate now: a long wait, not the concurrency's 1 s
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 1
        assert limiter.stats()["slots_held"] == 0


@pytest.mark.asyncio
async def test_dependency_charges_the_reported_cost(limiter: Any) -> None:
    from test_quota import settle

    app, _ = quota_app(limiter, asyncio.Event())
    key = "dep:tokens|203.0.113.9"

    async def left() -> int:
        await settle(limiter)
        return int((await limiter.hit(key, "100/hour", cost=0)).remaining)

    async with client(app) as c:
        # Checked with 10, 30 reported: 20 more charged after the response.
        assert (await c.get("/tokens?n=30")).headers["ratelimit-remaining"] == "90"
        assert await left() == 70
        await c.get("/tokens?n=4")  # 6 refunded
        assert await left() == 66
        # A streamed response: charged once its stream has ended (50 - 10).
        r = await c.get("/stream")
        assert r.content == b"chunk" * 3
        assert await left() == 16
        # A cost reported before the endpoint raised was spent: charged (5 - 10).
        with pytest.raises(RuntimeError):
            await c.get("/tokens?n=5&fail=true")
        assert await left() == 11
        # Into debt: the next request is denied.
        await c.get("/tokens?n=500")
        assert await left() == 0
        r = await c.get("/tokens?n=1")
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 60


def test_dependency_is_a_yield_dependency_only_when_it_holds() -> None:
    import inspect

    plain = RateLimit("1/minute", limiter="memory://")
    assert inspect.iscoroutinefunction(type(plain).__call__)
    for dep in (RateLimit("1/minute", limiter="memory://", concurrency=2),
                RateLimit("1/minute", limiter="memory://", charge=True)):
        assert isinstance(dep, RateLimit) and inspect.isasyncgenfunction(type(dep).__call__)
        assert "concurrency=2" in repr(dep) or "charge=True" in repr(dep)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"concurrency": 0}, ValueError, "concurrency must be an int >= 1"),
        ({"concurrency": True}, ValueError, "concurrency must be an int >= 1"),
        ({"concurrency": 2, "concurrency_ttl": -1}, ValueError, "concurrency_ttl must be a number of seconds"),
        ({"charge": "yes"}, TypeError, "charge must be True or False"),
        ({"limits": None, "concurrency": 2, "charge": True}, ValueError, "but limits is None"),
        ({"limits": None}, ValueError, "rates must be given"),
    ],
)
def test_concurrency_and_charge_config_errors(kwargs: dict[str, Any], error: type, words: str) -> None:
    kwargs.setdefault("limits", "1/minute")
    with pytest.raises(error, match=re.escape(words)):
        RateLimit(limiter="memory://", **kwargs)
