"""The FastAPI dependency: Depends(RateLimit("10/minute", limiter=...)), keyed by route template."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import PlainTextResponse

import rategate
from rategate.fastapi import RateLimit
from rategate.keys import header


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
