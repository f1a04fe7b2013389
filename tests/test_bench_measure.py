"""The benchmark's own instruments (bench/measure.py, bench/pace.py, the app's
control counters): they attribute CPU to the right threads, count Redis
commands per check, and the pacer counts what it sent and got.  Behaviour
only; no speed is asserted."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import rategate
from bench import measure, pace, procs
from bench.apps.common import counters_since
from bench.run import merged_lag, redis_checks, sum_stats
from redisserver import RedisServer

RATE = "1000000/second"


def burn(seconds: float) -> None:
    """Spend CPU on this (the main) thread."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        pass


async def test_cpu_split_names_the_threads(redis_url: str) -> None:
    lim = rategate.Limiter(redis_url)
    try:
        await lim.hit("warm", RATE)  # the engine starts its loop thread on first use
        before = measure.snapshot([os.getpid()], [], None)
        for i in range(200):
            await lim.hit(f"k{i % 10}", RATE)
        burn(0.2)
        after = measure.snapshot([os.getpid()], [], None)
    finally:
        await lim.aclose()
    cpu = measure.cpu_split(before, after)
    assert cpu["rategate_loop_threads"] >= 1, "no thread named rategate-loop-N in this process"
    assert cpu["rategate_loops"] is not None
    # the burn ran on the main thread: it is the event loop's column, not "other"
    assert cpu["event_loop"] >= 0.1
    assert abs(cpu["server"] - (cpu["event_loop"] + cpu["rategate_loops"] + cpu["other"])) < 1e-9
    assert cpu["redis"] is None  # no redis pid given: absent, not zero
    per = measure.per_request(cpu, 1000)
    assert per["event_loop"] == round(cpu["event_loop"] / 1000 * 1e6, 2)


def test_cpu_split_without_loop_threads_reports_them_absent() -> None:
    before = measure.snapshot([os.getpid()], [], os.getpid())
    burn(0.05)
    after = measure.snapshot([os.getpid()], [], os.getpid())
    fake_after = measure.CpuSnapshot(
        workers={pid: dict(w, loops={}) for pid, w in after.workers.items()}, redis=after.redis)
    fake_before = measure.CpuSnapshot(
        workers={pid: dict(w, loops={}) for pid, w in before.workers.items()}, redis=before.redis)
    cpu = measure.cpu_split(fake_before, fake_after)
    assert cpu["rategate_loops"] is None and cpu["rategate_loop_threads"] == 0
    assert cpu["redis"] is not None and cpu["redis"] >= 0.0
    # a process that is gone reads as absent, never as a crash
    gone = measure.snapshot([2**22 + 7], [2**22 + 9], 2**22 + 11)
    assert measure.cpu_split(gone, gone)["redis"] is None


async def test_redis_split_counts_checks_per_script(redis_server: RedisServer, redis_url: str) -> None:
    def commandstats() -> dict[str, dict[str, int]]:
        return measure.parse_commandstats(procs.redis_command("127.0.0.1", redis_server.port, "INFO", "commandstats"))

    lim = rategate.Limiter(redis_url)
    try:
        await lim.hit("warm", RATE)
        base = lim.stats()
        cs0 = commandstats()
        await asyncio.gather(*(lim.hit(f"k{i}", RATE) for i in range(300)))
        cs1 = commandstats()
        window = counters_since(lim.stats(), base)
    finally:
        await lim.aclose()
    checks = redis_checks(window)
    assert checks == 300
    r = measure.redis_split(cs0, cs1, checks, 300)
    assert r is not None
    assert r["script_calls"] >= 1 and r["checks"] == 300
    assert r["checks_per_script_call"] == round(300 / r["script_calls"], 2)
    # the script's own commands are counted too, their time inside the script's
    assert r["calls"] > r["script_calls"]
    assert r["usec_per_check"] == round(r["script_usec"] / 300, 2)
    assert "info" not in r["commands"]
    assert measure.redis_split(None, cs1, checks, 300) is None


def test_counters_and_merging() -> None:
    base = {"checks": 10, "allowed": 10, "denied": 0, "cached_denials": 0, "errors": {"timeout": 1},
            "in_flight": 3, "connected": True, "threads": 1, "last_error": None}
    now = {"checks": 25, "allowed": 20, "denied": 5, "cached_denials": 2, "errors": {"timeout": 2},
           "in_flight": 1, "connected": True, "threads": 1, "last_error": "x"}
    d = counters_since(now, base)
    assert d == {"checks": 15, "allowed": 10, "denied": 5, "cached_denials": 2, "errors": {"timeout": 1},
                 "in_flight": 1, "connected": True, "threads": 1, "last_error": "x"}
    assert redis_checks(d) == 10 + 5 - 2 - 1
    assert redis_checks(None) is None and redis_checks({"error": "boom"}) is None
    two = sum_stats([d, dict(d, connected=False)])
    assert two["checks"] == 30 and two["errors"] == {"timeout": 2} and two["connected"] is False
    lag = merged_lag([{"lag": {"samples_us": [1000, 3000]}}, {"lag": {"samples_us": [2000]}}, {}])
    assert lag["count"] == 3 and lag["p50_ms"] == 2.0 and lag["max_ms"] == 3.0
    assert merged_lag([{}])["count"] == 0


async def test_pacer_counts_every_request() -> None:
    """The pacer against a tiny HTTP server that answers in two pieces,
    200 for even requests and 429 for odd ones."""
    served = 0
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the pacer closed the connection
                break
            status = b"200 OK" if served % 2 == 0 else b"429 Too Many Requests"
            served += 1
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nab")
            await writer.drain()
            writer.write(b"cde")
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        p = pace.Pacer(port, "/ping", rate=400.0, max_connections=50)
        out: dict[str, Any] = await p.run(seconds=0.5, warmup=0.1, prewarm=2, drain=5.0)
    finally:
        server.close()
        await server.wait_closed()
        # the pacer closed its connections: every handler ends on its own
        await asyncio.wait_for(asyncio.gather(*handlers), 10)
    assert out["sent"] == 200 and out["completed"] == 200
    assert out["answered_total"] == served == 240
    assert sum(out["status"].values()) == 200 and set(out["status"]) == {"200", "429"}
    assert out["errors"] == 0 and out["unanswered"] == 0
    assert out["latency_ms"]["p50"] is not None and out["latency_ms"]["p50"] <= out["latency_ms"]["max"]


async def test_the_tls_case_serves_rategate_over_verified_tls(tmp_path: Any) -> None:
    # The benchmark's rategate-tls case: its Redis kind starts a private
    # redis-server with a throwaway CA, and its URL is verified TLS that a
    # Limiter uses; INFO (for commandstats) is read on the plain port.
    from bench.run import REDIS_SERVER, Ctx, HTTP_BY_NAME, REDIS_KINDS, redis_cmd

    case = HTTP_BY_NAME["rategate-tls"]
    ctx = Ctx(args=None, tmp=tmp_path, progress=None)  # type: ignore[arg-type]
    r = REDIS_KINDS[case.redis](ctx, case)
    assert r.server is not None and REDIS_SERVER
    try:
        assert r.url.startswith("rediss://127.0.0.1:") and "ssl_ca_certs=" in r.url
        lim = rategate.Limiter(r.url, timeout=2.0)
        try:
            d = await lim.hit("k", "2/minute")
            assert d.allowed and d.error is None and d.remaining == 1
        finally:
            await lim.aclose()
        info = redis_cmd(r.conf, "INFO", "commandstats")
        assert "cmdstat_evalsha" in (info.decode() if isinstance(info, bytes) else str(info))
    finally:
        r.server.stop()


async def test_the_python_redis_peer_decides_like_rategate(redis_url: str) -> None:
    # The benchmark's hand-written redis.asyncio limiter runs rategate's own
    # script with its own arguments: when the script's calling convention
    # changes, this catches a peer that no longer limits (a stale argument
    # layout once read every hit as a reset: nothing was ever denied).
    from bench.pyredis_limiter import PyRedisLimiter

    peer = PyRedisLimiter(redis_url, "5/minute")
    lim = rategate.Limiter(redis_url)
    try:
        got = [await peer.hit("peer") for _ in range(7)]
        want = [await lim.hit("same", "5/minute") for _ in range(7)]
        assert [r[0] for r in got] == [int(d.allowed) for d in want] == [1] * 5 + [0] * 2
        assert [r[2] for r in got] == [d.remaining for d in want]
    finally:
        await peer.aclose()
        await lim.aclose()
