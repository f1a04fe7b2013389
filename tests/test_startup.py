"""Connecting at startup (issue 16 #4, #5): the middleware connects to the
store at the ASGI lifespan startup, before the server takes traffic, and
passes the lifespan on unchanged; a store it cannot reach is one warning
naming the URL (password hidden) and the cause, and the app starts anyway.

In process (Starlette's TestClient runs the lifespan), then fresh starts of
``uvicorn --workers 2``: the first request on every worker is decided by
Redis (``error`` None) at the default ``timeout`` (50 ms).

    python tests/test_startup.py [--starts 10]     # the starts, as a script
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import warnings
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from redisserver import RedisServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from a checkout

from test_uvicorn import Uvicorn  # noqa: E402

import rategate  # noqa: E402
from rategate.middleware import RateLimitMiddleware  # noqa: E402

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")  # Starlette 1.x prefers httpx2; httpx works
    from starlette.testclient import TestClient

STARTS = int(os.environ.get("RATEGATE_STARTS", "10"))


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def app_of(lim: Any, **kw: Any) -> Starlette:
    app = Starlette(routes=[Route("/hello", hello)])
    app.add_middleware(RateLimitMiddleware, limiter=lim, limits="100/minute", **kw)
    return app


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rategate"]


def test_connects_at_lifespan_startup(redis_url: str) -> None:
    lim = rategate.Limiter(redis_url)
    try:
        with TestClient(app_of(lim)):
            # Before any request: the engine is running and every connection ready.
            assert lim.stats()["connected"] is True
            assert lim.stats()["checks"] == 0
    finally:
        lim.close()


def test_the_apps_own_lifespan_runs_unchanged(redis_url: str) -> None:
    lim = rategate.Limiter(redis_url)
    seen: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        seen.append("startup")
        yield {"db": "ready"}
        seen.append("shutdown")

    async def state(request: Request) -> JSONResponse:
        return JSONResponse({"db": request.state.db})

    app = Starlette(routes=[Route("/state", state)], lifespan=lifespan)
    app.add_middleware(RateLimitMiddleware, limiter=lim, limits="100/minute")
    try:
        with TestClient(app) as tc:
            r = tc.get("/state")
            assert r.json() == {"db": "ready"} and r.headers["ratelimit-limit"] == "100"
        assert seen == ["startup", "shutdown"]
    finally:
        lim.close()


def test_store_unreachable_at_startup_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    lim = rategate.Limiter(f"redis://:hunter2@127.0.0.1:{port}/0", connect_timeout=0.5)
    caplog.set_level(logging.WARNING, logger="rategate")
    outer = app_of(lim)
    # Two middlewares on one limiter: still one warning.
    outer.add_middleware(RateLimitMiddleware, limiter=lim, limits="100/minute", namespace="second")
    try:
        with TestClient(outer) as tc:
            lines = warnings_of(caplog)
            assert len(lines) == 1, lines
            assert f"redis://:***@127.0.0.1:{port}/0" in lines[0] and "hunter2" not in lines[0], lines
            assert "connection refused" in lines[0] and "starting anyway" in lines[0], lines
            r = tc.get("/hello")  # the app started; the failure mode answers
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
    finally:
        lim.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("behaviour", ["raises", "returns"])
async def test_an_app_without_lifespan_support_still_connects(behaviour: str, redis_url: str,
                                                              make_limiter: Any) -> None:
    """Django's ASGI handler raises on a lifespan scope; some apps return at once."""
    lim = make_limiter(redis_url)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            if behaviour == "raises":
                raise ValueError("Django can only handle ASGI/HTTP connections, not lifespan.")
            return
        await hello(Request(scope, receive))(scope, receive, send)

    mw = RateLimitMiddleware(app, limiter=lim, limits="1/minute")

    async def receive() -> Any:
        return {"type": "lifespan.startup"}

    async def send(m: Any) -> None:
        raise AssertionError(f"the app sent nothing, so neither may the middleware: {m}")

    if behaviour == "raises":
        with pytest.raises(ValueError, match="not lifespan"):  # the server sees the app's error
            await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    else:
        await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert lim.stats()["connected"] is True


# -- fresh starts of uvicorn --workers 2 -------------------------------------------------------
def make_app() -> Any:
    """``uvicorn --factory test_startup:make_app --workers 2``: "/" answers its worker's pid and
    its limiter's counts (the response of a request the limiter allowed)."""
    lim = rategate.Limiter(os.environ["RATEGATE_REDIS_URL"])  # the default timeout, 50 ms

    async def index(request: Request) -> JSONResponse:
        s = lim.stats()
        return JSONResponse({"pid": os.getpid(), "checks": s["checks"], "errors": s["errors"]})

    app = Starlette(routes=[Route("/", index), Route("/health", hello)])
    app.add_middleware(RateLimitMiddleware, limiter=lim, limits="1000/minute", exempt=["/health"])
    return app


def first_requests(url: str, workers: int) -> dict[int, dict[str, Any]]:
    """Requests on fresh connections until every worker has answered one: the
    first answer of each worker.  Every request must be allowed: a failure
    decision (429 with Retry-After: 1, from a worker whose first check did
    not wait for Redis) fails the run."""
    first: dict[int, dict[str, Any]] = {}

    async def go() -> None:
        for i in range(400):
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as c:
                rs = await asyncio.gather(*(c.get("/") for _ in range(workers)))
            for r in rs:
                assert r.status_code == 200, (i, r.status_code, dict(r.headers))
                body = r.json()
                first.setdefault(body["pid"], body)
            if len(first) >= workers:
                return
        raise AssertionError(f"400 rounds of requests reached only workers {sorted(first)}")

    asyncio.run(go())
    return first


def one_start(redis_url: str, workers: int = 2) -> dict[int, dict[str, Any]]:
    srv = Uvicorn("test_startup:make_app", "--factory", "--lifespan", "on", workers=workers,
                  env={"RATEGATE_REDIS_URL": redis_url})
    try:
        return first_requests(srv.url, workers)
    finally:
        srv.stop()


def check_start(first: dict[int, dict[str, Any]]) -> None:
    for pid, body in first.items():
        # Its first check (possibly one of a few sent at once) was answered
        # by Redis: no failure decision in that worker at all.
        assert body["checks"] >= 1 and not any(body["errors"].values()), (pid, body)


def test_first_request_on_every_worker_is_decided_by_redis(redis_server: RedisServer) -> None:
    """Done when: 10 fresh starts of uvicorn --workers 2 against a healthy Redis,
    the first request on every worker decided by Redis, at the default timeout."""
    for _ in range(STARTS):
        redis_server.flushall()
        check_start(one_start(redis_server.url))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--starts", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    failed = 0
    with RedisServer() as redis_srv:
        for i in range(args.starts):
            t0 = time.monotonic()
            first = one_start(redis_srv.url, args.workers)
            try:
                check_start(first)
                verdict = "ok"
            except AssertionError:
                verdict, failed = "FAIL", failed + 1
            print(f"start {i + 1:2d}/{args.starts}: {verdict} ({time.monotonic() - t0:.1f}s) "
                  + ", ".join(f"pid {pid}: checks {b['checks']}, errors {b['errors']}"
                              for pid, b in sorted(first.items())), flush=True)
    print(f"{args.starts - failed}/{args.starts} starts: the first request on each of "
          f"{args.workers} workers decided by Redis")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
