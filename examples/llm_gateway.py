"""An LLM gateway with rategate: ``uvicorn examples.llm_gateway:app``

Three limits on one route, decided together:

- a tiered rate limit: requests per minute by plan (the ``x-plan`` header
  here; in production a claim your auth middleware put in ``scope["state"]``);
- a concurrency limit: at most 4 generations of one API key in flight at
  once, across every worker and server sharing the Redis;
- a token budget: 100,000 tokens per API key per day, checked with an
  estimate before the call (the ``max_tokens`` the client asked for) and
  charged with the real usage after it (``rategate.set_cost``), also for a
  streamed answer, when its stream ends.

Environment:
  RATEGATE_REDIS_URL      storage URL (default redis://127.0.0.1:6379/0; "memory://" needs no server)

Routes:
  POST /v1/completions   {"prompt": str, "max_tokens": int, "stream": bool}; header x-api-key
  GET  /health           exempt
  GET  /budget           the caller's token budget left today (a peek: consumes nothing)

The model is a stand-in that "uses" a number of tokens of its own choosing,
so the charged amount differs from the estimate the way a real one does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import rategate
from rategate.admin import rule_part, store_key

REDIS_URL = os.environ.get("RATEGATE_REDIS_URL", "redis://127.0.0.1:6379/0")

PLANS = {b"free": "10/minute", b"pro": "600/minute"}
TOKENS_PER_DAY = "100000/day"
MAX_TOKENS = 4096  # the most one call may ask for (and the estimate's bound)

limiter = rategate.Limiter(REDIS_URL)


def api_key(scope: Any) -> str | None:
    """The caller: its API key header (None: not limited here, refused below)."""
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return bytes(value).decode("latin-1")
    return None


def plan_rates(scope: Any) -> str:
    plan = dict(scope["headers"]).get(b"x-plan", b"free")
    return PLANS.get(plan, PLANS[b"free"])


def estimate(scope: Any) -> int:
    """The check's cost: the tokens the call may use at most.  The middleware
    calls it before the app reads the body, so the estimate travels in a
    header here (x-max-tokens; a real gateway might use a fixed estimate)."""
    v = dict(scope["headers"]).get(b"x-max-tokens", b"256")
    return min(int(v), MAX_TOKENS) if v.isdigit() else 256


async def fake_model(prompt: str, max_tokens: int) -> list[str]:
    """A stand-in model: answers with up to max_tokens words."""
    await asyncio.sleep(0.05)
    n = min(max_tokens, 3 + len(prompt.split()) * 2)
    return [f"tok{i}" for i in range(n)]


async def completions(request: Request) -> Any:
    if api_key(request.scope) is None:
        return JSONResponse({"detail": "x-api-key required"}, status_code=401)
    body = await request.json()
    prompt, max_tokens = str(body.get("prompt", "")), int(body.get("max_tokens", 256))
    words = await fake_model(prompt, max_tokens)
    used = len(prompt.split()) + len(words)  # prompt + completion tokens
    if not body.get("stream"):
        rategate.set_cost(request, used)  # charged (the difference) after the response
        return JSONResponse({"text": " ".join(words), "usage": {"total_tokens": used}})

    async def chunks() -> AsyncIterator[bytes]:
        for w in words:
            yield (w + " ").encode()
            await asyncio.sleep(0.001)
        rategate.set_cost(request, used)  # a stream: known at its end, charged then

    return StreamingResponse(chunks(), media_type="text/plain")


async def budget(request: Request) -> JSONResponse:
    key = api_key(request.scope)
    if key is None:
        return JSONResponse({"detail": "x-api-key required"}, status_code=401)
    # A peek (cost 0) at the budget rule's bucket: its store key is made from
    # the rule's name and namespace and the API key (rategate.admin).
    d = await limiter.hit(store_key(rule_part("budget", "tokens"), key), TOKENS_PER_DAY, cost=0)
    return JSONResponse({"tokens_left_today": d.remaining})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/budget", budget),
    Route("/health", health),
])
# Middlewares run outermost last-added: the request meets the plan's rate and
# the concurrency limit first (one store call), then the token budget.
app.add_middleware(
    rategate.RateLimitMiddleware, limiter=limiter, key=api_key, exempt=["/health", "/budget"],
    namespace="tokens",
    rules=[rategate.Rule("/v1/completions", TOKENS_PER_DAY, cost=estimate, charge=True, name="budget")],
)
app.add_middleware(
    rategate.RateLimitMiddleware, limiter=limiter, key=api_key, exempt=["/health", "/budget"],
    rules=[rategate.Rule("/v1/completions", plan_rates, concurrency=4, concurrency_ttl=120, name="plan")],
)
