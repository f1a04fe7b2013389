"""Fake RESP servers for the tests: servers that misbehave on purpose.

Real redis-server processes cover what Redis does (tests/redisserver.py,
tests/topology.py).  What a production network adds, and no real server can
be made to do on demand, is played here: a server that accepts and then
never answers one command, a reply of the wrong shape, a node that moves to
a new address step by step, a handshake that takes its time.

A :class:`FakeServer` listens on 127.0.0.1:<free port>, runs an asyncio loop
in a daemon thread of its own, and answers each command (a list of bytes)
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
``close()`` stops the loop and closes every connection; the finalizer does
it too, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
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
    (EVALSHA/EVAL sha-or-body numkeys ...): six integers per check."""
    if xslot:  # no declared key: ARGV[1] is the number of keys (see csrc/script.c)
        nkeys = int(argv[3])
        n = int(argv[4 + nkeys])
    else:
        nkeys = int(argv[2])
        n = int(argv[3 + nkeys])
    return [1, 0, 0, 1000, 0, 0] * n


class FakeServer:
    """A RESP server on 127.0.0.1 that answers as its handler says.

    ``handler(server, conn, argv)``: ``conn`` numbers the connection (from
    1, in accept order); return the reply, or None for :meth:`default`.
    ``slots``: what CLUSTER SLOTS answers (a list, or a callable returning
    one).  ``port``: listen there (e.g. to come back on the same address).
    """

    def __init__(self, handler: Callable[["FakeServer", int, list[bytes]], Any] | None = None, *,
                 slots: Any = None, port: int = 0) -> None:
        self.handler = handler
        self.slots = slots
        self.commands: list[tuple[int, list[bytes]]] = []
        self.accepted = 0
        self.open_connections = 0
        self.scripts: dict[str, bool] = {}  # sha -> the cross-slot variant
        self._closing = False
        self._lock = threading.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._server = self._loop.run_until_complete(
                    asyncio.start_server(self._serve, "127.0.0.1", port))
            except BaseException as e:  # the port is taken: told to the caller
                errors.append(e)
                started.set()
                self._loop.close()
                return
            started.set()
            self._loop.run_forever()
            # Stopped (close()): every connection's task ends, then the loop.
            # A connection accepted but whose task has not started yet sees
            # _closing when it does.
            self._closing = True
            self._server.close()
            for w in list(self._writers):
                w.close()
            self._loop.run_until_complete(asyncio.sleep(0.02))
            tasks = asyncio.all_tasks(self._loop)
            for t in tasks:
                t.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-resp", daemon=True)
        self._thread.start()
        started.wait(10)
        if errors:
            raise errors[0]
        assert self._server is not None
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._finalizer = weakref.finalize(self, FakeServer._stop, self._loop, self._thread)

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
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        with self._lock:
            self.accepted += 1
            conn = self.accepted
            self.open_connections += 1
        self._writers.add(writer)
        try:
            while True:
                argv = await self._read_command(reader)
                if argv is None:
                    break
                with self._lock:
                    self.commands.append((conn, argv))
                reply = self.handler(self, conn, argv) if self.handler else None
                if reply is None:
                    reply = self.default(argv)
                if isinstance(reply, Delay):
                    await asyncio.sleep(reply.seconds)
                    reply = self.default(argv) if reply.reply is None else reply.reply
                if reply is SILENT:
                    continue
                if reply is CLOSE:
                    break
                writer.write(encode(reply))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # close(): end quietly (streams' callback reads the task's exception)
        finally:
            self._writers.discard(writer)
            with self._lock:
                self.open_connections -= 1
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    @staticmethod
    async def _read_command(reader: asyncio.StreamReader) -> list[bytes] | None:
        line = await reader.readline()
        if not line:
            return None
        if not line.startswith(b"*"):
            raise ValueError("not a RESP array")
        argv = []
        for _ in range(int(line[1:])):
            head = await reader.readline()
            n = int(head[1:])
            argv.append((await reader.readexactly(n + 2))[:-2])
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
        def go() -> None:
            for w in list(self._writers):
                w.close()
        self._loop.call_soon_threadsafe(go)

    @staticmethod
    def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # closed already
            return
        thread.join(10)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
