"""The engine's operator interface: Engine.connect(), command(), topology().

What rategate.Limiter.connect() and the ``rategate`` command line build on.
One real redis-server (the session's), a private one where a test pauses
it, and fake RESP servers (tests/fakeresp.py) for a server that answers
slowly or not at all.  The Sentinel and Cluster cases are in
tests/test_sentinel.py and tests/test_cluster.py, on their modules' sets.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import rategate
from fakeresp import SILENT, Delay, Error, FakeServer
from rategate import _core
from redisserver import RedisServer

# Deadlines are the engine's contract: an answer within its deadline plus
# this much scheduling on a loaded 2-core machine (never a speed claim).
ALLOWANCE = 1.5


def engine(lim: rategate.Limiter) -> Any:
    return lim._engine


# -- connect() -------------------------------------------------------------------

async def test_connect_then_topology(redis_server: RedisServer, redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, threads=3)
    e = engine(lim)
    assert e.topology() == {"kind": "server", "masters": [], "sentinel": None}  # not started
    assert await e.connect() is None
    assert e.topology() == {"kind": "server", "sentinel": None, "masters": [
        {"address": f"127.0.0.1:{redis_server.port}", "connected": True, "slots": []}]}
    await asyncio.wait_for(e.connect(0.5), 5)  # connected already: at once
    assert lim.stats()["connected"] is True


async def test_connect_over_a_unix_socket(redis_unix_server: RedisServer, redis_unix_url: str,
                                          make_limiter: Any) -> None:
    e = engine(make_limiter(redis_unix_url))
    await e.connect()
    [m] = e.topology()["masters"]
    assert m["address"] == redis_unix_server.socket_path and m["connected"]
    assert await e.command(["PING"], node=redis_unix_server.socket_path) == "PONG"


async def test_connect_refused_names_the_cause(make_limiter: Any) -> None:
    from redisserver import free_port

    port = free_port()
    e = engine(make_limiter(f"redis://127.0.0.1:{port}/0", timeout=5.0, connect_timeout=5.0))
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as ei:
        await e.connect()
    assert f"connect failed: 127.0.0.1:{port}: connection refused" in str(ei.value)
    assert time.monotonic() - t0 < 5.0  # failed for good: not held to the timeout


@pytest.mark.parametrize("timeout", [None, 0.3])
async def test_connect_to_a_silent_server_names_it(make_limiter: Any, timeout: float | None) -> None:
    # Accepts, then never answers the handshake.
    with FakeServer(lambda srv, conn, argv: SILENT) as fake:
        e = engine(make_limiter(fake.url, connect_timeout=0.3))
        t0 = time.monotonic()
        with pytest.raises(ConnectionError) as ei:
            await e.connect(timeout)
        assert time.monotonic() - t0 < 0.3 + ALLOWANCE
        msg = str(ei.value)
        assert fake.address in msg, msg
        assert "0.3 s" in msg or "300 ms" in msg, msg


async def test_connect_waits_for_every_shard(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, threads=4)
    await engine(lim).connect()
    assert lim.stats()["connected"] is True  # every shard, not just the first


# -- the first-connection rule ---------------------------------------------------

async def test_first_connection_waits_up_to_connect_timeout(make_limiter: Any) -> None:
    """A fresh engine's first checks wait for its first connection up to
    connect_timeout, even with a shorter timeout; once it has been ready,
    the timeout holds alone."""
    slow = {"hello": 0.4, "script": 0.0}

    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        name = argv[0].upper()
        if name == b"SCRIPT" and slow["hello"]:
            return Delay(slow["hello"], None)
        if name == b"EVALSHA" and slow["script"]:
            return Delay(slow["script"], None)
        return None

    with FakeServer(handler) as fake:
        lim = make_limiter(fake.url, timeout=0.05, connect_timeout=3.0)
        first = await asyncio.gather(*[lim.hit(f"k{i}", "5/second") for i in range(5)])
        assert [d.error for d in first] == [None] * 5, first
        slow["script"] = 0.4
        d = await lim.hit("k", "5/second")
        assert d.error == "timeout"


# -- command() -------------------------------------------------------------------

async def test_command_reply_types(redis_url: str, make_limiter: Any) -> None:
    e = engine(make_limiter(redis_url))
    assert await e.command(["PING"]) == "PONG"
    assert await e.command(["SET", "op:a", 5]) == "OK"
    assert await e.command([b"INCRBY", "op:a", -7]) == -2
    assert await e.command(["GET", "op:a"], key="op:a") == b"-2"
    assert await e.command(["GET", "op:missing"]) is None
    binary = b"\x00\r\n\xff" * 3
    assert await e.command([b"SET", b"op:\x00bin", binary]) == "OK"
    assert await e.command([b"GET", b"op:\x00bin"], key=b"op:\x00bin") == binary
    assert await e.command(["MGET", "op:a", "op:missing"]) == [b"-2", None]
    t = await e.command(["TIME"])
    assert len(t) == 2 and all(isinstance(x, bytes) and x.isdigit() for x in t)
    assert await e.command(["EVAL", "return {1, {2, 'x'}, {}}", 0]) == [1, [2, b"x"], []]
    mixed = await e.command(["EVAL", "return {1, redis.error_reply('boom here')}", 0])
    assert mixed[0] == 1 and isinstance(mixed[1], _core.ReplyError) and str(mixed[1]) == "boom here"
    assert await e.command(["PTTL", "op:a"]) == -1
    assert await e.command(["SCAN", 0, "MATCH", "op:*", "COUNT", 1000]) is not None


async def test_reply_error(redis_url: str, make_limiter: Any) -> None:
    e = engine(make_limiter(redis_url))
    await e.command(["SET", "op:s", "x"])
    with pytest.raises(_core.ReplyError) as ei:
        await e.command(["INCR", "op:s"])
    assert str(ei.value).startswith("ERR")
    with pytest.raises(_core.ReplyError, match="^WRONGTYPE"):
        await e.command(["LPUSH", "op:s", "y"])
    assert issubclass(_core.ReplyError, Exception) and not issubclass(_core.ReplyError, ConnectionError)
    # Not a check: nothing counted.
    assert engine_checks(e) == 0


def engine_checks(e: Any) -> int:
    return int(e.stats()["checks"])


async def test_node_routing_on_one_server(redis_server: RedisServer, redis_url: str,
                                          make_limiter: Any) -> None:
    e = engine(make_limiter(redis_url))
    await e.connect()
    addr = e.topology()["masters"][0]["address"]
    assert await e.command(["PING"], node=addr) == "PONG"
    with pytest.raises(ConnectionError) as ei:
        await e.command(["PING"], node="10.9.8.7:6379")
    assert "10.9.8.7:6379 is not the master" in str(ei.value) and addr in str(ei.value)


@pytest.mark.parametrize("args, kw, exc, text", [
    ([], {}, ValueError, "at least the command's name"),
    ("PING", {}, ValueError, "not one string"),
    (["SET", "k", 1.5], {}, TypeError, "argument 2 must be bytes, str or int, not float"),
    (["SET", "k", True], {}, TypeError, "not bool"),
    (42, {}, TypeError, "sequence of bytes, str or int"),
    (["PING"], {"key": "k", "node": "h:1"}, ValueError, "not both"),
    (["PING"], {"node": 7}, TypeError, "node must be a str"),
    (["PING"], {"key": 7}, TypeError, "key must be bytes or str"),
    (["PING"], {"timeout": -1}, ValueError, "timeout must be a number of seconds"),
    (["PING"], {"timeout": float("nan")}, ValueError, "timeout must be a number of seconds"),
    (["PING"], {"slot": 1}, TypeError, "unexpected keyword argument 'slot'"),
])
async def test_command_argument_errors(redis_url: str, make_limiter: Any, args: Any, kw: dict,
                                       exc: type, text: str) -> None:
    e = engine(make_limiter(redis_url))
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        e.command(args, **kw)
    with pytest.raises(TypeError):
        e.command()
    with pytest.raises(ValueError, match="timeout"):
        e.connect(0)


async def test_command_deadline_on_a_paused_server(own_redis: RedisServer, make_limiter: Any) -> None:
    e = engine(make_limiter(own_redis.url))
    await e.connect()
    pause = own_redis.pause(1.0)  # within the stall timeout (2 s): the connection stays
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        await e.command(["PING"], timeout=0.2)
    assert time.monotonic() - t0 < 0.2 + ALLOWANCE
    assert f"no answer from 127.0.0.1:{own_redis.port} within the timeout (0.2 s)" in str(ei.value)
    pause.wait()
    assert await e.command(["PING"]) == "PONG"  # the late reply was ignored, the next is fine


async def test_commands_to_a_down_server_fail_at_once(own_redis: RedisServer, make_limiter: Any) -> None:
    e = engine(make_limiter(own_redis.url, connect_timeout=5.0))
    await e.connect()
    own_redis.stop()
    for _ in range(300):  # the drop, then the refused reconnect
        try:
            await e.command(["PING"], timeout=5.0)
        except ConnectionError as ex:
            if "refused" in str(ex):
                break
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="connection refused"):
        await e.command(["PING"], timeout=5.0)
    assert time.monotonic() - t0 < 5.0
    assert e.topology()["masters"][0]["connected"] is False


async def test_close_answers_a_command_in_flight(make_limiter: Any) -> None:
    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        return SILENT if argv[0].upper() == b"BLPOP" else None

    with FakeServer(handler) as fake:
        lim = make_limiter(fake.url)
        e = engine(lim)
        await e.connect()
        fut = e.command(["BLPOP", "q", 0], timeout=30.0)
        await asyncio.sleep(0.1)
        await lim.aclose()
        with pytest.raises(ConnectionError, match="closed"):
            await asyncio.wait_for(fut, 5)
        with pytest.raises(RuntimeError, match="closed"):
            e.topology()
    assert _core._live()["checks"] == 0


async def test_a_cancelled_command_is_let_go(redis_url: str, make_limiter: Any) -> None:
    e = engine(make_limiter(redis_url))
    fut = e.command(["PING"])
    fut.cancel()
    assert await e.command(["ECHO", "after"]) == b"after"
    assert await e.command(["DEL", "nothing"]) == 0


async def test_error_text_is_the_servers(make_limiter: Any) -> None:
    # A server that words its errors its own way: the text is passed on as is.
    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        return Error("NOPE this server says no") if argv[0].upper() == b"GET" else None

    with FakeServer(handler) as fake:
        e = engine(make_limiter(fake.url))
        with pytest.raises(_core.ReplyError) as ei:
            await e.command(["GET", "k"])
        assert str(ei.value) == "NOPE this server says no"


# -- fork --------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_child_connects_and_commands_anew(redis_url: str) -> None:
    from test_limiter_concurrency import _run_in_child  # fork, run, report through a pipe

    lim = rategate.Limiter(redis_url)
    e = engine(lim)

    async def run(make: Any) -> Any:
        return await asyncio.wait_for(make(), 10)

    def child() -> list[Any]:
        async def go() -> list[Any]:
            before = e.topology()["masters"]  # the parent's view is not the child's
            await run(e.connect)
            return [before, await run(lambda: e.command(["SET", "op:fork", "child"]))]
        return asyncio.run(go())

    try:
        asyncio.run(run(e.connect))
        assert _run_in_child(child) == [[], "OK"]
        assert asyncio.run(run(lambda: e.command(["GET", "op:fork"]))) == b"child"
    finally:
        asyncio.run(run(lim.aclose))
