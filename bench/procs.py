"""Child processes of the benchmark: started in their own process group, always stopped.

Every process the benchmark starts (redis-server, uvicorn, wrk, redis-benchmark,
the micro-benchmark subprocesses) goes through :func:`spawn`, which

- puts it in a new session (its own process group), so a Ctrl-C in the terminal
  reaches only the benchmark, which then stops its children in order;
- asks the kernel to SIGKILL it if the benchmark itself dies, even by SIGKILL
  (``PR_SET_PDEATHSIG``), so nothing is left running in any case;
- records it, so :func:`stop_all` (run from ``finally`` blocks and ``atexit``)
  can stop whatever is still alive: SIGTERM to the group, then SIGKILL.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

_children: list[subprocess.Popen] = []
_PR_SET_PDEATHSIG = 1

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def _child_setup(parent_pid: int) -> None:
    # Runs in the child between fork and exec; the benchmark has no other
    # threads at that point, so this is safe.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def spawn(
    cmd: Sequence[str],
    *,
    log: Path | None = None,
    capture: bool = False,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in its own process group.

    stdout (unless ``capture``, then a pipe) and stderr are appended to ``log``,
    or discarded when there is no log.
    """
    parent = os.getpid()
    logf = open(log, "ab") if log is not None else None
    sink = logf if logf is not None else subprocess.DEVNULL
    try:
        p = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else sink,
            stderr=sink,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(parent),
        )
    finally:
        if logf is not None:
            logf.close()
    _children.append(p)
    return p


def stop(p: subprocess.Popen | None, timeout: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
    """Stop ``p`` and its whole process group; returns its exit code."""
    if p is None:
        return None
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while others of its group are not: make sure.
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
        pass
    if p in _children:
        _children.remove(p)
    return p.returncode


def stop_all() -> None:
    for p in reversed(list(_children)):
        stop(p, timeout=3.0)


atexit.register(stop_all)


def _on_signal(signum, frame):  # pragma: no cover - exercised by hand
    # SIGTERM/SIGHUP: unwind through the finally blocks like Ctrl-C does.
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------
# redis-server


class RedisServer:
    """A throwaway redis-server on a private loopback port (no persistence)."""

    def __init__(self, binary: str, workdir: Path, name: str = "redis", certs: Any = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.name = name
        self.port = 0
        self.tls_port = 0
        # tests/tlscerts.py's Certs: serve TLS on tls_port with its server
        # certificate too (the plain port stays, for INFO from the runner).
        self.certs = certs
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def tls_url(self) -> str:
        """rediss:// on the TLS port, verified against the throwaway CA."""
        return f"rediss://127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.certs.ca}"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            tls: list[str] = []
            if self.certs is not None:
                self.tls_port = free_port()
                tls = ["--tls-port", str(self.tls_port), "--tls-cert-file", self.certs.server_cert,
                       "--tls-key-file", self.certs.server_key, "--tls-ca-cert-file", self.certs.ca,
                       "--tls-auth-clients", "no"]
            self.proc = spawn(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "no",
                    "--dir", str(self.workdir),
                    "--logfile", "",
                    "--maxclients", "10000",
                    *tls,
                ],
                log=self.log,
            )
            if wait_tcp(self.port, timeout, self.proc) and (
                    not tls or wait_tcp(self.tls_port, timeout, self.proc)):
                return self
            stop(self.proc)
        raise RuntimeError(f"redis-server did not start; log:\n{tail(self.log)}")

    def kill(self) -> None:
        """Stop it hard, like a crash: SIGKILL."""
        stop(self.proc, timeout=2.0, sig=signal.SIGKILL)
        self.proc = None

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


def redis_command(host: str, port: int, *args: str | bytes, password: str | None = None, db: int = 0,
                  timeout: float = 5.0):
    """Send one command with a raw RESP socket (no client library needed); returns the decoded reply."""
    def enc(*parts) -> bytes:
        out = [b"*%d\r\n" % len(parts)]
        for a in parts:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        pre = []
        if password:
            pre.append(enc("AUTH", password))
        if db:
            pre.append(enc("SELECT", db))
        s.sendall(b"".join(pre) + enc(*args))
        replies = [_read_resp(f) for _ in range(len(pre) + 1)]
        for r in replies[:-1]:
            if isinstance(r, Exception):
                raise r
        r = replies[-1]
        if isinstance(r, Exception):
            raise r
        return r


def _read_resp(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    t, rest = line[:1], line[1:-2]
    if t == b"+":
        return rest.decode()
    if t == b"-":
        return RuntimeError(rest.decode())
    if t == b":":
        return int(rest)
    if t == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    if t == b"*":
        n = int(rest)
        return None if n < 0 else [_read_resp(f) for _ in range(n)]
    raise ValueError(f"bad RESP line {line!r}")


def python() -> str:
    return sys.executable
