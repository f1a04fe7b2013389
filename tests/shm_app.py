"""The app of tests/test_uvicorn_shm.py: ``/limited`` allows 10/minute per client,
in the shm:// segment named by RATEGATE_SHM_URL, shared by every worker;
``/`` answers with the worker's pid (not limited); ``/health`` is exempt."""

from __future__ import annotations

import os

from fastapi import FastAPI

import rategate

limiter = rategate.Limiter(os.environ["RATEGATE_SHM_URL"])

app = FastAPI()
app.add_middleware(rategate.RateLimitMiddleware, limiter=limiter, limits=None,
                   rules={"/limited": "10/minute"}, exempt=["/health"])


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/limited")
async def limited() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/")
async def root() -> dict[str, int]:
    return {"pid": os.getpid()}
