"""Fake RESP servers for the tests: servers that misbehave on purpose.

Real redis-server processes cover what Redis does (tests/redisserver.py,
tests/topology.py).  What a production network adds, and no real server can
be made to do on demand, is played here: a server that accepts and then
never answers one command, a reply of the wrong shape, a node that moves to
a new address step by step, a handshake that takes its time.

A :class:`FakeServer` listens on 127.0.0.1:<free port>, serves each
connection in a thread of its own, and answers each command (a list of bytes)
with what its ``handler`` returns: a Python value encoded as RESP (int, bytes
or str as a bulk string, None as nil, list as an array, :class:`Error`,
:class:`Status`, :class:`Raw` bytes as they are), or :data:`SILENT` (never
answer: the connection stays open), :data:`CLOSE` (close the connection),
:class:`Delay` (answer later).  A handler that returns ``None`` leaves the
command to :meth:`FakeServer.default`, which plays enough of Redis for
rategate: PING, AUTH, SELECT, SCRIPT LOAD, EVALSHA / EVAL (every check
allowed), ROLE (master), CLUSTER SLOTS (``slots``), ASKING.

Every command received is logged in ``commands`` (with the connection's
number), and ``open_connections`` counts the connections open now.
``close()`` closes the listening socket and every connection and joins
their threads; the finalizer does it too, so nothing is left behind.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["FakeServer", "Error", "Status", "Raw", "Delay", "SILENT", "CLOSE", "grant"]


class Error(str):
    """An error reply: ``-<text>``."""


class Status(str):
    """A status reply: ``+<text>``."""


class Raw(bytes):
    """Bytes sent as they are (a malformed reply, half a reply...)."""


class Delay:
    """Answer ``reply`` (None: what :meth:`FakeServer.default` answers) after
    ``seconds``; later commands on the connection wait."""

    def __init__(self, seconds: float, reply: Any) -> None:
        self.seconds = seconds
        self.reply = reply


SILENT = object()
CLOSE = object()


def encode(v: Any) -> bytes:
    if isinstance(v, Raw):
        return bytes(v)
    if isinstance(v, Error):
        return b"-" + v.encode() + b"\r\n"
    if isinstance(v, Status):
        return b"+" + v.encode() + b"\r\n"
    if v is None:
        return b"$-1\r\n"
    if isinstance(v, bool):
        return b":%d\r\n" % int(v)
    if isinstance(v, int):
        return b":%d\r\n" % v
    if isinstance(v, str):
        v = v.encode()
    if isinstance(v, bytes):
        return b"$%d\r\n%s\r\n" % (len(v), v)
    if isinstance(v, (list, tuple)):
        return b"*%d\r\n" % len(v) + b"".join(encode(e) for e in v)
    raise TypeError(f"cannot encode {v!r}")


def grant(argv: list[bytes], xslot: bool) -> list[int]:
    """The script's answer allowing every check of the call ``argv``
    (EVALSHA/EVAL sha-or-body numkeys ...): per check H = (allowed + 2) * 32
    + rate, remaining and reset (csrc/script.c: three integers when allowed)."""
    if xslot:  # no declared key: ARGV[1] is the number of keys (see csrc/script.c)
        nkeys = int(argv[3])
        n = int(argv[4 + nkeys])
    else:
        nkeys = int(argv[2])
        n = int(argv[3 + nkeys])
    return [(1 + 2) * 32 + 0, 0, 1000] * n


class FakeServer:
    """A RESP server on 127.0.0.1 that answers as its handler says.

    ``handler(server, conn, argv)``: ``conn`` numbers the connection (from
    1, in accept order); return the reply, or None for :meth:`default`.
    ``slots``: what CLUSTER SLOTS answers (a list, or a callable returning
    one).  ``port``: listen there (e.g. to come back on the same address).

    Plain threads and blocking sockets (one thread per connection): what
    is open is exactly the sockets listed here, and close() closes them.
    """

    def __init__(self, handler: Callable[["FakeServer", int, list[bytes]], Any] | None = None, *,
                 slots: Any = None, port: int = 0) -> None:
        self.handler = handler
        self.slots = slots
        self.commands: list[tuple[int, list[bytes]]] = []
        self.accepted = 0
        self.open_connections = 0
        self.scripts: dict[str, bool] = {}  # sha -> the cross-slot variant
        self._lock = threading.Lock()
        self._conns: dict[int, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._state = {"closing": False}
        self._sock = socket.create_server(("127.0.0.1", port))
        self.port = int(self._sock.getsockname()[1])
        self._finalizer = weakref.finalize(self, FakeServer._stop, self._sock, self._conns,
                                           self._threads, self._lock, self._state)
        t = threading.Thread(target=self._accept_loop, name="fake-resp", daemon=True)
        self._threads.append(t)
        t.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def names(self) -> list[bytes]:
        """The command names received, upper case, in order."""
        with self._lock:
            return [argv[0].upper() for _, argv in self.commands]

    def count(self, name: bytes) -> int:
        return sum(1 for n in self.names() if n == name.upper())

    # -- the protocol ------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._state["closing"]:
                    sock.close()
                    return
                self.accepted += 1
                conn = self.accepted
                self.open_connections += 1
                self._conns[conn] = sock
                t = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
                self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, conn: int) -> None:
        f = sock.makefile("rb")
        try:
            while True:
                argv = self._read_command(f)
                if argv is None:
                    break
                with self._lock:
                    self.commands.append((conn, argv))
                reply = self.handler(self, conn, argv) if self.handler else None
                if reply is None:
                    reply = self.default(argv)
                if isinstance(reply, Delay):
                    time.sleep(reply.seconds)
                    reply = self.default(argv) if reply.reply is None else reply.reply
                if reply is SILENT:
                    continue
                if reply is CLOSE:
                    break
                sock.sendall(encode(reply))
        except (OSError, ValueError):
            pass
        finally:
            f.close()
            with self._lock:
                if self._conns.pop(conn, None) is not None:
                    self.open_connections -= 1
            sock.close()

    @staticmethod
    def _read_command(f: Any) -> list[bytes] | None:
        line = f.readline()
        if not line:
            return None
        if not line.startswith(b"*"):
            raise ValueError("not a RESP array")
        argv = []
        for _ in range(int(line[1:])):
            head = f.readline()
            n = int(head[1:])
            data = f.read(n + 2)
            if len(data) != n + 2:
                return None
            argv.append(data[:-2])
        return argv

    def default(self, argv: list[bytes]) -> Any:
        """What a healthy master answers (enough for rategate)."""
        name = argv[0].upper()
        if name == b"PING":
            return Status("PONG")
        if name in (b"AUTH", b"SELECT", b"ASKING", b"READONLY"):
            return Status("OK")
        if name == b"SCRIPT" and argv[1].upper() == b"LOAD":
            sha = hashlib.sha1(argv[2]).hexdigest()
            self.scripts[sha] = argv[2].startswith(b"#!lua")
            return sha
        if name == b"EVALSHA":
            xslot = self.scripts.get(argv[1].decode())
            if xslot is None:
                return Error("NOSCRIPT No matching script. Please use EVAL.")
            return grant(argv, xslot)
        if name == b"EVAL":
            self.scripts[hashlib.sha1(argv[1]).hexdigest()] = argv[1].startswith(b"#!lua")
            return grant(argv, argv[1].startswith(b"#!lua"))
        if name == b"ROLE":
            return [b"master", 0, []]
        if name == b"CLUSTER" and argv[1].upper() == b"SLOTS":
            return self.slots() if callable(self.slots) else self.slots
        return Error(f"ERR unknown command '{argv[0].decode(errors='replace')}'")

    # -- life --------------------------------------------------------------
    def drop_connections(self) -> None:
        """Close every open connection now (the server keeps listening)."""
        with self._lock:
            socks = list(self._conns.values())
        for sk in socks:
            try:
                sk.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _stop(sock: socket.socket, conns: dict[int, socket.socket], threads: list[threading.Thread],
              lock: threading.Lock, state: dict[str, bool]) -> None:
        with lock:
            state["closing"] = True  # a connection accepted from here is closed at once
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        sock.close()
        with lock:
            socks = list(conns.values())
        for sk in socks:
            try:
                sk.shutdown(socket.SHUT_RDWR)  # each thread's read ends; it closes its socket
            except OSError:
                pass
        for t in list(threads):
            if t is not threading.current_thread():
                t.join(10)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
