"""An open-loop HTTP/1.1 load at a fixed rate: the latency a user feels at normal load.

    python -m bench.pace --port 8000 --path /ping --rate 4000 --seconds 5

Request ``i`` is due at ``t0 + i / rate`` whether or not earlier ones were
answered (open loop: a slow response does not slow the offered load down, as
it would in wrk or in a closed loop).  Each due request goes out on an idle
keep-alive connection, or on a new one when none is idle (up to
``--max-connections``; past that it waits for one, and the wait is counted in
its latency and in ``late``).  The latency of a request is from the moment it
was due to its last response byte, so a client that falls behind does not
hide the server's queueing (coordinated omission).

Why not ``hey -q``: hey paces each of its workers with its own ticker, and the
tickers start together, so the requests leave in bursts of ``-c`` at once (on
this machine, at -c 50 and half of /health's capacity, 90% of requests went
out within 100 µs of the one before, and the p50 was 5 ms): that measures
bursts, not a steady load.  Here the due requests leave as the timer allows
(about 1 ms granularity, so a few at a time), one per connection.

Prints one line ``PACE_JSON {...}`` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque

REQUEST = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: rategate-bench-pace\r\n\r\n"


class Pacer:
    """The scheduler, the connection pool and the tallies of one run."""

    def __init__(self, port: int, path: str, rate: float, max_connections: int) -> None:
        self.port = port
        self.request = REQUEST % (path.encode(), port)
        self.rate = rate
        self.max_connections = max_connections
        self.idle: list[Conn] = []
        self.open: set[Conn] = set()
        self.waiting: deque[float] = deque()  # due times of requests with no connection yet
        self.connections = 0                  # open or opening
        self.peak_connections = 0
        self.latencies: list[float] = []
        self.t_measure = 0.0
        self.answered_total = 0  # the warm-up's too: the window's CPU is divided by it
        self.status: dict[int, int] = {}
        self.errors = 0
        self.late = 0
        self.outstanding = 0

    def due(self, t_due: float) -> None:
        """Request due at ``t_due`` (perf_counter seconds): send it now if a connection allows."""
        self.outstanding += 1
        if self.idle:
            self.idle.pop().send(t_due)
        elif self.connections < self.max_connections:
            self.connections += 1
            self.peak_connections = max(self.peak_connections, self.connections)
            asyncio.get_running_loop().create_task(self._open(t_due))
        else:
            self.late += 1
            self.waiting.append(t_due)

    async def _open(self, t_due: float | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: Conn(self), "127.0.0.1", self.port)
        except OSError:
            self.connections -= 1
            if t_due is not None:
                self.errors += 1
                self.outstanding -= 1
            return
        self.open.add(conn)
        if t_due is not None:
            conn.send(t_due)
        else:
            self.release(conn)

    def release(self, conn: "Conn") -> None:
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)

    def finished(self, conn: "Conn", t_due: float, status: int) -> None:
        self.answered_total += 1
        if t_due >= self.t_measure:  # requests of the pacer's own warm-up are not counted
            self.latencies.append(time.perf_counter() - t_due)
            self.status[status] = self.status.get(status, 0) + 1
        self.outstanding -= 1
        self.release(conn)

    def lost(self, conn: "Conn", busy: bool) -> None:
        self.connections -= 1
        self.open.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if busy:
            self.errors += 1
            self.outstanding -= 1

    async def run(self, seconds: float, warmup: float, prewarm: int, drain: float) -> dict:
        for _ in range(min(prewarm, self.max_connections)):
            self.connections += 1
            await self._open(None)
        self.peak_connections = self.connections
        total = int((warmup + seconds) * self.rate)
        t0 = time.perf_counter() + 0.01
        self.t_measure = t0 + warmup
        sent = 0
        while sent < total:
            now = time.perf_counter()
            upto = min(total, int((now - t0) * self.rate) + 1)
            while sent < upto:
                self.due(t0 + sent / self.rate)
                sent += 1
            # at least 1 ms: the loop's timers have 1 ms granularity, and a shorter
            # sleep spins (the client's CPU is taken from the server under test)
            await asyncio.sleep(max(0.001, t0 + sent / self.rate - time.perf_counter()))
        wall = time.perf_counter() - self.t_measure
        deadline = time.perf_counter() + drain
        while self.outstanding > 0 and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)  # let the transports finish closing
        lat = sorted(self.latencies)
        n = len(lat)

        def q(p: float) -> float | None:
            return round(lat[min(n - 1, int(p * n))] * 1e3, 3) if n else None

        return {
            "rate": self.rate, "seconds": round(wall, 3), "sent": sent - int(warmup * self.rate), "completed": n, "answered_total": self.answered_total,
            "achieved_rps": round(n / wall, 1) if wall > 0 else 0.0,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "errors": self.errors, "unanswered": self.outstanding, "late": self.late,
            "connections": self.peak_connections,
            "latency_ms": {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p99_9": q(0.999),
                           "max": round(lat[-1] * 1e3, 3) if n else None},
        }


class Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.t_due: float | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def send(self, t_due: float) -> None:
        self.t_due = t_due
        assert self.transport is not None
        self.transport.write(self.pacer.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.t_due is None:
            return
        head = self.buf[:end].lower() + b"\r\n"
        i = head.find(b"\r\ncontent-length:")
        length = int(head[i + 17:head.index(b"\r\n", i + 2)]) if i >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        status = int(self.buf[9:12])
        self.buf = self.buf[end + 4 + length:]
        t_due, self.t_due = self.t_due, None
        self.pacer.finished(self, t_due, status)

    def connection_lost(self, exc: Exception | None) -> None:
        busy = self.t_due is not None
        self.t_due = None
        self.pacer.lost(self, busy)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pace", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/ping")
    p.add_argument("--rate", type=float, required=True, help="requests per second offered")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--max-connections", type=int, default=1000)
    p.add_argument("--warmup", type=float, default=0.5,
                   help="seconds at the same rate before the measured ones (not counted)")
    p.add_argument("--drain", type=float, default=5.0,
                   help="seconds to wait for the last answers; later ones count as unanswered")
    p.add_argument("--prewarm", type=int, default=32, help="connections opened before the clock starts")
    a = p.parse_args(argv)
    if a.rate <= 0 or a.seconds <= 0 or a.warmup < 0 or a.max_connections < 1:
        p.error("--rate and --seconds must be > 0, --warmup >= 0, --max-connections >= 1")
    try:
        import uvloop  # the client's own CPU is load on the machine too: the cheaper loop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    out = runner(Pacer(a.port, a.path, a.rate, a.max_connections).run(a.seconds, a.warmup, a.prewarm, a.drain))
    sys.stdout.write("PACE_JSON " + json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
