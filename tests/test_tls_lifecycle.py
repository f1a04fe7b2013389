"""What a TLS connection costs over a long life (issue 17 #8): sessions
resumed on reconnects, close_notify when rategate closes, bounded buffers.

A small TLS server written here (Python's ssl, blocking, a thread per
connection) plays Redis: it sees what no real server reports, whether a
session was resumed and whether the client said goodbye (close_notify) or
just dropped the socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import threading
from typing import Any

import rategate
from fakeresp import Error, Status, encode, grant
from tlscerts import Certs


class TLSFake:
    """A TLS RESP server on 127.0.0.1: per connection, whether its session
    was resumed and how it ended ("close_notify", "ragged", "server")."""

    def __init__(self, certs: Certs) -> None:
        cert, key, _ = certs.server_tls
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.resumed: list[bool] = []
        self.ended: list[str] = []
        self.scripts: dict[str, bool] = {}
        self.conns: list[ssl.SSLSocket] = []
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        with self.lock:
            self.resumed.append(conn.session_reused)
            self.conns.append(conn)
        how = "server"
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    how = "close_notify"  # a clean TLS end of stream
                    break
                argv = []
                for _ in range(int(line[1:])):
                    n = int(f.readline()[1:])
                    argv.append(f.read(n + 2)[:-2])
                conn.sendall(encode(self._answer(argv)))
        except ssl.SSLEOFError:
            how = "ragged"  # the TCP stream ended without close_notify
        except (OSError, ValueError):
            how = "server"
        finally:
            with self.lock:
                self.ended.append(how)
            f.close()
            conn.close()

    def _answer(self, argv: list[bytes]) -> Any:
        name = argv[0].upper()
        if name == b"SCRIPT":
            sha = hashlib.sha1(argv[2]).hexdigest()
            self.scripts[sha] = False
            return sha
        if name == b"EVALSHA":
            return grant(argv, False) if argv[1].decode() in self.scripts else Error("NOSCRIPT")
        return Status("PONG") if name == b"PING" else Error("ERR unknown")

    def drop(self) -> None:
        """The server ends every connection (as a restart would)."""
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        self.drop()
        for t in self.threads:
            t.join(5)


def test_sessions_are_resumed_and_closed_with_close_notify(tls_certs: Certs) -> None:
    fake = TLSFake(tls_certs)
    try:
        async def main() -> None:
            lim = rategate.Limiter(f"rediss://127.0.0.1:{fake.port}/0?ssl_ca_certs={tls_certs.ca}",
                                   timeout=2.0)
            try:
                assert (await lim.hit("a", "5/second")).error is None
                for i in range(2):  # the server goes away twice: each reconnect resumes
                    fake.drop()
                    for _ in range(200):
                        d = await lim.hit(f"k{i}", "5/second")
                        if d.error is None:
                            break
                        await asyncio.sleep(0.01)
                    assert d.error is None, lim.stats()["last_error"]
                # A burst far larger than a TLS record goes through (16 KiB
                # records moved out one at a time, see conn.c).
                ds = await asyncio.gather(*[lim.hit(f"burst-{i:05d}-{'x' * 200}", "5/second")
                                            for i in range(3000)])
                assert {d.error for d in ds} == {None}
            finally:
                await lim.aclose()

        asyncio.run(main())
    finally:
        fake.close()
    assert fake.resumed[0] is False and fake.resumed[1:] and all(fake.resumed[1:]), fake.resumed
    # The last connection was closed by rategate (aclose): with close_notify.
    assert fake.ended[-1] == "close_notify", fake.ended
