"""Issue 12 #2 and #3 in process: concurrency limits and charging the real cost.

Each test runs on memory:// and on a real redis-server (``storage_url``):
the two stores must agree.  The middleware is driven through
httpx.ASGITransport; test_uvicorn_quota.py runs the same under uvicorn.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import rategate
from rategate import ConcurrencyLimitExceeded, Rule, _core

BOUND = 10.0  # seconds: only a hang fails on it


async def settle(lim: Any) -> None:
    """Let fire-and-forget work (a release, a charge) reach the store: a
    check on another key is answered after it (one connection, in order)."""
    await asyncio.wait_for(lim.hit("settle", "1000/second", cost=0), BOUND)


# -- charge -------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_charge_debt_denies_until_refilled_and_refund_stops_at_full(storage_url: str,
                                                                          make_limiter: Any) -> None:
    lim = make_limiter(storage_url, deny_cache=False) if storage_url != "memory://" else make_limiter(storage_url)
    rates = "10/hour"
    assert (await lim.hit("u", rates, cost=3)).remaining == 7
    # 25 more than the bucket holds: allowed (a charge never denies), in debt.
    d = await lim.charge("u", rates, 25)
    assert (d.allowed, d.remaining, d.error) == (True, 0, None)
    assert d.reset_after == pytest.approx(28 * 360, abs=1)  # 28 tokens to refill, 6 min each
    d = await lim.hit("u", rates)
    assert not d.allowed and d.retry_after == pytest.approx(19 * 360, abs=1)  # debt of 18, then 1 token
    # A refund of 20: two tokens left (28 - 20 = 8 used).
    d = await lim.charge("u", rates, -20)
    assert (d.allowed, d.remaining) == (True, 2)
    assert (await lim.hit("u", rates, cost=2)).allowed
    # A refund larger than what was used stops at a full bucket.
    d = await lim.charge("u", rates, -1000)
    assert (d.remaining, d.reset_after) == (10, 0.0)
    assert (await lim.hit("u", rates, cost=10)).allowed
    assert not (await lim.hit("u", rates)).allowed
    # Charges are not checks.
    assert lim.stats()["checks"] == 5


@pytest.mark.asyncio
async def test_charge_all_rates_and_report_the_tightest(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    rates = "100/minute; 1000/day"
    d = await lim.charge("m", rates, 150)
    assert (d.rate, d.remaining, d.limit) == (0, 0, 100)
    d = await lim.hit("m", rates, cost=0)
    assert not d.allowed or d.remaining == 0
    d = await lim.charge("m", rates, -150)
    assert (d.rate, d.remaining) == (0, 100)


@pytest.mark.asyncio
async def test_charge_input_errors(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    with pytest.raises(ValueError, match="cost must be an int"):
        await lim.charge("k", "1/second", True)
    with pytest.raises(ValueError, match="cost must be an int"):
        await lim.charge("k", "1/second", 2**60)
    with pytest.raises(ValueError, match="no rates to charge"):
        await lim.charge("k", lim.compile(None, concurrency=2), 1)
    with pytest.raises(ValueError, match=r"charge\(\) a negative cost"):
        # hit() keeps refusing negative costs: a refund is a charge.
        await lim.hit("k", "1/second", cost=-1)


# -- concurrency --------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_concurrency_limit_and_release(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    held = [lim.concurrency("c", limit=3, ttl=60) for _ in range(3)]
    for s in held:
        await s.__aenter__()
    assert [s.decision.remaining for s in held] == [2, 1, 0]
    assert lim.stats()["slots_held"] == 3
    with pytest.raises(ConcurrencyLimitExceeded) as e:
        async with lim.concurrency("c", limit=3, ttl=60):
            pass
    assert (e.value.limit, e.value.decision.allowed, e.value.decision.retry_after) == (3, False, 1.0)
    assert "3" in str(e.value)
    # Another key has its own slots.
    async with lim.concurrency("other", limit=3, ttl=60):
        pass
    held[1].release()
    held[1].release()  # idempotent
    assert lim.stats()["slots_held"] == 2
    await settle(lim)
    async with lim.concurrency("c", limit=3, ttl=60) as s:
        assert s.decision.remaining == 0
    # Released on an exception in the block, too.
    with pytest.raises(RuntimeError):
        async with lim.concurrency("c", limit=3, ttl=60):
            raise RuntimeError("boom")
    await settle(lim)
    async with lim.concurrency("c", limit=3, ttl=60):
        pass
    for s in held:
        s.release()
    assert lim.stats()["slots_held"] == 0
    # A release is a check with no future: the loop thread frees it.
    await settle(lim)
    assert _core._live()["checks"] == 0


@pytest.mark.asyncio
async def test_unreleased_slot_expires_after_ttl(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    s = lim.concurrency("t", limit=1, ttl=0.3)
    await s.__aenter__()  # and never released: a holder that died
    with pytest.raises(ConcurrencyLimitExceeded):
        await lim.concurrency("t", limit=1, ttl=0.3).__aenter__()
    await asyncio.sleep(0.4)
    async with lim.concurrency("t", limit=1, ttl=0.3):
        pass


@pytest.mark.asyncio
async def test_rate_and_concurrency_in_one_check_neither_consumed_on_denial(storage_url: str,
                                                                           make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    spec = lim.compile("3/hour", concurrency=1, ttl=60)
    assert (spec.concurrency, spec.ttl) == (1, 60.0)
    async with lim.concurrency("r", rates=spec) as s:
        assert (s.decision.remaining, s.decision.limit) == (2, 3)
        # The concurrency limit denies: no token is taken from the rate.
        with pytest.raises(ConcurrencyLimitExceeded) as e:
            await lim.concurrency("r", rates=spec).__aenter__()
        assert e.value.decision.rate == 1  # the concurrency limit (index: the number of rates)
    await settle(lim)
    for left in (1, 0):
        async with lim.concurrency("r", rates=spec) as s:
            assert s.decision.remaining == left
    # The rate denies: no slot is taken (a later peek finds both free).
    with pytest.raises(ConcurrencyLimitExceeded) as e:
        await lim.concurrency("r", rates=spec).__aenter__()
    assert e.value.decision.rate == 0 and e.value.decision.retry_after > 1000
    assert lim.stats()["slots_held"] == 0


@pytest.mark.asyncio
async def test_concurrency_input_errors(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    for bad in (0, -1, True, 2.5, None):
        with pytest.raises(ValueError, match="limit must be an int"):
            lim.concurrency("k", limit=bad)
    with pytest.raises(ValueError, match="ttl"):
        lim.concurrency("k", limit=2, ttl=0)
    spec = lim.compile(None, concurrency=2)
    with pytest.raises(TypeError, match="slot_id"):
        lim.submit("k", spec, 1)
    with pytest.raises(ValueError, match="slot_id"):
        lim.submit("k", lim.compile("1/second"), 1, b"x")
    with pytest.raises(ValueError, match="rates must be given"):
        lim.compile(None)
    with pytest.raises(ValueError, match="concurrency"):
        rategate.Rule("/x", "1/second", concurrency=0)
    with pytest.raises(ValueError, match="concurrency_ttl"):
        rategate.Rule("/x", "1/second", concurrency=2, concurrency_ttl=-1)


@pytest.mark.asyncio
async def test_concurrency_wrong_type_key_fails_only_its_check(redis_server: Any, redis_url: str,
                                                               make_limiter: Any) -> None:
    lim = make_limiter(redis_url)
    redis_server.client().set(b"rg:{poisoned}:c", b"not a sorted set")
    spec = lim.compile(None, concurrency=2)
    ds = await asyncio.gather(*(lim.submit(k, spec, 1, f"id-{k}") for k in ("a", "poisoned", "b")))
    assert [(d.allowed, d.error) for d in ds] == [(True, None), (False, "redis_error"), (True, None)]
    assert "WRONGTYPE" in lim.stats()["last_error"]


# -- Decision.latency -------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_latency_set_by_the_loop_thread_only(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    d = await lim.hit("lat", "1/hour")
    if storage_url == "memory://":
        assert d.latency is None
    else:
        assert d.latency is not None and 0 < d.latency < BOUND
        d = await lim.hit("lat", "1/hour")  # denied by Redis, then cached
        assert not d.allowed and d.latency is not None
        d = await lim.hit("lat", "1/hour")
        assert not d.allowed and d.latency is None  # the local cache answered at once
    assert rategate.Decision(True, 1, 1, 0.0, 0.0).latency is None


# -- the middleware -------------------------------------------------------------------------
def make_app(lim: Any, gate: asyncio.Event | None = None) -> Any:
    inside = {"now": 0, "max": 0}

    async def slow(request: Request) -> JSONResponse:
        inside["now"] += 1
        inside["max"] = max(inside["max"], inside["now"])
        try:
            if gate is not None:
                await gate.wait()
            return JSONResponse({"ok": True})
        finally:
            inside["now"] -= 1

    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("the app failed")

    async def tokens(request: Request) -> JSONResponse:
        rategate.set_cost(request, int(request.query_params["used"]))
        return JSONResponse({"ok": True})

    async def spent(request: Request) -> JSONResponse:
        rategate.set_cost(request, int(request.query_params["used"]))
        raise RuntimeError("the app failed after spending")

    async def stream(request: Request) -> StreamingResponse:
        async def gen() -> Any:
            for i in range(3):
                yield b"chunk"
            rategate.set_cost(request, 50)  # known only once the stream is done
        return StreamingResponse(gen())

    app = Starlette(routes=[Route("/slow", slow), Route("/boom", boom), Route("/tokens", tokens),
                            Route("/stream", stream), Route("/nocharge", tokens), Route("/spent", spent)])
    mw = rategate.RateLimitMiddleware(app, limiter=lim, rules=[
        Rule("/slow", "100/minute", concurrency=2),
        Rule("/boom", None, concurrency=1),
        Rule("/tokens", "100/hour", cost=10, charge=True),
        Rule("/stream", "100/hour", cost=10, charge=True),
        Rule("/nocharge", "100/hour", cost=10),
        Rule("/spent", "100/hour", cost=10, charge=True),
    ])
    return mw, inside


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.7", 4000)),
                             base_url="http://test", timeout=BOUND)


@pytest.mark.asyncio
async def test_middleware_concurrency(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    gate = asyncio.Event()
    app, inside = make_app(lim, gate)
    async with client(app) as c:
        first = [asyncio.ensure_future(c.get("/slow")) for _ in range(2)]
        while inside["now"] < 2:
            await asyncio.sleep(0.01)
        r = await c.get("/slow")  # 429 at once while two are in flight
        assert r.status_code == 429
        assert r.headers["ratelimit-policy"].startswith('2;qu="concurrent-requests"')
        assert r.headers["retry-after"] == "1"
        assert lim.stats()["slots_held"] == 2
        gate.set()
        assert [(await f).status_code for f in first] == [200, 200]
        assert lim.stats()["slots_held"] == 0
        ok = await c.get("/slow")
        assert ok.status_code == 200
        assert ok.headers["ratelimit-policy"] == '100;w=60, 2;qu="concurrent-requests"'
        # The app raises: the slot comes back all the same.
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await c.get("/boom")
            await settle(lim)
    assert inside["max"] == 2


@pytest.mark.asyncio
async def test_middleware_charges_the_reported_cost(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    app, _ = make_app(lim)
    async with client(app) as c:
        # Checked with 10; the app reports 30: 20 more are charged after the response.
        assert (await c.get("/tokens?used=30")).headers["ratelimit-remaining"] == "90"
        await settle(lim)
        assert (await lim.hit("/tokens|203.0.113.7", "100/hour", cost=0)).remaining == 70
        # Reports 4: 6 are refunded.
        await c.get("/tokens?used=4")
        await settle(lim)
        assert (await lim.hit("/tokens|203.0.113.7", "100/hour", cost=0)).remaining == 66
        # A streamed response is charged when its stream ends: 50 - 10.
        r = await c.get("/stream")
        assert r.content == b"chunk" * 3
        await settle(lim)
        assert (await lim.hit("/stream|203.0.113.7", "100/hour", cost=0)).remaining == 50
        # A rule without charge=True ignores the reported cost.
        await c.get("/nocharge?used=60")
        await settle(lim)
        assert (await lim.hit("/nocharge|203.0.113.7", "100/hour", cost=0)).remaining == 90
        # The app reported 30, then raised: what it reported was spent all the same.
        with pytest.raises(RuntimeError, match="after spending"):
            await c.get("/spent?used=30")
        await settle(lim)
        assert (await lim.hit("/spent|203.0.113.7", "100/hour", cost=0)).remaining == 70
        # Into debt: the next request is denied.
        await c.get("/tokens?used=500")
        await settle(lim)
        r = await c.get("/tokens?used=1")
        assert r.status_code == 429


def test_set_cost_errors() -> None:
    with pytest.raises(ValueError, match="cost must be an int"):
        rategate.set_cost({"type": "http"}, 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Request or an ASGI scope"):
        rategate.set_cost(object(), 1)
    scope: dict[str, Any] = {"type": "http"}
    rategate.set_cost(scope, 7)
    assert scope["state"]["rategate.cost"] == 7


@pytest.mark.asyncio
async def test_websocket_holds_its_slot_for_the_connection(storage_url: str, make_limiter: Any) -> None:
    """A WebSocket under a concurrency rule holds a slot from the handshake
    to the disconnect: a second connection of the key is refused meanwhile."""
    lim = make_limiter(storage_url)
    opened, leave = asyncio.Event(), asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        opened.set()
        await receive()  # until the client goes away

    mw = rategate.RateLimitMiddleware(app, limiter=lim, rules=[Rule("/ws", None, concurrency=1)])

    def scope() -> dict[str, Any]:
        return {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": "/ws",
                "raw_path": b"/ws", "query_string": b"", "root_path": "", "headers": [(b"host", b"t")],
                "client": ("203.0.113.5", 1), "server": ("t", 80), "subprotocols": []}

    async def client(stay: asyncio.Event | None) -> list[Any]:
        inbox: list[Any] = [{"type": "websocket.connect"}]
        sent: list[Any] = []

        async def receive() -> Any:
            if inbox:
                return inbox.pop(0)
            if stay is not None:
                await stay.wait()
            return {"type": "websocket.disconnect", "code": 1000}

        async def send(m: Any) -> None:
            sent.append(m)

        await asyncio.wait_for(mw(scope(), receive, send), BOUND)
        return sent

    first = asyncio.ensure_future(client(leave))
    await asyncio.wait_for(opened.wait(), BOUND)
    second = await client(None)
    assert second[-1]["type"] == "websocket.close" and second[-1]["code"] == 1008
    assert lim.stats()["slots_held"] == 1
    leave.set()
    assert (await first)[0]["type"] == "websocket.accept"
    assert lim.stats()["slots_held"] == 0
    await settle(lim)
    assert (await client(None))[0]["type"] == "websocket.accept"
