"""The app tests/test_cli_ops.py runs under uvicorn (``uvicorn cli_app:app``):
a middleware limiting every client, whose buckets the `rategate` command
line then finds, shows and resets.  The store's URL and the deny cache's ttl
come from the environment (RATEGATE_TEST_URL, RATEGATE_TEST_DENY_CACHE_TTL)."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import rategate

limiter = rategate.Limiter(os.environ["RATEGATE_TEST_URL"], timeout=1.0,
                           deny_cache_ttl=float(os.environ.get("RATEGATE_TEST_DENY_CACHE_TTL", "1.0")))


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/health", ok), Route("/{p:path}", ok)],
    middleware=[Middleware(rategate.RateLimitMiddleware, limiter=limiter, limits="3/minute",
                           rules={"/api": "2/minute"}, exempt=["/health"])],
)
