"""Prometheus metrics for rategate, through ``prometheus_client``.

``pip install rategate[prometheus]``, then::

    from rategate.metrics import PrometheusMetrics

    metrics = PrometheusMetrics()            # once per process, at import time
    app.add_middleware(rategate.RateLimitMiddleware, limiter=limiter, limits="100/minute",
                       exempt=["/metrics"], metrics=metrics)
    app.add_route("/metrics", metrics.asgi_app())

Exposed (``namespace`` ``"rategate"`` by default):

- ``rategate_decisions_total{rule, outcome}``: every decision of the
  middlewares and dependencies given these metrics, by rule label and
  outcome: ``allowed``, ``denied``, ``denied_cached`` (answered by the
  core's local over-limit cache, no round trip), ``shadow_would_deny``,
  ``failure`` (the failure mode decided);
- ``rategate_failures_total{rule, error}``: the failure decisions by error
  kind (``timeout``, ``unavailable``, ``overloaded``, ``closed``,
  ``redis_error``);
- ``rategate_check_latency_seconds{rule}``: a histogram of check latency,
  submit to decision, measured on the loop thread (``Decision.latency``):
  decisions answered at once (memory://, the local over-limit cache, the
  failure mode while Redis is down) have none and are not observed;
- ``rategate_leased_checks_total``: checks answered from token leases
  (``lease=True``), with no round trip;
- ``rategate_denied_clients_last_minute``: about how many distinct clients
  were denied in the last minute, in this process (a HyperLogLog estimate,
  within about 3 %, from ``Limiter.stats()["denied_clients_1m"]``; a
  client denied under several rules counts once).  In multiprocess mode
  the largest of the workers' figures: a client spread over the workers is
  counted by each, so their sum would over-count; the largest is a lower
  bound on the union;
- ``rategate_redis_reconnects_total``, ``rategate_redis_up`` (1: every
  watched limiter is connected), ``rategate_checks_in_flight``,
  ``rategate_concurrency_slots_held`` (slots of concurrency limits held by
  requests in flight): from
  ``Limiter.stats()`` of the limiters in use, read at most once a second on
  the request path, and at every scrape.

Labels are rule labels only (a rule's name, ``"<namespace>:<name>"`` with a
namespace, ``"dep:<route>"`` for the FastAPI dependency, `` (messages)``
appended for a rule's WebSocket messages), never client keys: the series are
as many as the rules.

Several worker processes (``uvicorn --workers 4``, gunicorn): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the workers start
(prometheus_client's multiprocess mode).  Each worker then writes its
figures there, and a scrape of any worker (``asgi_app()``, ``render()``)
adds up all of them.  Gauges: ``redis_up`` is the minimum over the workers,
``checks_in_flight`` the sum; a worker's gauges are as fresh as its last
request (at most a second behind while it serves).  Under gunicorn call
``prometheus_client.multiprocess.mark_process_dead(worker.pid)`` in its
``child_exit`` hook so a dead worker's gauges go away; empty the directory
when the server starts.  Without ``PROMETHEUS_MULTIPROC_DIR`` each process
exposes only its own figures.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import TYPE_CHECKING, Any

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ImportError as e:  # pragma: no cover - tested in a subprocess
    raise ImportError(
        "rategate.metrics needs prometheus_client, an optional dependency: "
        "pip install 'rategate[prometheus]' (or pip install prometheus_client)"
    ) from e

from .counts import OUTCOMES, RuleCounts

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import Receive, Scope, Send

__all__ = ["Exposition", "PrometheusMetrics"]

# Seconds; a check is typically 50 us to a few ms, the deadline 50 ms.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# The engine's gauges are refreshed on the request path at most this often.
REFRESH_INTERVAL = 1.0


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


class PrometheusMetrics:
    """rategate's metrics in a prometheus_client registry (see the module docstring).

    ``registry``: where the metrics are registered (default: prometheus_client's
    global ``REGISTRY``).  ``namespace``: the metric names' prefix.  Create one
    per process and registry (two would register the same names twice), and
    give it to every middleware and dependency with ``metrics=``.
    """

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "rategate") -> None:
        if registry is None:
            registry = prometheus_client.REGISTRY
        if not isinstance(registry, CollectorRegistry):
            raise TypeError(f"registry must be a prometheus_client.CollectorRegistry, got {registry!r}")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
        self.registry = registry
        kw: dict[str, Any] = {"namespace": namespace, "registry": registry}
        try:
            self.decisions = Counter("decisions", "Rate-limit decisions by rule and outcome",
                                     ["rule", "outcome"], **kw)
            self.failures = Counter("failures", "Failure-mode decisions by rule and error kind",
                                    ["rule", "error"], **kw)
            self.latency = Histogram("check_latency_seconds",
                                     "Check latency, submit to decision, on the loop thread",
                                     ["rule"], buckets=LATENCY_BUCKETS, **kw)
            self.reconnects = Counter("redis_reconnects", "Reconnections to Redis", **kw)
            self.leased = Counter("leased_checks", "Checks answered from token leases, without Redis", **kw)
            self.redis_up = Gauge("redis_up", "1 if every limiter is connected to Redis, else 0",
                                  multiprocess_mode="livemin", **kw)
            self.in_flight = Gauge("checks_in_flight", "Checks sent and not yet answered",
                                   multiprocess_mode="livesum", **kw)
            self.slots = Gauge("concurrency_slots_held", "Concurrency slots held by requests in flight",
                               multiprocess_mode="livesum", **kw)
            self.denied_clients = Gauge("denied_clients_last_minute",
                                        "Distinct clients denied in the last minute (an estimate)",
                                        multiprocess_mode="livemax", **kw)
        except ValueError as e:  # "Duplicated timeseries in CollectorRegistry"
            raise ValueError(
                f"rategate metrics are already registered in this registry ({e}): create one "
                "PrometheusMetrics per process (at module level) and pass it to every middleware, "
                "or give another registry= or namespace="
            ) from None
        # limiter -> its (reconnects, leased) counts already added to the counters
        self._limiters: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()
        self._attached: dict[int, RuleCounts] = {}
        self._next_refresh = 0.0

    def __repr__(self) -> str:
        return f"PrometheusMetrics(rules={sorted(c.name for c in self._attached.values())!r})"

    def attach(self, counts: RuleCounts) -> None:
        """Feed the decisions ``counts`` sees into the metrics (idempotent)."""
        if self._attached.get(id(counts)) is counts:
            return
        self._attached[id(counts)] = counts
        rule = counts.name
        # Children bound once: a decision costs a dict look-up and an inc().
        children = {o: self.decisions.labels(rule, o) for o in OUTCOMES}
        errors: dict[str, Any] = {}
        latency = self.latency.labels(rule)
        failures = self.failures

        def sink(outcome: str, err: Any, d: Any) -> None:
            children[outcome].inc()
            if err is not None:
                c = errors.get(err)
                if c is None:
                    c = errors[err] = failures.labels(rule, err)
                c.inc()
            lat = getattr(d, "latency", None)
            if lat is not None:
                latency.observe(lat)
            if time.monotonic() >= self._next_refresh:
                self.refresh()

        counts.sinks = (*counts.sinks, sink)

    def watch(self, limiter: Any) -> None:
        """Report ``limiter``'s connection figures (reconnects, up, in flight)."""
        if hasattr(limiter, "stats") and limiter not in self._limiters:
            try:
                st = limiter.stats()
                self._limiters[limiter] = (int(st.get("reconnects", 0)), int(st.get("leased", 0)))
            except TypeError:  # pragma: no cover - not weak-referenceable: not watched
                return
            self.refresh()  # this process's gauges exist from now on, with true values

    def refresh(self) -> None:
        """Read the watched limiters' stats() into the gauges and the reconnect counter."""
        self._next_refresh = time.monotonic() + REFRESH_INTERVAL
        up, in_flight, slots, denied_clients = 1, 0, 0, 0
        for lim, seen in list(self._limiters.items()):
            try:
                s = lim.stats()
            except Exception:  # a closed or broken limiter reports nothing
                continue
            in_flight += int(s.get("in_flight", 0))
            slots += int(s.get("slots_held", 0))
            denied_clients += int(s.get("denied_clients_1m", 0))
            # An engine starts on its first check: one that has checked
            # nothing yet (an idle worker) says nothing about Redis.
            if not s.get("connected", True) and s.get("checks", 1):
                up = 0
            n, leased = int(s.get("reconnects", 0)), int(s.get("leased", 0))
            if n > seen[0]:
                self.reconnects.inc(n - seen[0])
            if leased > seen[1]:
                self.leased.inc(leased - seen[1])
            self._limiters[lim] = (n, leased)  # lower after a fork: start again from there
        self.redis_up.set(up)
        self.in_flight.set(in_flight)
        self.slots.set(slots)
        self.denied_clients.set(denied_clients)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape: every worker's figures in multiprocess mode."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.refresh()
        if _multiprocess():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def asgi_app(self) -> "Exposition":
        """An ASGI app answering GET with the exposition: ``app.add_route("/metrics",
        metrics.asgi_app())`` (or ``app.mount("/metrics", ...)``, scraped at ``/metrics/``)."""
        return Exposition(self)


class Exposition:
    """The ASGI app of :meth:`PrometheusMetrics.asgi_app` (an object, not a
    function, so that Starlette's ``Route``/``add_route`` treat it as ASGI)."""

    __slots__ = ("metrics",)

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send({"type": "http.response.start", "status": 405,
                        "headers": [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        body, ctype = self.metrics.render()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
