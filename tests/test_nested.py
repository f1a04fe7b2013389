"""One request, several rategate checkers (issue 16 #2, Seam 4): nested
middlewares (an app's and a mounted sub-app's), a middleware and FastAPI
dependencies, two dependencies.  A limit (same limiter, store key and rates)
is charged once whichever checker meets it; different limits all apply; a
response carries one set of rate-limit headers, the most restrictive.

In process on memory:// and Redis, and under a real uvicorn (one process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from test_uvicorn import Uvicorn

import rategate
from rategate.middleware import RateLimitMiddleware

RL_FIELDS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy", "ratelimit",
             "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after")


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def client(app: Any, ip: str = "203.0.113.9") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 1)), base_url="http://t")


def fields(r: httpx.Response) -> dict[str, list[str]]:
    """Every rate-limit field of a response, each with all its values (a field sent twice shows twice)."""
    return {k: r.headers.get_list(k) for k in RL_FIELDS if k in r.headers}


def one_set(r: httpx.Response) -> dict[str, str]:
    f = fields(r)
    assert all(len(v) == 1 for v in f.values()), f"more than one set of rate-limit headers: {f}"
    return {k: v[0] for k, v in f.items()}


def nested_app(limiter: Any, outer: dict[str, Any], inner: dict[str, Any]) -> Starlette:
    """An app with a middleware, mounting /v2, whose sub-app has its own middleware."""
    sub = Starlette(routes=[Route("/hello", hello)])
    sub.add_middleware(RateLimitMiddleware, limiter=limiter, **inner)
    app = Starlette(routes=[Route("/hello", hello), Mount("/v2", sub)])
    app.add_middleware(RateLimitMiddleware, limiter=limiter, **outer)
    return app


@pytest.mark.asyncio
async def test_the_same_limit_at_two_levels_is_charged_once(storage_url: str, make_limiter: Any) -> None:
    """The issue's app: /v2/hello gave 200 200 429 with two sets of headers."""
    app = nested_app(make_limiter(storage_url), {"limits": "5/minute"}, {"limits": "5/minute"})
    async with client(app) as c:
        rs = [await c.get("/v2/hello") for _ in range(10)]
    assert [r.status_code for r in rs] == [200] * 5 + [429] * 5
    for i, r in enumerate(rs):
        h = one_set(r)
        assert h["ratelimit-limit"] == "5" and h["ratelimit-remaining"] == str(max(4 - i, 0)), (i, h)
    assert "retry-after" in one_set(rs[5])


@pytest.mark.asyncio
async def test_different_limits_at_two_levels_both_apply_with_one_set(storage_url: str,
                                                                      make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    app = nested_app(lim, {"limits": "10/minute", "headers": "draft-11"},
                     {"limits": "3/minute", "namespace": "v2"})
    async with client(app) as c:
        rs = [await c.get("/v2/hello") for _ in range(5)]
        assert [r.status_code for r in rs] == [200, 200, 200, 429, 429]
        # The sub-app's limit is the most restrictive: its headers (draft-6), alone.
        assert [one_set(r).get("ratelimit-remaining") for r in rs[:3]] == ["2", "1", "0"]
        assert all("ratelimit" not in fields(r) for r in rs)  # no draft-11 field beside them
        assert one_set(rs[3])["ratelimit-limit"] == "3"
        # The outer limit was charged for each of the 5 (the inner one denied after it allowed).
        r = await c.get("/hello")
        assert one_set(r) == {"ratelimit-policy": '"default";q=10;w=60', "ratelimit": '"default";r=4;t=36'}
    stats = lim.stats()["rules"]
    assert stats["default"]["allowed"] == 6 and stats["v2:default"]["allowed"] == 3
    assert stats["v2:default"]["denied"] + stats["v2:default"]["denied_cached"] == 2


@pytest.mark.asyncio
async def test_outer_without_headers_inner_with(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    app = nested_app(lim, {"limits": "5/minute", "headers": None}, {"limits": "4/minute", "namespace": "v2"})
    async with client(app) as c:
        assert one_set(await c.get("/v2/hello"))["ratelimit-remaining"] == "3"
        assert fields(await c.get("/hello")) == {}


@pytest.mark.asyncio
async def test_the_same_limit_outer_without_headers_inner_with(make_limiter: Any) -> None:
    """The inner checker meets the limit the outer one charged, and shows its headers."""
    lim = make_limiter("memory://")
    app = nested_app(lim, {"limits": "3/minute", "headers": None}, {"limits": "3/minute", "headers": "draft-11"})
    async with client(app) as c:
        rs = [await c.get("/v2/hello") for _ in range(2)]
    assert [one_set(r) for r in rs] == [{"ratelimit-policy": '"default";q=3;w=60', "ratelimit": f'"default";r={n};t={t}'}
                                        for n, t in ((2, 20), (1, 40))]
    assert lim.stats()["checks"] == 2


@pytest.mark.asyncio
async def test_shadow_outside_enforcing_inside_on_the_same_limit(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    app = nested_app(lim, {"limits": "2/minute", "shadow": True}, {"limits": "2/minute"})
    async with client(app) as c:
        assert [(await c.get("/v2/hello")).status_code for _ in range(3)] == [200, 200, 429]
        assert (await c.get("/hello")).status_code == 200  # the outer one only counts
    assert lim.stats()["checks"] == 4  # one check per request: the inner one used the outer's


def dep_app(lim: Any, *deps: Any, mw: dict[str, Any] | None = None, router_dep: Any = None) -> FastAPI:
    app = FastAPI()
    router = APIRouter(dependencies=[Depends(router_dep)] if router_dep is not None else [])

    @router.get("/items/{n}", dependencies=[Depends(d) for d in deps])
    async def item(n: int) -> dict[str, int]:
        return {"n": n}

    app.include_router(router)
    if mw is not None:
        app.add_middleware(RateLimitMiddleware, limiter=lim, **mw)
    return app


@pytest.mark.asyncio
async def test_middleware_and_dependency_one_set_of_headers(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    app = dep_app(lim, rategate.RateLimit("2/minute", limiter=lim), mw={"limits": "5/minute"})
    async with client(app) as c:
        rs = [await c.get("/items/1") for _ in range(3)]
        assert [r.status_code for r in rs] == [200, 200, 429]
        # The dependency's limit is the tighter one: its headers, alone.
        assert [one_set(r)["ratelimit-remaining"] for r in rs] == ["1", "0", "0"]
        assert [one_set(r)["ratelimit-limit"] for r in rs] == ["2", "2", "2"]
        assert "retry-after" in one_set(rs[2])
        # The middleware's limit was charged three times.
        r = await c.get("/other")
        assert r.status_code == 404 and one_set(r)["ratelimit-remaining"] == "1"


@pytest.mark.asyncio
async def test_middleware_tighter_than_dependency(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    app = dep_app(lim, rategate.RateLimit("10/minute", limiter=lim), mw={"limits": "3/minute"})
    async with client(app) as c:
        rs = [await c.get("/items/1") for _ in range(4)]
    assert [r.status_code for r in rs] == [200, 200, 200, 429]
    assert [one_set(r)["ratelimit-limit"] for r in rs] == ["3"] * 4
    assert lim.stats()["rules"]["dep:GET /items/{n}"]["allowed"] == 3  # denied before the endpoint


@pytest.mark.asyncio
async def test_two_dependencies_one_set_the_most_restrictive(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    loose, tight = rategate.RateLimit("9/minute", limiter=lim, name="loose"), \
        rategate.RateLimit("3/minute", limiter=lim, name="tight")
    for deps in ((loose, tight), (tight, loose)):
        await lim.clear()
        async with client(dep_app(lim, *deps)) as c:
            rs = [await c.get("/items/1") for _ in range(4)]
        assert [r.status_code for r in rs] == [200, 200, 200, 429]
        assert [one_set(r)["ratelimit-remaining"] for r in rs] == ["2", "1", "0", "0"], deps


@pytest.mark.asyncio
async def test_the_same_limit_on_router_and_route_is_charged_once(make_limiter: Any) -> None:
    # Two RateLimit objects for one limit (FastAPI calls the same dependency
    # object only once per request by itself; these are two).
    lim = make_limiter("memory://")
    on_router = rategate.RateLimit("3/minute", limiter=lim, name="shared")
    on_route = rategate.RateLimit("3/minute", limiter=lim, name="shared")
    async with client(dep_app(lim, on_route, router_dep=on_router)) as c:
        rs = [await c.get("/items/1") for _ in range(4)]
    assert [r.status_code for r in rs] == [200, 200, 200, 429]
    assert [one_set(r)["ratelimit-remaining"] for r in rs] == ["2", "1", "0", "0"]
    assert lim.stats()["checks"] == 4


# -- under uvicorn ---------------------------------------------------------------------------
def make_app() -> Any:
    """``uvicorn --factory test_nested:make_app``: the issue's nested app, and a health route."""
    lim = rategate.Limiter(os.environ["RATEGATE_REDIS_URL"])
    app = nested_app(lim, {"limits": "5/minute", "exempt": ["/health"]}, {"limits": "5/minute"})
    app.routes.append(Route("/health", hello))
    return app


@pytest.fixture(scope="module")
def server(redis_server: Any) -> Iterator[Uvicorn]:
    redis_server.flushall()
    srv = Uvicorn("test_nested:make_app", "--factory", "--lifespan", "on",
                  env={"RATEGATE_REDIS_URL": redis_server.url})
    try:
        yield srv
    finally:
        srv.stop()


def test_nested_under_uvicorn_five_of_ten(server: Uvicorn) -> None:
    """Done when: nested middlewares on one limiter, exactly 5 of 10 allowed at
    5/minute, one RateLimit-Limit field per response."""
    with server.client("127.0.0.83") as c:
        rs = [c.get("/v2/hello") for _ in range(10)]
    assert [r.status_code for r in rs] == [200] * 5 + [429] * 5
    assert [len(r.headers.get_list("ratelimit-limit")) for r in rs] == [1] * 10
    assert [one_set(r)["ratelimit-remaining"] for r in rs] == ["4", "3", "2", "1", "0"] + ["0"] * 5
