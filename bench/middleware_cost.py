"""The middleware's own CPU per request on the event-loop thread, without HTTP.

    python bench/middleware_cost.py redis://127.0.0.1:PORT/0 [requests]

Calls RateLimitMiddleware directly with ASGI scopes (a trivial app), 50
requests at a time with asyncio.gather, distinct client addresses: "/" is
allowed traffic (one Redis check each), "/flood" is all 429 (the local
over-limit cache).  Prints time.thread_time() per request in microseconds,
which includes gather's Task per request.  Compare two builds by running it
with each on PYTHONPATH, interleaved.
"""
from __future__ import annotations

import asyncio
import sys
import time

import rategate
async def main(url, n):
    lim = rategate.Limiter(url, timeout=5.0)
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    mw = rategate.RateLimitMiddleware(app, limiter=lim, limits="1000000/hour", rules={"/flood": "1/hour"})
    async def receive(): return {"type": "http.request", "body": b""}
    async def send(m): pass
    def scope(path, i):
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
                "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
                "client": (f"10.0.{i % 250}.{i // 250 % 250}", 1), "server": ("t", 80)}
    out = {}
    for path in ("/", "/flood"):
        for i in range(2000):
            await mw(scope(path, i), receive, send)
        t0 = time.thread_time()
        B = 50
        for k in range(0, n, B):
            await asyncio.gather(*(mw(scope(path, i), receive, send) for i in range(k, k + B)))
        out[path] = (time.thread_time() - t0) / n * 1e6
    await lim.aclose()
    print(" ".join(f"{p}: {v:.2f} us/req" for p, v in out.items()))
if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40000))
