"""Paths are matched as the app routes them (issue 16 #1): without the root
path a server (``uvicorn --root-path``) or a Starlette ``Mount`` puts in
``scope["path"]``, for ``exempt``, rules and the FastAPI dependency.

In process (httpx.ASGITransport, the ASGI scope as uvicorn makes it), and
under a real ``uvicorn --root-path /api`` (one process for the module).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette._utils import get_route_path
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from test_uvicorn import Uvicorn

import rategate
from rategate.middleware import RateLimitMiddleware


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def routes() -> list[Route]:
    return [Route("/health", ok), Route("/chat", ok), Route("/other", ok)]


def client(app: Any, root_path: str = "") -> httpx.AsyncClient:
    """With ``root_path``, the scope uvicorn --root-path makes: root_path set, and
    scope["path"] the root path + the path requested (here: the URL's path, so
    tests request "/api/health" where uvicorn would be asked for "/health")."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 1), root_path=root_path),
                             base_url="http://t")


def _app(limiter: Any) -> Starlette:
    app = Starlette(routes=routes())
    app.add_middleware(RateLimitMiddleware, limiter=limiter, limits="5/minute", rules={"/chat": "2/minute"},
                       exempt=["/health"])
    return app


def test_route_path_is_starlettes_get_route_path() -> None:
    """route_path() is starlette._utils.get_route_path (but "/" for ""), on random paths and root paths."""
    from rategate.middleware import route_path

    rnd = random.Random(16)
    parts = ["", "/", "/api", "/api/", "/apiary", "/v2", "/a/b", "/%2F", "/ü"]
    for _ in range(5000):
        root = rnd.choice(parts) + rnd.choice(["", "/x"])
        path = rnd.choice([root, "", "/"]) + rnd.choice(parts) + rnd.choice(["", "/health", "?"])
        scope = {"path": path, "root_path": root}
        want = get_route_path(scope)
        assert route_path(scope) == (want or "/"), scope
    assert route_path({"path": "/api/health"}) == "/api/health"  # no root_path key at all


@pytest.mark.asyncio
async def test_server_root_path_exempt_and_rules(storage_url: str, make_limiter: Any) -> None:
    app = _app(make_limiter(storage_url))
    async with client(app, root_path="/api") as c:
        for _ in range(7):
            r = await c.get("/api/health")
            assert r.status_code == 200 and "ratelimit-limit" not in r.headers, r
        codes = [(await c.get("/api/chat")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]  # the /chat rule, not the default (5/minute)
        r = await c.get("/api/other")
        assert r.headers["ratelimit-limit"] == "5"


@pytest.mark.asyncio
async def test_mounted_sub_app_matches_paths_below_its_mount(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    sub = Starlette(routes=routes())
    sub.add_middleware(RateLimitMiddleware, limiter=lim, rules={"/chat": "2/minute"}, exempt=["/health"],
                       namespace="v2")
    app = Starlette(routes=[Mount("/v2", sub)])
    async with client(app) as c:
        for _ in range(4):
            r = await c.get("/v2/health")
            assert r.status_code == 200 and "ratelimit-limit" not in r.headers
        assert [(await c.get("/v2/chat")).status_code for _ in range(3)] == [200, 200, 429]
        assert "ratelimit-limit" not in (await c.get("/v2/other")).headers  # no rule, no default
    # The same under a server root path as well.
    async with client(app, root_path="/api") as c:
        for _ in range(4):
            assert "ratelimit-limit" not in (await c.get("/api/v2/health")).headers
        assert (await c.get("/api/v2/chat")).status_code == 429  # the same client, the same counter


@pytest.mark.asyncio
async def test_dependency_counter_is_the_route_as_the_app_declares_it(redis_server: Any, redis_url: str,
                                                                      make_limiter: Any) -> None:
    lim = make_limiter(redis_url)
    app = FastAPI()

    @app.get("/items/{item_id}", dependencies=[Depends(rategate.RateLimit("5/minute", limiter=lim))])
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    sub = FastAPI()

    @sub.get("/things/{n}", dependencies=[Depends(rategate.RateLimit("5/minute", limiter=lim))])
    async def thing(n: int) -> dict[str, int]:
        return {"n": n}

    app.mount("/v2", sub)
    async with client(app, root_path="/api") as c:
        assert (await c.get("/api/items/1")).status_code == 200
        assert (await c.get("/api/v2/things/1")).status_code == 200
    async with client(app) as c:  # the same routes without a root path: the same counters
        r = await c.get("/items/2")
        assert r.headers["ratelimit-remaining"] == "3"
        assert (await c.get("/v2/things/2")).headers["ratelimit-remaining"] == "3"
    keys = sorted(k.decode() for k in redis_server.client().keys("rg:*"))
    assert keys == ["rg:{dep:GET /items/%7Bitem_id%7D|203.0.113.9}:5/60000",
                    "rg:{dep:GET /v2/things/%7Bn%7D|203.0.113.9}:5/60000"]
    assert set(lim.stats()["rules"]) == {"dep:GET /items/{item_id}", "dep:GET /v2/things/{n}"}


# -- under uvicorn --root-path /api ---------------------------------------------------------
def make_app() -> Any:
    """``uvicorn --factory test_route_path:make_app --root-path /api``."""
    import os

    lim = rategate.Limiter(os.environ["RATEGATE_REDIS_URL"])
    return _app(lim)


@pytest.fixture(scope="module")
def server(redis_server: Any) -> Iterator[Uvicorn]:
    redis_server.flushall()
    srv = Uvicorn("test_route_path:make_app", "--factory", "--root-path", "/api", "--lifespan", "on",
                  env={"RATEGATE_REDIS_URL": redis_server.url})
    try:
        yield srv
    finally:
        srv.stop()


def test_uvicorn_root_path_health_is_exempt(server: Uvicorn) -> None:
    """Done when: under uvicorn --root-path /api, 50 requests to an exempt /health all get 200."""
    # uvicorn is asked for /health (a proxy stripped /api); the app sees
    # scope["path"] == "/api/health" and root_path "/api".
    with server.client("127.0.0.81") as c:
        rs = [c.get("/health") for _ in range(50)]
    assert [r.status_code for r in rs] == [200] * 50
    assert not any("ratelimit-limit" in r.headers for r in rs)


def test_uvicorn_root_path_rule_limits_the_route(server: Uvicorn) -> None:
    """... and a rule on /chat limits /api/chat requests (the path the app routes on)."""
    with server.client("127.0.0.82") as c:
        rs = [c.get("/chat") for _ in range(3)]
        assert [r.status_code for r in rs] == [200, 200, 429]
        assert rs[0].headers["ratelimit-policy"] == "2;w=60"
        assert c.get("/other").headers["ratelimit-limit"] == "5"
