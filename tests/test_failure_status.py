"""A store failure does not look like the client's fault (issue 16 #6):
``failure_status`` (429 by default, 503 the other sensible value) on the
middleware and the dependency, with ``Retry-After: 1`` and no ``RateLimit-*``
field claiming the client used its quota.  And ``enabled=False`` (issue 16
#8): no checks, no headers, the app runs.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from redisserver import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient; httpx works.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.testclient import TestClient, WebSocketDenialResponse

import rategate
from rategate.middleware import RateLimitMiddleware

RL = re.compile(r"^(x-)?ratelimit")


def down_url() -> str:
    """A Redis that is not there (nothing listens on the port): every check fails."""
    return f"redis://127.0.0.1:{free_port()}/0"


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.close()


def app_with(**kw: Any) -> Starlette:
    app = Starlette(routes=[Route("/hello", hello), WebSocketRoute("/ws", ws)])
    app.add_middleware(RateLimitMiddleware, **kw)
    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 1)), base_url="http://t")


def assert_failure(r: httpx.Response, status: int, detail: str) -> None:
    assert r.status_code == status, r
    assert r.json() == {"detail": detail}
    assert r.headers["retry-after"] == "1"
    assert int(r.headers["content-length"]) == len(r.content)
    assert not [k for k in r.headers if RL.match(k)], r.headers  # nothing claims the quota is used


@pytest.mark.asyncio
@pytest.mark.parametrize("status,detail", [(429, "Too Many Requests"), (503, "Service Unavailable")])
async def test_middleware_store_failure_status(status: int, detail: str, make_limiter: Any) -> None:
    lim = make_limiter(down_url())
    kw = {} if status == 429 else {"failure_status": status}
    async with client(app_with(limiter=lim, limits="5/minute", **kw)) as c:
        for _ in range(3):
            assert_failure(await c.get("/hello"), status, detail)
    assert sum(lim.stats()["errors"].values()) == 3


@pytest.mark.asyncio
async def test_a_real_denial_is_still_429_with_its_headers(make_limiter: Any) -> None:
    app = app_with(limiter=make_limiter("memory://"), limits="1/minute", failure_status=503)
    async with client(app) as c:
        assert (await c.get("/hello")).status_code == 200
        r = await c.get("/hello")
        assert r.status_code == 429 and r.headers["ratelimit-remaining"] == "0" and r.headers["retry-after"] != "1"


@pytest.mark.asyncio
@pytest.mark.parametrize("status,detail", [(429, "Too Many Requests"), (503, "Service Unavailable")])
async def test_dependency_store_failure_status(status: int, detail: str, make_limiter: Any) -> None:
    lim = make_limiter(down_url())
    app = FastAPI()
    kw = {} if status == 429 else {"failure_status": status}

    @app.get("/items/{n}", dependencies=[Depends(rategate.RateLimit("5/minute", limiter=lim, **kw))])
    async def item(n: int) -> dict[str, int]:
        return {"n": n}

    async with client(app) as c:
        assert_failure(await c.get("/items/1"), status, detail)


def test_websocket_store_failure_status() -> None:
    lim = rategate.Limiter(down_url())
    try:
        # TestClient offers the websocket.http.response extension: the handshake gets the HTTP answer.
        with TestClient(app_with(limiter=lim, limits="5/minute", failure_status=503)) as tc:
            with pytest.raises(WebSocketDenialResponse) as e:
                with tc.websocket_connect("/ws"):
                    pass
            assert e.value.status_code == 503 and e.value.headers["retry-after"] == "1"
            assert e.value.json() == {"detail": "Service Unavailable"}
            assert "ratelimit-limit" not in e.value.headers
    finally:
        lim.close()


@pytest.mark.parametrize("bad", [200, 302, 600, True, "503", None])
def test_failure_status_must_be_an_error_status(bad: Any) -> None:
    with pytest.raises(ValueError, match="failure_status must be an HTTP error status"):
        RateLimitMiddleware(hello, limiter="memory://", limits="1/minute", failure_status=bad)
    with pytest.raises(ValueError, match="failure_status must be an HTTP error status"):
        rategate.RateLimit("1/minute", limiter="memory://", failure_status=bad)


# -- enabled=False ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_disabled_middleware_does_nothing(caplog: pytest.LogCaptureFixture, make_limiter: Any) -> None:
    lim = make_limiter(down_url())
    caplog.set_level(logging.WARNING, logger="rategate")
    app = app_with(limiter=lim, limits="1/minute", enabled=False)
    async with client(app) as c:
        for _ in range(5):
            r = await c.get("/hello")
            assert r.status_code == 200 and r.text == "hello"
            assert not [k for k in r.headers if RL.match(k)]
    with TestClient(app) as tc:  # the lifespan: no connect, no warning
        assert tc.get("/hello").status_code == 200
    assert lim.stats()["checks"] == 0 and not caplog.records


@pytest.mark.asyncio
async def test_disabled_dependency_does_nothing(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    app = FastAPI()
    deps = [Depends(rategate.RateLimit("1/minute", limiter=lim, enabled=False)),
            Depends(rategate.RateLimit("1/minute", limiter=lim, concurrency=1, charge=True, enabled=False))]

    @app.get("/items/{n}", dependencies=deps)
    async def item(n: int) -> dict[str, int]:
        return {"n": n}

    async with client(app) as c:
        for _ in range(3):
            r = await c.get("/items/1")
            assert r.status_code == 200 and "ratelimit-limit" not in r.headers
    assert lim.stats()["checks"] == 0


@pytest.mark.parametrize("bad", ["no", 0, None])
def test_enabled_must_be_a_bool(bad: Any) -> None:
    with pytest.raises(TypeError, match="enabled must be True or False"):
        RateLimitMiddleware(hello, limiter="memory://", limits="1/minute", enabled=bad)
    with pytest.raises(TypeError, match="enabled must be True or False"):
        rategate.RateLimit("1/minute", limiter="memory://", enabled=bad)


@pytest.mark.asyncio
@pytest.mark.parametrize("status,code", [(429, 1008), (503, 1013)])
async def test_websocket_store_failure_without_the_http_response_extension(status: int, code: int,
                                                                           make_limiter: Any) -> None:
    """A server that cannot answer a handshake with HTTP: closed, 1013 (try again later) for 503."""
    mw = RateLimitMiddleware(ws, limiter=make_limiter(down_url()), limits="5/minute", failure_status=status)
    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "path": "/ws", "raw_path": b"/ws",
             "query_string": b"", "root_path": "", "headers": [], "client": ("203.0.113.9", 1),
             "server": ("t", 80), "subprotocols": []}
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    async def send(m: Any) -> None:
        sent.append(m)

    await mw(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": code,
                     "reason": "Try Again Later" if code == 1013 else "Too Many Requests"}]
