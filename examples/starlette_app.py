"""rategate with Starlette: ``uvicorn examples.starlette_app:app``

Environment:
  RATEGATE_REDIS_URL      storage URL (default redis://127.0.0.1:6379/0; "memory://" needs no server)
  RATEGATE_FAILURE_MODE   "closed" (default: Redis down -> 429) or "open" (Redis down -> let through)

Routes:
  GET /health    exempt: never limited, no headers
  GET /limited   5/minute per client
  POST /login    3/minute per client (a method-filtered rule)
  GET /          the default: 100/minute per client
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import rategate

REDIS_URL = os.environ.get("RATEGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
FAILURE_MODE = os.environ.get("RATEGATE_FAILURE_MODE", "closed")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def limited(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


async def login(request: Request) -> JSONResponse:
    return JSONResponse({"logged_in": False})


async def index(request: Request) -> JSONResponse:
    return JSONResponse({"see": "/limited, /login, /health"})


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/limited", limited),
        Route("/login", login, methods=["POST"]),
        Route("/", index),
    ],
    middleware=[
        Middleware(
            rategate.RateLimitMiddleware,
            limiter=rategate.Limiter(REDIS_URL, failure_mode=FAILURE_MODE),
            limits="100/minute",
            rules={"/limited": "5/minute", "POST /login": "3/minute"},
            exempt=["/health"],
            headers="draft-6",
        )
    ],
)
