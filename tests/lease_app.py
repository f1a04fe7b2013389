"""The app of test_uvicorn_lease: one global limit every request of /global
shares (a hot key; the query string names another, for a fresh run), leased; ``/stats`` (exempt) answers with the worker's pid
and its limiter's counters.  RATEGATE_REDIS_URL, RATEGATE_LEASE_LIMIT."""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import rategate

limiter = rategate.Limiter(os.environ["RATEGATE_REDIS_URL"], timeout=2.0)


async def stats(request: Any) -> JSONResponse:
    st = limiter.stats()
    return JSONResponse({"pid": os.getpid(), "leased": st["leased"], "errors": st["errors"]})


async def ok(request: Any) -> PlainTextResponse:
    """The worker's pid, and in x-leased how many of its checks leases answered so far."""
    return PlainTextResponse(str(os.getpid()), headers={"x-leased": str(limiter.stats()["leased"])})


app = Starlette(routes=[Route("/health", ok), Route("/stats", stats), Route("/global", ok)])
app.add_middleware(
    rategate.RateLimitMiddleware,
    limiter=limiter,
    rules=[rategate.Rule("/global", os.environ.get("RATEGATE_LEASE_LIMIT", "200/minute"),
                         key=lambda scope: scope["query_string"] or b"everyone", lease=True)],
    exempt=["/health", "/stats"],
)
