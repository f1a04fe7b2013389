"""RateLimitMiddleware: a pure ASGI rate-limiting middleware.

::

    app.add_middleware(
        rategate.RateLimitMiddleware,
        limiter="redis://127.0.0.1:6379/0",     # a Limiter, or a storage URL
        limits="100/minute",                     # default for every path; None: rules only
        rules={"/api/chat": "10/minute; 200/day", "POST /login": "5/minute"},
        key=rategate.client_ip(trusted_proxies=["10.0.0.0/8"]),
        exempt=["/health", "/metrics"],
        headers="draft-6",                       # "draft-6" | "draft-11" | "x-ratelimit" | None
        websocket_messages="20/second",          # each received WebSocket message, per key
        metrics=rategate.metrics.PrometheusMetrics(),  # optional: pip install rategate[prometheus]
    )

``limits`` (the default's and a rule's) may also be a callable
``(scope) -> rates | None``, for limits that depend on the request (the
caller's plan): see :class:`DynamicLimits`.

Why it is written the way it is:

- Pure ASGI (no ``BaseHTTPMiddleware``, which costs most of an app's
  throughput): ``__init__`` resolves everything that can be resolved once
  (rates compiled by the limiter, header policies rendered, key prefixes
  built), and ``__call__`` does a set look-up for exempt paths, a dict look-up
  for the rule of a path (cached, bounded), the key function, and one
  ``limiter.submit()``.  A key the core already knows to be over its limit is
  answered synchronously from its local cache, so a flood of 429s never
  suspends the request's task.
- ``send`` is wrapped only when headers must be added to a response that the
  app produces; the app's header list is copied, never mutated in place (an
  app may send the same Response object twice).
- A denied request gets its 429 without the app being called and without
  its body being read.
- Configuration mistakes raise ``ValueError``/``TypeError`` from
  ``__init__``.  Note that Starlette and FastAPI build their middleware stack
  (and so call ``__init__``) on the first ASGI event, which under uvicorn is
  the lifespan startup, not at ``add_middleware()`` time.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from http import HTTPStatus
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union

from .admin import MESSAGES_PREFIX, NAME_ESCAPES, prefixed_key, rule_part
from .counts import RuleCounts, counts_for
from .denials import denial_log_option
from .headers import RateLimitHeaders, make_headers, retry_after_header
from .incidents import IncidentLog
from .keys import client_ip, header, key_digest
from .limiter import new_slot_id, shown_url

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import Message, Receive, Scope, Send

__all__ = ["COST_KEY", "RECORD_KEY", "DynamicLimits", "RateLimitMiddleware", "Rule", "ShadowLog", "route_path",
           "set_cost"]

logger = logging.getLogger("rategate")

# The 429 every denial answers with.
DENIED_BODY = b'{"detail":"Too Many Requests"}'
_DENIED_BASE = (
    (b"content-type", b"application/json"),
    (b"content-length", str(len(DENIED_BODY)).encode()),
)
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
# A "METHOD[,METHOD...] /path" rule key.
_METHOD_RULE_RE = re.compile(r"^\s*([A-Za-z]+(?:\s*[,|]\s*[A-Za-z]+)*)\s+(/\S*)\s*$")

# The routing cache (path -> rule) is cleared when it reaches this size: an
# attacker walking random paths costs recomputation, never memory.
_ROUTE_CACHE_MAX = 4096
# Shadow-mode "would deny" log lines remember this many keys.
_SHADOW_LOG_MAX = 4096
# A limits callable's results, compiled, are cached up to this many per rule
# (the oldest is dropped first): a plan lookup costs a dict look-up per
# request, and a callable returning endless distinct rates costs a compile
# per request, never memory.
_DYNAMIC_MAX = 1024

# A rule's name goes into the store key as "<name>|<client key>" (or
# "<name>#<digest>" for a hashed client key), escaped: rategate.admin holds
# the layout (and the FastAPI dependency imports the escapes from here).
_NAME_ESCAPES = NAME_ESCAPES
_WS_ACTIONS = ("close", "drop")
# The options a rule takes (Rule's keyword arguments; a rules dict's keys).
_RULE_OPTIONS = ("limits", "methods", "key", "cost", "name", "websocket_messages", "websocket_over_limit",
                 "concurrency", "concurrency_ttl", "charge", "lease")
# Where the app reports the actual cost of the response it produces (see
# set_cost): scope["state"][COST_KEY], i.e. request.state's "rategate.cost".
COST_KEY = "rategate.cost"
_DISCONNECTS = frozenset({"http.disconnect", "websocket.disconnect"})

RateSpec = Any  # str | Rate | list of them (see rategate.rates.parse_rates)
# What the middleware wraps, for type checkers: any ASGI app.  Starlette,
# Litestar, Quart (hypercorn's types) and Django each type scopes and messages
# their own way; the middleware takes and is an app of any of them.
AnyASGIApp = Callable[[Any, Any, Any], Awaitable[Any]]

# RATEGATE_PYTHON_PATH=1 in the environment (read once, at import) turns the
# request path in C (rategate._core.Gate, csrc/pygate.c) off: every request
# then takes the Python code below, the reference the C path is tested
# against (tests/test_gate.py).  The escape hatch if the C path is ever
# suspected; docs/how-it-works.md.
PYTHON_PATH = os.environ.get("RATEGATE_PYTHON_PATH", "").strip().lower() not in ("", "0", "false", "no", "off")


_DYNAMIC = object()  # Rule.spec of a rule whose limits are a callable (see Rule.dynamic)
_SEEN = object()  # _check()'s slot id: the limit is in the request's record already
# The messages that start a response, where the rate-limit headers go.
_HTTP_START = frozenset({"http.response.start"})
_WS_START = frozenset({"websocket.accept", "websocket.http.response.start"})


def route_path(scope: Scope) -> str:
    """The path the app routes on: ``scope["path"]`` without ``scope["root_path"]``
    (which a server's ``--root-path`` or a Starlette ``Mount`` put there), as
    Starlette's router matches it (``starlette._utils.get_route_path``), but
    ``"/"`` where that gives ``""``.  Rules and ``exempt`` are matched against it.
    """
    path: str = scope["path"]
    root = scope.get("root_path")
    if root and path.startswith(root):
        n = len(root)
        if len(path) == n:
            return "/"
        if path[n] == "/":
            return path[n:]
    return path or "/"


# -- one request, several checkers: the per-request record (Seam 4) ---------------------
#
# A request may meet several rategate checkers: nested middlewares (an app's
# and a mounted sub-app's), a middleware and FastAPI dependencies, two
# dependencies.  They share one record, a list kept in scope["state"] under
# RECORD_KEY (scope["state"] is created if the server gave none; a Starlette
# Mount and every middleware pass the same dict on), so that:
#
# - a limit already checked for this request is not charged again: a limit is
#   (limiter, store key, spec), the same limiter object, an equal store key
#   (as given to submit: "default|203.0.113.9"), and the same Spec object or
#   one with equal rates and concurrency; a checker that meets it uses the
#   recorded decision (no store call, no counting, no log, no slot, no charge;
#   the first checker's cost and charge= apply), applies its own verdict (its
#   shadow=), and offers its own renderer for the headers (record_offer);
# - a different limit is checked and joins the record;
# - the response carries one set of rate-limit headers: those of the most
#   restrictive decision among the record's entries that have headers to show
#   (a renderer, i.e. headers= not None, and no error: a failure in "open" mode
#   knows no counts).  Most restrictive: a denial (shadow mode lets one
#   through) over an allowance; between denials the longer retry_after; between
#   allowances the fewer remaining; on a tie, the one recorded first.
#
# The record, index by index (a list: cheap to make, simple to mirror in C):
#
#   [R_BEST]     the Decision whose headers the response carries, or None
#   [R_HEADERS]  its RateLimitHeaders (its renderer), or None
#   [R_MODE]     who puts the headers on the response:
#                  OPEN        nobody yet: the next checker with headers to show
#                              takes it (a middleware wraps send: WRAPPED; a
#                              dependency renders into its response: DEPENDENCY)
#                  WRAPPED     a middleware's send wrapper renders R_BEST at the
#                              response's start message (http.response.start,
#                              websocket.accept, websocket.http.response.start),
#                              then sets DONE
#                  DEPENDENCY  each FastAPI dependency renders R_BEST into its
#                              Response (replacing R_ADDED, what an earlier one
#                              added, when R_BEST changed)
#                  DONE        the response has its headers: rendered, or a denial
#                              (429 or failure_status) answered with its own
#                              headers by the checker that denied; nothing is added
#   [R_ADDED]    DEPENDENCY mode: (the Response, the header list rendered into it)
#   [R_ENTRIES:] four items per limit checked, in order: limiter, store key,
#                Spec, Decision
#
# The first checker makes the record when it allows the request (a denial
# answers at once: no later checker runs); a checker that denies sets DONE on
# a record that exists.  The common case, one middleware and one rule, costs
# one list, a dict store and the send wrapper it always needed (inlined in
# RateLimitMiddleware.__call__; measured with bench/middleware_cost.py and
# callgrind: no more instructions per request than before the record).
# csrc/gate.c mirrors these functions (record_new, record_find, record_offer,
# record_add, more_restrictive, _rendering and RateLimitMiddleware._join) and
# must give byte-identical responses; it reads and writes the same list, so a
# C checker and a Python one (a dependency) share a request.
RECORD_KEY = "rategate.record"
R_BEST, R_HEADERS, R_MODE, R_ADDED, R_ENTRIES = 0, 1, 2, 3, 4
OPEN, WRAPPED, DEPENDENCY, DONE = 0, 1, 2, 3


def record_of(scope: Scope) -> list[Any] | None:
    """The request's record, or None (no checker has allowed it yet)."""
    state = scope.get("state")
    return state.get(RECORD_KEY) if state else None


def record_new(scope: Scope, limiter: Any, key: Any, spec: Any, d: Any, h: RateLimitHeaders | None) -> list[Any]:
    """The record of a request whose first limit is (limiter, key, spec),
    decided ``d`` with renderer ``h``; stored in scope["state"]."""
    rec: list[Any] = [None, None, OPEN, None, limiter, key, spec, d]
    if h is not None and d.error is None:
        rec[R_BEST] = d
        rec[R_HEADERS] = h
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    state[RECORD_KEY] = rec
    return rec


def record_find(rec: list[Any], limiter: Any, key: Any, spec: Any) -> Any:
    """The Decision recorded for the limit (limiter, key, spec), or None."""
    i, n = R_ENTRIES, len(rec)
    while i < n:
        if rec[i] is limiter and rec[i + 1] == key:
            s = rec[i + 2]
            if s is spec or (s.rates == spec.rates and s.concurrency == spec.concurrency):
                return rec[i + 3]
        i += 4
    return None


def more_restrictive(d: Any, best: Any) -> bool:
    """Whether ``d`` carries the headers rather than ``best`` (None: nothing yet)."""
    if best is None:
        return True
    if d.allowed != best.allowed:
        return not d.allowed
    if not d.allowed:
        return bool(d.retry_after > best.retry_after)
    return bool(d.remaining < best.remaining)


def record_offer(rec: list[Any], d: Any, h: RateLimitHeaders | None) -> bool:
    """Offer decision ``d`` with renderer ``h`` for the response's headers;
    True if they became the response's (the most restrictive so far)."""
    if h is not None and d.error is None and more_restrictive(d, rec[R_BEST]):
        rec[R_BEST] = d
        rec[R_HEADERS] = h
        return True
    return False


def record_add(rec: list[Any], limiter: Any, key: Any, spec: Any, d: Any, h: RateLimitHeaders | None) -> bool:
    """Add the limit (limiter, key, spec) decided ``d`` and offer its headers
    (renderer ``h``); True if they became the response's.  A checker that
    meets a limit already recorded only offers its renderer (record_offer):
    an outer checker with ``headers=None`` leaves the choice to an inner one."""
    rec += (limiter, key, spec, d)
    return record_offer(rec, d, h)


def _rendering(rec: list[Any], send: Send, starts: frozenset[str]) -> Send:
    """``send``, adding the record's headers to the message that starts the
    response (WRAPPED mode; see the record above).  The app's header list is
    copied, never edited in place: an app may send the same Response twice."""

    async def send_with_headers(message: Message) -> None:
        if rec[R_MODE] == WRAPPED and message["type"] in starts:
            rec[R_MODE] = DONE
            d = rec[R_BEST]
            if d is not None:
                message["headers"] = [*message.get("headers", ()), *rec[R_HEADERS].render(d)]
        await send(message)

    return send_with_headers


class _Pass:
    """The routing result "not limited" (exempt rule, or no rule and no default)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<not limited>"


_PASS = _Pass()


def _normalize_methods(methods: Iterable[str] | str | None, where: str) -> frozenset[str] | None:
    if methods is None:
        return None
    if isinstance(methods, str):
        methods = re.split(r"[\s,|]+", methods.strip())
    out = set()
    for m in methods:
        if not isinstance(m, str) or not m.strip():
            raise ValueError(f"{where}: methods must be HTTP method names like \"POST\", got {m!r}")
        m = m.strip().upper()
        if m not in _HTTP_METHODS:
            raise ValueError(
                f"{where}: unknown HTTP method {m!r}; use {', '.join(sorted(_HTTP_METHODS))}"
            )
        out.add(m)
    if not out:
        raise ValueError(f"{where}: methods is empty; leave it out (None) to match every method")
    if "GET" in out:
        out.add("HEAD")  # as Starlette does: a GET route answers HEAD too, limit both
    return frozenset(out)


def _check_key(key: Any, where: str) -> Any:
    if key is not None and not callable(key):
        raise TypeError(
            f"{where}: key must be a callable(scope) -> str | bytes | None, such as "
            f"rategate.client_ip() or rategate.header(\"x-api-key\"), got {key!r}"
        )
    return key


def _check_cost(cost: Any, where: str) -> Any:
    if cost is None or callable(cost):
        return cost
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        raise ValueError(f"{where}: cost must be an int >= 0 or a callable(scope) -> int, got {cost!r}")
    return cost


def set_cost(request_or_scope: Any, cost: int) -> None:
    """Report the actual cost of the response being produced (for example the
    tokens an LLM call used), from inside the app.

    ``request_or_scope``: a Starlette/FastAPI ``Request`` (or WebSocket), or
    the ASGI scope.  After the response has been sent (a streamed response:
    when its stream ends), :class:`RateLimitMiddleware` charges the
    difference between ``cost`` and what the request's check consumed to the
    same key and rates (``Limiter.charge``: it may put the bucket into debt,
    or refund), off the request's critical path.  Setting it again replaces
    the value.  It lives in ``scope["state"]["rategate.cost"]``.
    """
    if isinstance(cost, bool) or not isinstance(cost, int) or abs(cost) > 2**53:
        raise ValueError(f"set_cost: cost must be an int (tokens), got {cost!r}")
    scope = getattr(request_or_scope, "scope", request_or_scope)
    if not isinstance(scope, dict):
        raise TypeError(f"set_cost takes a Request or an ASGI scope, got {type(request_or_scope).__name__}")
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    state[COST_KEY] = cost


def charge_reported(limiter: Any, spec: Any, rates: Any, d: Any, key: str | bytes, cost: int, state: Any) -> None:
    """Charge the difference between the cost the app reported (:func:`set_cost`,
    in ``state``) and what the check ``d`` consumed (``cost``; nothing if it
    was denied or failed) to ``key``'s buckets of ``spec``, fire and forget:
    the response has been sent.  Nothing when no int was reported, when
    ``rates`` is empty (only a concurrency limit) or ``limiter`` cannot
    charge.  Shared by the middleware and the FastAPI dependency."""
    actual = state.get(COST_KEY)
    charge = getattr(limiter, "charge_nowait", None)
    if isinstance(actual, bool) or not isinstance(actual, int) or not rates or charge is None:
        return
    diff = actual - (cost if d.allowed and d.error is None else 0)
    if diff:
        charge(key, spec, diff)


def _check_concurrency(value: Any, ttl: Any, where: str) -> tuple[int, float]:
    if value is None:
        return 0, 60.0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: concurrency must be an int >= 1 (requests in flight per key), got {value!r}")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0.001 <= ttl <= 86400:
        raise ValueError(
            f"{where}: concurrency_ttl must be a number of seconds from 0.001 to 86400 (how long a "
            f"crashed process may hold a slot), got {ttl!r}"
        )
    return value, float(ttl)


def _check_ws_messages(value: Any, where: str, rule_level: bool) -> Any:
    if value is None or (rule_level and value is False):
        return value
    if callable(value) or isinstance(value, bool):
        off = " (False: not limited on this rule; None: the middleware's)" if rule_level else ""
        raise TypeError(
            f"{where}: websocket_messages must be rates like \"20/second\"{off}, got {value!r}"
        )
    return value


def _check_ws_action(value: Any, where: str) -> Any:
    if value is not None and value not in _WS_ACTIONS:
        raise ValueError(
            f"{where}: websocket_over_limit must be \"close\" (close the connection with 1008) or "
            f"\"drop\" (drop the message), got {value!r}"
        )
    return value


class DynamicLimits:
    """Limits that depend on the request: ``fn(scope) -> rates | None``.

    ``fn`` returns rates (``"10/minute"``, a ``Rate``, a list of them, or a
    compiled ``Spec``) or ``None`` (this request is not limited).  What it
    returns is compiled once, by ``make``, and cached (at most _DYNAMIC_MAX
    values, the oldest dropped first), so after the first request of each
    plan a call costs ``fn`` and a dict look-up.  Return the same objects
    (module-level constants) rather than building new strings per request.

    Each distinct rate has its own counter in the store (the rate is part of
    the Redis key): a client moving from one plan to another starts the new
    plan with a full bucket.
    """

    __slots__ = ("fn", "make", "cache", "where")

    def __init__(self, fn: Callable[[Any], Any], make: Callable[[Any], Any], where: str) -> None:
        self.fn = fn
        self.make = make
        self.cache: dict[Any, Any] = {}
        self.where = where

    def __repr__(self) -> str:
        return f"DynamicLimits({self.fn!r})"

    def __call__(self, scope: Any) -> Any:
        """``make(rates)`` for this request (cached), or None: not limited."""
        v = self.fn(scope)
        if v is None:
            return None
        try:
            return self.cache[v]
        except KeyError:
            key = v
        except TypeError:  # unhashable: a list of rates
            key = tuple(v) if isinstance(v, list) else None
            if key is not None:
                hit = self.cache.get(key)
                if hit is not None:
                    return hit
        try:
            out = self.make(v)
        except ValueError as e:
            raise ValueError(
                f"{self.where}: the limits function returned {v!r}: {e}; return rates like "
                "\"10/minute\", a Rate, a list of them, or None (not limited)"
            ) from None
        cache = self.cache
        if key is not None:
            if len(cache) >= _DYNAMIC_MAX:
                try:
                    del cache[next(iter(cache))]
                except (StopIteration, KeyError):  # a request in another thread evicted it first
                    pass
            cache[key] = out
        return out


class Rule:
    """Where a limit applies, what it is, and whom it counts.

    ``path``: a path prefix (``"/api"`` covers ``/api`` and ``/api/...`` but
    not ``/apiary``; ``"/"`` covers everything), or a compiled regular
    expression (matched with ``pattern.match(path)``, i.e. anchored at the
    start).  ``limits``: rates (``"10/minute; 200/day"``, a ``Rate``, a list),
    or ``None`` to leave matching requests unlimited, or a callable
    ``(scope) -> rates | None`` for limits that depend on the request (see
    :class:`DynamicLimits`).  ``methods``: only these
    HTTP methods (``GET`` implies ``HEAD``; a WebSocket handshake counts as
    ``GET``).  ``key`` and ``cost`` override the middleware's.  ``name`` is the
    rule's part of the Redis key and its header policy name; by default the
    rule as written (``"POST /login"``), so two processes with the same rules
    share counters.  ``websocket_messages``: rates for each message a
    WebSocket client sends, on the handshake's key (``None``: the
    middleware's; ``False``: not limited); ``websocket_over_limit``:
    ``"close"`` (1008) or ``"drop"`` (``None``: the middleware's).
    ``concurrency``: at most this many requests of one key in flight at once
    (across every process sharing the store); over it, a 429 at once (its
    ``RateLimit-Policy`` says ``qu="concurrent-requests"``).  Decided in the
    same store call as the rates: if either denies, neither is consumed.
    The slot is given back when the response ends, the client disconnects or
    the app raises; one held by a process that died expires after
    ``concurrency_ttl`` seconds (keep it above your slowest request).
    ``limits`` may be None with a concurrency limit.
    ``charge``: after the response, charge the actual cost the app reported
    with :func:`set_cost` (the difference from what the check consumed) to
    this rule's rates (``None``: the middleware's ``charge``).
    ``lease``: answer this rule's checks from tokens leased from Redis (see
    :meth:`rategate.Limiter.compile`), for a hot key such as one global
    limit; ``None``: the limiter's ``lease``.
    """

    __slots__ = ("path", "regex", "limits", "methods", "key", "cost", "name", "spec", "headers",
                 "sprefix", "bprefix", "shprefix", "bhprefix", "rates", "dynamic", "counts",
                 "ws_limits", "ws_action", "ws_rule", "concurrency", "concurrency_ttl", "charge",
                 "lease", "redact")

    def __init__(
        self,
        path: str | re.Pattern[str],
        limits: RateSpec | None,
        *,
        methods: Iterable[str] | str | None = None,
        key: Callable[..., Any] | None = None,
        cost: int | Callable[..., int] | None = None,
        name: str | None = None,
        websocket_messages: RateSpec | None = None,
        websocket_over_limit: str | None = None,
        concurrency: int | None = None,
        concurrency_ttl: float = 60.0,
        charge: bool | None = None,
        lease: bool | None = None,
    ) -> None:
        where = f"rule {path!r}"
        if charge is not None and not isinstance(charge, bool):
            raise TypeError(f"{where}: charge must be True, False or None, got {charge!r}")
        self.charge = charge
        self.concurrency, self.concurrency_ttl = _check_concurrency(concurrency, concurrency_ttl, where)
        if lease is not None and not isinstance(lease, bool):
            raise TypeError(f"{where}: lease must be True, False or None, got {lease!r}")
        if lease and self.concurrency:
            raise ValueError(f"{where}: lease=True cannot go with concurrency (a slot is taken in the "
                             "store for every request); drop one of them")
        self.lease = lease
        self.regex: re.Pattern[str] | None = None
        if isinstance(path, re.Pattern):
            if not isinstance(path.pattern, str):
                raise ValueError(f"{where}: the regular expression must be of str, not bytes")
            self.regex = path
        elif isinstance(path, str):
            if not path.startswith("/"):
                raise ValueError(
                    f"{where}: a path prefix starts with '/' (like \"/api\"); "
                    "for a regular expression pass re.compile(...)"
                )
        else:
            raise ValueError(f"{where}: path must be a str prefix like \"/api\" or a compiled re.Pattern")
        self.path = path
        self.limits = limits
        self.methods = _normalize_methods(methods, where)
        self.key = _check_key(key, where)
        self.cost = _check_cost(cost, where)
        self.ws_limits = _check_ws_messages(websocket_messages, where, True)
        self.ws_action = _check_ws_action(websocket_over_limit, where)
        if self.ws_limits and limits is None:
            raise ValueError(
                f"{where}: websocket_messages needs limits on the handshake too (limits=None leaves "
                "the route unlimited); give the handshake a limit, such as \"60/minute\""
            )
        if name is None:
            text = path.pattern if isinstance(path, re.Pattern) else path
            if self.methods is not None:
                shown = sorted(self.methods - {"HEAD"} if "GET" in self.methods else self.methods)
                text = ",".join(shown) + " " + text
            name = text
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: name must be a non-empty str, got {name!r}")
        self.name = name
        # Filled in by the middleware.
        self.spec: Any = None
        self.rates: tuple[Any, ...] = ()
        self.headers: RateLimitHeaders | None = None
        self.sprefix = self.shprefix = ""
        self.bprefix = self.bhprefix = b""
        self.dynamic: DynamicLimits | None = None  # set when limits is a callable
        self.counts: RuleCounts | None = None
        self.ws_rule: Rule | None = None  # the rule of its WebSocket messages
        self.redact: Any = None  # the key function's redact (rategate.denials), if any

    def __repr__(self) -> str:
        p = f"re.compile({self.regex.pattern!r})" if self.regex is not None else repr(self.path)
        m = "" if self.methods is None else f", methods={sorted(self.methods)!r}"
        c = f", concurrency={self.concurrency}" if self.concurrency else ""
        return f"Rule({p}, {self.limits!r}{m}{c}, name={self.name!r})"

    def set_prefixes(self, name: str) -> None:
        """The key prefixes of this rule, from its escaped (namespaced) name."""
        self.sprefix = name + "|"
        self.shprefix = name + "#"
        self.bprefix = self.sprefix.encode("utf-8", "surrogatepass")
        self.bhprefix = self.shprefix.encode("utf-8", "surrogatepass")

    def _matches_path(self, path: str) -> bool:
        if self.regex is not None:
            return self.regex.match(path) is not None
        p = self.path
        assert isinstance(p, str)
        if p.endswith("/"):
            return path.startswith(p)
        return path == p or path.startswith(p + "/")


def _rules_from(rules: Any) -> list[Rule]:
    """Rules from a dict {path-or-pattern: limits | None | {options}} or a list of Rule."""
    if rules is None:
        return []
    out: list[Rule] = []
    if isinstance(rules, Mapping):
        for where, value in rules.items():
            methods = None
            path = where
            if isinstance(where, str):
                if not where.startswith("/"):
                    m = _METHOD_RULE_RE.match(where)
                    if m is None:
                        raise ValueError(
                            f"rule {where!r}: write a path prefix like \"/api\", methods and a path like "
                            "\"POST /login\", or use re.compile(...) for a regular expression"
                        )
                    methods, path = m.group(1), m.group(2)
            if isinstance(value, Rule):
                raise ValueError(f"rule {where!r}: pass Rule objects in a list, not as dict values")
            if isinstance(value, Mapping):
                opts = dict(value)
                unknown = set(opts) - set(_RULE_OPTIONS)
                if unknown:
                    raise ValueError(
                        f"rule {where!r}: unknown option(s) {sorted(unknown)}; "
                        f"a rule takes {', '.join(_RULE_OPTIONS)}"
                    )
                if "limits" not in opts:
                    raise ValueError(f"rule {where!r}: give its limits, like {{\"limits\": \"10/minute\"}}")
                if methods is not None and opts.get("methods") is not None:
                    raise ValueError(f"rule {where!r}: methods given both in the path and as an option")
                if methods is not None:
                    opts["methods"] = methods
                out.append(Rule(path, **opts))
            else:
                out.append(Rule(path, value, methods=methods))
    elif isinstance(rules, (list, tuple)):
        for r in rules:
            if not isinstance(r, Rule):
                raise ValueError(f"rules: a list must hold rategate.Rule objects, got {r!r}")
            # A copy: the middleware fills in compiled state, and one Rule
            # may be given to several middlewares.
            out.append(Rule(r.path, r.limits, methods=r.methods, key=r.key, cost=r.cost, name=r.name,
                            websocket_messages=r.ws_limits, websocket_over_limit=r.ws_action,
                            concurrency=r.concurrency or None, concurrency_ttl=r.concurrency_ttl,
                            charge=r.charge, lease=r.lease))
    else:
        raise ValueError(
            "rules must be a dict like {\"/api\": \"10/minute\"} or a list of rategate.Rule, "
            f"got {type(rules).__name__}"
        )
    return out


def _decision_type() -> type:
    """The core's Decision type: ``submit()`` returns one when it answers at once."""
    try:
        import rategate

        return rategate.Decision
    except (ImportError, AttributeError):  # pragma: no cover - a core without it
        class _NoDecision:  # nothing is ever of this type: always await
            pass

        return _NoDecision


class RateLimitMiddleware:
    """Rate-limit an ASGI app.  See the module docstring and the README.

    Options: ``limiter`` (a :class:`rategate.Limiter` or a storage URL),
    ``limits`` (the default rates, or ``None``), ``rules``, ``key`` (default
    :func:`rategate.client_ip` with no trusted proxies), ``exempt`` (exact
    paths never limited), ``headers`` (style or ``None``), ``cost`` (int or
    callable(scope) -> int; default 1), ``shadow`` (count and log, never
    block), ``websocket`` (limit WebSocket handshakes too; default True),
    ``namespace`` (prefixed to every rule's name in the Redis key: two
    middlewares sharing a limiter and a rule name, such as ``"default"``,
    share its counters unless their namespaces differ),
    ``websocket_messages`` (rates for each message a WebSocket client sends,
    checked on the handshake's key; default None: only the handshake is
    limited), ``websocket_over_limit`` (``"close"``, the default: close the
    connection with 1008; ``"drop"``: drop the message), ``metrics`` (a
    :class:`rategate.metrics.PrometheusMetrics`, or None), ``charge``
    (default False: after each response, charge the actual cost the app
    reported with :func:`set_cost` to the rule's rates; per rule with
    ``Rule(charge=...)``), ``failure_status`` (default 429: the status of a
    request refused because the store failed, in ``failure_mode="closed"``,
    with ``Retry-After: 1`` and no ``RateLimit-*`` fields; 503 says "our
    fault, not yours": see docs/failures.md), ``enabled`` (default True;
    False: no checks, no headers, no connection: the app runs as if the
    middleware were not there, for tests), ``denial_log`` (True, the default: enforced
    denials go to the logger ``rategate.denials``, rate-limited, through the
    process's :data:`rategate.denials.DEFAULT`; False: not logged; or a
    :class:`rategate.denials.DenialLog`).

    Paths (``exempt``, rules) are matched as the app routes them: without the
    ``root_path`` that ``uvicorn --root-path`` or a ``Mount`` put in
    ``scope["path"]`` (see :func:`route_path`).  At the ASGI lifespan startup
    it connects to the store (``Limiter.connect()``) before the server takes
    traffic, logging one warning and starting anyway when it cannot.
    Several middlewares and FastAPI dependencies on one request share a
    record (see RECORD_KEY): one limit is charged once, and a response
    carries one set of rate-limit headers, the most restrictive.

    Every decision is counted per rule in ``limiter.stats()["rules"]`` (and
    in ``metrics``), labelled ``"<namespace>:<rule name>"`` (or the name
    alone without a namespace); a rule's WebSocket messages under the label
    with `` (messages)`` after it.
    """

    def __init__(
        self,
        app: AnyASGIApp,
        limiter: Any,
        limits: RateSpec | None = None,
        rules: Mapping[Any, Any] | Iterable[Rule] | None = None,
        key: Callable[..., Any] | None = None,
        exempt: Iterable[str] | str = (),
        headers: str | None = "draft-6",
        cost: int | Callable[..., int] | None = None,
        shadow: bool = False,
        websocket: bool = True,
        namespace: str | None = None,
        websocket_messages: RateSpec | None = None,
        websocket_over_limit: str = "close",
        metrics: Any = None,
        charge: bool = False,
        failure_status: int = 429,
        enabled: bool = True,
        denial_log: Any = True,
    ) -> None:
        self.app = app
        self._denial_log = denial_log_option(denial_log, "RateLimitMiddleware")
        if not isinstance(charge, bool):
            raise TypeError(f"charge must be True or False, got {charge!r}")
        self.charge = charge
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        self.enabled = enabled
        self.failure_status, self._failure_body, self._failure_headers = failure_response(
            failure_status, "RateLimitMiddleware")
        from .limiter import as_limiter

        limiter = as_limiter(limiter, "RateLimitMiddleware")
        self.limiter = limiter
        if not isinstance(shadow, bool):
            raise TypeError(f"shadow must be True or False, got {shadow!r}")
        if not isinstance(websocket, bool):
            raise TypeError(f"websocket must be True or False, got {websocket!r}")
        self.shadow = shadow
        self.websocket = websocket
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            raise ValueError(f"namespace must be a non-empty str (or None), got {namespace!r}")
        self.namespace = namespace
        self.ws_limits = _check_ws_messages(websocket_messages, "RateLimitMiddleware", False)
        self.ws_action = _check_ws_action(websocket_over_limit, "RateLimitMiddleware") or "close"
        if self.ws_limits is not None and not websocket:
            raise ValueError(
                "RateLimitMiddleware: websocket_messages limits the messages of WebSockets, but "
                "websocket=False leaves them alone; drop one of the two"
            )
        self.metrics = _check_metrics(metrics, "RateLimitMiddleware")
        # A Decision returned by submit() at once, denied and without error,
        # came from the core's local over-limit cache, except on memory://
        # and shm:// (which answer every check at once, from the store).
        self._sync_cached = getattr(limiter, "kind", "memory") not in ("memory", "shm")
        self.key = _check_key(key, "RateLimitMiddleware") or client_ip()
        self.cost = _check_cost(cost, "RateLimitMiddleware")

        if isinstance(exempt, str):
            exempt = [exempt]
        ex = set()
        for p in exempt or ():
            if not isinstance(p, str) or not p.startswith("/"):
                raise ValueError(f"exempt: paths start with '/', like \"/health\"; got {p!r}")
            ex.add(p)
        self.exempt = frozenset(ex)

        # Headers: validated even when there is nothing to render yet.
        make_headers(headers, _dummy_rates())
        self.header_style = headers

        all_rules = _rules_from(rules)
        self.default: Rule | None = None
        if limits is not None:
            self.default = Rule("/", limits, name="default")
        if self.default is None and not all_rules:
            raise ValueError(
                "RateLimitMiddleware limits nothing: give limits=\"100/minute\" (the default for every "
                "path) and/or rules={\"/api\": \"10/minute\"}"
            )
        names: dict[str, Rule] = {}
        for r in all_rules + ([self.default] if self.default else []):
            if r.name in names:
                raise ValueError(
                    f"two rules are named {r.name!r} ({names[r.name]!r} and {r!r}): each rule has its own "
                    "counters, keyed by its name; give one of them name=..."
                )
            names[r.name] = r
            self._prepare(r)
        self.rules = tuple(all_rules)
        # Regular expressions are tried first, in the order given; then prefixes,
        # the longest first; then the default.
        self._regex_rules = tuple(r for r in all_rules if r.regex is not None)
        self._prefix_rules = tuple(
            sorted((r for r in all_rules if r.regex is None), key=lambda r: len(str(r.path)), reverse=True)
        )
        self._route_cache: dict[str, Any] = {}

        if hasattr(limiter, "submit") and hasattr(limiter, "compile"):
            self._submit = limiter.submit
        else:  # a limiter with only hit(): correct, one await per request
            self._submit = limiter.hit
        self._Decision: Any = _decision_type()

        if self.metrics is not None:
            self.metrics.watch(limiter)

        # The store's failures, logged as incidents: one log per limiter.
        self._incidents = incidents_of(limiter)
        self._shadow_log = ShadowLog()
        # The common case of a request in one call into C (None: Python only).
        self._gate = None if PYTHON_PATH else self._make_gate(names.values())

    def _make_gate(self, rules: Iterable[Rule]) -> Any:
        """The C request path (rategate._core.Gate) for this configuration,
        or None when nothing could take it.  What it cannot do for a rule
        (a key function or a cost of the user's, limits from a callable,
        concurrency, charge) it hands back per request, before doing
        anything: those requests take the Python path whole.  Shadow mode,
        and a limiter without submit() (or not rategate's), take the Python
        path always."""
        from . import _core

        lim = self.limiter
        if self.shadow or not self.enabled or not (hasattr(lim, "submit") and hasattr(lim, "compile")) or \
                type(self._Decision) is not type or self._Decision is not _core.Decision:
            return None
        table = []
        for r in rules:
            table.append(_gate_rule(r))
        return _core.Gate(self.exempt, self._route_cache, _PASS, table, self._submit, self._incidents, key_digest,
                          self._sync_cached, lim, RECORD_KEY, self.failure_status, self._failure_headers,
                          self._failure_body, self._denial_log)

    def _prepare(self, r: Rule) -> None:
        if r.limits is None and not r.concurrency:
            return
        where = f"rule {r.name!r}"
        if r.concurrency and not hasattr(self.limiter, "_release_held"):
            raise ValueError(f"{where}: concurrency needs a rategate.Limiter (with release()), got {self.limiter!r}")
        label = r.name if self.namespace is None else f"{self.namespace}:{r.name}"
        r.counts = self._counts(label)
        name = rule_part(r.name, self.namespace)
        r.set_prefixes(name)
        if callable(r.limits):
            r.spec = _DYNAMIC
            r.dynamic = DynamicLimits(r.limits, lambda v: self._resolved(r, label, v), where)
        else:
            try:
                r.spec, r.rates = compile_limits(self.limiter, r.limits, r.concurrency, r.concurrency_ttl,
                                                 r.lease)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            r.headers = make_headers(self.header_style, r.rates, r.name, r.concurrency)
            register(self.limiter, label, name, r.spec)
        if r.key is None:
            r.key = self.key
        r.redact = getattr(r.key, "redact", None)
        if r.redact is not None and hasattr(self.limiter, "_redact_keys"):
            self.limiter._redact_keys(name, r.redact)
        if r.cost is None:
            r.cost = self.cost
        if r.charge is None:
            r.charge = self.charge
        ws = self.ws_limits if r.ws_limits is None else r.ws_limits
        if ws:
            # The messages' own rule: the handshake's key function, its own
            # rates, counters and Redis keys, no headers (no response).
            m = r.ws_rule = copy.copy(r)
            m.dynamic = m.ws_rule = None
            m.headers = None
            m.name = f"{r.name} (messages)"
            m.counts = self._counts(f"{label} (messages)")
            m.ws_action = r.ws_action or self.ws_action
            try:
                m.spec, m.rates = compile_limits(self.limiter, ws)
            except ValueError as e:
                raise ValueError(f"{where}: websocket_messages: {e}") from None
            m.set_prefixes(MESSAGES_PREFIX + name)
            register(self.limiter, f"{label} (messages)", MESSAGES_PREFIX + name, m.spec)
            if r.redact is not None and hasattr(self.limiter, "_redact_keys"):
                self.limiter._redact_keys(MESSAGES_PREFIX + name, r.redact)

    def _counts(self, label: str) -> RuleCounts:
        c = counts_for(self.limiter, label)
        if self.metrics is not None:
            self.metrics.attach(c)
        return c

    def _resolved(self, r: Rule, label: str, limits: Any) -> Rule:
        """Rule ``r`` (whose limits are a callable) with the rates it returned:
        a copy, compiled once per distinct value by r.dynamic's cache."""
        out = copy.copy(r)
        out.dynamic = None
        out.spec, out.rates = compile_limits(self.limiter, limits, r.concurrency, r.concurrency_ttl,
                                             r.lease)
        out.headers = make_headers(self.header_style, out.rates, r.name, r.concurrency)
        register(self.limiter, label, r.sprefix[:-1], out.spec)
        return out

    def __repr__(self) -> str:
        return (
            f"RateLimitMiddleware(limits={self.default.limits if self.default else None!r}, "
            f"rules={list(self.rules)!r}, exempt={sorted(self.exempt)!r}, headers={self.header_style!r}, "
            f"shadow={self.shadow!r})"
        )

    # -- routing ---------------------------------------------------------------
    def _route(self, path: str) -> Any:
        """The cache entry for ``path``: a Rule, _PASS, or a tuple (method-dependent)."""
        cands = [r for r in self._regex_rules if r._matches_path(path)]
        cands += [r for r in self._prefix_rules if r._matches_path(path)]
        if self.default is not None:
            cands.append(self.default)
        # Everything after the first rule with no method filter is unreachable.
        for i, r in enumerate(cands):
            if r.methods is None:
                del cands[i + 1 :]
                break
        entry: Any
        if not cands:
            entry = _PASS
        elif len(cands) == 1 and cands[0].methods is None:
            entry = cands[0] if cands[0].spec is not None else _PASS
        else:
            entry = tuple(cands)
        cache = self._route_cache
        if len(cache) >= _ROUTE_CACHE_MAX:
            cache.clear()
        cache[path] = entry
        return entry

    @staticmethod
    def _by_method(cands: tuple[Rule, ...], method: str) -> Any:
        for r in cands:
            if r.methods is None or method in r.methods:
                return r if r.spec is not None else _PASS
        return _PASS

    def rule_for(self, path: str, method: str = "GET") -> Rule | None:
        """The rule that applies to ``method path`` (None: not limited): exempt
        paths (one set look-up), then the bounded path -> rule cache."""
        if path in self.exempt:
            return None
        e = self._route_cache.get(path)
        if e is None:
            e = self._route(path)
        if type(e) is tuple:
            e = self._by_method(e, method)
        return None if e is _PASS else e

    # -- the request -----------------------------------------------------------
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gate = self._gate
        if gate is not None:
            # The common case in C (see _make_gate): the send to call the
            # app with, the denial's two messages, or a check to await; None:
            # the Python path below.
            r = gate(scope, send)
            if r is not None:
                if type(r) is _GatePending:
                    r = gate.resume(r, await r.future, send)
                if type(r) is list:
                    await send(r[0])
                    await send(r[1])
                    return
                await self.app(scope, receive, r)
                return
        kind = scope["type"]
        if kind != "http" or not self.enabled:
            if not self.enabled:
                await self.app(scope, receive, send)
            elif kind == "websocket" and self.websocket:
                await self._websocket(scope, receive, send)
            elif kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)  # anything else
            return
        c = self._check(scope, scope["method"])
        if c is None:
            await self.app(scope, receive, send)
            return
        rule, k, d, cost, sid, rec = c
        if type(d) is not self._Decision:
            d = await d
            allow = self._settle(rule, k, d, False)
        elif sid is _SEEN:
            allow = d.allowed or self.shadow
        else:
            allow = self._settle(rule, k, d, self._sync_cached)
        if not allow:
            if rec is not None:
                rec[R_MODE] = DONE  # this denial's own headers; an outer wrapper adds none
            # (_deny_http inlined for a flood of 429s: no coroutine of its own)
            if d.error is None:
                if self._denial_log is not None and sid is not _SEEN:
                    self._denial_log.note(rule.counts.name, k, scope["path"], d.retry_after, rule.redact)  # type: ignore[union-attr]
                await send({"type": "http.response.start", "status": 429, "headers": _denied_headers(rule, d)})
                await send({"type": "http.response.body", "body": DENIED_BODY})
            else:
                await self._deny_http(rule, d, send)
            return
        h = rule.headers
        if rec is None and h is not None and d.error is None:
            # The common case (the first checker, with headers to show):
            # record_new() and the wrapping of _join(), inlined.
            rec = [d, h, WRAPPED, None, self.limiter, k, rule.spec, d]
            state = scope.get("state")
            if state is None:
                state = scope["state"] = {}
            state[RECORD_KEY] = rec

            async def send_with_headers(message: Message, send: Send = send, rec: list[Any] = rec) -> None:
                # _rendering(rec, send, _HTTP_START), inlined: no call, no
                # closure cell on this hot path (measured: bench/middleware_cost.py).
                if message["type"] == "http.response.start" and rec[R_MODE] == WRAPPED:
                    rec[R_MODE] = DONE
                    message["headers"] = [*message.get("headers", ()), *rec[R_HEADERS].render(rec[R_BEST])]
                await send(message)

            send = send_with_headers
        else:
            send = self._join(scope, rec, rule, k, d, sid is _SEEN, send, _HTTP_START)
        if sid is _SEEN:  # a limit an outer checker charged: nothing to hold or charge here
            await self.app(scope, receive, send)
        elif sid is not None:
            await self._run_holding(rule, d, k, cost, sid, scope, receive, send)
        elif rule.charge:
            try:
                await self.app(scope, receive, send)
            finally:
                self._charge_reported(rule, d, k, cost, scope)
        else:
            await self.app(scope, receive, send)

    def _join(self, scope: Scope, rec: list[Any] | None, rule: Rule, k: str | bytes, d: Any, seen: bool,
              send: Send, starts: frozenset[str]) -> Send:
        """Put an allowed decision in the request's record (made here by the
        first checker); wrap ``send`` if this checker is the first with headers
        to show (see the record, above)."""
        if rec is None:
            rec = record_new(scope, self.limiter, k, rule.spec, d, rule.headers)
        elif seen:
            record_offer(rec, d, rule.headers)
        else:
            record_add(rec, self.limiter, k, rule.spec, d, rule.headers)
        if rec[R_MODE] == OPEN and rec[R_BEST] is not None:
            rec[R_MODE] = WRAPPED
            return _rendering(rec, send, starts)
        return send

    async def _deny_http(self, rule: Rule, d: Any, send: Send) -> None:
        """Answer a denied request: 429 with the rule's headers, or, for a
        store failure (closed mode), failure_status with Retry-After: 1 only."""
        if d.error is not None:
            await send({"type": "http.response.start", "status": self.failure_status,
                        "headers": list(self._failure_headers)})
            await send({"type": "http.response.body", "body": self._failure_body})
            return
        await send({"type": "http.response.start", "status": 429, "headers": _denied_headers(rule, d)})
        await send({"type": "http.response.body", "body": DENIED_BODY})

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the lifespan on to the app unchanged, connecting to the store
        (Limiter.connect: the script loaded too) when the startup message
        arrives, before the app (and so the server) goes on: the first
        requests find a ready connection.  If the store cannot be reached: one
        warning, and the app starts (the failure mode answers meanwhile).
        An app that does not speak the lifespan protocol (it raises, as
        Django's ASGI handler does, or returns at once) is connected for
        anyway, and its error goes on to the server unchanged.  At the
        shutdown, the incident log writes what it held back."""
        started = False

        async def startup() -> None:
            nonlocal started
            started = True
            connect = getattr(self.limiter, "_startup_connect", None)
            if connect is not None:
                await connect()

        async def receive_connecting() -> Message:
            message = await receive()
            t = message["type"]
            if t == "lifespan.startup" and not started:
                await startup()
            elif t == "lifespan.shutdown":
                self._incidents.flush()
            return message

        try:
            await self.app(scope, receive_connecting, send)
        except Exception:
            if not started:
                await startup()
            raise
        if not started:
            await startup()

    async def _run_holding(self, rule: Rule, d: Any, key: str | bytes, cost: int, sid: bytes,
                           scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app while holding the concurrency slot the check took; give
        it back when the app returns or raises (the response has ended or
        failed) or as soon as the app learns the client disconnected."""
        # Taken only if allowed by the store itself (a failure decision in
        # "open" mode took nothing; shadow mode lets denials through).
        held = bool(d.allowed and d.error is None)
        lim = self.limiter
        if held:
            lim._took_slot()  # the Limiter's count of slots held (stats())

        def release() -> None:
            nonlocal held
            if held:
                held = False
                lim._release_held(key, rule.spec, sid)

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] in _DISCONNECTS:
                release()
            return message

        try:
            await self.app(scope, receive_watching if held else receive, send)
        finally:
            release()
            if rule.charge:
                self._charge_reported(rule, d, key, cost, scope)

    def _charge_reported(self, rule: Rule, d: Any, key: str | bytes, cost: int, scope: Scope) -> None:
        """After the app (also when it raised: what it reported was spent),
        charge the cost it reported with set_cost, if any (fire and forget)."""
        state = scope.get("state")
        if state and COST_KEY in state:
            charge_reported(self.limiter, rule.spec, rule.rates, d, key, cost, state)

    def _check(self, scope: Scope, method: str) -> tuple[Rule, Any, Any, int, Any, Any] | None:
        """Route, key and submit one request (HTTP or WebSocket handshake).

        None: not limited (exempt, no rule, or the key function said None).
        Otherwise (rule, store key, Decision or a future of one, cost, slot
        id, the request's record or None).  The slot id is None unless the
        rule has a concurrency limit, and _SEEN when the record already holds
        this limit (the Decision is the recorded one: nothing was submitted).
        A plain function, not a coroutine: a denial the core answers at once
        never suspends.
        """
        # route_path(scope), inlined: this runs on every request.
        path = scope["path"]
        root = scope.get("root_path")
        if root:
            path = route_path(scope)
        rule = self.rule_for(path, method)
        if rule is None:
            return None
        if rule.dynamic is not None:  # limits from a callable: this request's rule
            rule = rule.dynamic(scope)
            if rule is None:
                return None
        k = rule.key(scope)
        if k is None:
            return None
        k = prefixed_key(k, rule.sprefix, rule.bprefix, rule.shprefix, rule.bhprefix, rule)
        state = scope.get("state")
        rec = state.get(RECORD_KEY) if state else None
        if rec is not None:
            seen = record_find(rec, self.limiter, k, rule.spec)
            if seen is not None:
                return rule, k, seen, 0, _SEEN, rec
        cost = rule.cost
        if cost is None:
            cost = 1
        elif type(cost) is not int:
            cost = cost(scope)
        if rule.concurrency:
            sid = new_slot_id()
            return rule, k, self._submit(k, rule.spec, cost, sid), cost, sid, rec
        return rule, k, self._submit(k, rule.spec, cost), cost, None, rec

    def _settle(self, rule: Rule, k: str | bytes, d: Any, cached: bool = False) -> bool:
        """Count and log decision ``d`` of ``rule``; whether the request goes
        on (allowed, or a denial shadow mode lets through).  ``cached``: ``d``
        was answered at once by a store with a local over-limit cache (see
        RuleCounts)."""
        assert rule.counts is not None
        rule.counts.note(d, cached, self.shadow)
        if d.error is not None or self._incidents.active:
            self._incidents.note(d)
        if d.allowed:
            return True
        if self.shadow:
            self._shadow_log.note(rule.name, k, d)
            return True
        return False

    # -- WebSocket -------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Limit the handshake: allowed -> the app, headers on the accept; denied -> 429 or close."""
        c = self._check(scope, "GET")  # a handshake is a GET
        if c is None:
            await self.app(scope, receive, send)
            return
        rule, k, d, cost, sid, rec = c
        if type(d) is not self._Decision:
            d = await d
            allow = self._settle(rule, k, d, False)
        elif sid is _SEEN:
            allow = d.allowed or self.shadow
        else:
            allow = self._settle(rule, k, d, self._sync_cached)
        if allow:
            if rule.ws_rule is not None and sid is not _SEEN:
                receive, send = self._limit_messages(rule.ws_rule, scope, receive, send)
            send = self._join(scope, rec, rule, k, d, sid is _SEEN, send, _WS_START)
            if sid is not None and sid is not _SEEN:  # a slot held for the connection's life
                await self._run_holding(rule, d, k, cost, sid, scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if rec is not None:
            rec[R_MODE] = DONE
        # Denied.  Wait for the handshake request (websocket.connect), then
        # answer it with a 429 (failure_status for a store failure) if the
        # server can send HTTP responses for WebSockets, else reject it
        # (servers answer that with a 403): 1008, or 1013 (try again later)
        # for a store failure answered other than 429.
        if self._denial_log is not None and d.error is None and sid is not _SEEN:
            self._denial_log.note(rule.counts.name, k, scope["path"], d.retry_after, rule.redact)  # type: ignore[union-attr]
        message = await receive()
        if message["type"] != "websocket.connect":
            return  # the client went away
        failed = d.error is not None
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start",
                        "status": self.failure_status if failed else 429,
                        "headers": list(self._failure_headers) if failed else _denied_headers(rule, d)})
            await send({"type": "websocket.http.response.body",
                        "body": self._failure_body if failed else DENIED_BODY})
        elif failed and self.failure_status != 429:
            await send({"type": "websocket.close", "code": 1013, "reason": "Try Again Later"})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": "Too Many Requests"})

    def _limit_messages(self, m: Rule, scope: Scope, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """``receive`` and ``send`` for an accepted WebSocket whose messages
        rule ``m`` limits.

        Each ``websocket.receive`` is checked on the handshake's client key
        (cost 1).  Over the limit: "drop" skips the message (the app never
        sees it); "close" closes the connection with 1008 and hands the app a
        ``websocket.disconnect``, and from then on the app's sends are
        dropped (the connection is gone; a close the app sends after ours
        would be an ASGI error).  A key known over its limit is answered by
        the core's local cache: the check then adds no suspension.
        """
        k = m.key(scope)
        if k is None:  # pragma: no cover - the handshake had a key; a key function that changes its mind
            return receive, send
        mk = prefixed_key(k, m.sprefix, m.bprefix, m.shprefix, m.bhprefix, m)
        submit, spec, decision, cached = self._submit, m.spec, self._Decision, self._sync_cached
        drop = m.ws_action == "drop"
        closed = False
        denials, label, path = self._denial_log, m.counts.name, scope["path"]  # type: ignore[union-attr]

        async def receive_limited() -> Message:
            nonlocal closed
            while True:
                message = await receive()
                if message["type"] != "websocket.receive" or closed:
                    return message
                d = submit(mk, spec, 1)
                if type(d) is decision:  # answered at once: no suspension
                    allow = self._settle(m, mk, d, cached)
                else:
                    d = await d
                    allow = self._settle(m, mk, d, False)
                if allow:
                    return message
                if denials is not None and d.error is None:
                    denials.note(label, mk, path, d.retry_after, m.redact)
                if drop:
                    continue
                closed = True
                try:
                    await send({"type": "websocket.close", "code": 1008, "reason": "Too Many Messages"})
                except Exception:  # the client is gone already: the disconnect says it all
                    pass
                return {"type": "websocket.disconnect", "code": 1008, "reason": "Too Many Messages"}

        async def send_unless_closed(message: Message) -> None:
            if not closed:
                await send(message)

        return receive_limited, send_unless_closed


class ShadowLog:
    """Shadow mode: logs a would-be denial once per key per retry interval (bounded)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: dict[Any, float] = {}

    def note(self, name: str, key: Any, d: Any) -> None:
        now = time.monotonic()
        seen = self.seen
        until = seen.get(key)
        if until is not None and until > now:
            return
        if len(seen) >= _SHADOW_LOG_MAX:
            seen.clear()
        ra = d.retry_after
        seen[key] = now + (ra if 1.0 <= ra < 3600.0 else 1.0)
        logger.warning("rategate shadow mode: would deny %r (rule %r, retry after %.2fs)", key, name, ra)


def compile_limits(
    limiter: Any, limits: Any, concurrency: int = 0, ttl: float = 60.0, lease: bool | None = None
) -> tuple[Any, tuple[Any, ...]]:
    """(spec, rates) of ``limits`` for ``limiter``: its compiled Spec, or
    the parsed rates for a limiter with only hit().  ValueError when bad.
    ``lease``: None leaves it to the limiter."""
    if hasattr(limiter, "compile") and hasattr(limiter, "submit"):
        if concurrency:
            spec = limiter.compile(limits, concurrency=concurrency, ttl=ttl)
        elif lease is not None:
            spec = limiter.compile(limits, lease=lease)
        else:
            spec = limiter.compile(limits)
        return spec, tuple(spec.rates)
    from .rates import parse_rates

    rates = parse_rates(limits)
    return rates, rates


def _check_metrics(metrics: Any, who: str) -> Any:
    if metrics is not None and not (hasattr(metrics, "attach") and hasattr(metrics, "watch")):
        raise TypeError(f"{who}: metrics must be a rategate.metrics.PrometheusMetrics (or None), got {metrics!r}")
    return metrics


def failure_response(status: Any, who: str) -> tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]:
    """(status, body, headers) of a request refused because the store failed
    (failure_mode="closed"): ``status`` (429 or 503 are the sensible ones),
    ``Retry-After: 1`` and no RateLimit-* fields (nothing is known of the
    client's quota).  ValueError naming ``who`` for a status that is not an
    HTTP error."""
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise ValueError(
            f"{who}: failure_status must be an HTTP error status: 429 (the default: \"too many "
            f"requests\") or 503 (\"service unavailable\": the store failed, not the client), got {status!r}"
        )
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = json.dumps({"detail": phrase}, separators=(",", ":")).encode()
    headers = ((b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", b"1"))
    return status, body, headers


def incidents_of(limiter: Any) -> Any:
    """The limiter's incident log (one per Limiter), or a log of its own for
    a limiter object that has none."""
    log = getattr(limiter, "incidents", None)
    if log is None:
        storage = getattr(limiter, "storage", None)
        log = IncidentLog(shown_url(storage) if isinstance(storage, str) else repr(limiter),
                          getattr(limiter, "stats", None))
    return log


def register(limiter: Any, label: str, part: str, spec: Any) -> None:
    """Tell ``limiter`` that rule ``label`` checks store keys ``part`` + "|"
    + client with ``spec`` (Limiter.reset_client resets it without a scan)."""
    reg = getattr(limiter, "_register", None)
    if reg is not None:
        reg(label, part, spec)


def _denied_headers(rule: Rule, d: Any) -> list[tuple[bytes, bytes]]:
    out = list(_DENIED_BASE)
    h = rule.headers
    out += h.render_denied(d) if h is not None else retry_after_header(d)
    return out


def _ip_config(k: client_ip) -> tuple[Any, ...]:
    """client_ip's configuration as the C gate reads it."""
    nets = [(n.version, n.network_address.packed, n.prefixlen) for n in k._nets]
    hdr = {b"x-forwarded-for": 0, b"x-real-ip": 1, b"forwarded": 2}[k._hdr]
    return ("ip", nets, k._trust_unix, k.ipv6_prefix or 0, k._plain, hdr, k._hdr)


def _key_config(k: Any) -> tuple[Any, ...] | None:
    """A key function's configuration for the C gate; None: a function of the user's."""
    if type(k) is client_ip:
        return _ip_config(k)
    if type(k) is header:
        fb = k.fallback
        if fb is not None and type(fb) is not client_ip:
            return None
        return ("header", k._name, k._eq, k._hashed, None if fb is None else _ip_config(fb))
    return None


_STYLES = {None: 0, "draft-6": 1, "draft-11": 2, "x-ratelimit": 3}


def _gate_rule(r: Rule) -> tuple[Any, ...]:
    """One rule as the C gate reads it: (rule, methods, limited, gateable, spec,
    prefixes (bytes, then str), key, cost, renderer, header style and its
    constant parts, counts, the key function's redact for the denial log)."""
    key = _key_config(r.key)
    cost = 1 if r.cost is None else r.cost
    try:
        plain = r.bprefix == r.sprefix.encode("utf-8") and r.bhprefix == r.shprefix.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in the name: submit() would refuse the str
        plain = False
    gateable = (r.spec is not None and r.spec is not _DYNAMIC and r.dynamic is None and not r.concurrency
                and not r.charge and key is not None and type(cost) is int and plain and r.counts is not None)
    h = r.headers
    if not gateable:
        return (r, r.methods, r.spec is not None, False, None, None, None, None, None, None, None, None, 0, None,
                None, None, None, None)
    return (r, r.methods, True, True, r.spec, r.bprefix, r.bhprefix, r.sprefix, r.shprefix, key, cost, h,
            _STYLES[h.style if h is not None else None], h._pre if h is not None else (),
            h._items if h is not None else (), h._full if h is not None else (), r.counts, r.redact)


from ._core import GatePending as _GatePending  # noqa: E402 - beside its one use


def _dummy_rates() -> tuple[Any, ...]:
    from .rates import Rate

    return (Rate(1, 1.0),)


# For type checkers: what a rules mapping may hold.
RuleValue = Union[RateSpec, None, Mapping[str, Any]]
