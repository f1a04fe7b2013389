"""Many checks at once, several loops, threads, shards, fork, exit, re-import."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from typing import Any

import pytest

import rategate
from redisserver import RedisServer

BOUND = 30.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def catch_loop_errors() -> list[dict]:
    seen: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: seen.append(ctx))
    return seen


# -- 10,000 at once from one loop ---------------------------------------------------------------
@pytest.mark.parametrize("deny_cache", [False, True])
@pytest.mark.parametrize("storage", ["memory", "redis", "rediss"])
async def test_ten_thousand_concurrent_checks(
    request: pytest.FixtureRequest, make_limiter: Any, deny_cache: bool, storage: str
) -> None:
    storage_url = {"memory": lambda: "memory://", "redis": lambda: request.getfixturevalue("redis_url"),
                   "rediss": lambda: request.getfixturevalue("redis_tls_url")}[storage]()
    # Generous deadline: this is about exactness, not speed.
    lim = make_limiter(storage_url, timeout=BOUND, deny_cache=deny_cache)
    seen = catch_loop_errors()
    n, burst = 10_000, 500
    ds = await asyncio.wait_for(asyncio.gather(*(lim.hit("hot", "500/day") for _ in range(n))), BOUND)
    assert len(ds) == n
    assert all(type(d) is rategate.Decision for d in ds)
    assert Counter(d.error for d in ds) == {None: n}
    allowed = [d for d in ds if d.allowed]
    assert len(allowed) == burst
    # Each token handed out exactly once: the allowed checks saw every
    # remaining value from 499 down to 0, once each.
    assert sorted(d.remaining for d in allowed) == list(range(burst))
    st = lim.stats()
    assert st["allowed"] == burst
    assert st["checks"] == n
    assert st["checks"] == st["allowed"] + st["denied"]
    assert sum(st["errors"].values()) == 0
    assert st["in_flight"] == 0
    assert seen == []


async def test_many_keys_interleaved(storage_url: str, make_limiter: Any) -> None:
    # 100 keys x 100 hits, interleaved: one script call carries many checks,
    # several on the same key; each key still gets exactly its burst.
    lim = make_limiter(storage_url, timeout=BOUND)
    keys = [f"user:{i}" for i in range(100)]
    order = [k for _ in range(100) for k in keys]
    ds = await asyncio.wait_for(asyncio.gather(*(lim.hit(k, "50/day; 70/day") for k in order)), BOUND)
    assert all(d.error is None for d in ds)
    per_key = Counter(k for k, d in zip(order, ds) if d.allowed)
    assert per_key == {k: 50 for k in keys}
    for k in keys[:5]:
        assert (await asyncio.wait_for(lim.hit(k, "70/day", cost=0), BOUND)).remaining == 20


async def test_submit_futures_each_resolved_once(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, timeout=BOUND)
    seen = catch_loop_errors()
    spec = lim.compile("100/day")
    rs = [lim.submit(f"k{i % 50}", spec, 1) for i in range(5000)]
    futs = [r for r in rs if type(r) is not rategate.Decision]
    callbacks: Counter[int] = Counter()
    for i, f in enumerate(futs):
        f.add_done_callback(lambda _f, i=i: callbacks.update([i]))
    await asyncio.wait_for(asyncio.gather(*futs), BOUND)
    await asyncio.sleep(0)  # let done-callbacks run
    assert callbacks == Counter(range(len(futs)))
    ds = [r if type(r) is rategate.Decision else r.result() for r in rs]
    assert sum(d.allowed for d in ds) == 5000
    assert seen == []


# -- shards --------------------------------------------------------------------------------------
def _limiter_connections(server: RedisServer) -> int:
    c = server.client()
    me = c.client_id()
    return sum(1 for cl in c.client_list() if int(cl["id"]) != me)


@pytest.mark.parametrize("threads", [1, 2, 3])
async def test_threads_shard_keys(own_redis: RedisServer, make_limiter: Any, threads: int) -> None:
    lim = make_limiter(own_redis.url, timeout=BOUND, threads=threads)
    keys = [f"s{i}" for i in range(200)]
    order = [k for _ in range(3) for k in keys]
    ds = await asyncio.wait_for(asyncio.gather(*(lim.hit(k, "2/hour") for k in order)), BOUND)
    assert all(d.error is None for d in ds)
    assert Counter(k for k, d in zip(order, ds) if d.allowed) == {k: 2 for k in keys}
    # One connection per loop thread (200 keys reach every shard).
    assert _limiter_connections(own_redis) == threads
    st = lim.stats()
    assert (st["checks"], st["allowed"]) == (600, 400)


async def test_threads_same_key_is_exact(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, timeout=BOUND, threads=2)
    ds = await asyncio.wait_for(asyncio.gather(*(lim.hit("one", "100/day") for _ in range(2000))), BOUND)
    assert sum(d.allowed for d in ds) == 100


# -- the event loop replaced ------------------------------------------------------------------
_loops: list[Any] = []


@pytest.fixture(scope="module")
def module_limiter(redis_server: RedisServer) -> Any:
    # One Limiter for several tests, each with its own event loop.
    lim = rategate.Limiter(redis_server.url_for(5), timeout=5.0)
    yield lim
    asyncio.run(asyncio.wait_for(lim.aclose(), BOUND))


@pytest.mark.parametrize("round_", range(3))
async def test_loop_replaced_between_tests(module_limiter: Any, round_: int) -> None:
    loop = asyncio.get_running_loop()
    assert all(loop is not old for old in _loops)
    _loops.append(loop)
    key = f"loop-{os.getpid()}-{time.monotonic_ns()}"
    for i in range(3):
        d = await asyncio.wait_for(module_limiter.hit(key, "10/hour"), 10)
        assert (d.error, d.remaining) == (None, 9 - i)


def test_asyncio_run_twice_same_limiter(redis_url: str) -> None:
    lim = rategate.Limiter(redis_url, timeout=5.0)

    async def three(key: str) -> list[Any]:
        return [await asyncio.wait_for(lim.hit(key, "10/hour"), 10) for _ in range(3)]

    try:
        first = asyncio.run(three("a"))
        second = asyncio.run(three("a"))
        assert [d.remaining for d in first + second] == [9, 8, 7, 6, 5, 4]
        assert all(d.error is None for d in first + second)
    finally:
        asyncio.run(asyncio.wait_for(lim.aclose(), BOUND))


def test_loop_closed_with_checks_in_flight(own_redis: RedisServer) -> None:
    lim = rategate.Limiter(own_redis.url, timeout=0.5)

    async def abandon() -> None:
        d = await asyncio.wait_for(lim.hit("warm", "10/hour"), 10)
        assert d.error is None
        own_redis.pause(0.3)
        spec = lim.compile("10/hour")
        for i in range(10):
            lim.submit(f"k{i}", spec, 1)  # never awaited; the loop goes away

    async def later() -> list[Any]:
        await asyncio.sleep(0.6)  # the abandoned checks finish meanwhile
        return [await asyncio.wait_for(lim.hit("after", "10/hour"), 10) for _ in range(3)]

    try:
        asyncio.run(abandon())
        ds = asyncio.run(later())
        assert [(d.error, d.remaining) for d in ds] == [(None, 9), (None, 8), (None, 7)]
        assert lim.stats()["in_flight"] == 0
    finally:
        asyncio.run(asyncio.wait_for(lim.aclose(), BOUND))


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_several_loops_in_threads(request: pytest.FixtureRequest, storage: str) -> None:
    url = "memory://" if storage == "memory" else request.getfixturevalue("redis_url")
    lim = rategate.Limiter(url, timeout=BOUND)
    nthreads, each = 4, 60
    results: dict[int, Any] = {}

    async def work(t: int) -> tuple[list[int], int]:
        own = [(await asyncio.wait_for(lim.hit(f"own{t}", "1000/day"), BOUND)).remaining for _ in range(each)]
        shared = await asyncio.wait_for(
            asyncio.gather(*(lim.hit("shared", "100/day") for _ in range(each))), BOUND
        )
        assert all(d.error is None for d in shared)
        return own, sum(d.allowed for d in shared)

    def run(t: int) -> None:
        try:
            results[t] = asyncio.run(work(t))
        except BaseException as e:  # reported below
            results[t] = e

    threads = [threading.Thread(target=run, args=(t,)) for t in range(nthreads)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(BOUND)
        assert not any(th.is_alive() for th in threads), "a loop thread hung"
        for t in range(nthreads):
            r = results[t]
            assert not isinstance(r, BaseException), repr(r)
            own, _ = r
            assert own == list(range(999, 999 - each, -1))
        assert sum(results[t][1] for t in range(nthreads)) == 100
    finally:
        asyncio.run(asyncio.wait_for(lim.aclose(), BOUND))


# -- fork --------------------------------------------------------------------------------------
def _run_in_child(fn: Any) -> dict:
    """Fork; the child runs fn() and reports its JSON result through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            out = json.dumps({"ok": fn()})
            code = 0
        except BaseException as e:
            out = json.dumps({"error": repr(e)})
        finally:
            try:
                os.write(w, out.encode())
            finally:
                os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], BOUND)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the forked child hung")
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        deadline = time.monotonic() + BOUND
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the forked child did not exit")
            time.sleep(0.01)
    result = json.loads(data)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result["ok"]


def _decide(d: Any) -> list:
    return [d.allowed, d.remaining, d.error]


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@pytest.mark.parametrize("used_before_fork", [True, False])
def test_forked_child_uses_the_parents_limiter(redis_url: str, used_before_fork: bool) -> None:
    lim = rategate.Limiter(redis_url, timeout=5.0)
    try:
        if used_before_fork:  # the parent's engine thread is running
            d = asyncio.run(asyncio.wait_for(lim.hit("f", "10/hour"), 10))
            assert _decide(d) == [True, 9, None]

        def child() -> list:
            async def go() -> list:
                return [_decide(await asyncio.wait_for(lim.hit("f", "10/hour"), 10)) for _ in range(2)]
            return asyncio.run(go())

        done = 1 if used_before_fork else 0
        got = _run_in_child(child)
        assert got == [[True, 9 - done, None], [True, 8 - done, None]]
        # The parent carries on with its own engine, sharing Redis.
        d = asyncio.run(asyncio.wait_for(lim.hit("f", "10/hour"), 10))
        assert _decide(d) == [True, 7 - done, None]
    finally:
        asyncio.run(asyncio.wait_for(lim.aclose(), BOUND))


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_memory() -> None:
    lim = rategate.Limiter("memory://")
    try:
        d = asyncio.run(lim.hit("m", "10/hour"))
        assert d.remaining == 9

        def child() -> list:
            return _decide(asyncio.run(asyncio.wait_for(lim.hit("m", "10/hour"), 10)))

        allowed, remaining, error = _run_in_child(child)
        assert (allowed, error) == (True, None)
        assert remaining in (8, 9)  # a copy of the parent's buckets, or fresh ones
        assert asyncio.run(lim.hit("m", "10/hour")).remaining == 8  # the child consumed nothing here
    finally:
        asyncio.run(asyncio.wait_for(lim.aclose(), BOUND))


# -- process exit, re-import, leaks --------------------------------------------------------------
def _python(code: str, timeout: float = BOUND) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize("how", ["loop_ends", "limiter_dropped", "sys_exit_in_loop"])
def test_interpreter_exits_with_checks_in_flight(own_redis: RedisServer, how: str) -> None:
    own_redis.pause(20.0)  # nothing is ever answered
    p = _python(f"""
        import asyncio, gc, sys, rategate
        lim = rategate.Limiter({own_redis.url!r}, timeout=60.0, threads=2)
        async def main():
            spec = lim.compile("10/hour")
            futs = [lim.submit(f"k{{i}}", spec, 1) for i in range(100)]
            await asyncio.sleep(0.2)
            if {how!r} == "sys_exit_in_loop":
                print("bye", flush=True)
                sys.exit(0)
        asyncio.run(main())
        if {how!r} == "limiter_dropped":
            del lim
            gc.collect()
        print("bye", flush=True)
    """, timeout=15.0)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "bye"
    assert "Fatal" not in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_reimport_module() -> None:
    p = _python("""
        import asyncio, sys
        import rategate, rategate._core
        first = rategate._core
        for name in [n for n in sys.modules if n == "rategate" or n.startswith("rategate.")]:
            del sys.modules[name]
        import rategate, rategate._core
        assert rategate._core is not first
        async def main():
            lim = rategate.Limiter("memory://")
            d = await lim.hit("k", "10/hour")
            await lim.aclose()
            return d.remaining
        print(asyncio.run(main()))
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "9"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


async def test_aclose_releases_threads_and_fds(redis_url: str) -> None:
    from rategate import _core

    gc.collect()
    fds, tasks = _fds(), _tasks()
    for threads in (1, 2):
        for _ in range(5):
            lim = rategate.Limiter(redis_url, timeout=5.0, threads=threads)
            ds = await asyncio.wait_for(asyncio.gather(*(lim.hit(f"k{i}", "10/hour") for i in range(20))), BOUND)
            assert all(d.error is None for d in ds)
            await asyncio.wait_for(lim.aclose(), BOUND)
            del lim, ds
    gc.collect()
    assert _tasks() == tasks, "loop threads left running after aclose()"
    assert _fds() == fds, "file descriptors left open after aclose()"
    assert _core._live()["checks"] == 0


async def test_dropped_limiter_releases_threads_and_fds(redis_url: str) -> None:
    gc.collect()
    fds, tasks = _fds(), _tasks()
    for _ in range(5):
        lim = rategate.Limiter(redis_url, timeout=5.0)
        d = await asyncio.wait_for(lim.hit("k", "100/hour"), BOUND)
        assert d.error is None
        del lim, d
    gc.collect()
    deadline = time.monotonic() + 5.0
    while (_tasks(), _fds()) != (tasks, fds) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        gc.collect()
    assert (_tasks(), _fds()) == (tasks, fds), "a dropped Limiter leaked its threads or fds"


@pytest.mark.parametrize("spin", [0, 0.0002, 0.01])
async def test_spin_modes_answer_every_check_exactly_once(redis_url: str, make_limiter: Any, spin: float) -> None:
    # Whether the loop thread sleeps (spin=0) or polls while replies are owed,
    # the hand-over strands nothing: every check is answered, the burst exact.
    lim = make_limiter(redis_url, spin=spin, timeout=5.0)
    for wave in range(3):  # waves: the thread goes back to sleep between them
        ds = await asyncio.wait_for(
            asyncio.gather(*(lim.hit(f"spin{wave}", "300/hour") for _ in range(2000))), 30)
        assert sum(d.allowed for d in ds) == 300
        assert all(d.error is None for d in ds)
        await asyncio.sleep(0.01)
    assert lim.stats()["in_flight"] == 0


@pytest.mark.parametrize("spin", [-0.001, 0.5, True, "1"])
def test_bad_spin_is_named(spin: Any) -> None:
    import rategate

    with pytest.raises(ValueError, match="spin"):
        rategate.Limiter("redis://127.0.0.1:6379/0", spin=spin)


def _fd_kinds() -> dict[int, str]:
    """This process's fds and what they point at (socket:[ino], anon_inode:[eventpoll], ...)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def _redis_socket_inodes(port: int) -> set[str]:
    """Inodes of TCP sockets connected to 127.0.0.1:port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[2].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    return inodes


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_closes_the_parents_loop_fds(redis_server: RedisServer, redis_url: str) -> None:
    # The child must not keep the parent's Redis sockets, epoll fds and
    # eventfds (issue 8 #5): they are closed in the child at the fork.
    lim = rategate.Limiter(redis_url, timeout=5.0, threads=3)
    earlier = _fd_kinds()  # other tests' clients and limiters: not this one's
    try:
        assert asyncio.run(asyncio.wait_for(lim.hit("f", "10/hour"), 10)).error is None
        for _ in range(500):  # every shard connected
            if lim.stats()["connected"]:
                break
            time.sleep(0.01)
        before = {fd: k for fd, k in _fd_kinds().items() if earlier.get(fd) != k}
        redis_socks = {fd for fd, k in before.items() if k in _redis_socket_inodes(redis_server.port)}
        # Three shards: three connections to Redis (the test's own redis-py
        # clients are closed here).
        assert len(redis_socks) >= 3
        epolls = {fd for fd, k in before.items() if k == "anon_inode:[eventpoll]"}
        assert len(epolls) >= 3  # one per loop thread

        def child() -> list:
            now = _fd_kinds()
            kept_socks = [fd for fd in redis_socks if now.get(fd) == before[fd]]
            kept_epolls = [fd for fd in epolls if now.get(fd) == before[fd]]
            st = lim.stats()  # err_mu usable in the child
            return [kept_socks, kept_epolls, st["in_flight"]]

        got = _run_in_child(child)
        assert got == [[], [], 0]
    finally:
        asyncio.run(asyncio.wait_for(lim.aclose(), BOUND))


def _thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


async def test_loop_threads_are_named(redis_url: str, make_limiter: Any) -> None:
    # For ps, top, py-spy and the incident notes: which threads are ours.
    lim = make_limiter(redis_url, threads=2)
    assert (await lim.hit("n", "10/hour")).error is None
    names = _thread_names()
    assert "rategate-loop-0" in names and "rategate-loop-1" in names, names
