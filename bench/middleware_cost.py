"""The middleware's own CPU per request on the event-loop thread, without HTTP.

    python bench/middleware_cost.py redis://127.0.0.1:PORT/0 [requests] [rounds]

Calls a trivial ASGI app directly with ASGI scopes, 50 requests at a time
with asyncio.gather, each with a client address no earlier request had:

- ``bare``: the app alone (the floor: the scope, the app's two sends and the
  Task per request that gather makes);
- ``allowed``: the app behind RateLimitMiddleware (``limits="1000000/hour"``,
  keyed by the client address, draft-6 headers): one Redis check per request,
  all allowed (issue 20's first target: the middleware's CPU over ``bare``);
- ``denied``: path "/flood", limited to 1/hour, each address first made to
  exceed it (two requests, not timed: the second is denied by Redis and so
  put in the deny cache), then the timed request, answered 429 from the
  cache (issue 20's second target).  The count answered from the cache is
  printed: a denial Redis answered instead would cost a future and a round
  trip, and is not what this figure measures.  The addresses are warmed in
  chunks of 2000 just before their timed pass, well inside the cache's
  deny_cache_ttl (1 s).

time.thread_time() per request in microseconds: the event-loop thread's CPU
only (rategate's loop threads run elsewhere).  The three cases are measured
in turn, ``rounds`` times (interleaved, so load from other processes spreads
over all three); each figure is the median over the rounds, with the range.
Compare two builds by running it with each on PYTHONPATH, interleaved; the
C request path against the Python one with RATEGATE_PYTHON_PATH=1 (read
once, at import: docs/how-it-works.md).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/middleware_cost.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rategate

BATCH = 50
CHUNK = 2000  # addresses warmed, then timed, at a time (flood)


def _scope(path: str, i: int) -> dict[str, Any]:
    # address i: 10.a.b.c, distinct for i < 2**24
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"t"), (b"user-agent", b"bench")],
            "client": (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000 + i % 20000),
            "server": ("t", 80)}


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _send(message: Any) -> None:
    pass


async def _timed(call: Any, path: str, first: int, n: int) -> float:
    """CPU seconds of the event-loop thread for n requests from address first on."""
    t0 = time.thread_time()
    for k in range(first, first + n, BATCH):
        await asyncio.gather(*(call(_scope(path, i), _receive, _send) for i in range(k, min(k + BATCH, first + n))))
    return time.thread_time() - t0


async def measure(url: str, n: int = 20000, rounds: int = 3) -> dict[str, Any]:
    lim = rategate.Limiter(url, timeout=5.0)
    mw = rategate.RateLimitMiddleware(_app, limiter=lim, limits="1000000/hour", rules={"/flood": "1/hour"})
    fast = getattr(mw, "_gate", None) is not None
    nxt = 1  # the next unused address
    per: dict[str, list[float]] = {"bare": [], "allowed": [], "denied": []}
    cached = measured_denied = 0
    # warm the code paths and the connection (not measured)
    await _timed(mw, "/", nxt, 2000)
    nxt += 2000
    for _ in range(rounds):
        per["bare"].append(await _timed(_app, "/", nxt, n) / n * 1e6)
        nxt += n
        per["allowed"].append(await _timed(mw, "/", nxt, n) / n * 1e6)
        nxt += n
        spent = 0.0
        for first in range(nxt, nxt + n, CHUNK):
            m = min(CHUNK, nxt + n - first)
            for _w in range(2):  # the first is allowed, the second denied by Redis: cached
                for k in range(first, first + m, BATCH):
                    await asyncio.gather(*(mw(_scope("/flood", i), _receive, _send)
                                           for i in range(k, min(k + BATCH, first + m))))
            s0 = lim.stats()
            spent += await _timed(mw, "/flood", first, m)
            s1 = lim.stats()
            cached += s1["cached_denials"] - s0["cached_denials"]
            measured_denied += s1["denied"] - s0["denied"]
        per["denied"].append(spent / n * 1e6)
        nxt += n
    await lim.aclose()

    def fig(xs: list[float]) -> dict[str, Any]:
        return {"median_us": round(statistics.median(xs), 3), "min_us": round(min(xs), 3),
                "max_us": round(max(xs), 3), "rounds_us": [round(x, 3) for x in xs]}

    def over(name: str) -> dict[str, Any]:
        xs = [a - b for a, b in zip(per[name], per["bare"])]
        return fig(xs)

    return {"requests_per_round": n, "rounds": rounds, "batch": BATCH, "c_path": fast,
            "bare": fig(per["bare"]), "allowed": fig(per["allowed"]), "denied": fig(per["denied"]),
            "allowed_over_bare": over("allowed"), "denied_over_bare": over("denied"),
            "denied_from_cache": cached, "denied_measured": measured_denied}


def summary(r: dict[str, Any]) -> str:
    def f(key: str) -> str:
        x = r[key]
        return f"{x['median_us']:.2f} us ({x['min_us']:.2f}-{x['max_us']:.2f})"

    return (f"{'C' if r['c_path'] else 'Python'} path, {r['rounds']} rounds of {r['requests_per_round']}: "
            f"bare app {f('bare')}; allowed {f('allowed')}, over bare {f('allowed_over_bare')}; "
            f"denied {f('denied')}, over bare {f('denied_over_bare')}; "
            f"{r['denied_from_cache']} of {r['denied_measured']} measured denials from the deny cache")


def main() -> None:
    url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    r = asyncio.run(measure(url, n, rounds))
    print(summary(r))
    if "--json" in sys.argv:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
