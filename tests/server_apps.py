"""The same rate-limited app in each framework rategate is run under (for
tests/test_servers.py), each the way that framework adds an ASGI middleware:

    GET /hello    5/minute per client (the middleware's default limit)
    GET /health   exempt

The storage URL comes from RATEGATE_REDIS_URL.  Each app is built when a
server first reads its name (``server_apps:starlette``, ``server_apps:django``
...), in the server's process: importing this module builds nothing.
"""

from __future__ import annotations

import os
from typing import Any

import rategate

LIMITS = "5/minute"
EXEMPT = ["/health"]


def _limiter() -> rategate.Limiter:
    return rategate.Limiter(os.environ["RATEGATE_REDIS_URL"])


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/hello", hello), Route("/health", hello)])
    app.add_middleware(rategate.RateLimitMiddleware, limiter=_limiter(), limits=LIMITS, exempt=EXEMPT)
    return app


def fastapi_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/hello")
    async def hello() -> str:
        return "hello"

    @app.get("/health")
    async def health() -> str:
        return "ok"

    app.add_middleware(rategate.RateLimitMiddleware, limiter=_limiter(), limits=LIMITS, exempt=EXEMPT)
    return app


def litestar_app() -> Any:
    # Litestar's own middleware (DefineMiddleware) runs per route, after routing,
    # and never sees the lifespan: connect from on_startup instead.
    from litestar import Litestar, get
    from litestar.middleware import DefineMiddleware

    @get("/hello")
    async def hello() -> str:
        return "hello"

    @get("/health")
    async def health() -> str:
        return "ok"

    lim = _limiter()
    return Litestar(route_handlers=[hello, health], on_startup=[lim.connect],
                    middleware=[DefineMiddleware(rategate.RateLimitMiddleware, limiter=lim, limits=LIMITS,
                                                 exempt=EXEMPT)])


def quart_app() -> Any:
    # Quart's documented way: wrap app.asgi_app (the lifespan goes through it).
    from quart import Quart

    app = Quart(__name__)

    @app.get("/hello")
    async def hello() -> str:
        return "hello"

    @app.get("/health")
    async def health() -> str:
        return "ok"

    app.asgi_app = rategate.RateLimitMiddleware(app.asgi_app, limiter=_limiter(),  # type: ignore[method-assign]
                                                limits=LIMITS, exempt=EXEMPT)
    return app


def django_app() -> Any:
    # Django's ASGI handler has no middleware of this kind and refuses the
    # lifespan (it raises): wrap it.  The middleware still connects at startup.
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, SECRET_KEY="test only",
                           MIDDLEWARE=[], INSTALLED_APPS=[], USE_TZ=True)
    django.setup()
    from django.core.asgi import get_asgi_application

    return rategate.RateLimitMiddleware(get_asgi_application(), limiter=_limiter(), limits=LIMITS,
                                        exempt=EXEMPT)


def bad_app() -> Any:
    """A configuration mistake: Starlette raises it when it builds its stack (the lifespan startup)."""
    from starlette.applications import Starlette

    app = Starlette()
    app.add_middleware(rategate.RateLimitMiddleware, limiter="memory://", limits="1/minute", headers="draft-7")
    return app


def _urlpatterns() -> list[Any]:
    from django.http import HttpResponse
    from django.urls import path

    async def hello(request: Any) -> Any:
        return HttpResponse("hello")

    return [path("hello", hello), path("health", hello)]


_FACTORIES = {"starlette": starlette_app, "fastapi": fastapi_app, "litestar": litestar_app, "quart": quart_app,
              "django": django_app, "bad": bad_app}
_built: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name == "urlpatterns":  # Django's ROOT_URLCONF
        return _urlpatterns()
    if name in _FACTORIES:
        if name not in _built:
            _built[name] = _FACTORIES[name]()
        return _built[name]
    raise AttributeError(f"module 'server_apps' has no attribute {name!r}")
