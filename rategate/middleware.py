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
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union

from .counts import RuleCounts, counts_for
from .headers import RateLimitHeaders, make_headers, retry_after_header
from .keys import MAX_KEY_LENGTH, client_ip, header, key_digest
from .limiter import new_slot_id

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["COST_KEY", "DynamicLimits", "FailureLog", "RateLimitMiddleware", "Rule", "ShadowLog", "set_cost"]

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

# A rule's name goes into the Redis key as "<name>|<client key>" (or
# "<name>#<digest>" for a hashed client key); these characters are escaped in
# names so that the split is unambiguous, and braces so they never form a
# Redis Cluster hash tag of their own.
_NAME_ESCAPES = {ord(c): f"%{ord(c):02X}" for c in "%|#{}"}
# A namespace is joined to a rule's name with ":", so it escapes ":" too.
_NAMESPACE_ESCAPES = {ord(c): f"%{ord(c):02X}" for c in "%|#{}:"}
# The counters of a rule's WebSocket messages are the rule's name with this in
# front: an escaped name never starts with "%w" ("%" is always followed by two
# hex digits there), so they never share a Redis key with a rule's handshakes.
_WS_MESSAGES_PREFIX = "%ws:"
_WS_ACTIONS = ("close", "drop")
# The options a rule takes (Rule's keyword arguments; a rules dict's keys).
_RULE_OPTIONS = ("limits", "methods", "key", "cost", "name", "websocket_messages", "websocket_over_limit",
                 "concurrency", "concurrency_ttl", "charge", "lease")
# Where the app reports the actual cost of the response it produces (see
# set_cost): scope["state"][COST_KEY], i.e. request.state's "rategate.cost".
COST_KEY = "rategate.cost"
_DISCONNECTS = frozenset({"http.disconnect", "websocket.disconnect"})

RateSpec = Any  # str | Rate | list of them (see rategate.rates.parse_rates)

# RATEGATE_PYTHON_PATH=1 in the environment (read once, at import) turns the
# request path in C (rategate._core.Gate, csrc/pygate.c) off: every request
# then takes the Python code below, the reference the C path is tested
# against (tests/test_gate.py).  The escape hatch if the C path is ever
# suspected; docs/how-it-works.md.
PYTHON_PATH = os.environ.get("RATEGATE_PYTHON_PATH", "").strip().lower() not in ("", "0", "false", "no", "off")


_DENY = object()  # _settle(): the request is denied
_DYNAMIC = object()  # Rule.spec of a rule whose limits are a callable (see Rule.dynamic)
# The messages that start a response, where the rate-limit headers go.
_HTTP_START = frozenset({"http.response.start"})
_WS_START = frozenset({"websocket.accept", "websocket.http.response.start"})


def _adding(hdrs: list[tuple[bytes, bytes]], send: Send, starts: frozenset[str]) -> Send:
    """``send``, adding ``hdrs`` to the message that starts the response.

    The app's header list is copied, never edited in place: an app may send
    the same Response object twice.
    """

    async def send_with_headers(message: Message) -> None:
        if message["type"] in starts:
            message["headers"] = [*message.get("headers", ()), *hdrs]
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
                 "lease")

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
    ``Rule(charge=...)``).

    Every decision is counted per rule in ``limiter.stats()["rules"]`` (and
    in ``metrics``), labelled ``"<namespace>:<rule name>"`` (or the name
    alone without a namespace); a rule's WebSocket messages under the label
    with `` (messages)`` after it.
    """

    def __init__(
        self,
        app: ASGIApp,
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
    ) -> None:
        self.app = app
        if not isinstance(charge, bool):
            raise TypeError(f"charge must be True or False, got {charge!r}")
        self.charge = charge
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
        # (which answers every check at once).
        self._sync_cached = getattr(limiter, "kind", "memory") != "memory"
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
        self._Decision = _decision_type()

        if self.metrics is not None:
            self.metrics.watch(limiter)

        # Failure incidents: logged when one starts and when it ends.
        self._failures = FailureLog(cause=getattr(limiter, "stats", None))
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
        if self.shadow or not (hasattr(lim, "submit") and hasattr(lim, "compile")) or \
                type(self._Decision) is not type or self._Decision is not _core.Decision:
            return None
        table = []
        for r in rules:
            table.append(_gate_rule(r))
        return _core.Gate(self.exempt, self._route_cache, _PASS, table, self._submit, self._failures, key_digest,
                          self._sync_cached)

    def _prepare(self, r: Rule) -> None:
        if r.limits is None and not r.concurrency:
            return
        where = f"rule {r.name!r}"
        if r.concurrency and not hasattr(self.limiter, "_release_held"):
            raise ValueError(f"{where}: concurrency needs a rategate.Limiter (with release()), got {self.limiter!r}")
        label = r.name if self.namespace is None else f"{self.namespace}:{r.name}"
        r.counts = self._counts(label)
        if callable(r.limits):
            r.spec = _DYNAMIC
            r.dynamic = DynamicLimits(r.limits, lambda v: self._resolved(r, v), where)
        else:
            try:
                r.spec, r.rates = compile_limits(self.limiter, r.limits, r.concurrency, r.concurrency_ttl,
                                                 r.lease)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            r.headers = make_headers(self.header_style, r.rates, r.name, r.concurrency)
        name = r.name.translate(_NAME_ESCAPES)
        if self.namespace is not None:
            name = self.namespace.translate(_NAMESPACE_ESCAPES) + ":" + name
        r.set_prefixes(name)
        if r.key is None:
            r.key = self.key
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
            m.set_prefixes(_WS_MESSAGES_PREFIX + name)

    def _counts(self, label: str) -> RuleCounts:
        c = counts_for(self.limiter, label)
        if self.metrics is not None:
            self.metrics.attach(c)
        return c

    def _resolved(self, r: Rule, limits: Any) -> Rule:
        """Rule ``r`` (whose limits are a callable) with the rates it returned:
        a copy, compiled once per distinct value by r.dynamic's cache."""
        out = copy.copy(r)
        out.dynamic = None
        out.spec, out.rates = compile_limits(self.limiter, limits, r.concurrency, r.concurrency_ttl,
                                             r.lease)
        out.headers = make_headers(self.header_style, out.rates, r.name, r.concurrency)
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
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        if kind != "http":
            if kind == "websocket" and self.websocket:
                await self._websocket(scope, receive, send)
                return
            await self.app(scope, receive, send)  # lifespan and anything else
            return
        r = await self._decide(scope, scope["method"])
        if r is None:
            await self.app(scope, receive, send)
            return
        rule, d, hdrs, k, cost, sid = r
        if hdrs is not _DENY:
            send = send if hdrs is None else _adding(hdrs, send, _HTTP_START)
            if sid is not None:
                await self._run_holding(rule, d, k, cost, sid, scope, receive, send)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                if rule.charge:
                    self._charge_reported(rule, d, k, cost, scope)
            return
        await send({"type": "http.response.start", "status": 429, "headers": _denied_headers(rule, d)})
        await send({"type": "http.response.body", "body": DENIED_BODY})

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

    async def _decide(self, scope: Scope, method: str) -> tuple[Rule, Any, Any, Any, int, Any] | None:
        """Check one request: None if it is not limited, else (rule, decision,
        headers, key, cost, slot id), headers being _DENY for a denial, the
        slot id None unless the rule has a concurrency limit.  Suspends only
        to await Redis: a denial the core answers at once returns without
        suspending."""
        c = self._check(scope, method)
        if c is None:
            return None
        rule, k, d, cost, sid = c
        if type(d) is not self._Decision:
            d = await d
            return rule, d, self._settle(rule, k, d, False), k, cost, sid
        return rule, d, self._settle(rule, k, d, self._sync_cached), k, cost, sid

    def _check(self, scope: Scope, method: str) -> tuple[Rule, str | bytes, Any, int, Any] | None:
        """Route, key and submit one request (HTTP or WebSocket handshake).

        None: not limited (exempt, no rule, or the key function said None).
        Otherwise (rule, key, Decision or a future of one, cost, slot id or
        None).  A plain function,
        not a coroutine: a denial the core answers at once never suspends.
        """
        rule = self.rule_for(scope["path"], method)
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
        cost = rule.cost
        if cost is None:
            cost = 1
        elif type(cost) is not int:
            cost = cost(scope)
        if rule.concurrency:
            sid = new_slot_id()
            return rule, k, self._submit(k, rule.spec, cost, sid), cost, sid
        return rule, k, self._submit(k, rule.spec, cost), cost, None

    def _settle(self, rule: Rule, k: str | bytes, d: Any, cached: bool = False) -> Any:
        """Log and count a decision: _DENY, or let it through with these
        headers (None: no headers to add).  ``cached``: ``d`` was answered
        at once by a store with a local over-limit cache (see RuleCounts)."""
        assert rule.counts is not None
        rule.counts.note(d, cached, self.shadow)
        err = d.error
        if err is not None or self._failures.active:
            self._failures.note(d)
        if d.allowed or self.shadow:
            if not d.allowed:
                self._shadow_log.note(rule.name, k, d)
            h = rule.headers
            # No headers, or nothing true to say: a failure decision in
            # "open" mode knows no counts (its remaining=0 would make
            # well-behaved clients back off for no reason).
            return None if h is None or err is not None else h.render(d)
        return _DENY

    # -- WebSocket -------------------------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Limit the handshake: allowed -> the app, headers on the accept; denied -> 429 or close."""
        r = await self._decide(scope, "GET")  # a handshake is a GET
        if r is None:
            await self.app(scope, receive, send)
            return
        rule, d, hdrs, k, cost, sid = r
        if hdrs is not _DENY:
            if rule.ws_rule is not None:
                receive, send = self._limit_messages(rule.ws_rule, scope, receive, send)
            send = send if hdrs is None else _adding(hdrs, send, _WS_START)
            if sid is not None:  # a slot held for the connection's life
                await self._run_holding(rule, d, k, cost, sid, scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # Denied.  Wait for the handshake request (websocket.connect), then
        # answer it with a 429 if the server can send HTTP responses for
        # WebSockets, else reject it (servers answer that with a 403).
        message = await receive()
        if message["type"] != "websocket.connect":
            return  # the client went away
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": 429,
                        "headers": _denied_headers(rule, d)})
            await send({"type": "websocket.http.response.body", "body": DENIED_BODY})
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

        async def receive_limited() -> Message:
            nonlocal closed
            while True:
                message = await receive()
                if message["type"] != "websocket.receive" or closed:
                    return message
                d = submit(mk, spec, 1)
                if type(d) is decision:  # answered at once: no suspension
                    verdict = self._settle(m, mk, d, cached)
                else:
                    verdict = self._settle(m, mk, await d, False)
                if verdict is not _DENY:
                    return message
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


class FailureLog:
    """Logs limiter failures once when an incident starts, and once when it ends.

    An incident starts with the first decision carrying ``error`` and ends
    with the first one without; the closing line counts the failed checks by
    kind.  A flood during a Redis outage thus writes two log lines, not one per
    request.  The opening line says the cause (``cause()``: the limiter's
    ``stats()``, whose ``last_error`` names it: "connect failed:
    127.0.0.1:6390: connection refused", Redis's own error text...).  A
    flapping connection makes many short incidents: an opening line is
    written at most once per ``quiet`` seconds (the ones left out are counted
    in the next), and a closing line only for an incident whose opening was.
    Call :meth:`note` for a decision with an error, and for every decision
    while :attr:`active`.
    """

    __slots__ = ("active", "started", "counts", "what", "cause", "quiet", "logged", "last_logged",
                 "unlogged")

    def __init__(self, what: str = "the limiter", cause: Any = None, quiet: float = 60.0) -> None:
        self.active = False
        self.started = 0.0
        self.counts: dict[str, int] = {}
        self.what = what
        self.cause = cause
        self.quiet = quiet
        self.logged = False
        self.last_logged = -float("inf")
        self.unlogged = 0

    def _cause(self, err: str) -> str:
        if err == "timeout":
            return "no answer within the check's deadline"
        if err == "overloaded":
            return "too many checks outstanding (max_pending)"
        try:
            last = self.cause().get("last_error") if self.cause is not None else None
        except Exception:  # a limiter closing in another thread: no cause, still a line
            last = None
        return str(last) if last else ""

    def note(self, d: Any) -> None:
        err = d.error
        if err is None:
            if self.active:
                self.active = False
                counts, self.counts = self.counts, {}
                if self.logged:
                    logger.warning(
                        "rategate: %s is answering again after %.1fs; failed checks: %s",
                        self.what,
                        time.monotonic() - self.started,
                        ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
                    )
            return
        counts = self.counts
        counts[err] = counts.get(err, 0) + 1
        if not self.active:
            self.active = True
            now = self.started = time.monotonic()
            self.logged = now - self.last_logged >= self.quiet
            if not self.logged:
                self.unlogged += 1
                return
            self.last_logged = now
            cause = self._cause(err)
            more = (f"; {self.unlogged} shorter incidents in the last {self.quiet:.0f}s were not logged"
                    if self.unlogged else "")
            self.unlogged = 0
            logger.warning(
                "rategate: %s failed (%s%s); until it recovers, limited requests are %s "
                "(logged once per incident%s)",
                self.what,
                err,
                f": {cause}" if cause else "",
                "let through (failure_mode='open')" if d.allowed else "answered 429 (failure_mode='closed')",
                more,
            )


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


def prefixed_key(k: Any, sp: str, bp: bytes, shp: str, bhp: bytes, owner: Any) -> str | bytes:
    """The limiter key for client key ``k``: its prefix + ``k``, or past
    MAX_KEY_LENGTH the hashed prefix + its digest, so a huge header never
    makes a huge Redis key.  Subclasses of str/bytes are made plain; any
    other type is a TypeError naming ``owner`` (a Rule, or a string)."""
    t = type(k)
    if t is not str and t is not bytes:
        if isinstance(k, str):
            k, t = str(k), str
        elif isinstance(k, (bytes, bytearray, memoryview)):
            k, t = bytes(k), bytes
        else:
            who = f"rule {owner.name!r}" if isinstance(owner, Rule) else str(owner)
            raise TypeError(
                f"the key function of {who} returned {type(k).__name__}; "
                "it must return str, bytes, or None (do not limit)"
            )
    if t is str:
        return sp + k if len(k) <= MAX_KEY_LENGTH else shp + key_digest(k)
    return bp + k if len(k) <= MAX_KEY_LENGTH else bhp + key_digest(k).encode()


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
    prefixes, key, cost, header style and its constant parts, counts)."""
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
        return (r, r.methods, r.spec is not None, False, None, None, None, None, None, 0, None, None, None, None)
    return (r, r.methods, True, True, r.spec, r.bprefix, r.bhprefix, key, cost,
            _STYLES[h.style if h is not None else None], h._pre if h is not None else (),
            h._items if h is not None else (), h._full if h is not None else (), r.counts)


from ._core import GatePending as _GatePending  # noqa: E402 - beside its one use


def _dummy_rates() -> tuple[Any, ...]:
    from .rates import Rate

    return (Rate(1, 1.0),)


# For type checkers: what a rules mapping may hold.
RuleValue = Union[RateSpec, None, Mapping[str, Any]]
