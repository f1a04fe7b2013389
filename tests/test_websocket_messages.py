"""Per-message WebSocket limits (``websocket_messages=``), in process, direct ASGI calls.

Under a real uvicorn: tests/test_uvicorn_features.py.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

import rategate
from rategate.middleware import RateLimitMiddleware, Rule


class EchoApp:
    """Accepts, echoes every text message, records what it saw; after the
    disconnect it tries one more send (a careless app)."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            m = await receive()
            self.seen.append(m)
            if m["type"] == "websocket.disconnect":
                await send({"type": "websocket.send", "text": "bye"})
                return
            await send({"type": "websocket.send", "text": "echo " + m["text"]})


def ws_scope(path: str = "/ws", ip: str = "203.0.113.9") -> dict[str, Any]:
    return {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"test")], "client": (ip, 1), "server": ("test", 80), "subprotocols": []}


async def connect(mw: Any, n: int, path: str = "/ws", ip: str = "203.0.113.9") -> list[Any]:
    """A client that sends ``n`` messages, then goes away; what the server sent it."""
    inbox: list[Any] = [{"type": "websocket.connect"}]
    inbox += [{"type": "websocket.receive", "text": f"m{i}"} for i in range(n)]
    sent: list[Any] = []

    async def receive() -> Any:
        await asyncio.sleep(0)
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(m: Any) -> None:
        sent.append(m)

    await mw(ws_scope(path, ip), receive, send)
    return sent


def texts(sent: list[Any]) -> list[str]:
    return [m["text"] for m in sent if m["type"] == "websocket.send"]


@pytest.mark.asyncio
async def test_over_the_limit_the_connection_is_closed_with_1008(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url)
    app = EchoApp()
    mw = RateLimitMiddleware(app, limiter=lim, limits="100/minute", websocket_messages="3/minute")
    sent = await connect(mw, 5)
    assert texts(sent) == ["echo m0", "echo m1", "echo m2"]  # and no "bye": the app's late send is dropped
    assert sent[-1] == {"type": "websocket.close", "code": 1008, "reason": "Too Many Messages"}
    assert [m["type"] for m in app.seen] == ["websocket.receive"] * 3 + ["websocket.disconnect"]
    assert app.seen[-1]["code"] == 1008
    # The same client key on a new connection: its messages are still over the limit.
    app.seen.clear()
    sent = await connect(mw, 1)
    assert sent[0]["type"] == "websocket.accept" and texts(sent) == []
    assert sent[-1]["code"] == 1008
    # Another client has its own budget.
    assert texts(await connect(mw, 3, ip="198.51.100.1")) == ["echo m0", "echo m1", "echo m2", "bye"]
    counts = lim.stats()["rules"]["default (messages)"]
    assert counts["allowed"] == 6 and counts["denied"] + counts["denied_cached"] == 2
    assert lim.stats()["rules"]["default"]["allowed"] == 3  # the handshakes, counted apart


@pytest.mark.asyncio
async def test_drop_mode_drops_the_messages_and_keeps_the_connection(storage_url: str,
                                                                     make_limiter: Any) -> None:
    app = EchoApp()
    mw = RateLimitMiddleware(app, limiter=make_limiter(storage_url), limits="100/minute",
                             websocket_messages="2/minute", websocket_over_limit="drop")
    sent = await connect(mw, 5)
    assert texts(sent) == ["echo m0", "echo m1", "bye"]
    assert not any(m["type"] == "websocket.close" for m in sent)
    assert [m.get("text") for m in app.seen] == ["m0", "m1", None]
    assert app.seen[-1] == {"type": "websocket.disconnect", "code": 1000}


@pytest.mark.asyncio
async def test_per_rule_options(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    app = EchoApp()
    mw = RateLimitMiddleware(app, limiter=lim, limits="100/minute", websocket_messages="1/minute", rules={
        "/chat": {"limits": "10/minute", "websocket_messages": "2/minute", "websocket_over_limit": "drop"},
        "/feed": {"limits": "10/minute", "websocket_messages": False},
    })
    assert texts(await connect(mw, 4, "/chat")) == ["echo m0", "echo m1", "bye"]
    assert texts(await connect(mw, 4, "/feed")) == ["echo m0", "echo m1", "echo m2", "echo m3", "bye"]
    sent = await connect(mw, 4, "/other")
    assert texts(sent) == ["echo m0"] and sent[-1]["code"] == 1008
    # A Rule object takes the same options.
    mw = RateLimitMiddleware(app, limiter=lim, rules=[
        Rule("/r", "10/minute", websocket_messages="1/minute", websocket_over_limit="drop")])
    assert texts(await connect(mw, 3, "/r")) == ["echo m0", "bye"]


@pytest.mark.asyncio
async def test_message_counters_have_their_own_redis_keys(redis_server: Any, redis_url: str,
                                                          make_limiter: Any) -> None:
    # The same rates on the handshake and the messages: still two counters.
    mw = RateLimitMiddleware(EchoApp(), limiter=make_limiter(redis_url), limits="5/minute",
                             websocket_messages="5/minute")
    assert len(texts(await connect(mw, 4))) == 5
    keys = sorted(k.decode() for k in redis_server.client().keys("*"))
    assert keys == ["rg:{%ws:default|203.0.113.9}:5/60000", "rg:{default|203.0.113.9}:5/60000"]


@pytest.mark.asyncio
async def test_shadow_mode_counts_and_lets_messages_through(make_limiter: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    lim = make_limiter("memory://")
    mw = RateLimitMiddleware(EchoApp(), limiter=lim, limits="100/minute", websocket_messages="1/minute",
                             shadow=True)
    assert len(texts(await connect(mw, 3))) == 4
    assert lim.stats()["rules"]["default (messages)"]["shadow_would_deny"] == 2
    assert "would deny '%ws:default|203.0.113.9' (rule 'default (messages)'" in caplog.text


@pytest.mark.asyncio
async def test_a_message_over_the_limit_is_refused_without_suspending(storage_url: str,
                                                                      make_limiter: Any) -> None:
    """A key known over its limit is answered by the local cache: receive()
    of the middleware finishes in one step when the client's receive does."""
    lim = make_limiter(storage_url)
    mw = RateLimitMiddleware(EchoApp(), limiter=lim, limits="100/minute", websocket_messages="1/minute",
                             websocket_over_limit="drop")
    await connect(mw, 2)  # one allowed, one denied (by Redis: now in the local cache)
    rule = mw.rule_for("/ws")
    assert rule is not None and rule.ws_rule is not None
    inbox = [{"type": "websocket.receive", "text": f"x{i}"} for i in range(5)]
    inbox.append({"type": "websocket.disconnect", "code": 1000})

    async def receive() -> Any:  # never suspends
        return inbox.pop(0)

    async def send(m: Any) -> None:
        raise AssertionError(m)

    limited_receive, _ = mw._limit_messages(rule.ws_rule, ws_scope(), receive, send)
    coro = limited_receive()
    with pytest.raises(StopIteration) as e:
        coro.send(None)  # five checks, all denied at once, then the disconnect: one step
    assert e.value.value == {"type": "websocket.disconnect", "code": 1000}
    if storage_url != "memory://":
        assert lim.stats()["rules"]["default (messages)"]["denied_cached"] == 5


@pytest.mark.parametrize("kwargs, error, words", [
    ({"websocket_messages": "1/minute", "websocket": False}, ValueError, "websocket=False leaves them alone"),
    ({"websocket_messages": True}, TypeError, "websocket_messages must be rates like"),
    ({"websocket_messages": lambda s: "1/s"}, TypeError, "websocket_messages must be rates like"),
    ({"websocket_messages": "1/fortnight"}, ValueError, "rule 'default': websocket_messages: bad rate"),
    ({"websocket_over_limit": "kick"}, ValueError, "websocket_over_limit must be \"close\""),
    ({"rules": {"/ws": {"limits": None, "websocket_messages": "1/s"}}}, ValueError,
     "websocket_messages needs limits on the handshake too"),
    ({"rules": {"/ws": {"limits": "1/s", "websocket_over_limit": "close!"}}}, ValueError,
     "rule '/ws': websocket_over_limit"),
])
def test_config_errors(kwargs: dict[str, Any], error: type, words: str) -> None:
    lim = rategate.Limiter("memory://")
    kwargs.setdefault("limits", "1/minute")
    try:
        with pytest.raises(error, match=re.escape(words)):
            RateLimitMiddleware(EchoApp(), limiter=lim, **kwargs)
    finally:
        lim.close()
