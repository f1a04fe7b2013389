"""Fixtures shared by the whole suite: real redis-server processes, limiters.

Stable names (the middleware tests use them too):

- ``redis_server``: session-scoped :class:`RedisServer` on a free loopback port.
- ``redis_url``: flushes that server and returns ``redis://127.0.0.1:PORT/0``.
- ``own_redis``: a private server for one test, free to kill, restart, pause.
- ``redis_unix_server`` / ``redis_unix_url``: the same over a unix socket.
- ``storage_url``: parametrized over ``"memory://"`` and ``redis_url``.
- ``tls_certs``: a throwaway CA and certificates (tests/tlscerts.py).
- ``redis_tls_server`` / ``redis_tls_url``: a TLS-only server (session),
  ``rediss://127.0.0.1:PORT/0?ssl_ca_certs=...``, emptied for the test.
- ``make_limiter``: builds Limiters and closes them after the test.

``RATEGATE_TEST_INSTALLED=<dir>`` (set by ``make test-wheel``): the run
stops at once unless ``import rategate`` finds the package under <dir> (the
wheel's venv), not a checkout that happens to be on ``sys.path``.

A hang must fail, not block CI: every test runs under a hard watchdog
(``RATEGATE_TEST_TIMEOUT`` seconds, default 60) that dumps every thread's
stack and exits the run.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # "from redisserver import ..."

from redisserver import RedisServer  # noqa: E402
from tlscerts import Certs, make_certs  # noqa: E402

TEST_TIMEOUT = float(os.environ.get("RATEGATE_TEST_TIMEOUT", "60"))


# -- which rategate ------------------------------------------------------------
def pytest_report_header(config: pytest.Config) -> str:
    import rategate

    return f"rategate {rategate.__version__} from {os.path.dirname(rategate.__file__)}"


def _check_installed() -> None:
    want = os.environ.get("RATEGATE_TEST_INSTALLED")
    if not want:
        return
    import rategate

    where = os.path.realpath(rategate.__file__)
    if os.path.commonpath([where, os.path.realpath(want)]) != os.path.realpath(want):
        raise pytest.UsageError(f"RATEGATE_TEST_INSTALLED={want}, but rategate was imported from {where}")


# -- the watchdog -------------------------------------------------------------
_watchdog_fd: list[int] = []


def pytest_configure(config: pytest.Config) -> None:
    _check_installed()
    # A private copy of the real stderr, taken while output capture is
    # suspended: the dump must reach the terminal / CI log, not a capture file.
    if not _watchdog_fd:
        _watchdog_fd.append(os.dup(2))


def pytest_unconfigure(config: pytest.Config) -> None:
    while _watchdog_fd:
        os.close(_watchdog_fd.pop())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # pytest's own faulthandler_timeout uses the same (single) faulthandler
    # timer; leave it alone when someone configured that instead.
    ours = (TEST_TIMEOUT > 0 and bool(_watchdog_fd)
            and not float(item.config.getini("faulthandler_timeout") or 0))
    if ours:
        # exit=True: a deadlocked C thread cannot be interrupted any other
        # way; the run fails (exit status 1) with every thread's stack.
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True, file=_watchdog_fd[0])
    try:
        return (yield)
    finally:
        if ours:
            faulthandler.cancel_dump_traceback_later()


# -- redis servers ------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server, emptied (FLUSHALL) for this test."""
    return fresh_url(redis_server)


def fresh_url(server: RedisServer) -> str:
    """A session server's URL, emptied for this test (healed first if a test killed it)."""
    if not server.running:
        server.start()
    server.flushall()
    return server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server for this test alone: kill it, restart it, pause it."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_unix_server() -> Iterator[RedisServer]:
    server = RedisServer(unix=True)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_unix_url(redis_unix_server: RedisServer) -> str:
    """``unix:///tmp/.../redis.sock`` of the session unix server, emptied."""
    return fresh_url(redis_unix_server)


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def redis_tls_server(tls_certs: Certs) -> Iterator[RedisServer]:
    with RedisServer(tls=tls_certs.server_tls) as server:
        yield server


@pytest.fixture
def redis_tls_url(redis_tls_server: RedisServer) -> str:
    """``rediss://127.0.0.1:PORT/0?ssl_ca_certs=...`` of the session TLS server, emptied."""
    return fresh_url(redis_tls_server)


@pytest.fixture(params=["memory", "redis"])
def storage_url(request: pytest.FixtureRequest) -> str:
    """Each storage with the same GCRA semantics: "memory://" and a real Redis."""
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


# -- an event loop for a module's synchronous tests ------------------------------
@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One asyncio loop per test module, for tests that drive coroutines with
    ``loop.run_until_complete`` (hypothesis-driven ones among them)."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


# -- limiters -----------------------------------------------------------------
@pytest.fixture
async def make_limiter() -> AsyncIterator[Callable[..., Any]]:
    """``make_limiter(url, **kw)`` -> Limiter, closed (bounded) after the test."""
    import rategate

    made: list[Any] = []

    def make(url: str, **kw: Any) -> Any:
        lim = rategate.Limiter(url, **kw)
        made.append(lim)
        return lim

    yield make
    for lim in made:
        try:
            await asyncio.wait_for(lim.aclose(), 10)
        except RuntimeError as e:  # closed by the test already
            if "closed" not in str(e):
                raise
