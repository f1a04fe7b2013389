"""What every benchmark app shares: settings from the environment, the event-loop
lag monitor, and a private control port through which the runner reads them.

The control port is a separate asyncio server on the app's own event loop, not
an HTTP route: nothing is added to the measured request path (a `/stats` route
would sit behind the rate limiter, and an outer ASGI wrapper would cost every
request something).  It speaks one line per command:

    reset\n  -> {"ok": true}       start a new measurement window
    stats\n  -> {...}              lag percentiles and samples, pid, RSS, the limiter's
                                   counters since reset (gauges as they are)

CPU by thread is read by the runner from /proc (bench/measure.py), not here.
Under `uvicorn --workers N` every worker is its own process with its own
control server: each listens on a free port and writes it to
``$BENCH_CONTROL_DIR/<pid>.port``, where the runner finds them all.

Environment (set by bench/run.py):
    BENCH_REDIS_URL       Redis for the limiter
    BENCH_MODE            allowed | flood   (limit high enough for all / so low all but a few are denied)
    BENCH_CONTROL_DIR     where each worker writes its control port; unset = no monitor, no control server
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any, Awaitable, Callable

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MODE = os.environ.get("BENCH_MODE", "allowed")
CONTROL_DIR = os.environ.get("BENCH_CONTROL_DIR", "")

# The limits of the two modes, the same for every limiter.
ALLOWED_RATE = "1000000/second"  # never reached: every request is checked and allowed
FLOOD_RATE = "5/minute"          # one client (wrk, 127.0.0.1): all but the first 5 are denied
RATE = FLOOD_RATE if MODE == "flood" else ALLOWED_RATE
ALLOWED_LIMIT, ALLOWED_PERIOD = 1_000_000, 1.0
FLOOD_LIMIT, FLOOD_PERIOD = 5, 60.0
LIMIT, PERIOD = (FLOOD_LIMIT, FLOOD_PERIOD) if MODE == "flood" else (ALLOWED_LIMIT, ALLOWED_PERIOD)

SLEEP = 0.001  # the monitor's asyncio.sleep
GAUGES = ("in_flight", "connected", "threads", "last_error")  # limiter stats that are states, not counts


def counters_since(now: Any, base: Any) -> Any:
    """``now`` minus ``base`` for every count (nested dicts too); gauges and
    anything not a number as they are now."""
    if isinstance(now, dict):
        b = base if isinstance(base, dict) else {}
        return {k: v if k in GAUGES else counters_since(v, b.get(k)) for k, v in now.items()}
    if isinstance(now, int) and not isinstance(now, bool) and isinstance(base, int):
        return now - base
    return now


class LagMonitor:
    """A background task measuring how late ``asyncio.sleep(0.001)`` wakes up."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        perf = time.perf_counter
        sleep = asyncio.sleep
        append = self.samples.append
        while True:
            t0 = perf()
            await sleep(SLEEP)
            append(perf() - t0 - SLEEP)

    def reset(self) -> None:
        self.samples.clear()

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)
        n = len(s)
        if not n:
            return {"count": 0}

        def q(p: float) -> float:
            return round(s[min(n - 1, int(p * n))] * 1e3, 4)

        return {"count": n, "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99),
                "max_ms": round(s[-1] * 1e3, 4), "mean_ms": round(sum(s) / n * 1e3, 4),
                # the samples themselves, so the runner can merge the workers'
                "samples_us": [round(x * 1e6) for x in self.samples]}


class Control:
    def __init__(self, stats_hook: Callable[[], Any] | None) -> None:
        self.monitor = LagMonitor()
        self.stats_hook = stats_hook
        self.server: asyncio.AbstractServer | None = None
        self.port_file = ""
        self.limiter_base: Any = None
        self._mark()

    def _mark(self) -> None:
        self.t_wall = time.perf_counter()
        self.limiter_base = self._limiter_stats()

    def _limiter_stats(self) -> Any:
        if self.stats_hook is None:
            return None
        try:
            return self.stats_hook()
        except Exception as e:  # a stats hook must never break the run
            return {"error": repr(e)}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lag": self.monitor.summary(),
            "wall_s": time.perf_counter() - self.t_wall,
            "pid": os.getpid(),
        }
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out["rss_kb"] = int(line.split()[1])
        except OSError:
            pass
        if self.stats_hook is not None:
            out["limiter"] = counters_since(self._limiter_stats(), self.limiter_base)
        return out

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                cmd = line.strip().decode()
                if cmd == "reset":
                    self.monitor.reset()
                    self._mark()
                    reply: Any = {"ok": True}
                elif cmd == "stats":
                    reply = self.stats()
                else:
                    reply = {"error": f"unknown command {cmd!r}"}
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    async def start(self) -> None:
        self.monitor.task = asyncio.create_task(self.monitor.run())
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.port_file = os.path.join(CONTROL_DIR, f"{os.getpid()}.port")
        tmp = self.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, self.port_file)  # the runner never reads half a file

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.port_file:
            with contextlib.suppress(OSError):
                os.unlink(self.port_file)
        if self.monitor.task is not None:
            self.monitor.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.monitor.task


def bench_lifespan(
    startup: Callable[[], Awaitable[None]] | None = None,
    shutdown: Callable[[], Awaitable[None]] | None = None,
    stats_hook: Callable[[], Any] | None = None,
):
    """A FastAPI lifespan running the app's own startup/shutdown and, under the
    runner, the lag monitor and control server."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if startup is not None:
            await startup()
        control = Control(stats_hook) if CONTROL_DIR else None
        if control is not None:
            await control.start()
        try:
            yield
        finally:
            if control is not None:
                await control.stop()
            if shutdown is not None:
                await shutdown()

    return lifespan
