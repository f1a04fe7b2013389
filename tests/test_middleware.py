"""RateLimitMiddleware in process: httpx.ASGITransport and direct ASGI calls.

Most tests run twice, on ``memory://`` (decisions answered synchronously) and
on a real redis-server (decisions through futures), via ``storage_url``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

import rategate
from rategate.keys import client_ip, header
from rategate.middleware import RateLimitMiddleware, Rule, _ROUTE_CACHE_MAX

DENIED_BODY = {"detail": "Too Many Requests"}
APP_HEADERS = [(b"content-type", b"text/plain"), (b"x-app", b"yes")]


class App:
    """A raw ASGI app: 200 "ok"; records every call and whether ``send`` was wrapped."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.raw_send: list[Any] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(scope)
        self.raw_send.append(send)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": APP_HEADERS})
            await send({"type": "http.response.body", "body": b"ok"})
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept", "headers": [(b"x-app", b"yes")]})
            await send({"type": "websocket.close", "code": 1000})


@pytest.fixture
async def limiters() -> AsyncIterator[Callable[..., rategate.Limiter]]:
    made: list[rategate.Limiter] = []

    def make(url: str, **kw: Any) -> rategate.Limiter:
        lim = rategate.Limiter(url, **kw)
        made.append(lim)
        return lim

    yield make
    for lim in made:
        await lim.aclose()


def wrapped(send: Any) -> bool:
    """Whether ``send`` is the middleware's wrapper (it adds headers)."""
    return getattr(send, "__module__", None) == "rategate.middleware"


def client(app: Any, ip: str = "203.0.113.9") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 40000)), base_url="http://test")


def rl(r: httpx.Response) -> dict[str, str]:
    """The rate-limit headers of a response."""
    return {k: v for k, v in r.headers.items() if "ratelimit" in k or k == "retry-after"}


def assert_429(r: httpx.Response, low: int, high: int) -> None:
    assert r.status_code == 429
    assert r.json() == DENIED_BODY
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert low <= int(r.headers["retry-after"]) <= high, r.headers


# -- the burst, the 429 and each header format --------------------------------------
@pytest.mark.asyncio
async def test_burst_then_429_draft6(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url), limits="3/minute")
    async with client(mw) as c:
        for remaining in (2, 1, 0):
            r = await c.get("/anything")
            assert r.status_code == 200 and r.text == "ok"
            assert r.headers["x-app"] == "yes"
            assert rl(r) == {
                "ratelimit-limit": "3",
                "ratelimit-remaining": str(remaining),
                "ratelimit-reset": str(20 * (3 - remaining)),
                "ratelimit-policy": "3;w=60",
            }
        r = await c.get("/anything")
        assert_429(r, 19, 20)  # the next token in 20 s, rounded up
        assert r.headers["ratelimit-remaining"] == "0"
        assert r.headers["ratelimit-limit"] == "3"
        assert r.headers["ratelimit-policy"] == "3;w=60"
        assert "x-app" not in r.headers
    assert len(app.calls) == 3


@pytest.mark.asyncio
async def test_draft11(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url), rules={"/api": "2/minute"}, headers="draft-11")
    async with client(mw) as c:
        r = await c.get("/api/x")
        assert rl(r) == {"ratelimit-policy": '"/api";q=2;w=60', "ratelimit": '"/api";r=1;t=30'}
        r = await c.get("/api")
        # r=0: the window ends when the next token arrives (30 s), not when
        # the bucket is full (60 s); issue 8 #16.
        assert rl(r) == {"ratelimit-policy": '"/api";q=2;w=60', "ratelimit": '"/api";r=0;t=30'}
        r = await c.get("/api/y")
        assert_429(r, 29, 30)
        assert r.headers["ratelimit"] == f'"/api";r=0;t={r.headers["retry-after"]}'


@pytest.mark.asyncio
async def test_x_ratelimit(storage_url: str, limiters: Any) -> None:
    import time

    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url), limits="2/minute", headers="x-ratelimit")
    async with client(mw) as c:
        now = time.time()
        r = await c.get("/")
        assert r.headers["x-ratelimit-limit"] == "2" and r.headers["x-ratelimit-remaining"] == "1"
        assert now + 29 <= int(r.headers["x-ratelimit-reset"]) <= now + 32
        await c.get("/")
        r = await c.get("/")
        assert_429(r, 29, 30)
        assert r.headers["x-ratelimit-remaining"] == "0"
        assert not any(k.startswith("ratelimit") for k in r.headers)


@pytest.mark.asyncio
async def test_several_rates_report_the_closest(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url), limits="2/second; 3/minute")
    async with client(mw) as c:
        r = await c.get("/")
        # 1 of 2 left in the second, 2 of 3 in the minute: the second is closest.
        assert r.headers["ratelimit-limit"] == "2" and r.headers["ratelimit-remaining"] == "1"
        assert r.headers["ratelimit-policy"] == "2;w=1, 3;w=60"
        await asyncio.sleep(1.05)
        await c.get("/")
        await asyncio.sleep(1.05)
        r = await c.get("/")  # the minute is now used up; the second still has room
        assert r.status_code == 200
        assert r.headers["ratelimit-limit"] == "3" and r.headers["ratelimit-remaining"] == "0"
        assert r.headers["ratelimit-policy"] == "3;w=60, 2;w=1"


@pytest.mark.asyncio
async def test_headers_none(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url), limits="1/minute", headers=None)
    async with client(mw) as c:
        r = await c.get("/")
        assert r.status_code == 200 and rl(r) == {}
        r = await c.get("/")
        assert_429(r, 59, 60)
        assert rl(r) == {"retry-after": r.headers["retry-after"]}
    assert not wrapped(app.raw_send[0])  # no headers to add: send is not wrapped


# -- exempt, unmatched, rules, methods ----------------------------------------------
@pytest.mark.asyncio
async def test_exempt_and_unmatched_paths_untouched(storage_url: str, limiters: Any) -> None:
    lim = limiters(storage_url)
    app = App()
    mw = RateLimitMiddleware(app, limiter=lim, rules={"/api": "1/minute", "/api/public": None},
                             exempt=["/health"])
    async with client(mw) as c:
        for path in ["/health", "/other", "/api/public", "/api/public/x", "/apiary"] * 3:
            r = await c.get(path)
            assert r.status_code == 200 and rl(r) == {}, path
        assert (await c.get("/api/x")).status_code == 200
        assert (await c.get("/api/x")).status_code == 429
        assert (await c.get("/health")).status_code == 200
    # Untouched: the app got the server's own send, not a wrapper.
    assert not any(map(wrapped, app.raw_send[:15]))
    assert wrapped(app.raw_send[15])
    assert lim.stats()["checks"] == 2


@pytest.mark.asyncio
async def test_exempt_is_exact_and_default_applies_elsewhere(limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters("memory://"), limits="1/minute", exempt="/health")
    async with client(mw) as c:
        assert [(await c.get("/health")).status_code for _ in range(3)] == [200] * 3
        assert [(await c.get("/health/x")).status_code for _ in range(2)] == [200, 429]


@pytest.mark.asyncio
async def test_rules_and_default_keep_separate_counters(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url), limits="2/minute",
                             rules={"/api": "2/minute", "/login": "2/minute"})
    async with client(mw) as c:
        assert [(await c.get("/")).status_code for _ in range(3)] == [200, 200, 429]
        assert [(await c.get("/api/a")).status_code for _ in range(3)] == [200, 200, 429]
        assert [(await c.get("/login")).status_code for _ in range(3)] == [200, 200, 429]


@pytest.mark.asyncio
async def test_rule_is_part_of_the_redis_key(redis_server: Any, redis_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(redis_url), limits="5/minute",
                             rules={"/api": "2/minute", "POST /login": "3/minute",
                                    re.compile(r"/a[|]b{1}"): "4/minute"})
    async with client(mw) as c:
        await c.get("/")
        await c.get("/api")
        await c.post("/login")
        await c.get("/a|b")
    keys = sorted(k.decode() for k in redis_server.client().keys("rg:*"))
    assert keys == [
        # "|", "{", "}" (and "%", "#") of a rule's name are escaped in the key.
        "rg:{/a[%7C]b%7B1%7D|203.0.113.9}:4/60000",
        "rg:{/api|203.0.113.9}:2/60000",
        "rg:{POST /login|203.0.113.9}:3/60000",
        "rg:{default|203.0.113.9}:5/60000",
    ]


@pytest.mark.asyncio
async def test_namespaces_separate_middlewares_sharing_a_limiter(redis_server: Any, redis_url: str,
                                                                 limiters: Any) -> None:
    lim = limiters(redis_url)
    a = RateLimitMiddleware(App(), limiter=lim, limits="1/minute")
    b = RateLimitMiddleware(App(), limiter=lim, limits="1/minute")
    c_ = RateLimitMiddleware(App(), limiter=lim, limits="1/minute", namespace="admin{x}")
    async with client(a) as ca, client(b) as cb, client(c_) as cc:
        assert (await ca.get("/")).status_code == 200
        assert (await cb.get("/")).status_code == 429  # the same rule, the same counter
        assert (await cc.get("/")).status_code == 200
    assert redis_server.client().exists("rg:{admin%7Bx%7D:default|203.0.113.9}:1/60000") == 1


@pytest.mark.asyncio
async def test_longest_prefix_wins(limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters("memory://"),
                             rules={"/api": "1/minute", "/api/chat": "2/minute", "/": "3/minute"})
    async with client(mw) as c:
        assert (await c.get("/api/chat/x")).headers["ratelimit-limit"] == "2"
        assert (await c.get("/api/chat")).headers["ratelimit-limit"] == "2"
        assert (await c.get("/api/chatter")).headers["ratelimit-limit"] == "1"  # segment boundary
        assert (await c.get("/api/other")).status_code == 429  # the /api rule, already used
        assert (await c.get("/apiary")).headers["ratelimit-limit"] == "3"
    assert mw.rule_for("/api/chat/x") is not None and mw.rule_for("/api/chat/x").name == "/api/chat"
    assert mw.rule_for("/anything").name == "/"


@pytest.mark.asyncio
async def test_regex_rules_come_first_in_order(limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters("memory://"), limits="9/minute",
                             rules={re.compile(r"/items/\d+$"): "1/minute", "/items": "5/minute",
                                    re.compile(r"/items/"): "7/minute"})
    async with client(mw) as c:
        assert (await c.get("/items/1")).headers["ratelimit-limit"] == "1"
        assert (await c.get("/items/2")).status_code == 429  # one rule, one counter per client
        assert (await c.get("/items/abc")).headers["ratelimit-limit"] == "7"
        assert (await c.get("/items")).headers["ratelimit-limit"] == "5"
        assert (await c.get("/x/items/1")).headers["ratelimit-limit"] == "9"  # match() is anchored


@pytest.mark.asyncio
async def test_method_filters(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url),
                             rules={"POST /login": "1/minute", "GET /feed": "1/minute",
                                    "PUT,PATCH /doc": "1/minute", "/doc": "3/minute"})
    async with client(mw) as c:
        assert rl(await c.get("/login")) == {}
        assert (await c.post("/login")).status_code == 200
        assert (await c.post("/login")).status_code == 429
        assert (await c.get("/login")).status_code == 200
        assert (await c.head("/feed")).status_code == 200  # GET implies HEAD
        assert (await c.get("/feed")).status_code == 429
        assert (await c.post("/feed")).status_code == 200 and rl(await c.post("/feed")) == {}
        assert (await c.put("/doc")).headers["ratelimit-limit"] == "1"
        assert (await c.patch("/doc")).status_code == 429
        assert (await c.get("/doc")).headers["ratelimit-limit"] == "3"
        assert (await c.delete("/doc")).headers["ratelimit-limit"] == "3"


@pytest.mark.asyncio
async def test_rule_objects_with_their_own_key_and_cost(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(
        app,
        limiter=limiters(storage_url),
        limits="10/minute",
        cost=lambda scope: 5,
        rules=[
            Rule("/api", "4/minute", key=header("x-api-key"), cost=2),
            Rule(re.compile(r"/llm"), "100/minute", cost=lambda s: int(dict(s["headers"]).get(b"x-tokens", b"1"))),
        ],
    )
    async with client(mw) as c:
        a = {"x-api-key": "alice"}
        b = {"x-api-key": "bob"}
        assert [(await c.get("/api", headers=a)).status_code for _ in range(3)] == [200, 200, 429]
        assert (await c.get("/api", headers=b)).headers["ratelimit-remaining"] == "2"
        assert [(await c.get("/", headers=a)).status_code for _ in range(3)] == [200, 200, 429]
        r = await c.get("/llm", headers={"x-tokens": "60"})
        assert r.headers["ratelimit-remaining"] == "40"
        assert (await c.get("/llm", headers={"x-tokens": "41"})).status_code == 429
        assert (await c.get("/llm", headers={"x-tokens": "40"})).status_code == 200


@pytest.mark.asyncio
async def test_rule_options_in_a_dict(limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters("memory://"),
                             rules={"POST /upload": {"limits": "10/minute", "cost": 4, "name": "uploads"}})
    assert mw.rule_for("/upload", "POST").name == "uploads"
    assert mw.rule_for("/upload", "GET") is None
    async with client(mw) as c:
        assert (await c.post("/upload")).headers["ratelimit-remaining"] == "6"


# -- shadow mode, keys ---------------------------------------------------------------
@pytest.mark.asyncio
async def test_shadow_never_blocks_and_still_counts(storage_url: str, limiters: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    lim = limiters(storage_url)
    app = App()
    shadow = RateLimitMiddleware(app, limiter=lim, limits="2/minute", shadow=True)
    with caplog.at_level(logging.WARNING, logger="rategate"):
        async with client(shadow) as c:
            rs = [await c.get("/") for _ in range(6)]
    assert [r.status_code for r in rs] == [200] * 6
    assert [r.headers["ratelimit-remaining"] for r in rs] == ["1", "0", "0", "0", "0", "0"]
    assert len(app.calls) == 6
    stats = lim.stats()
    assert stats["allowed"] == 2 and stats["denied"] + stats["cached_denials"] >= 4
    # Logged once per key per retry interval, not once per request.
    lines = [r for r in caplog.records if "shadow" in r.getMessage()]
    assert len(lines) == 1 and "default|203.0.113.9" in lines[0].getMessage()
    # The counter is the real one: the same rule enforced is already spent.
    enforced = RateLimitMiddleware(App(), limiter=lim, limits="2/minute")
    async with client(enforced) as c:
        assert (await c.get("/")).status_code == 429


@pytest.mark.asyncio
async def test_key_returning_none_skips_limiting(storage_url: str, limiters: Any) -> None:
    lim = limiters(storage_url)
    app = App()

    def key(scope: Any) -> str | None:
        return None if (b"x-internal", b"1") in scope["headers"] else client_ip()(scope)

    mw = RateLimitMiddleware(app, limiter=lim, limits="1/minute", key=key)
    async with client(mw) as c:
        for _ in range(5):
            r = await c.get("/", headers={"x-internal": "1"})
            assert r.status_code == 200 and rl(r) == {}
        assert lim.stats()["checks"] == 0
        assert [(await c.get("/")).status_code for _ in range(2)] == [200, 429]
    assert not any(map(wrapped, app.raw_send[:5]))


@pytest.mark.asyncio
async def test_spoofed_forwarded_for_from_an_untrusted_client(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url), limits="2/minute",
                             key=client_ip(trusted_proxies=["10.0.0.0/8"]))
    async with client(mw, ip="203.0.113.9") as c:
        codes = [(await c.get("/", headers={"x-forwarded-for": f"1.2.3.{i}"})).status_code for i in range(4)]
    assert codes == [200, 200, 429, 429]
    # Behind the trusted proxy, each real client has its own counter.
    async with client(mw, ip="10.1.2.3") as c:
        for i in range(3):
            h = {"x-forwarded-for": f"1.2.3.4, 198.51.100.{i}"}
            assert [(await c.get("/", headers=h)).status_code for _ in range(3)] == [200, 200, 429]


@pytest.mark.asyncio
async def test_long_and_bytes_keys_are_bounded(redis_server: Any, redis_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(redis_url), limits="1/minute",
                             key=lambda s: dict(s["headers"]).get(b"x-k", b"")[:100000].decode() or b"bytes-key")
    async with client(mw) as c:
        assert (await c.get("/", headers={"x-k": "a" * 20000})).status_code == 200
        assert (await c.get("/", headers={"x-k": "a" * 20000})).status_code == 429
        assert (await c.get("/", headers={"x-k": "a" * 19999 + "b"})).status_code == 200
        assert (await c.get("/")).status_code == 200
        assert (await c.get("/")).status_code == 429
    keys = [k.decode() for k in redis_server.client().keys("rg:*")]
    assert len(keys) == 3
    assert max(len(k) for k in keys) < 100
    assert "rg:{default|bytes-key}:1/60000" in keys
    assert sum(k.startswith("rg:{default#") for k in keys) == 2


@pytest.mark.asyncio
async def test_key_of_a_wrong_type_is_a_clear_error(limiters: Any) -> None:
    mw = RateLimitMiddleware(App(), limiter=limiters("memory://"), limits="1/minute", key=lambda s: 42)
    async with client(mw) as c:
        with pytest.raises(TypeError, match="must return str, bytes, or None"):
            await c.get("/")


@pytest.mark.asyncio
async def test_limiter_given_as_a_url() -> None:
    mw = RateLimitMiddleware(App(), limiter="memory://", limits="1/minute")
    try:
        async with client(mw) as c:
            assert [(await c.get("/")).status_code for _ in range(2)] == [200, 429]
    finally:
        await mw.limiter.aclose()


# -- ASGI details: what the app sees, what is read, what is sent ------------------------
def _http_scope(path: str = "/", method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"host", b"test")], "client": ("203.0.113.9", 1),
            "server": ("test", 80)}


@pytest.mark.asyncio
async def test_allowed_calls_the_app_once_unchanged(limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters("memory://"), limits="5/minute")
    scope = _http_scope()
    before = dict(scope)
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(m: Any) -> None:
        sent.append(m)

    await mw(scope, receive, send)
    # Unchanged but for the per-request record in scope["state"] (Seam 4), which
    # the server had not created here.
    state = scope.pop("state")
    assert len(app.calls) == 1 and app.calls[0] is scope and scope == before
    assert list(state) == ["rategate.record"]
    assert app.raw_send[0] is not send  # wrapped: headers were added
    start = sent[0]
    assert start["status"] == 200
    names = [k for k, _ in start["headers"]]
    assert names[:2] == [b"content-type", b"x-app"] and b"ratelimit-remaining" in names
    # The app's own list is copied, not extended in place (apps may reuse it).
    assert APP_HEADERS == [(b"content-type", b"text/plain"), (b"x-app", b"yes")]


@pytest.mark.asyncio
async def test_denied_never_calls_the_app_nor_reads_the_body(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url), limits="1/minute")

    async def receive_ok() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send_ok(m: Any) -> None:
        pass

    await mw(_http_scope(method="POST"), receive_ok, send_ok)
    assert len(app.calls) == 1

    async def receive() -> Any:
        raise AssertionError("the request body was read")

    sent: list[Any] = []

    async def send(m: Any) -> None:
        sent.append(m)

    await mw(_http_scope(method="POST"), receive, send)
    assert len(app.calls) == 1
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 429
    assert json.loads(sent[1]["body"]) == DENIED_BODY
    assert not sent[1].get("more_body", False)


@pytest.mark.asyncio
async def test_a_denial_from_the_local_cache_never_suspends(storage_url: str, limiters: Any) -> None:
    """Over-limit keys are answered at once: the request's coroutine finishes without yielding."""
    lim = limiters(storage_url)
    mw = RateLimitMiddleware(App(), limiter=lim, limits="1/minute")

    async def receive() -> Any:
        raise AssertionError("not read")

    sent: list[Any] = []

    async def send(m: Any) -> None:  # never suspends
        sent.append(m)

    async def nosend(m: Any) -> None:
        pass

    await mw(_http_scope(), receive, nosend)
    await mw(_http_scope(), receive, nosend)  # the first denial (may go to Redis)
    for _ in range(3):
        coro = mw(_http_scope(), receive, send)
        with pytest.raises(StopIteration):
            coro.send(None)  # ran to completion in one step: no await suspended
        coro.close()
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [429, 429, 429]


@pytest.mark.asyncio
async def test_lifespan_and_other_scopes_pass_through(limiters: Any) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    mw = RateLimitMiddleware(app, limiter=limiters("memory://"), limits="1/minute")

    async def receive() -> Any:
        return {"type": "lifespan.startup"}

    async def send(m: Any) -> None:
        pass

    scope = {"type": "something-else"}
    await mw(scope, receive, send)
    assert seen[-1][0] is scope and seen[-1][1] is receive and seen[-1][2] is send
    # The lifespan reaches the app with the same scope, send and messages; the
    # middleware reads the startup message on its way (to connect: issue 16 #4).
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    await mw(scope, receive, send)
    assert seen[-1][0] is scope and seen[-1][2] is send
    assert await seen[-1][1]() == {"type": "lifespan.startup"}


@pytest.mark.asyncio
async def test_a_reused_response_header_list_does_not_grow(limiters: Any) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    shared = PlainTextResponse("same object every time")

    async def endpoint(request: Any) -> Any:
        return shared

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(RateLimitMiddleware, limiter=limiters("memory://"), limits="10/minute")
    async with client(app) as c:
        for remaining in range(9, 5, -1):
            r = await c.get("/")
            assert r.headers.get_list("ratelimit-remaining") == [str(remaining)]
    assert not any(k.startswith(b"ratelimit") for k, _ in shared.raw_headers)


@pytest.mark.asyncio
async def test_route_cache_is_bounded(limiters: Any) -> None:
    mw = RateLimitMiddleware(App(), limiter=limiters("memory://"), rules={"/api": "1000/second"})
    for i in range(_ROUTE_CACHE_MAX + 100):
        assert mw.rule_for(f"/x/{i}") is None
        assert mw.rule_for(f"/api/{i}") is not None
    assert len(mw._route_cache) <= _ROUTE_CACHE_MAX


# -- WebSocket -----------------------------------------------------------------------
def _ws_scope(path: str = "/ws", extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    s = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": path,
         "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [(b"host", b"test")],
         "client": ("203.0.113.9", 1), "server": ("test", 80), "subprotocols": []}
    if extensions is not None:
        s["extensions"] = extensions
    return s


async def _ws_call(mw: Any, scope: Any) -> list[Any]:
    inbox = [{"type": "websocket.connect"}]
    sent: list[Any] = []

    async def receive() -> Any:
        if inbox:
            return inbox.pop(0)
        await asyncio.sleep(0)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(m: Any) -> None:
        sent.append(m)

    await mw(scope, receive, send)
    return sent


@pytest.mark.asyncio
async def test_websocket_limited_at_connect(storage_url: str, limiters: Any) -> None:
    app = App()
    mw = RateLimitMiddleware(app, limiter=limiters(storage_url), limits="1/minute")
    sent = await _ws_call(mw, _ws_scope(extensions={"websocket.http.response": {}}))
    assert sent[0]["type"] == "websocket.accept"
    assert dict(sent[0]["headers"])[b"ratelimit-remaining"] == b"0"
    assert dict(sent[0]["headers"])[b"x-app"] == b"yes"
    # Denied, and the server can send an HTTP response: a real 429.
    sent = await _ws_call(mw, _ws_scope(extensions={"websocket.http.response": {}}))
    assert [m["type"] for m in sent] == ["websocket.http.response.start", "websocket.http.response.body"]
    assert sent[0]["status"] == 429
    h = dict(sent[0]["headers"])
    assert h[b"content-type"] == b"application/json" and 59 <= int(h[b"retry-after"]) <= 60
    assert json.loads(sent[1]["body"]) == DENIED_BODY
    # Without the extension: the handshake is rejected (servers answer 403).
    sent = await _ws_call(mw, _ws_scope())
    assert [m["type"] for m in sent] == ["websocket.close"]
    assert len(app.calls) == 1


@pytest.mark.asyncio
async def test_websocket_exempt_and_opt_out(limiters: Any) -> None:
    lim = limiters("memory://")
    app = App()
    mw = RateLimitMiddleware(app, limiter=lim, limits="1/minute", exempt=["/ws"])
    for _ in range(3):
        assert (await _ws_call(mw, _ws_scope()))[0]["type"] == "websocket.accept"
    mw = RateLimitMiddleware(app, limiter=lim, limits="1/minute", websocket=False)
    for _ in range(3):
        sent = await _ws_call(mw, _ws_scope("/other"))
        assert sent[0]["type"] == "websocket.accept" and b"ratelimit-limit" not in dict(sent[0]["headers"])
    assert lim.stats()["checks"] == 0


def test_websocket_through_starlette_testclient() -> None:
    import warnings

    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    with warnings.catch_warnings():
        # Starlette 1.x prefers httpx2 for its TestClient; httpx works.
        warnings.filterwarnings("ignore", message=".*httpx2")
        from starlette.testclient import TestClient, WebSocketDenialResponse

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    lim = rategate.Limiter("memory://")
    app = Starlette(routes=[WebSocketRoute("/ws", ws)])
    app.add_middleware(RateLimitMiddleware, limiter=lim, limits="1/minute")
    try:
        with TestClient(app) as tc:
            with tc.websocket_connect("/ws") as s:
                assert s.receive_text() == "hi"
            with pytest.raises(WebSocketDenialResponse) as e:
                with tc.websocket_connect("/ws"):
                    pass
            assert e.value.status_code == 429
            assert e.value.json() == DENIED_BODY
            assert "retry-after" in e.value.headers
    finally:
        lim.close()
