"""What production adds to a topology: hostile replies, half-dead servers,
addresses that move, a thread descheduled past a deadline (issue 17).

Every server here is a fake RESP server written in the tests
(tests/fakeresp.py): it answers as told, which no real server does on
demand.  The real failovers (READONLY after CLUSTER FAILOVER, a killed
master) are in tests/test_cluster.py and tests/test_sentinel.py.  A case
that crashed the process before its fix runs in a child process, so that a
regression fails the test instead of the run.  These tests run under ASan
in CI (.ci/run).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

import rategate
from fakeresp import CLOSE, SILENT, Delay, Error, FakeServer
from rategate import _core
from source_tree import ROOT

ALLOWANCE = 1.5  # scheduling on a loaded 2-core machine, beyond a deadline


def own_map(node: FakeServer, first: int = 0, last: int = 16383) -> list[Any]:
    """CLUSTER SLOTS naming `node` the master of first..last."""
    return [[first, last, ["127.0.0.1", node.port, f"id{node.port}"]]]


def run_child(body: str, timeout: float = 60) -> dict[str, Any]:
    """Run `body` (the inside of an async function; `out` is a dict it
    fills) in a fresh interpreter: a crash is a failed test, not a dead
    run.  The sanitizer's preload, if any, goes along."""
    code = ("import asyncio, json, rategate\n"
            "async def main(out):\n" + textwrap.indent(textwrap.dedent(body), "    ") +
            "\nout = {}\nasyncio.run(main(out))\nprint(json.dumps(out))\n")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, f"the child died ({r.returncode}):\n{r.stderr[-3000:]}"
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


async def until_allowed(lim: rategate.Limiter, key: str, within: float) -> rategate.Decision:
    """Hit key until a check is allowed (a store recovering); the last decision."""
    deadline = time.monotonic() + within
    while True:
        d = await lim.hit(key, "1000000/second")
        if d.allowed or time.monotonic() > deadline:
            return d
        await asyncio.sleep(0.01)


# -- #1: every number range-checked as the 64-bit value it arrived as ---------------

BAD_MAPS = {
    "start 2^31": lambda p: [[2**31, 5, ["127.0.0.1", p, "x"]]],
    "start 2^32+1": lambda p: [[2**32 + 1, 2**32 + 9, ["127.0.0.1", p, "x"]]],
    "negative": lambda p: [[-1, 5, ["127.0.0.1", p, "x"]]],
    "last 16384": lambda p: [[0, 16384, ["127.0.0.1", p, "x"]]],
    "last before first": lambda p: [[9, 5, ["127.0.0.1", p, "x"]]],
    "port 2^32+6379": lambda p: [[0, 16383, ["127.0.0.1", 2**32 + 6379, "x"]]],
    "port 0": lambda p: [[0, 16383, ["127.0.0.1", 0, "x"]]],
    "host an int": lambda p: [[0, 16383, [7, p, "x"]]],
    "no master": lambda p: [[0, 16383]],
    "slot twice": lambda p: [[0, 10, ["127.0.0.1", p, "x"]], [10, 20, ["127.0.0.1", p, "x"]]],
    "not an array": lambda p: 42,
}


def test_malformed_slot_maps_are_refused_not_a_crash() -> None:
    fakes = {name: FakeServer() for name in BAD_MAPS}
    try:
        for name, f in fakes.items():
            f.slots = BAD_MAPS[name](f.port)
        ports = {name: f.port for name, f in fakes.items()}
        out = run_child(f"""
            for name, port in {ports!r}.items():
                lim = rategate.Limiter(f"redis+cluster://127.0.0.1:{{port}}", timeout=0.3,
                                       connect_timeout=0.3)
                d = await lim.hit("k", "5/second")
                out[name] = [d.error, lim.stats()["last_error"]]
                await lim.aclose()
            """)
    finally:
        for f in fakes.values():
            f.close()
    for name in BAD_MAPS:
        err, last = out[name]
        assert err == "unavailable", (name, err)
        assert "CLUSTER SLOTS" in last and "127.0.0.1" in last, (name, last)


@pytest.mark.parametrize("reply", [
    # per check H = (allowed + 2) * 32 + rate, remaining, reset (+ retry, block when denied)
    [(2**32 + 1 + 2) * 32, 0, 1000],      # "allowed" 2^32+1 (it was once cut to 1)
    [-5, 0, 1000],                        # H negative
])
async def test_script_numbers_out_of_range_are_a_redis_error(make_limiter: Any, reply: list[int]) -> None:
    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        return reply if argv[0].upper() == b"EVALSHA" else None

    with FakeServer(handler) as fake:
        lim = make_limiter(fake.url)
        d = await lim.hit("k", "5/second")
        assert (d.allowed, d.error) == (False, "redis_error"), d
        assert "reply to the script" in lim.stats()["last_error"]  # malformed, or unexpected


@pytest.mark.parametrize("reply, allowed", [
    ([(0 + 2) * 32, 0, 1000, 2**62, 2**62], False),  # retry and block of 2^62 us
    ([(0 + 2) * 32, 0, 1000, 2**63 - 1, 1000000], False),  # retry "forever", block 1 s
    ([(1 + 2) * 32, 2**62, 1000], True),              # remaining
    ([(1 + 2) * 32, 0, -2**62], True),                # reset
])
async def test_huge_script_numbers_are_clamped(make_limiter: Any, reply: list[int], allowed: bool) -> None:
    """Times and counts as they arrived, clamped (a century, 2^53): a
    denial stays a denial, and nothing added to the clock wraps."""
    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        return reply if argv[0].upper() == b"EVALSHA" else None

    with FakeServer(handler) as fake:
        lim = make_limiter(fake.url)
        d = await lim.hit("k", "5/second")
        assert (d.allowed, d.error) == (allowed, None), d
        assert d.remaining <= 2**53 and abs(d.reset_after) <= 101 * 366 * 86400
        assert d.retry_after <= 101 * 366 * 86400
        if not allowed:  # the deny cache holds it (its end did not wrap into the past)
            again = await lim.hit("k", "5/second")
            assert not again.allowed and lim.stats()["cached_denials"] == 1


# -- #2: a rejected map leaves the good one --------------------------------------------

async def test_a_rejected_map_keeps_the_good_one(make_limiter: Any) -> None:
    """The only node answers a good map, then [] (a node holding no slot):
    the map it had stays in force, and checks go on being answered."""
    state = {"empty": False, "moved": 0}

    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        name = argv[0].upper()
        if name == b"CLUSTER" and state["empty"]:
            return []
        if name == b"EVALSHA" and state["empty"] and state["moved"] == 0:
            state["moved"] += 1  # a MOVED to itself: the map is read again now
            return Error(f"MOVED 1 127.0.0.1:{srv.port}")
        return None

    with FakeServer(handler) as node:
        node.slots = own_map(node)
        lim = make_limiter(f"redis+cluster://127.0.0.1:{node.port}", timeout=0.5)
        assert (await lim.hit("a", "100/second")).error is None
        state["empty"] = True
        errors = []
        for i in range(30):
            errors.append((await lim.hit(f"k{i}", "100/second")).error)
            await asyncio.sleep(0.01)
        assert errors == [None] * 30, (errors, lim.stats()["last_error"])
        assert state["moved"] == 1 and node.count(b"CLUSTER") >= 2
        assert "empty slot map" in lim.stats()["last_error"]


# -- #3: masters that move, step by step -------------------------------------------------

def test_100_successive_master_addresses_are_followed() -> None:
    """A pod that comes back on a new address, 100 times: each new master is
    followed, and the nodes and connections held stay those of the map."""
    steps = int(os.environ.get("RATEGATE_CHURN_STEPS", "100"))
    current: list[FakeServer] = []
    seed = FakeServer(slots=lambda: own_map(current[0]))
    current.append(FakeServer())
    worst_conns = 0

    async def main() -> None:
        nonlocal worst_conns
        lim = rategate.Limiter(f"redis+cluster://127.0.0.1:{seed.port}", timeout=0.5, threads=2)
        try:
            await lim._engine.connect()
            for step in range(steps):
                old = current[0]
                current[0] = FakeServer()  # the new address
                old.close()                # the old one is gone
                d = await until_allowed(lim, f"k{step}", 10.0)
                assert d.allowed, (step, d, lim.stats()["last_error"])
                # topology() is the first loop thread's view: it follows too.
                for _ in range(500):
                    masters = lim._engine.topology()["masters"]
                    if [m["address"] for m in masters] == [current[0].address]:
                        break
                    await asyncio.sleep(0.01)
                assert [m["address"] for m in masters] == [current[0].address], (step, masters)
                # Two shards: each a data connection and at most a question
                # in flight; nothing kept for the addresses that went.
                worst_conns = max(worst_conns, _core._live()["conns"])
                assert _core._live()["conns"] <= 4, (step, _core._live())
        finally:
            await lim.aclose()

    try:
        asyncio.run(main())
    finally:
        seed.close()
        current[0].close()
    print(f"\n{steps} master addresses followed; at most {worst_conns} connections open at once")
    assert _core._live()["conns"] == 0


# -- #4: a server that answers the handshake, then nothing ---------------------------------

async def test_a_silent_cluster_node_is_passed_over(make_limiter: Any) -> None:
    def silent(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        return SILENT if argv[0].upper() == b"CLUSTER" else None

    with FakeServer(silent) as mute, FakeServer() as node:
        node.slots = own_map(node)
        lim = make_limiter(f"redis+cluster://127.0.0.1:{mute.port},127.0.0.1:{node.port}",
                           timeout=0.2, connect_timeout=0.3)
        t0 = time.monotonic()
        await asyncio.wait_for(lim._engine.connect(2.0), 5)
        assert time.monotonic() - t0 < 0.3 + ALLOWANCE
        assert mute.count(b"CLUSTER") >= 1  # it was asked first, and passed over
        assert (await lim.hit("k", "5/second")).error is None


async def test_a_silent_sentinel_is_passed_over(make_limiter: Any) -> None:
    with FakeServer() as master:
        def sentinel(answer: bool) -> Any:
            def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
                name = argv[0].upper()
                if name == b"SENTINEL":
                    return ["127.0.0.1", str(master.port)] if answer else SILENT
                if name == b"SUBSCRIBE":
                    return ["subscribe", "+switch-master", 1]
                return None
            return handler

        with FakeServer(sentinel(False)) as mute, FakeServer(sentinel(True)) as good:
            lim = make_limiter(f"redis+sentinel://127.0.0.1:{mute.port},127.0.0.1:{good.port}/mymaster",
                               timeout=0.2, connect_timeout=0.3)
            t0 = time.monotonic()
            await asyncio.wait_for(lim._engine.connect(2.0), 5)
            assert time.monotonic() - t0 < 0.3 + ALLOWANCE
            assert mute.count(b"SENTINEL") >= 1
            assert (await lim.hit("k", "5/second")).error is None
            assert lim._engine.topology()["sentinel"] == good.address


async def test_a_master_that_never_answers_role_fails_naming_it(make_limiter: Any) -> None:
    def mute_role(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        return SILENT if argv[0].upper() == b"ROLE" else None

    with FakeServer(mute_role) as master:
        def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
            if argv[0].upper() == b"SENTINEL":
                return ["127.0.0.1", str(master.port)]
            return ["subscribe", "+switch-master", 1] if argv[0].upper() == b"SUBSCRIBE" else None

        with FakeServer(handler) as sentinel:
            lim = make_limiter(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster", timeout=0.2,
                               connect_timeout=0.3)
            t0 = time.monotonic()
            with pytest.raises(ConnectionError) as ei:
                await asyncio.wait_for(lim._engine.connect(5.0), 10)
            assert time.monotonic() - t0 < 0.3 + ALLOWANCE
            assert master.address in str(ei.value) and "connect timeout" in str(ei.value)
            d = await lim.hit("k", "5/second")  # answered, not held
            assert d.error in ("unavailable", "timeout")
            assert lim.stats()["last_error"] is not None


def test_connections_have_keepalive(redis_server: Any, redis_url: str) -> None:
    async def main() -> list[int]:
        lim = rategate.Limiter(redis_url)
        try:
            await lim._engine.connect()
            found = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    s = socket.socket(fileno=os.dup(int(fd)))
                except OSError:
                    continue
                with s:
                    try:
                        peer = s.getpeername()
                    except OSError:
                        continue
                    if s.family == socket.AF_INET and peer[1] == redis_server.port:
                        found.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
            return found
        finally:
            await lim.aclose()

    found = asyncio.run(main())
    assert found and all(found), found


# -- #5 (fake): READONLY from a cluster node ---------------------------------------------

async def test_readonly_reads_the_map_again_and_resends(make_limiter: Any) -> None:
    """A master demoted under a call without declared keys answers READONLY,
    not MOVED: the map is read again and the checks go to the new master."""
    with FakeServer() as new:
        state = {"demoted": False}

        def old_handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
            if state["demoted"] and argv[0].upper() in (b"EVALSHA", b"EVAL"):
                return Error("READONLY You can't write against a read only replica.")
            return None

        with FakeServer(old_handler) as old:
            old.slots = lambda: own_map(new if state["demoted"] else old)
            new.slots = old.slots
            lim = make_limiter(f"redis+cluster://127.0.0.1:{old.port}", timeout=1.0)
            keys = [f"k{i}" for i in range(40)]
            assert all(d.error is None for d in await asyncio.gather(*[lim.hit(k, "5/second") for k in keys]))
            before = old.count(b"EVALSHA") + old.count(b"EVAL")
            state["demoted"] = True
            ds = await asyncio.gather(*[lim.hit(k, "5/second") for k in keys])
            assert [d.error for d in ds] == [None] * 40, lim.stats()["last_error"]
            assert new.count(b"EVALSHA") + new.count(b"EVAL") >= 1
            # It was asked, and said READONLY (unless every shard had read
            # the new map first).
            if old.count(b"EVALSHA") + old.count(b"EVAL") > before:
                assert "READONLY" in (lim.stats()["last_error"] or "")


async def test_only_a_compile_error_turns_the_cross_slot_script_off(make_limiter: Any) -> None:
    """An OOM (or READONLY, BUSY) after NOSCRIPT then EVAL says nothing of
    the server's version: later calls still carry many slots at once."""
    state = {"oom": 1}

    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        if argv[0].upper() == b"EVAL" and argv[1].startswith(b"#!lua") and state["oom"]:
            state["oom"] -= 1
            return Error("OOM command not allowed when used memory > 'maxmemory'.")
        return None

    with FakeServer(handler) as node:
        node.slots = own_map(node)
        lim = make_limiter(f"redis+cluster://127.0.0.1:{node.port}", timeout=1.0)
        first = await asyncio.gather(*[lim.hit(f"a{i}", "5/second") for i in range(20)])
        assert {d.error for d in first} == {"redis_error"}  # the OOM is the answer
        before = len(node.commands)
        second = await asyncio.gather(*[lim.hit(f"b{i}", "5/second") for i in range(20)])
        assert [d.error for d in second] == [None] * 20
        # Still the cross-slot script: no call of the one-slot script (the
        # fallback of servers without script flags).
        scripts = [argv for _, argv in node.commands[before:] if argv[0].upper() in (b"EVALSHA", b"EVAL")]
        one_slot = [a for a in scripts if a[0].upper() == b"EVALSHA" and node.scripts.get(a[1].decode()) is False
                    or a[0].upper() == b"EVAL" and not a[1].startswith(b"#!lua")]
        assert scripts and not one_slot, [a[:3] for a in scripts]


# -- #7: a replacement killed before its first reply ----------------------------------------

async def test_a_replacement_killed_before_its_first_reply_is_replaced(make_limiter: Any) -> None:
    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        # The second connection (the first one's replacement) is killed on
        # its first script call, as CLIENT KILL TYPE normal kills it too.
        return CLOSE if conn == 2 and argv[0].upper() == b"EVALSHA" else None

    with FakeServer(handler) as fake:
        lim = make_limiter(fake.url, timeout=2.0)
        assert (await lim.hit("a", "100/second")).error is None
        fake.drop_connections()
        await asyncio.sleep(0.1)
        ds = [await lim.hit(f"k{i}", "100/second") for i in range(5)]
        assert [d.error for d in ds] == [None] * 5, lim.stats()["last_error"]
        assert fake.accepted >= 3


# -- #9: replies read before a deadline pass ------------------------------------------------

def test_a_descheduled_loop_thread_reads_replies_before_timing_out() -> None:
    """The loop thread is stopped (SIGSTOP of its process) past a check's
    deadline while the reply arrives; once it runs again, the reply that is
    waiting in the socket answers the check, not the deadline."""
    sent = {"pid": 0}
    release: list[float] = []

    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        if argv[0].upper() != b"EVALSHA" or srv.count(b"EVALSHA") != 2:
            return None
        os.kill(sent["pid"], signal.SIGSTOP)  # descheduled, reply in hand
        release.append(time.monotonic())
        return None  # answered now, while the process is stopped

    with FakeServer(handler) as fake:
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import asyncio, rategate, sys
                async def main():
                    lim = rategate.Limiter("{fake.url}", timeout=0.3, spin=0.01)
                    assert (await lim.hit("warm", "5/second")).error is None
                    print("ready", flush=True)
                    d = await lim.hit("k", "5/second")
                    print(d.error, flush=True)
                    await lim.aclose()
                asyncio.run(main())
                """)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
            # Polling while a reply is owed (not in epoll_wait): stopped
            # there, the thread's next loop turn starts with the timers.
            env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
                     RATEGATE_SPIN_ADAPTIVE="0"))
        sent["pid"] = child.pid
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 10
            while not release and time.monotonic() < deadline:
                time.sleep(0.01)
            assert release, "the check never reached the server"
            time.sleep(0.6)  # well past the 0.3 s deadline, the reply in its socket
            os.kill(child.pid, signal.SIGCONT)
            out, _ = child.communicate(timeout=20)
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGCONT)
                child.kill()
                child.wait()
        assert out.strip() == "None", out  # answered by its reply: no "timeout"


# -- #10: the TLS hint only when it fits ---------------------------------------------------

async def test_no_tls_hint_for_a_server_that_was_reached_in_plain(make_limiter: Any) -> None:
    state = {"close": False}

    def handler(srv: FakeServer, conn: int, argv: list[bytes]) -> Any:
        return CLOSE if state["close"] else None  # a server dying mid set-up

    with FakeServer(handler) as fake:
        lim = make_limiter(fake.url, timeout=0.3)
        assert (await lim.hit("a", "5/second")).error is None
        state["close"] = True
        fake.drop_connections()
        for _ in range(100):
            last = lim.stats()["last_error"] or ""
            if "during the set-up" in last:
                break
            await lim.hit("a", "5/second")
            await asyncio.sleep(0.01)
        assert "during the set-up" in last and "rediss" not in last, last
    # Never reached in plain: a TLS port, perhaps (the hint stays).
    with FakeServer(lambda srv, conn, argv: CLOSE) as tlsish:
        lim = make_limiter(tlsish.url, timeout=0.3)
        await lim.hit("a", "5/second")
        assert "if this is a TLS port, use rediss://" in lim.stats()["last_error"]
