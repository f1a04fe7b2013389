"""rategate.metrics: the Prometheus collector, in process, against a real redis-server.

Four uvicorn workers in multiprocess mode: tests/test_uvicorn_features.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import rategate
from rategate.metrics import PrometheusMetrics
from rategate.middleware import RateLimitMiddleware


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def client(app: Any, ip: str = "203.0.113.9") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 1)), base_url="http://t")


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


@pytest.mark.asyncio
async def test_decisions_by_rule_and_outcome(redis_url: str, make_limiter: Any) -> None:
    reg = CollectorRegistry()
    m = PrometheusMetrics(registry=reg)
    lim = make_limiter(redis_url)
    mw = RateLimitMiddleware(ok_app, limiter=lim, limits="2/minute", rules={"/api": "1/minute"}, metrics=m)
    shadow = RateLimitMiddleware(ok_app, limiter=lim, limits="1/minute", shadow=True, namespace="sh",
                                 metrics=m)
    async with client(mw) as c, client(shadow) as s:
        assert [(await c.get("/x")).status_code for _ in range(5)] == [200, 200, 429, 429, 429]
        assert [(await c.get("/api")).status_code for _ in range(2)] == [200, 429]
        assert [(await s.get("/x")).status_code for _ in range(3)] == [200] * 3

    def d(rule: str, outcome: str) -> float:
        return value(reg, "rategate_decisions_total", rule=rule, outcome=outcome)

    assert d("default", "allowed") == 2
    # The first denial goes to Redis; the next ones are answered by the local cache.
    assert d("default", "denied") == 1 and d("default", "denied_cached") == 2
    assert d("/api", "allowed") == 1 and d("/api", "denied") == 1
    assert d("sh:default", "allowed") == 1 and d("sh:default", "shadow_would_deny") == 2
    assert d("default", "failure") == 0 and d("default", "shadow_would_deny") == 0  # series exist at 0
    # stats() carries the same figures.
    rules = lim.stats()["rules"]
    assert rules["default"] == {"allowed": 2, "denied": 1, "denied_cached": 2, "shadow_would_deny": 0,
                                "failures": {}}
    assert rules["sh:default"]["shadow_would_deny"] == 2
    # The histogram is fed from Decision.latency: the decisions Redis answered
    # (2 allowed, 1 denied), not the two the local cache answered at once.
    assert value(reg, "rategate_check_latency_seconds_count", rule="default") == 3
    assert 0 < value(reg, "rategate_check_latency_seconds_sum", rule="default") < 3 * 5.0  # seconds: any answer at all, not a speed
    # Never a client key in a label.
    body, ctype = m.render()
    assert ctype.startswith("text/plain") and b"203.0.113" not in body
    assert b'rategate_decisions_total{outcome="denied_cached",rule="default"} 2.0' in body


@pytest.mark.asyncio
async def test_failures_reconnects_and_redis_up(own_redis: Any, make_limiter: Any) -> None:
    reg = CollectorRegistry()
    m = PrometheusMetrics(registry=reg)
    lim = make_limiter(own_redis.url, timeout=0.2)
    mw = RateLimitMiddleware(ok_app, limiter=lim, limits="100/minute", metrics=m)
    # Set when the middleware is built: an engine that has checked nothing
    # yet (not started, not connected) does not report Redis down.
    assert reg.get_sample_value("rategate_redis_up") == 1
    async with client(mw) as c:
        assert (await c.get("/")).status_code == 200
        m.refresh()
        assert value(reg, "rategate_redis_up") == 1 and value(reg, "rategate_checks_in_flight") == 0
        own_redis.stop()
        for _ in range(3):
            assert (await c.get("/")).status_code == 429
        m.refresh()
        assert value(reg, "rategate_redis_up") == 0
        own_redis.start()
        deadline = time.monotonic() + 20
        while (await c.get("/")).status_code != 200:
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            await __import__("asyncio").sleep(0.05)
    m.refresh()
    assert value(reg, "rategate_redis_up") == 1
    assert value(reg, "rategate_redis_reconnects_total") >= 1
    failures = lim.stats()["rules"]["default"]["failures"]
    assert sum(failures.values()) >= 3
    total = value(reg, "rategate_decisions_total", rule="default", outcome="failure")
    assert total == sum(failures.values())
    for kind, n in failures.items():
        assert value(reg, "rategate_failures_total", rule="default", error=kind) == n


@pytest.mark.asyncio
async def test_the_dependency_and_the_exposition_app(make_limiter: Any) -> None:
    from fastapi import Depends, FastAPI

    reg = CollectorRegistry()
    m = PrometheusMetrics(registry=reg)
    lim = make_limiter("memory://")
    app = FastAPI()

    @app.get("/items/{i}", dependencies=[Depends(rategate.RateLimit("2/minute", limiter=lim, metrics=m))])
    async def item(i: int) -> dict[str, int]:
        return {"i": i}

    app.add_route("/metrics", m.asgi_app())
    async with client(app) as c:
        assert [(await c.get(f"/items/{i}")).status_code for i in range(3)] == [200, 200, 429]
        r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert 'rategate_decisions_total{outcome="allowed",rule="dep:GET /items/{i}"} 2.0' in r.text
        assert 'rategate_decisions_total{outcome="denied",rule="dep:GET /items/{i}"} 1.0' in r.text
        assert (await c.post("/metrics")).status_code == 405


def test_latency_histogram_is_fed_from_decision_latency() -> None:
    """The C core does not time checks yet; a decision that carries
    ``latency`` (as it will) lands in the histogram."""
    reg = CollectorRegistry()
    m = PrometheusMetrics(registry=reg)
    counts = rategate.counts.RuleCounts("r")
    m.attach(counts)
    m.attach(counts)  # idempotent
    d = types.SimpleNamespace(allowed=True, error=None, latency=0.0003)
    counts.note(d, False, False)
    assert value(reg, "rategate_check_latency_seconds_count", rule="r") == 1
    assert value(reg, "rategate_check_latency_seconds_bucket", rule="r", le="0.0005") == 1
    assert value(reg, "rategate_check_latency_seconds_bucket", rule="r", le="0.00025") == 0
    assert value(reg, "rategate_decisions_total", rule="r", outcome="allowed") == 1


def test_mistakes_are_clear() -> None:
    reg = CollectorRegistry()
    PrometheusMetrics(registry=reg)
    with pytest.raises(ValueError, match="create one PrometheusMetrics per process"):
        PrometheusMetrics(registry=reg)
    PrometheusMetrics(registry=reg, namespace="other")
    with pytest.raises(TypeError, match="registry must be a prometheus_client.CollectorRegistry"):
        PrometheusMetrics(registry="default")  # type: ignore[arg-type]
    lim = rategate.Limiter("memory://")
    try:
        with pytest.raises(TypeError, match="metrics must be a rategate.metrics.PrometheusMetrics"):
            RateLimitMiddleware(ok_app, limiter=lim, limits="1/s", metrics=reg)
        with pytest.raises(TypeError, match="RateLimit: metrics must be"):
            rategate.RateLimit("1/s", limiter=lim, metrics=True)
    finally:
        lim.close()


def test_missing_prometheus_client_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "import rategate\n"
        "try:\n"
        "    import rategate.metrics\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install 'rategate[prometheus]'" in out.stdout


def test_rule_labels_are_bounded() -> None:
    from rategate.limiter import MAX_RULE_LABELS

    lim = rategate.Limiter("memory://")
    try:
        for i in range(MAX_RULE_LABELS + 10):
            lim.rule_counts(f"/raw/{i}")
        assert len(lim.stats()["rules"]) == MAX_RULE_LABELS + 1
        assert lim.rule_counts("/raw/new") is lim.rule_counts("/raw/other")
        assert lim.rule_counts("/raw/new").name == "(other)"
        assert lim.rule_counts("/raw/1").name == "/raw/1"
    finally:
        lim.close()
