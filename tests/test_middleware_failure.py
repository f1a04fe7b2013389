"""Redis down or slow while the app serves: the failure mode decides at once, logged as one incident."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest

import rategate
from rategate.middleware import RateLimitMiddleware

# A hang must fail, not pass slowly: no request may take longer than this
# (the limiter's deadline is 0.05 s; this is hang detection, not a speed test).
HANG = 5.0


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def messages(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rategate" and words in r.getMessage()]


async def get(c: httpx.AsyncClient, path: str) -> httpx.Response:
    return await asyncio.wait_for(c.get(path), HANG)


@pytest.mark.asyncio
async def test_redis_killed_while_serving(own_redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    closed = rategate.Limiter(own_redis.url, failure_mode="closed")
    opened = rategate.Limiter(own_redis.url, failure_mode="open")

    async def router(scope: Any, receive: Any, send: Any) -> None:
        target = closed_mw if scope["path"].startswith("/closed") or scope["path"] == "/health" else open_mw
        await target(scope, receive, send)

    closed_mw = RateLimitMiddleware(ok, limiter=closed, limits="100/minute", exempt=["/health"])
    open_mw = RateLimitMiddleware(ok, limiter=opened, limits="100/minute")
    transport = httpx.ASGITransport(app=router, client=("203.0.113.9", 1))
    caplog.set_level(logging.WARNING, logger="rategate")
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await get(c, "/closed")).status_code == 200
            assert (await get(c, "/open")).status_code == 200

            own_redis.stop()
            for _ in range(20):
                r = await get(c, "/closed")
                assert r.status_code == 429
                assert r.json() == {"detail": "Too Many Requests"}
                assert r.headers["retry-after"] == "1"
                # Nothing is known of the client's quota: no RateLimit-* field
                # says it was used up (issue 16 #6).
                assert "ratelimit-remaining" not in r.headers and "ratelimit-limit" not in r.headers
                r = await get(c, "/open")
                assert r.status_code == 200 and r.text == "ok"
                assert "ratelimit-remaining" not in r.headers  # no counts known: no headers
                assert (await get(c, "/health")).status_code == 200
            assert closed.stats()["errors"]["unavailable"] + closed.stats()["errors"]["timeout"] >= 20
            # Logged once per incident (per limiter), not 20 times.
            assert len(messages(caplog, "failed (")) == 2
            assert any("refused (failure_mode='closed')" in m for m in messages(caplog, "failed ("))
            assert any("let through (failure_mode='open')" in m for m in messages(caplog, "failed ("))

            own_redis.start()
            deadline = time.monotonic() + 20
            codes = []
            while time.monotonic() < deadline:
                codes.append((await get(c, "/closed")).status_code)
                if codes[-1] == 200:
                    break
                await asyncio.sleep(0.1)
            assert codes[-1] == 200, f"no recovery after Redis came back: {codes[-5:]}"
            r = await get(c, "/closed")
            assert r.status_code == 200 and r.headers["ratelimit-limit"] == "100"
            for _ in range(200):  # an incident ends once Redis has answered for 2 s
                await get(c, "/open")
                await get(c, "/closed")
                if len(messages(caplog, "answering again")) == 2:
                    break
                await asyncio.sleep(0.1)
            again = messages(caplog, "answering again")
            assert len(again) == 2, again
            assert all("it cost" in m and "failed checks" in m for m in again), again
            assert len(messages(caplog, "failed (")) == 2
    finally:
        await closed.aclose()
        await opened.aclose()


@pytest.mark.asyncio
async def test_redis_too_slow_answers_at_the_deadline(own_redis: Any) -> None:
    lim = rategate.Limiter(own_redis.url, failure_mode="closed", timeout=0.05)
    mw = RateLimitMiddleware(ok, limiter=lim, limits="100/minute")
    transport = httpx.ASGITransport(app=mw, client=("203.0.113.9", 1))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await get(c, "/")).status_code == 200
            pause = own_redis.pause(1.0)
            r = await get(c, "/")
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert lim.stats()["errors"]["timeout"] >= 1
            await asyncio.get_running_loop().run_in_executor(None, pause.wait)
            for _ in range(100):
                r = await get(c, "/")
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 200
    finally:
        await lim.aclose()


@pytest.mark.asyncio
async def test_incident_line_names_the_cause_and_flapping_is_one_incident(
    own_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 8 #13: the line carries the cause.  Issue 16 #3: a Redis that
    # flaps faster than an incident's recovery (2 s of answers with no
    # failure) is one incident: one opening line, one end line counting every
    # failed check, not an end line on the first lucky reply.
    lim = rategate.Limiter(own_redis.url, failure_mode="closed", timeout=0.2)
    mw = RateLimitMiddleware(ok, limiter=lim, limits="1000/minute")
    transport = httpx.ASGITransport(app=mw, client=("203.0.113.9", 1))
    caplog.set_level(logging.WARNING, logger="rategate")
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await get(c, "/")).status_code == 200
            for _ in range(3):  # three outages, each healed
                own_redis.stop()
                for _ in range(50):
                    if (await get(c, "/")).status_code == 429:
                        break
                    await asyncio.sleep(0.02)
                own_redis.start()
                for _ in range(200):
                    if (await get(c, "/")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                assert not messages(caplog, "answering again")  # healed for less than 2 s
            for _ in range(100):
                await get(c, "/")
                if messages(caplog, "answering again"):
                    break
                await asyncio.sleep(0.05)
            opened = messages(caplog, "failed (")
            assert len(opened) == 1, opened
            assert f"127.0.0.1:{own_redis.port}" in opened[0], opened[0]
            assert any(w in opened[0] for w in ("connection refused", "connection closed", "reset by peer")), opened[0]
            ended = messages(caplog, "answering again")
            assert len(ended) == 1, ended
            failed = sum(lim.stats()["errors"].values())
            assert f"it cost {failed} failed checks" in ended[0], (failed, ended)
    finally:
        await lim.aclose()
