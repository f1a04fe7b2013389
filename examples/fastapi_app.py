"""rategate with FastAPI: ``uvicorn examples.fastapi_app:app``

Environment:
  RATEGATE_REDIS_URL      storage URL (default redis://127.0.0.1:6379/0; "memory://" needs no server)
  RATEGATE_FAILURE_MODE   "closed" (default: Redis down -> 429) or "open" (Redis down -> let through)

Routes:
  GET /health            exempt: never limited, no headers
  GET /limited           5/minute per client (a middleware rule)
  GET /items/{item_id}   10/minute per client and route template (the FastAPI dependency)
  GET /                  the default: 100/minute per client (answers with the worker's pid)
"""

from __future__ import annotations

import os

from fastapi import Depends, FastAPI

import rategate

REDIS_URL = os.environ.get("RATEGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
FAILURE_MODE = os.environ.get("RATEGATE_FAILURE_MODE", "closed")

limiter = rategate.Limiter(REDIS_URL, failure_mode=FAILURE_MODE)

app = FastAPI(title="rategate example (FastAPI)")
app.add_middleware(
    rategate.RateLimitMiddleware,
    limiter=limiter,
    limits="100/minute",
    rules={"/limited": "5/minute", "/items": None},  # /items/...: limited by the dependency instead
    exempt=["/health"],
    headers="draft-6",
)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/limited")
async def limited() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/items/{item_id}", dependencies=[Depends(rategate.RateLimit("10/minute", limiter=limiter))])
async def item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


@app.get("/")
async def index() -> dict[str, object]:
    # pid: which worker answered (run with --workers 4 and watch it change).
    return {"see": "/limited, /items/1, /health", "pid": os.getpid()}
