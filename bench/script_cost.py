"""Redis CPU per check of the batched script, from INFO commandstats.

    python bench/script_cost.py redis://127.0.0.1:PORT/0 [checks] [batch sizes...]

Runs ``checks`` allowed single-rate checks through a Limiter (the common
check: one rate, cost 1, distinct keys), submitted ``batch`` at a time
without awaiting (so the loop thread can group them), for each batch size;
resets Redis's command stats before each and prints, per batch size: the
script calls, checks per call, usec per call (Redis's own figure) and usec
per check (usec per call / checks per call).  Run it against a Redis that
nothing else uses, on a quiet machine; compare two builds by running it
with each on PYTHONPATH, interleaved.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from urllib.parse import urlsplit

import rategate


def redis_cmd(url: str, *args: str) -> bytes:
    u = urlsplit(url)
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379)) as s:
        s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args))
        out = b""
        while not out.endswith(b"\r\n") or out.startswith(b"$") and out.count(b"\r\n") < 2:
            out += s.recv(65536)
        return out


def evalsha_stats(url: str) -> tuple[int, float]:
    text = redis_cmd(url, "INFO", "commandstats").decode()
    calls, usec = 0, 0.0
    for line in text.splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            f = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            calls += int(f["calls"])
            usec += float(f["usec"])
    return calls, usec


async def run(url: str, checks: int, batch: int) -> tuple[int, float, float]:
    lim = rategate.Limiter(url, timeout=5.0)
    spec = lim.compile("1000000/hour")
    await lim.hit("warm", spec)
    redis_cmd(url, "CONFIG", "RESETSTAT")
    t0 = time.perf_counter()
    done = 0
    while done < checks:
        futs = [lim.submit(f"k{(done + i) % 10000}", spec, 1) for i in range(batch)]
        for d in await asyncio.gather(*(f for f in futs if not isinstance(f, rategate.Decision))):
            assert d.allowed and d.error is None, d
        done += batch
    wall = time.perf_counter() - t0
    calls, usec = evalsha_stats(url)
    await lim.aclose()
    return calls, usec, wall


def main() -> None:
    url = sys.argv[1]
    checks = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    sizes = [int(a) for a in sys.argv[3:]] or [1, 10, 50, 100]
    for b in sizes:
        n = checks if b > 1 else checks // 4
        calls, usec, wall = asyncio.run(run(url, n, b))
        per_call = n / calls
        print(f"batch {b:4d}: {n} checks, {calls} calls, {per_call:6.1f} checks/call, "
              f"{usec / calls:8.1f} usec/call, {usec / n:6.2f} usec/check, wall {wall:5.2f} s", flush=True)


if __name__ == "__main__":
    main()
