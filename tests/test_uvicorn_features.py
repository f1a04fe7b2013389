"""Issue 12's Python-layer features under a real ``uvicorn --workers 4`` and a real redis-server.

One server for the module (:func:`make_app`): tiered limits (a limits
callable reading the plan from a header), Prometheus metrics in
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), and
per-message WebSocket limits (the ``websockets`` client against uvicorn's
WebSocket server).  Counters are kept apart by loopback source address, as in
test_uvicorn.py.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_uvicorn import Uvicorn  # noqa: E402
from test_uvicorn_workers import warm_workers  # noqa: E402

WORKERS = 4
TIERS = {b"free": "10/minute", b"pro": "1000/minute"}


def plan_limits(scope: Any) -> Any:
    return TIERS.get(dict(scope["headers"]).get(b"x-plan", b"free"), TIERS[b"free"])


def make_app() -> Any:
    """``uvicorn --factory test_uvicorn_features:make_app``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    import rategate
    from rategate.metrics import PrometheusMetrics

    metrics = PrometheusMetrics()
    limiter = rategate.Limiter(os.environ["RATEGATE_REDIS_URL"])

    async def pid(request: Request) -> JSONResponse:
        return JSONResponse({"pid": os.getpid()})

    async def echo(ws: WebSocket) -> None:
        """Echoes each message with the number of messages this app has seen."""
        await ws.accept()
        n = 0
        try:
            while True:
                text = await ws.receive_text()
                n += 1
                await ws.send_text(f"{n}:{text}")
        except WebSocketDisconnect:
            pass

    app = Starlette(routes=[
        Route("/", pid), Route("/health", pid), Route("/tiered", pid), Route("/m", pid),
        WebSocketRoute("/ws", echo), WebSocketRoute("/ws-drop", echo),
    ])
    app.add_route("/metrics", metrics.asgi_app())
    app.add_middleware(
        rategate.RateLimitMiddleware, limiter=limiter, limits=plan_limits, metrics=metrics,
        exempt=["/", "/health", "/metrics"],
        rules={
            "/m": {"limits": plan_limits},
            "/ws": {"limits": "100/minute", "websocket_messages": "3/minute"},
            "/ws-drop": {"limits": "100/minute", "websocket_messages": "3/6 seconds",
                         "websocket_over_limit": "drop"},
        },
    )
    return app


@pytest.fixture(scope="module")
def server(redis_server: Any) -> Iterator[Uvicorn]:
    redis_server.flushall()
    mpdir = tempfile.mkdtemp(prefix="rategate-prom-")
    srv = Uvicorn("test_uvicorn_features:make_app", "--factory", "--no-proxy-headers", workers=WORKERS,
                  env={"RATEGATE_REDIS_URL": redis_server.url, "PROMETHEUS_MULTIPROC_DIR": mpdir})
    try:
        warm_workers(srv, "127.0.0.59", WORKERS)
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(mpdir, ignore_errors=True)


async def _burst(url: str, source: str, path: str, n: int, headers: dict[str, str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    transport = httpx.AsyncHTTPTransport(local_address=source, limits=limits)
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as c:
        return list(await asyncio.gather(*(c.get(path, headers=headers) for _ in range(n))))


def burst(srv: Uvicorn, source: str, path: str, n: int, **headers: str) -> list[httpx.Response]:
    """``n`` concurrent requests, each on its own connection (spread over the workers)."""
    return asyncio.run(_burst(srv.url, source, path, n, headers))


def codes(rs: list[httpx.Response]) -> collections.Counter[int]:
    return collections.Counter(r.status_code for r in rs)


# -- tiered limits across four workers ---------------------------------------------------
def test_tiered_limits_across_workers(server: Uvicorn) -> None:
    assert codes(burst(server, "127.0.0.60", "/tiered", 40)) == {200: 10, 429: 30}
    pro = burst(server, "127.0.0.61", "/tiered", 40, **{"x-plan": "pro"})
    assert codes(pro) == {200: 40}
    assert {r.headers["ratelimit-limit"] for r in pro} == {"1000"}
    # The same client on the free plan has its own (free) counter.
    assert codes(burst(server, "127.0.0.61", "/tiered", 12, **{"x-plan": "free"})) == {200: 10, 429: 2}


# -- metrics: one scrape adds up every worker ----------------------------------------------
def scrape(srv: Uvicorn, rule: str) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for m in re.finditer(r'^rategate_decisions_total\{(.*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels["rule"] == rule:
            out[labels["outcome"]] = float(m.group(2))
    return out


def test_prometheus_totals_add_up_across_workers(server: Uvicorn) -> None:
    responses: list[httpx.Response] = []
    pids: set[int] = set()
    # Allowed (pro) bursts until at least two workers have answered (the
    # kernel may hand one worker a whole burst), then a free-plan burst
    # that is mostly denied.
    for _ in range(10):
        rs = burst(server, "127.0.0.62", "/m", 30, **{"x-plan": "pro"})
        responses += rs
        pids |= {r.json()["pid"] for r in rs if r.status_code == 200}
        if len(pids) >= 2:
            break
    assert len(pids) >= 2, pids
    responses += burst(server, "127.0.0.62", "/m", 25)
    sent = len(responses)
    got = codes(responses)
    assert got[429] >= 15 and got[200] + got[429] == sent
    totals = scrape(server, "/m")
    assert sum(totals.values()) == sent, totals
    assert totals["allowed"] == got[200], totals
    assert totals["denied"] + totals["denied_cached"] == got[429], totals
    assert totals["failure"] == 0 and totals["shadow_would_deny"] == 0
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert re.search(r"^rategate_redis_up 1\.0$", text, re.M), text
    assert "127.0.0.62" not in text


# -- per-message WebSocket limits ---------------------------------------------------------
def ws_connect(srv: Uvicorn, path: str, source: str) -> Any:
    from websockets.sync.client import connect

    return connect(f"ws://127.0.0.1:{srv.port}{path}", source_address=(source, 0), proxy=None,
                   open_timeout=10, close_timeout=5)


def test_websocket_closed_with_1008_over_the_message_limit(server: Uvicorn) -> None:
    from websockets.exceptions import ConnectionClosed

    with ws_connect(server, "/ws", "127.0.0.63") as ws:
        for t in "abcd":
            ws.send(t)
        assert [ws.recv(timeout=10) for _ in range(3)] == ["1:a", "2:b", "3:c"]
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
    assert e.value.rcvd is not None
    assert (e.value.rcvd.code, e.value.rcvd.reason) == (1008, "Too Many Messages")
    # A new connection of the same client: its first message is over the limit too.
    with ws_connect(server, "/ws", "127.0.0.63") as ws:
        ws.send("e")
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
    assert e.value.rcvd is not None and e.value.rcvd.code == 1008


def test_websocket_drop_mode_keeps_the_connection(server: Uvicorn) -> None:
    # 3 messages per 6 seconds: one token back every 2 s.
    with ws_connect(server, "/ws-drop", "127.0.0.64") as ws:
        for t in "abcde":
            ws.send(t)
        assert [ws.recv(timeout=10) for _ in range(3)] == ["1:a", "2:b", "3:c"]
        time.sleep(2.5)
        ws.send("f")
        # "4": the app never saw d and e, and the connection is still open.
        assert ws.recv(timeout=10) == "4:f"
