"""The denial log (rategate.denials): nginx limit_req-style lines, rate-limited and bounded.

Unit tests drive a DenialLog with a fake clock (exact bounds); the flood
tests send 10,000 distinct clients through a real RateLimitMiddleware
(memory:// and a real Redis) and count the lines.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytest
from asgi_call import get, ok_app

import rategate
from rategate.denials import DEFAULT, DenialLog, client_of, hashed


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rategate.denials"]


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> tuple[DenialLog, Clock]:
    caplog.set_level(logging.INFO, logger="rategate.denials")
    clock = Clock()
    return DenialLog(per_client=60, per_second=5, clock=clock), clock


def test_one_line_per_client_per_rule_per_minute(log: tuple[DenialLog, Clock],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    d, clock = log
    for _ in range(100):
        d.note("api", "api|203.0.113.9", "/api/search", 12.3)
        clock.t += 0.5  # 50 s
    d.note("other", "other|203.0.113.9", "/x", 1.0)  # another rule: its own line
    assert lines(caplog) == [
        'limiting requests: rule "api", client 203.0.113.9, path "/api/search", retry after 12.3 s',
        'limiting requests: rule "other", client 203.0.113.9, path "/x", retry after 1 s',
    ]
    clock.t += 10.5  # a minute after the first line
    d.note("api", "api|203.0.113.9", "/api/search", math.inf)
    assert lines(caplog)[-1] == (
        'limiting requests: rule "api", client 203.0.113.9, path "/api/search", retry after never '
        "(the cost is larger than the bucket); 99 more denials of this client since its last line")
    assert d.lines == 3 and d.suppressed == 99
    rec = [r for r in caplog.records if r.name == "rategate.denials"][-1]
    assert rec.levelno == logging.WARNING
    assert (rec.rategate_rule, rec.rategate_client, rec.rategate_path) == (  # type: ignore[attr-defined]
        "api", "203.0.113.9", "/api/search")


def test_total_per_second_and_what_was_left_out(log: tuple[DenialLog, Clock],
                                                caplog: pytest.LogCaptureFixture) -> None:
    d, clock = log
    for i in range(1000):  # 1000 distinct clients within one second
        d.note("r", f"r|10.0.{i // 256}.{i % 256}", "/", 1.0)
    assert len(lines(caplog)) == 5  # the burst
    clock.t += 1.0
    d.note("r", "r|192.0.2.1", "/", 1.0)
    assert len(lines(caplog)) == 6
    assert lines(caplog)[-1].endswith("; 995 denials of other clients not logged (over 5 lines/s)")
    # The count was reported once.
    clock.t += 1.0
    d.note("r", "r|192.0.2.2", "/", 1.0)
    assert "not logged" not in lines(caplog)[-1]


def test_flood_of_distinct_clients_is_bounded_in_lines_and_memory(log: tuple[DenialLog, Clock],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    d, clock = log
    seconds = 300
    for t in range(seconds * 100):  # 100 new clients a second for 5 minutes
        d.note("r", f"r|c{t}", "/", 1.0)
        clock.t += 0.01
        assert len(d._seen) <= 5 * (60 + 1)
    # per_second * (T + 1) lines at most
    assert len(lines(caplog)) <= 5 * (seconds + 1)
    assert len(lines(caplog)) >= 5 * seconds - 5  # and the budget is used


def test_keys_are_shown_safely(log: tuple[DenialLog, Clock], caplog: pytest.LogCaptureFixture) -> None:
    d, clock = log
    api = rategate.header("x-api-key")
    d.note("a", b"a|x-api-key=s3cret-value", "/p\r\nX-Injected: 1", 2.0, api.redact)
    d.note("a", b"a|127.0.0.1", "/p", 2.0, api.redact)  # the fallback's key: an IP, as it is
    d.note("b", "b#" + "f" * 40, "/q", 2.0)  # a long client key, hashed by the middleware
    d.note("c", "c|" + "\x1b[31mred", "/" + "y" * 500, 2.0)
    d.note("d", "d|user-7", "/", 2.0, redact=lambda k: 1 / 0)  # type: ignore[arg-type,return-value]
    out = lines(caplog)
    assert "s3cret" not in caplog.text
    assert out[0] == ('limiting requests: rule "a", client x-api-key=' + hashed(b"s3cret-value")
                      + r', path "/p\r\nX-Injected: 1", retry after 2 s')
    assert ", client 127.0.0.1," in out[1]
    assert ", client #" + "f" * 40 + "," in out[2]
    assert r"\x1b[31mred" in out[3] and ('"/' + "y" * 199 + '...", retry') in out[3]
    assert ", client " + hashed("user-7") + "," in out[4]
    for line in out:
        assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert rategate.header("x-tenant", secret=False).redact(b"x-tenant=acme") == "x-tenant=acme"
    assert client_of("no-separator") == "no-separator"


def test_off_when_the_logger_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="rategate.denials")
    d = DenialLog(per_second=5)
    for i in range(100):
        d.note("r", f"r|{i}", "/", 1.0)
    assert lines(caplog) == [] and d.lines == 0 and not d._seen


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="per_second must be"):
        DenialLog(per_second=0)
    with pytest.raises(ValueError, match="per_client must be"):
        DenialLog(per_client=-1)
    with pytest.raises(TypeError, match="denial_log must be True"):
        rategate.RateLimitMiddleware(lambda *a: None, limiter="memory://", limits="1/s", denial_log="yes")
    with pytest.raises(ValueError, match="secret must be True or False"):
        rategate.header("x-api-key", secret="no")  # type: ignore[arg-type]


# -- through the middleware ----------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_flood_from_10000_clients(store: str, request_fixture: Any, make_limiter: Any,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rategate.denials")
    url = "memory://" if store == "memory" else request_fixture("redis_url")
    lim = make_limiter(url, timeout=2.0)
    per_second = 10
    dl = DenialLog(per_second=per_second)
    mw = rategate.RateLimitMiddleware(ok_app, limiter=lim, limits="1/minute", denial_log=dl)
    heavy = [f"192.0.2.{i}" for i in range(1, 4)]
    t0 = time.monotonic()
    statuses = []
    for i in range(10_000):
        ip = f"198.51.{i // 256}.{i % 256}"
        statuses += [await get(mw, ip), await get(mw, ip)]  # allowed, then denied
        if i % 100 == 0:
            for n, h in enumerate(heavy):
                for _ in range(3 * (n + 1)):
                    await get(mw, h)
    elapsed = time.monotonic() - t0
    assert statuses.count(429) == 10_000
    n = len(lines(caplog))
    # the bound: per_second * (T + 1), T the flood's length in seconds
    assert n <= per_second * (elapsed + 1), (n, elapsed)
    assert n == dl.lines and dl.suppressed == 10_000 + 100 * 18 - 3 - n
    st = lim.stats()
    assert [(e["rule"], e["client"]) for e in st["top_denied"][:3]] == [
        ("default", heavy[2]), ("default", heavy[1]), ("default", heavy[0])]
    assert abs(st["denied_clients_1m"] - 10_003) <= 1000


@pytest.fixture
def request_fixture(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue


async def test_the_default_log_and_the_dependency(make_limiter: Any, caplog: pytest.LogCaptureFixture) -> None:
    import httpx
    from fastapi import Depends, FastAPI

    caplog.set_level(logging.INFO, logger="rategate.denials")
    DEFAULT.clear()  # the process's log: earlier tests' floods spent its budget
    lim = make_limiter("memory://")
    app = FastAPI()

    @app.get("/items/{i}", dependencies=[Depends(rategate.RateLimit(
        "1/minute", limiter=lim, key=rategate.header("x-api-key")))])
    async def item(i: int) -> dict[str, int]:
        return {"i": i}

    mw = rategate.RateLimitMiddleware(app, limiter=lim, rules={"/ws": "1/minute"})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw, client=("203.0.113.7", 1)),
                                 base_url="http://t") as c:
        codes = [(await c.get("/items/1", headers={"x-api-key": "k-123"})).status_code for _ in range(3)]
    assert codes == [200, 429, 429]
    assert lines(caplog) == [f'limiting requests: rule "dep:GET /items/{{i}}", client x-api-key={hashed(b"k-123")}, '
                             'path "/items/1", retry after 60 s']
    st = lim.stats()
    assert st["top_denied"] == [{"rule": "dep:GET /items/{i}", "client": f"x-api-key={hashed(b'k-123')}",
                                 "denials": 2, "overcount": 0}]
    assert "k-123" not in repr(st)


async def test_off_per_middleware_and_not_for_shadow_or_failures(make_limiter: Any, own_redis: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rategate")
    lim = make_limiter("memory://")
    off = rategate.RateLimitMiddleware(ok_app, limiter=lim, limits="1/minute", denial_log=False)
    shadow = rategate.RateLimitMiddleware(ok_app, limiter=lim, limits="1/minute", shadow=True, namespace="s")
    assert [await get(off, "10.1.1.1") for _ in range(3)] == [200, 429, 429]
    assert [await get(shadow, "10.1.1.1") for _ in range(3)] == [200, 200, 200]
    own_redis.stop()
    down = rategate.RateLimitMiddleware(ok_app, limiter=make_limiter(own_redis.url, connect_timeout=0.2),
                                        limits="1/minute", namespace="d")
    assert await get(down, "10.1.1.1") == 429  # the failure mode, not a denial of the client
    assert lines(caplog) == []


async def test_the_gauge_of_clients_denied_in_the_last_minute(make_limiter: Any) -> None:
    from prometheus_client import CollectorRegistry

    from rategate.metrics import PrometheusMetrics

    reg = CollectorRegistry()
    m = PrometheusMetrics(registry=reg)
    lim = make_limiter("memory://")
    mw = rategate.RateLimitMiddleware(ok_app, limiter=lim, limits="1/minute", metrics=m, denial_log=False)
    for i in range(30):
        for _ in range(2 if i % 3 else 5):
            await get(mw, f"203.0.113.{i}")
    m.refresh()
    assert reg.get_sample_value("rategate_denied_clients_last_minute") == 30
    body, _ = m.render()
    assert b"203.0.113" not in body  # never a client key in a label
