"""A FastAPI dependency for per-route limits.

::

    from fastapi import Depends, FastAPI
    import rategate

    limiter = rategate.Limiter("redis://127.0.0.1:6379/0")
    app = FastAPI()

    @app.get("/items/{item_id}", dependencies=[Depends(rategate.RateLimit("10/minute", limiter=limiter))])
    async def item(item_id: int): ...

The counter is per route *template* and method (``GET /items/{item_id}``, not
``/items/42``), and per key (the client address by default).  Give ``name=``
to make several routes share one counter.  An allowed request gets the
rate-limit headers on its response (when the endpoint returns data; an
endpoint returning its own ``Response`` object keeps its headers as they are,
which is how FastAPI treats every dependency's headers); a denied one raises
``HTTPException(429)`` with ``Retry-After`` and the same headers, which FastAPI
renders as ``{"detail":"Too Many Requests"}``.

This module imports FastAPI; the rest of rategate does not need it.  For
WebSocket routes, and for the fastest path, use :class:`RateLimitMiddleware`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request, Response

from .counts import counts_for
from .headers import make_headers, retry_after_header
from .keys import client_ip
from .middleware import (
    _NAME_ESCAPES,
    DynamicLimits,
    FailureLog,
    ShadowLog,
    _check_cost,
    _check_key,
    _check_metrics,
    _decision_type,
    _dummy_rates,
    compile_limits,
    prefixed_key,
)

__all__ = ["RateLimit"]

_MAX_ROUTES = 4096


class RateLimit:
    """``Depends(RateLimit("10/minute", limiter=...))``: limit one route.

    ``limits``: rates (``"10/minute; 200/day"``, a ``Rate`` or a list), or a
    callable ``(scope) -> rates | None`` for limits that depend on the request
    (``None``: not limited; see :class:`rategate.middleware.DynamicLimits`).
    ``limiter``: a :class:`rategate.Limiter` or a storage URL.  ``key``: a key
    function (default :func:`rategate.client_ip` with no trusted proxies;
    returning ``None`` skips the limit).  ``cost``: int or callable(scope) ->
    int.  ``headers``: ``"draft-6"`` (default), ``"draft-11"``,
    ``"x-ratelimit"`` or ``None``.  ``name``: share one counter between the
    routes that give the same name (default: the route's method and template).
    ``shadow``: count and log, never raise.  ``metrics``: a
    :class:`rategate.metrics.PrometheusMetrics`, or None.  Decisions are
    counted in ``limiter.stats()["rules"]`` (and ``metrics``) under the label
    ``"dep:<name>"``, the name being the route's method and template unless
    given.
    """

    def __init__(
        self,
        limits: Any,
        *,
        limiter: Any,
        key: Callable[..., Any] | None = None,
        cost: int | Callable[..., int] | None = None,
        headers: str | None = "draft-6",
        name: str | None = None,
        shadow: bool = False,
        metrics: Any = None,
    ) -> None:
        from .limiter import as_limiter

        limiter = as_limiter(limiter, "RateLimit")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"RateLimit: name must be a non-empty str, got {name!r}")
        if not isinstance(shadow, bool):
            raise TypeError(f"RateLimit: shadow must be True or False, got {shadow!r}")
        self.limiter = limiter
        self.limits = limits
        self.key = _check_key(key, "RateLimit") or client_ip()
        self.cost = _check_cost(cost, "RateLimit")
        self.name = name
        self.shadow = shadow
        self.metrics = _check_metrics(metrics, "RateLimit")
        self._sync_cached = getattr(limiter, "kind", "memory") != "memory"
        if hasattr(limiter, "compile") and hasattr(limiter, "submit"):
            self._submit = limiter.submit
        else:
            self._submit = limiter.hit
        self._dynamic = callable(limits)
        if self._dynamic:
            rates: tuple[Any, ...] = ()
            self._spec = None
            make_headers(headers, _dummy_rates())  # validate the style now
        else:
            try:
                self._spec, rates = compile_limits(limiter, limits)
            except ValueError as e:
                raise ValueError(f"RateLimit({limits!r}): {e}") from None
        self.rates = rates
        self._header_style = headers
        self.headers = None if self._dynamic else make_headers(headers, rates, name or "default")
        if self.metrics is not None:
            self.metrics.watch(limiter)
        self._Decision = _decision_type()
        # (method, template) -> the counter's prefixes, headers, limits and counts (see _make_prefixes)
        self._prefixes: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._fixed: tuple[Any, ...] | None = None
        if name is not None:
            self._fixed = self._make_prefixes(name)
        self._failures = FailureLog(cause=getattr(limiter, "stats", None))
        self._shadow_log = ShadowLog()

    def __repr__(self) -> str:
        return f"RateLimit({self.limits!r}, name={self.name!r}, headers={self._header_style!r})"

    def _make_prefixes(self, name: str) -> tuple[Any, ...]:
        """(str prefix, bytes prefix, str hashed prefix, bytes hashed prefix,
        headers, DynamicLimits or None, RuleCounts) of the counter ``name``."""
        esc = "dep:" + name.translate(_NAME_ESCAPES)
        dyn = None
        if self._dynamic:
            hdrs = None
            dyn = DynamicLimits(self.limits, lambda v: self._resolved(name, v), f"RateLimit {name!r}")
        elif self.name is not None:
            hdrs = self.headers
        else:
            hdrs = make_headers(self._header_style, self.rates, name)
        counts = counts_for(self.limiter, "dep:" + name)
        if self.metrics is not None:
            self.metrics.attach(counts)
        return (esc + "|", (esc + "|").encode("utf-8", "surrogatepass"),
                esc + "#", (esc + "#").encode("utf-8", "surrogatepass"), hdrs, dyn, counts)

    def _resolved(self, name: str, limits: Any) -> tuple[Any, Any]:
        """(spec, headers) of the rates a limits callable returned for counter ``name``."""
        spec, rates = compile_limits(self.limiter, limits)
        return spec, make_headers(self._header_style, rates, name)

    def _prefixes_for(self, scope: Any) -> tuple[Any, ...]:
        route = scope.get("route")
        template = getattr(route, "path", None) or scope.get("path", "")
        template = scope.get("root_path", "") + template
        k = (scope.get("method", "GET"), template)
        p = self._prefixes.get(k)
        if p is None:
            if len(self._prefixes) >= _MAX_ROUTES:  # pragma: no cover - unbounded templates?
                self._prefixes.clear()
            p = self._prefixes[k] = self._make_prefixes(f"{k[0]} {template}")
        return p

    async def __call__(self, request: Request, response: Response) -> None:
        scope = request.scope
        k = self.key(scope)
        if k is None:
            return
        p = self._fixed or self._prefixes_for(scope)
        spec, h = self._spec, p[4]
        if p[5] is not None:  # limits from a callable
            r = p[5](scope)
            if r is None:
                return
            spec, h = r
        k = prefixed_key(k, p[0], p[1], p[2], p[3], "RateLimit")
        cost = self.cost
        if cost is None:
            cost = 1
        elif not isinstance(cost, int):
            cost = cost(scope)
        d = self._submit(k, spec, cost)
        if type(d) is not self._Decision:
            d = await d
            p[6].note(d, False, self.shadow)
        else:
            p[6].note(d, self._sync_cached, self.shadow)
        err = d.error
        if err is not None or self._failures.active:
            self._failures.note(d)
        if d.allowed or self.shadow:
            if not d.allowed:
                self._shadow_log.note(self.name or "", k, d)
            if h is not None and err is None:  # a failure in "open" mode knows no counts
                response.raw_headers.extend(h.render(d))
            return
        pairs = h.render_denied(d) if h is not None else retry_after_header(d)
        raise HTTPException(
            status_code=429,
            detail="Too Many Requests",
            headers={name.decode("latin-1"): value.decode("latin-1") for name, value in pairs},
        )
