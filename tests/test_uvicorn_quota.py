"""Concurrency limits (issue 12 #2) under a real ``uvicorn --workers 4`` and a real redis-server,
through the middleware and through the FastAPI dependency (a FastAPI app mounted at ``/dep``).

One server for the module (:func:`make_app`).  The app counts the requests
inside it across every worker in Redis itself (INCR on entry, DECR on exit,
the highest value kept by a tiny script), so "never more than N in the app
at once" is measured where it matters.  Clients are kept apart by loopback
source address (the default key is the client IP).  The SIGKILL test runs
last: it kills workers of the shared server.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_uvicorn import Uvicorn  # noqa: E402
from test_uvicorn_workers import warm_workers  # noqa: E402

WORKERS = 4
LIMIT = 4
HELD_TTL = 3.0  # seconds a slot of /held outlives a dead worker
MAX_SCRIPT = "local n = tonumber(ARGV[1]) if n > tonumber(redis.call('GET', KEYS[1]) or 0) then " \
             "redis.call('SET', KEYS[1], n) end"


def make_app() -> Any:
    """``uvicorn --factory test_uvicorn_quota:make_app``."""
    import redis.asyncio as aioredis
    from fastapi import Depends, FastAPI
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route

    import rategate
    from rategate.fastapi import RateLimit

    url = os.environ["RATEGATE_REDIS_URL"]
    r = aioredis.from_url(url)
    limiter = rategate.Limiter(url, timeout=2.0)

    async def pid(request: Request) -> JSONResponse:
        return JSONResponse({"pid": os.getpid()})

    async def slow_in(tag: str) -> Any:
        n = await r.incr(f"test:in:{tag}")
        try:
            await r.eval(MAX_SCRIPT, 1, f"test:max:{tag}", n)
            await asyncio.sleep(0.05)
        finally:
            await r.decr(f"test:in:{tag}")
        return JSONResponse({"pid": os.getpid()})

    async def slow(request: Request) -> Any:
        return await slow_in(request.query_params["tag"])

    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("the app failed")

    async def hang_forever() -> Any:
        async def gen() -> Any:
            while True:  # until the client goes away
                yield b"x" * 1024
                await asyncio.sleep(0.02)
        return StreamingResponse(gen())

    async def hang(request: Request) -> Any:
        return await hang_forever()

    async def held(request: Request) -> JSONResponse:
        if request.query_params.get("hold"):
            await r.sadd("test:held", os.getpid())
            await r.incr("test:held:n")
            await asyncio.sleep(60)
        return JSONResponse({"pid": os.getpid()})

    # The same endpoints behind the FastAPI dependency (mounted at /dep; no middleware rule covers it).
    dep = FastAPI()
    dep.add_api_route("/slow", slow_in, dependencies=[
        Depends(RateLimit("100000/minute", limiter=limiter, concurrency=LIMIT))])
    dep.add_api_route("/hang", hang_forever, dependencies=[Depends(RateLimit(None, limiter=limiter, concurrency=1))])

    app = Starlette(routes=[Route("/", pid), Route("/health", pid), Route("/slow", slow),
                            Route("/boom", boom), Route("/hang", hang), Route("/held", held),
                            Mount("/dep", dep)])
    app.add_middleware(
        rategate.RateLimitMiddleware, limiter=limiter, exempt=["/", "/health"],
        rules={
            "/slow": {"limits": "100000/minute", "concurrency": LIMIT},
            "/boom": {"limits": None, "concurrency": 1},
            "/hang": {"limits": None, "concurrency": 1},
            "/held": {"limits": None, "concurrency": 2, "concurrency_ttl": HELD_TTL},
        },
    )
    return app


@pytest.fixture(scope="module")
def server(redis_server: Any) -> Iterator[Uvicorn]:
    redis_server.flushall()
    srv = Uvicorn("test_uvicorn_quota:make_app", "--factory", "--no-proxy-headers", workers=WORKERS,
                  env={"RATEGATE_REDIS_URL": redis_server.url})
    try:
        warm_workers(srv, "127.0.0.70", WORKERS)
        yield srv
    finally:
        srv.stop(graceful=False)


async def _burst(url: str, source: str, path: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    transport = httpx.AsyncHTTPTransport(local_address=source, limits=limits)
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as c:
        return list(await asyncio.gather(*(c.get(path) for _ in range(n))))


def burst(srv: Uvicorn, source: str, path: str, n: int) -> list[httpx.Response]:
    return asyncio.run(_burst(srv.url, source, path, n))


def get(srv: Uvicorn, source: str, path: str, timeout: float = 10) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=srv.url, transport=transport, timeout=timeout) as c:
        return c.get(path)


def eventually(srv: Uvicorn, source: str, path: str, status: int, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        got = get(srv, source, path).status_code
        if got == status:
            return
        assert time.monotonic() < deadline, f"{path} still answers {got}, not {status}, after {within} s"
        time.sleep(0.1)


def test_never_more_than_the_limit_in_the_app_across_workers(server: Uvicorn, redis_server: Any) -> None:
    rc = redis_server.client()
    pids: set[int] = set()
    for round_ in range(5):
        tag = f"r{round_}"
        rs = burst(server, "127.0.0.71", f"/slow?tag={tag}", 200)
        got = collections.Counter(r.status_code for r in rs)
        assert set(got) <= {200, 429} and got[200] >= LIMIT and got[429] > 0, got
        high = int(rc.get(f"test:max:{tag}"))
        assert 1 <= high <= LIMIT, (high, got)
        assert int(rc.get(f"test:in:{tag}")) == 0
        # Denials are concurrency denials, said so in the policy.
        denied = next(r for r in rs if r.status_code == 429)
        assert 'qu="concurrent-requests"' in denied.headers["ratelimit-policy"]
        pids |= {r.json()["pid"] for r in rs if r.status_code == 200}
        if len(pids) >= 2:
            break
    assert len(pids) >= 2, f"five bursts of 200 were all served by one worker: {pids}"
    # Every slot came back (an empty set is no key at all).
    assert rc.zcard(b"rg:{/slow|127.0.0.71}:c") == 0


def test_slot_freed_when_the_app_raises(server: Uvicorn) -> None:
    # Limit 1: a slot not given back would answer 429 from the second on.
    assert [get(server, "127.0.0.72", "/boom").status_code for _ in range(5)] == [500] * 5


@pytest.mark.parametrize("path, source", [("/hang", "127.0.0.73"), ("/dep/hang", "127.0.0.76")],
                         ids=["middleware", "dependency"])
def test_slot_freed_when_the_client_disconnects(server: Uvicorn, path: str, source: str) -> None:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=server.url, transport=transport, timeout=10) as c:
        with c.stream("GET", path) as r:
            assert r.status_code == 200
            chunks = r.iter_bytes()  # kept: a dropped iterator closes the response
            next(chunks)
            # In flight: the one slot is taken.
            assert get(server, source, path).status_code == 429
            next(chunks)  # still streaming
        # Closed mid-stream: the app notices the disconnect (the dependency: the stream fails and
        # FastAPI runs its exit) and the slot comes back.
    deadline = time.monotonic() + 10
    while True:
        with httpx.Client(base_url=server.url, transport=httpx.HTTPTransport(local_address=source),
                          timeout=10) as c, c.stream("GET", path) as r:
            if r.status_code == 200:
                break
        assert time.monotonic() < deadline, "the slot of a disconnected client was not given back"
        time.sleep(0.1)


def test_dependency_concurrency_across_workers(server: Uvicorn, redis_server: Any) -> None:
    """RateLimit(concurrency=LIMIT) as a FastAPI dependency: never more than
    LIMIT in the endpoint at once across the workers, every slot given back."""
    rc = redis_server.client()
    rs = burst(server, "127.0.0.75", "/dep/slow?tag=dep", 200)
    got = collections.Counter(r.status_code for r in rs)
    assert set(got) <= {200, 429} and got[200] >= LIMIT and got[429] > 0, got
    assert 1 <= int(rc.get("test:max:dep")) <= LIMIT
    denied = next(r for r in rs if r.status_code == 429)
    assert 'qu="concurrent-requests"' in denied.headers["ratelimit-policy"]
    assert rc.zcard(b"rg:{dep:GET /dep/slow|127.0.0.75}:c") == 0


def test_llm_gateway_example(redis_server: Any) -> None:
    """examples/llm_gateway.py as written: the plan's rate and the concurrency
    limit in one call, the token budget checked with an estimate and charged
    with the real usage (streamed too)."""
    redis_server.flushall()
    srv = Uvicorn("examples.llm_gateway:app", env={"RATEGATE_REDIS_URL": redis_server.url})
    try:
        async def go() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                assert (await c.post("/v1/completions", json={"prompt": "hi"})).status_code == 401

                def left(key: str) -> Any:
                    return c.get("/budget", headers={"x-api-key": key})

                async def budget_is(key: str, want: int) -> None:
                    for _ in range(100):  # the charge is fire and forget
                        if (await left(key)).json()["tokens_left_today"] == want:
                            return
                        await asyncio.sleep(0.05)
                    raise AssertionError(f"budget of {key}: {(await left(key)).json()}, not {want}")

                h = {"x-api-key": "alice", "x-max-tokens": "1000"}
                r = await c.post("/v1/completions", headers=h, json={"prompt": "one two three", "max_tokens": 1000})
                assert r.status_code == 200
                used = r.json()["usage"]["total_tokens"]
                assert used == 3 + 9  # prompt words + the stand-in's 3 + 2 per word
                # Checked with 1000, charged with 12: the budget shows the real usage.
                await budget_is("alice", 100000 - used)
                # Streamed: charged when the stream ends.
                r = await c.post("/v1/completions", headers=h, json={"prompt": "a b", "max_tokens": 1000, "stream": True})
                assert r.text.split() == [f"tok{i}" for i in range(7)]
                await budget_is("alice", 100000 - used - 9)
                # Concurrency: 4 generations of one key at once, the others 429 at once.
                pro = {"x-api-key": "bob", "x-plan": "pro"}
                rs = await asyncio.gather(*(c.post("/v1/completions", headers=pro, json={"prompt": "x"})
                                            for _ in range(8)))
                got = collections.Counter(r.status_code for r in rs)
                assert got[200] <= 4 and got[200] + got[429] == 8 and got[429] >= 1, got
                denied = next(r for r in rs if r.status_code == 429)
                assert 'qu="concurrent-requests"' in denied.headers["ratelimit-policy"]
                # The free plan: 10 per minute (2 used by alice above).
                codes = [(await c.post("/v1/completions", headers=h, json={"prompt": "x"})).status_code
                         for _ in range(9)]
                assert codes == [200] * 8 + [429]

        asyncio.run(go())
    finally:
        srv.stop()


def test_sigkilled_worker_slots_expire_after_ttl(server: Uvicorn, redis_server: Any) -> None:
    rc = redis_server.client()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            get(server, "127.0.0.74", "/held?hold=1", timeout=30)
        except httpx.HTTPError as e:  # the worker is killed under it
            errors.append(e)

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while int(rc.get("test:held:n") or 0) < 2:
        assert time.monotonic() < deadline, "the two holders never got in"
        time.sleep(0.02)
    # Both slots held (by one worker or two): kill the holders outright.
    holders = {int(p) for p in rc.smembers("test:held")}
    killed_at = time.monotonic()
    for p in holders:
        os.kill(p, signal.SIGKILL)
    for t in threads:
        t.join(10)
    # Nothing gave the slots back: still full right after the kill...
    assert get(server, "127.0.0.74", "/held").status_code == 429
    # ...and free once their ttl has passed.
    eventually(server, "127.0.0.74", "/held", 200, within=HELD_TTL + 10)
    assert time.monotonic() - killed_at >= HELD_TTL - 1.0  # not before the ttl (taken just before the kill)
