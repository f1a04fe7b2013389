"""Configuration mistakes raise when the middleware is built, with a message that says what to do."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

import rategate
from rategate.keys import client_ip
from rategate.middleware import RateLimitMiddleware, Rule


async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
    raise AssertionError


@pytest.fixture(scope="module")
def limiter() -> Any:
    lim = rategate.Limiter("memory://")
    yield lim
    lim.close()


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"limits": "1/minute", "headers": "draft-7"}, ValueError, "unknown header style 'draft-7'"),
        ({"limits": "1/minute", "headers": 6}, ValueError, "headers must be one of"),
        ({"limits": "10/fortnight"}, ValueError, "unknown unit 'fortnight'"),
        ({"rules": {"/api": "ten per minute"}}, ValueError, "rule '/api': bad rate string"),
        ({"rules": {"api": "1/minute"}}, ValueError, "write a path prefix like"),
        ({"rules": {"FETCH /api": "1/minute"}}, ValueError, "unknown HTTP method 'FETCH'"),
        ({"rules": {"/api": {"limit": "1/minute"}}}, ValueError, "unknown option"),
        ({"rules": {"/api": {"methods": ["GET"]}}}, ValueError, "give its limits"),
        ({"rules": {"POST /api": {"limits": "1/m", "methods": "GET"}}}, ValueError, "methods given both"),
        ({"rules": {"/api": Rule("/api", "1/minute")}}, ValueError, "in a list"),
        ({"rules": ["/api"]}, ValueError, "rategate.Rule objects"),
        ({"rules": "/api=1/minute"}, ValueError, "rules must be a dict"),
        ({"rules": {"/a": "1/minute", "/b": {"limits": "1/minute", "name": "/a"}}}, ValueError,
         "two rules are named '/a'"),
        ({"limits": "1/minute", "key": "client_ip"}, TypeError, "key must be a callable"),
        ({"rules": {"/a": {"limits": "1/minute", "key": 5}}}, TypeError, "rule '/a': key must be a callable"),
        ({"limits": "1/minute", "cost": -1}, ValueError, "cost must be an int >= 0"),
        ({"limits": "1/minute", "cost": "2"}, ValueError, "cost must be"),
        ({"limits": "1/minute", "exempt": ["health"]}, ValueError, "exempt: paths start with '/'"),
        ({"limits": "1/minute", "shadow": "yes"}, TypeError, "shadow must be True or False"),
        ({"limits": "1/minute", "websocket": 1}, TypeError, "websocket must be True or False"),
        ({"limits": "1/minute", "namespace": ""}, ValueError, "namespace must be a non-empty str"),
        ({}, ValueError, "limits nothing"),
        ({"limits": None, "rules": {}}, ValueError, "limits nothing"),
    ],
)
def test_config_errors(limiter: Any, kwargs: dict[str, Any], error: type, words: str) -> None:
    with pytest.raises(error, match=re.escape(words)):
        RateLimitMiddleware(app, limiter=limiter, **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, words",
    [
        (("api", "1/minute"), {}, "starts with '/'"),
        ((b"/api", "1/minute"), {}, "path must be"),
        ((re.compile(b"/api"), "1/minute"), {}, "of str, not bytes"),
        (("/api", "1/minute"), {"methods": []}, "methods is empty"),
        (("/api", "1/minute"), {"methods": ["GOT"]}, "unknown HTTP method 'GOT'"),
        (("/api", "1/minute"), {"name": ""}, "name must be a non-empty str"),
        (("/api", "1/minute"), {"cost": 1.5}, "cost must be an int"),
    ],
)
def test_rule_errors(args: Any, kwargs: Any, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        Rule(*args, **kwargs)


def test_bad_limiter() -> None:
    with pytest.raises(TypeError, match="limiter must be a rategate.Limiter or a storage URL"):
        RateLimitMiddleware(app, limiter=None, limits="1/minute")
    with pytest.raises(ValueError, match="unknown scheme"):
        RateLimitMiddleware(app, limiter="mongodb://x", limits="1/minute")


def test_errors_surface_when_starlette_builds_its_stack_before_any_request() -> None:
    """Starlette instantiates middleware lazily: on the first ASGI event, the lifespan startup."""
    import asyncio

    from starlette.applications import Starlette

    star = Starlette()
    star.add_middleware(RateLimitMiddleware, limiter="memory://", limits="1/minute", headers="draft-7")

    async def startup() -> None:
        msgs = iter([{"type": "lifespan.startup"}])

        async def receive() -> Any:
            return next(msgs)

        async def send(m: Any) -> None:
            pass

        await star({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    with pytest.raises(ValueError, match="unknown header style"):
        asyncio.run(startup())


def test_good_configuration_is_resolved_once(limiter: Any) -> None:
    mw = RateLimitMiddleware(
        app, limiter=limiter, limits="100/minute",
        rules={"/api/chat": "10/minute; 200/day", "POST /login": "5/minute", "/static": None,
               re.compile(r"/u/\d+"): {"limits": "1/second", "name": "users"}},
        key=client_ip(trusted_proxies=["10.0.0.0/8"]), exempt=["/health", "/metrics"],
        headers="draft-11", cost=None, shadow=False,
    )
    assert mw.rule_for("/health") is None
    assert mw.rule_for("/static/x.css") is None
    assert mw.rule_for("/api/chat/1").name == "/api/chat"
    assert mw.rule_for("/login", "POST").name == "POST /login"
    assert mw.rule_for("/login", "GET").name == "default"
    assert mw.rule_for("/u/7").name == "users"
    assert [str(r) for r in mw.rule_for("/api/chat").rates] == ["10/minute", "200/day"]
    assert "draft-11" in repr(mw)


def test_public_names() -> None:
    """rategate exports the gateway names (lead: rategate/__init__.py)."""
    from rategate import headers, keys, middleware

    assert rategate.RateLimitMiddleware is middleware.RateLimitMiddleware
    assert rategate.Rule is middleware.Rule
    assert rategate.client_ip is keys.client_ip
    assert rategate.header is keys.header
    assert rategate.RateLimitHeaders is headers.RateLimitHeaders
    from rategate.fastapi import RateLimit

    assert rategate.RateLimit is RateLimit


def test_importing_rategate_does_not_import_fastapi() -> None:
    """Starlette-only users need no FastAPI: rategate.RateLimit is imported lazily."""
    code = (
        "import sys, rategate\n"
        "from rategate import RateLimitMiddleware, client_ip, header\n"
        "assert 'fastapi' not in sys.modules, 'fastapi imported'\n"
        "rategate.RateLimit\n"
        "assert 'fastapi' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
