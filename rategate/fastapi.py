"""A FastAPI dependency for per-route limits.

::

    from fastapi import Depends, FastAPI
    import rategate

    limiter = rategate.Limiter("redis://127.0.0.1:6379/0")
    app = FastAPI()

    @app.get("/items/{item_id}", dependencies=[Depends(rategate.RateLimit("10/minute", limiter=limiter))])
    async def item(item_id: int): ...

The counter is per route *template* and method (``GET /items/{item_id}``, not
``/items/42``; under a ``Mount``, with the mount's path in front, and without a
server's ``--root-path``), and per key (the client address by default).  Give ``name=``
to make several routes share one counter.  An allowed request gets the
rate-limit headers on its response (when the endpoint returns data; an
endpoint returning its own ``Response`` object keeps its headers as they are,
which is how FastAPI treats every dependency's headers); a denied one raises
``HTTPException(429)`` with ``Retry-After`` and the same headers, which FastAPI
renders as ``{"detail":"Too Many Requests"}``.

``concurrency=`` (requests of one key in flight) and ``charge=True`` (the
cost the endpoint reports with :func:`rategate.set_cost`, charged after the
response) make it a dependency with ``yield``: the slot is given back, and the
cost charged, in its exit code, which FastAPI runs after the response has been
sent (its whole body, for a streamed one) on FastAPI >= 0.118, also when the
endpoint raised or the client went away.  FastAPI 0.106 to 0.117 ran that
exit code when the endpoint returned, before the response was sent: there a
streamed body runs after the slot is given back, and a cost reported from
inside the stream is not charged.  Do not give such a dependency
``Depends(..., scope="function")``: that also exits before the response.

This module imports FastAPI; the rest of rategate does not need it.  For
WebSocket routes, and for the fastest path, use :class:`RateLimitMiddleware`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
import json
from typing import Any

from fastapi import HTTPException, Request, Response

from .admin import dependency_part, prefixed_key, prefixes
from .counts import counts_for
from .headers import make_headers, retry_after_header
from .keys import client_ip
from .limiter import new_slot_id
from .middleware import (
    DEPENDENCY,
    DONE,
    OPEN,
    R_ADDED,
    R_BEST,
    R_HEADERS,
    R_MODE,
    RECORD_KEY,
    DynamicLimits,
    ShadowLog,
    _check_cost,
    _check_concurrency,
    _check_key,
    _check_metrics,
    _decision_type,
    _dummy_rates,
    charge_reported,
    compile_limits,
    failure_response,
    incidents_of,
    record_add,
    record_find,
    record_new,
    record_offer,
    register,
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
    :class:`rategate.metrics.PrometheusMetrics`, or None.  ``denial_log``:
    as the middleware's (True: enforced denials to the logger
    ``rategate.denials``, rate-limited; False: not logged).  Decisions are
    counted in ``limiter.stats()["rules"]`` (and ``metrics``) under the label
    ``"dep:<name>"``, the name being the route's method and template unless
    given.

    ``concurrency``: at most this many requests of one key in flight at once
    on this route (across every process sharing the store), decided in the
    same store call as the rates (if either denies, neither is consumed; over
    it: 429 with ``qu="concurrent-requests"`` in ``RateLimit-Policy``);
    ``limits`` may then be None.  The slot is given back once the response has
    been sent, or the endpoint raised; ``concurrency_ttl``: seconds a slot of
    a process that died is held (keep it above your slowest request).
    ``charge``: after the response, charge the cost the endpoint reported
    with :func:`rategate.set_cost` (the difference from what the check
    consumed) to the same key and rates, fire and forget.  With either, the
    instance is a dependency with ``yield`` (see the module docstring for
    when FastAPI runs its exit).  ``lease``: answer this route's checks from
    tokens leased from Redis (see :meth:`rategate.Limiter.compile`), for a
    hot key; ``None``: the limiter's ``lease``.  ``failure_status``: the
    status of a request refused because the store failed (closed mode):
    429 (default) or 503, with ``Retry-After: 1`` and no ``RateLimit-*``
    fields.  ``enabled=False``: no check, no header (for tests).

    With a :class:`rategate.RateLimitMiddleware` on the same request, or
    another RateLimit dependency, the checks share a record: a limit already
    checked is not charged again, and the response carries one set of
    rate-limit headers, the most restrictive (see rategate.middleware).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> RateLimit:
        # FastAPI tells a plain dependency from one with yield by the type
        # of __call__: only a limit that holds something past the endpoint
        # pays for the exit stack (the rate-only path stays one await).
        if cls is RateLimit and (kwargs.get("concurrency") or kwargs.get("charge")):
            cls = _HoldingRateLimit
        return super().__new__(cls)

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
        concurrency: int | None = None,
        concurrency_ttl: float = 60.0,
        charge: bool = False,
        lease: bool | None = None,
        failure_status: int = 429,
        enabled: bool = True,
        denial_log: Any = True,
    ) -> None:
        from .denials import denial_log_option
        from .limiter import as_limiter

        self._denial_log = denial_log_option(denial_log, "RateLimit")
        limiter = as_limiter(limiter, "RateLimit")
        if not isinstance(enabled, bool):
            raise TypeError(f"RateLimit: enabled must be True or False, got {enabled!r}")
        self.enabled = enabled
        self.failure_status, fbody, fheaders = failure_response(failure_status, "RateLimit")
        self._failure_detail = json.loads(fbody)["detail"]
        self._failure_headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in fheaders[2:]}
        if not isinstance(charge, bool):
            raise TypeError(f"RateLimit: charge must be True or False, got {charge!r}")
        self.concurrency, self.concurrency_ttl = _check_concurrency(concurrency, concurrency_ttl, "RateLimit")
        if lease is not None and not isinstance(lease, bool):
            raise TypeError(f"RateLimit: lease must be True, False or None, got {lease!r}")
        if lease and self.concurrency:
            raise ValueError("RateLimit: lease=True cannot go with concurrency (a slot is taken in the "
                             "store for every request); drop one of them")
        self.lease = lease
        if self.concurrency and not hasattr(limiter, "_release_held"):
            raise ValueError(f"RateLimit: concurrency needs a rategate.Limiter (with release()), got {limiter!r}")
        if charge and not hasattr(limiter, "charge_nowait"):
            raise ValueError(f"RateLimit: charge=True needs a rategate.Limiter (with charge_nowait()), got {limiter!r}")
        if charge and limits is None:
            raise ValueError(
                "RateLimit: charge=True charges the reported cost to the rates, but limits is None (only "
                "a concurrency limit); give rates like \"100000/day\", or drop charge"
            )
        self.charge = charge
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"RateLimit: name must be a non-empty str, got {name!r}")
        if not isinstance(shadow, bool):
            raise TypeError(f"RateLimit: shadow must be True or False, got {shadow!r}")
        self.limiter = limiter
        self.limits = limits
        self.key = _check_key(key, "RateLimit") or client_ip()
        self._redact = getattr(self.key, "redact", None)
        self.cost = _check_cost(cost, "RateLimit")
        self.name = name
        self.shadow = shadow
        self.metrics = _check_metrics(metrics, "RateLimit")
        self._sync_cached = getattr(limiter, "kind", "memory") not in ("memory", "shm")
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
                self._spec, rates = compile_limits(limiter, limits, self.concurrency, self.concurrency_ttl,
                                                   lease)
            except ValueError as e:
                raise ValueError(f"RateLimit({limits!r}): {e}") from None
        self.rates = rates
        self._header_style = headers
        self.headers = None if self._dynamic else make_headers(headers, rates, name or "default",
                                                                self.concurrency)
        if self.metrics is not None:
            self.metrics.watch(limiter)
        self._Decision: Any = _decision_type()
        # (method, template) -> the counter's prefixes, headers, limits and counts (see _make_prefixes)
        self._prefixes: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._fixed: tuple[Any, ...] | None = None
        if name is not None:
            self._fixed = self._make_prefixes(name)
        self._incidents = incidents_of(limiter)
        self._shadow_log = ShadowLog()

    def __repr__(self) -> str:
        c = f", concurrency={self.concurrency}" if self.concurrency else ""
        c += ", charge=True" if self.charge else ""
        return f"RateLimit({self.limits!r}, name={self.name!r}, headers={self._header_style!r}{c})"

    def _make_prefixes(self, name: str) -> tuple[Any, ...]:
        """(str prefix, bytes prefix, str hashed prefix, bytes hashed prefix,
        headers, DynamicLimits or None, RuleCounts) of the counter ``name``."""
        part = dependency_part(name)
        label = "dep:" + name
        dyn = None
        if self._dynamic:
            hdrs = None
            dyn = DynamicLimits(self.limits, lambda v: self._resolved(name, v), f"RateLimit {name!r}")
        elif self.name is not None:
            hdrs = self.headers
        else:
            hdrs = make_headers(self._header_style, self.rates, name, self.concurrency)
        if not self._dynamic:
            register(self.limiter, label, part, self._spec)
        counts = counts_for(self.limiter, label)
        if self._redact is not None and hasattr(self.limiter, "_redact_keys"):
            self.limiter._redact_keys(part, self._redact)
        if self.metrics is not None:
            self.metrics.attach(counts)
        return (*prefixes(part), hdrs, dyn, counts)

    def _resolved(self, name: str, limits: Any) -> tuple[Any, Any]:
        """(spec, headers) of the rates a limits callable returned for counter ``name``."""
        spec, rates = compile_limits(self.limiter, limits, self.concurrency, self.concurrency_ttl, self.lease)
        register(self.limiter, "dep:" + name, dependency_part(name), spec)
        return spec, make_headers(self._header_style, rates, name, self.concurrency)

    def _prefixes_for(self, scope: Any) -> tuple[Any, ...]:
        k = (scope.get("method", "GET"), route_template(scope))
        p = self._prefixes.get(k)
        if p is None:
            if len(self._prefixes) >= _MAX_ROUTES:  # pragma: no cover - unbounded templates?
                self._prefixes.clear()
            p = self._prefixes[k] = self._make_prefixes(f"{k[0]} {k[1]}")
        return p

    async def __call__(self, request: Request, response: Response) -> None:
        if self.enabled:
            await self._decide(request.scope, response)

    async def _decide(self, scope: Any, response: Response) -> tuple[Any, ...] | None:
        """Check one request: raise HTTPException(429) if denied, add the
        headers to ``response`` if allowed.  None: not limited, or a limit
        already checked for this request (see the record in
        rategate.middleware); else (key, spec, decision, cost, slot id or None)."""
        k = self.key(scope)
        if k is None:
            return None
        p = self._fixed or self._prefixes_for(scope)
        spec, h = self._spec, p[4]
        if p[5] is not None:  # limits from a callable
            r = p[5](scope)
            if r is None:
                return None
            spec, h = r
        k = prefixed_key(k, p[0], p[1], p[2], p[3], "RateLimit")
        state = scope.get("state")
        rec = state.get(RECORD_KEY) if state else None
        if rec is not None:
            seen = record_find(rec, self.limiter, k, spec)
            if seen is not None:  # checked (and charged) by an outer checker
                if not seen.allowed and not self.shadow:
                    self._deny(rec, seen, h)
                self._join(scope, rec, k, spec, seen, h, response, seen=True)
                return None
        cost = self.cost
        if cost is None:
            cost = 1
        elif not isinstance(cost, int):
            cost = cost(scope)
        sid = None
        if self.concurrency:
            sid = new_slot_id()
            d = self._submit(k, spec, cost, sid)
        else:
            d = self._submit(k, spec, cost)
        if type(d) is not self._Decision:
            d = await d
            p[6].note(d, False, self.shadow)
        else:
            p[6].note(d, self._sync_cached, self.shadow)
        if d.error is not None or self._incidents.active:
            self._incidents.note(d)
        if d.allowed or self.shadow:
            if not d.allowed:
                self._shadow_log.note(self.name or "", k, d)
            self._join(scope, rec, k, spec, d, h, response)
            return k, spec, d, cost, sid
        if self._denial_log is not None and d.error is None:
            self._denial_log.note(p[6].name, k, scope.get("path", ""), d.retry_after, self._redact)
        self._deny(rec, d, h)
        return None  # pragma: no cover - _deny raises

    def _join(self, scope: Any, rec: list[Any] | None, k: Any, spec: Any, d: Any, h: Any,
              response: Response, seen: bool = False) -> None:
        """Put an allowed decision in the request's record (``seen``: the
        limit is there already, only offer its headers); render the record's
        headers into ``response`` unless a middleware's send wrapper does (see
        the record in rategate.middleware)."""
        if rec is None:
            rec = record_new(scope, self.limiter, k, spec, d, h)
            changed = True
        elif seen:
            changed = record_offer(rec, d, h)
        else:
            changed = record_add(rec, self.limiter, k, spec, d, h)
        if rec[R_MODE] == OPEN and rec[R_BEST] is not None:
            rec[R_MODE] = DEPENDENCY  # no middleware shows headers: the dependencies do
            changed = True
        if rec[R_MODE] != DEPENDENCY or not changed:
            return
        added = rec[R_ADDED]
        raw = response.raw_headers
        if added is not None and added[0] is response:
            for pair in added[1]:  # an earlier dependency's, less restrictive
                if pair in raw:
                    raw.remove(pair)
        pairs = rec[R_HEADERS].render(rec[R_BEST])
        raw.extend(pairs)
        rec[R_ADDED] = (response, pairs)

    def _deny(self, rec: list[Any] | None, d: Any, h: Any) -> None:
        """Raise the HTTPException of a denial: 429 with its headers, or
        failure_status with Retry-After: 1 for a store failure (closed mode)."""
        if rec is not None:
            rec[R_MODE] = DONE  # the exception's response carries its own headers
        if d.error is not None:
            raise HTTPException(status_code=self.failure_status, detail=self._failure_detail,
                                headers=dict(self._failure_headers))
        pairs = h.render_denied(d) if h is not None else retry_after_header(d)
        raise HTTPException(
            status_code=429,
            detail="Too Many Requests",
            headers={name.decode("latin-1"): value.decode("latin-1") for name, value in pairs},
        )


def route_template(scope: Any) -> str:
    """The dependency's counter of this request: its route's path template
    (``/items/{item_id}``), with the path of the ``Mount`` (if any) it was
    reached through in front, and without the server's root path
    (``uvicorn --root-path``): the routes as the app declares them.  Without a
    route (a dependency called outside routing), the route path itself."""
    root = scope.get("root_path", "")
    app_root = scope.get("app_root_path")
    # Starlette's Mount sets app_root_path (the server's root_path) and puts
    # its own path after it in root_path; without a Mount, root_path is the server's.
    mount = root[len(app_root):] if app_root is not None and root.startswith(app_root) else ""
    template = getattr(scope.get("route"), "path", None)
    if not isinstance(template, str):
        from .middleware import route_path

        return route_path(scope) if not mount else mount + route_path(scope)
    return mount + template


class _HoldingRateLimit(RateLimit):
    """A :class:`RateLimit` with ``concurrency`` or ``charge``: a dependency
    with ``yield``, whose exit (after the response, see the module
    docstring) gives the slot back and charges the reported cost."""

    async def __call__(  # type: ignore[override]  # a yield dependency: FastAPI enters and exits it
        self, request: Request, response: Response
    ) -> AsyncIterator[None]:
        r = await self._decide(request.scope, response) if self.enabled else None
        if r is None:  # not limited, or a limit an outer checker holds and charges
            yield
            return
        k, spec, d, cost, sid = r
        lim = self.limiter
        # Taken only if the store itself allowed it (a failure decision in
        # "open" mode took nothing; shadow mode lets denials through).
        held = sid is not None and d.allowed and d.error is None
        if held:
            lim._took_slot()
        try:
            yield
        finally:
            # Both fire and forget, so they cost the exit no await: FastAPI
            # runs it shielded from cancellation, and a client gone away or
            # an endpoint that raised still gets here.  A cost reported
            # before the endpoint raised was spent: it is charged too.
            if held:
                lim._release_held(k, spec, sid)
            if self.charge:
                state = request.scope.get("state")
                if state:
                    charge_reported(lim, spec, True, d, k, cost, state)
