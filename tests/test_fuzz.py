"""Fuzzing (hypothesis) of everything that parses input.

Configuration (rate strings, Rate fields, storage URLs, Limiter options):
only ValueError or TypeError, and what is accepted works end to end (the C
core accepts every Rate that Python accepts).  Network input (client
addresses, header lists, whole ASGI scopes through the middleware): never
an exception, never a hang, always a bounded, non-empty key or a response.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rategate
from rategate.limiter import parse_storage_url

FUZZ = settings(deadline=None, database=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.none(), st.text(max_size=5))


# -- configuration --------------------------------------------------------------------------
rate_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, sep, c, u: f"{a}{sep}{c}{u}",
              st.one_of(st.integers(-5, 10**12).map(str), st.text(max_size=3)),
              st.sampled_from(["/", " per ", "/ ", ";", ","]),
              st.one_of(st.just(""), st.integers(0, 10**9).map(str), st.floats(0, 1e9).map(str)),
              st.sampled_from(["s", "second", "minute", "h", "day", "ms", "fortnight", ""])),
)


@settings(FUZZ)
@given(text=rate_text)
def test_rate_strings(text: str) -> None:
    try:
        rates = rategate.parse_rates(text)
    except ValueError as e:
        assert str(e)
        return
    rategate.Spec(rates)  # whatever Python accepts, the C core takes


@settings(FUZZ)
@given(limit=numbers, period=numbers, burst=numbers)
def test_rate_fields(limit: Any, period: Any, burst: Any) -> None:
    try:
        r = rategate.Rate(limit, period, burst=burst)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    rategate.Spec((r,))


url_text = st.one_of(
    st.text(max_size=60),
    st.builds(lambda scheme, rest: scheme + rest,
              st.sampled_from(["redis://", "unix://", "memory://", "rediss://", "REDIS://", "http://", ""]),
              st.text(alphabet=st.characters(codec="utf-8"), max_size=50)),
    st.builds(lambda host, port, db: f"redis://{host}:{port}/{db}",
              st.sampled_from(["h", "[::1]", "127.0.0.1", "", "a:b", "[zz]"]),
              st.one_of(st.integers(-5, 2**70), st.text(max_size=4)),
              st.one_of(st.integers(-5, 2**70), st.text(max_size=4))),
    st.builds(lambda db: f"unix:///tmp/r.sock?db={db}", st.one_of(st.integers(-5, 2**70), st.text(max_size=6))),
)


@settings(FUZZ)
@given(url=url_text)
def test_storage_urls(url: str) -> None:
    try:
        cfg = parse_storage_url(url)
    except ValueError as e:
        assert str(e)
        return
    if cfg["kind"] == "redis":
        # Builds the engine (no connection until the first check): no
        # OverflowError or anything else for an accepted URL.
        rategate.Limiter(url).close()


@settings(FUZZ, max_examples=200)
@given(timeout=numbers, connect_timeout=numbers, stall_timeout=numbers, spin=numbers,
       deny_cache_ttl=numbers, max_pending=numbers, deny_cache=numbers, threads=numbers)
def test_limiter_options(**kw: Any) -> None:
    try:
        lim = rategate.Limiter("redis://127.0.0.1:1/0", **kw)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    lim.close()


# -- network input ----------------------------------------------------------------------------
hosts = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:443"),
    st.ip_addresses(v=4).map(lambda a: f"{a}:80"),
    st.text(max_size=80),
    st.just(""),
)
header_names = st.sampled_from([b"x-forwarded-for", b"X-Forwarded-For", b"forwarded", b"x-real-ip",
                                b"x-api-key", b"host"])
header_values = st.one_of(
    st.binary(max_size=300),
    st.lists(hosts, max_size=40).map(lambda hs: ", ".join(hs).encode("utf-8", "replace")),
    st.lists(hosts, max_size=5).map(lambda hs: ", ".join(f'for="{h}";proto=https' for h in hs).encode("utf-8", "replace")),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=8)
clients = st.one_of(st.none(), st.tuples(hosts, st.integers(0, 65535)))
key_funcs = [
    rategate.client_ip(),
    rategate.client_ip(trusted_proxies=["10.0.0.0/8", "::1", "unix"], ipv6_prefix=64),
    rategate.client_ip(trusted_proxies=["0.0.0.0/0", "::/0"], proxy_header="forwarded"),
    rategate.client_ip(trusted_proxies=["0.0.0.0/0"], proxy_header="x-real-ip"),
    rategate.header("x-api-key"),
]


@settings(FUZZ, max_examples=500)
@given(client=clients, hdrs=headers)
def test_key_functions_never_raise(client: Any, hdrs: list[tuple[bytes, bytes]]) -> None:
    scope = {"type": "http", "client": client, "headers": hdrs}
    for f in key_funcs:
        k = f(scope)
        assert isinstance(k, (str, bytes)) and 0 < len(k) <= 300, (f, k)


def test_one_client_one_key() -> None:
    f = rategate.client_ip()
    same = ["2001:db8::1", "2001:DB8:0:0:0:0:0:1", "[2001:db8::1]", "2001:0db8::0001", "[2001:db8::1]:8080"]
    assert {f({"type": "http", "client": (s, 0), "headers": []}) for s in same} == {"2001:db8::1"}


# -- the middleware over random scopes -------------------------------------------------------
def check_start(start: dict[str, Any]) -> None:
    """What any request, however malformed, gets back: a 200 or a 429 whose
    header names and values are bytes and whose Retry-After is a whole
    number of seconds, at least 1 (test_gate.py checks its C path with it)."""
    assert start["type"] == "http.response.start" and start["status"] in (200, 429)
    for k, v in start["headers"]:
        assert isinstance(k, bytes) and isinstance(v, bytes)
        if k == b"retry-after":
            assert int(v) >= 1 and math.isfinite(int(v))


@pytest.fixture(scope="module")
def middleware() -> Iterator[Any]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"y")]})
            await send({"type": "http.response.body", "body": b"ok"})

    lim = rategate.Limiter("memory://")
    mw = rategate.RateLimitMiddleware(
        app, limiter=lim, limits="5/minute",
        rules={"/api": "2/second; 10/minute", "POST /login": "1/minute"},
        key=rategate.client_ip(trusted_proxies=["10.0.0.0/8"]), headers="draft-11",
        exempt=["/health"], cost=lambda scope: len(scope.get("query_string", b"")) % 7,
    )
    yield mw
    lim.close()


paths = st.one_of(st.sampled_from(["/", "/api", "/api/x", "/login", "/health", "/apiary", ""]),
                  st.text(max_size=40))
scopes = st.fixed_dictionaries({
    "type": st.sampled_from(["http", "http", "websocket", "lifespan"]),
    "method": st.sampled_from(["GET", "POST", "HEAD", "get", "", "PURGE"]),
    "path": paths,
    "raw_path": st.binary(max_size=40),
    "query_string": st.binary(max_size=20),
    "headers": headers,
    "client": clients,
    "scheme": st.sampled_from(["http", "https"]),
    "http_version": st.just("1.1"),
    "asgi": st.just({"version": "3.0"}),
})


@settings(FUZZ, max_examples=300)
@given(scope=scopes)
def test_middleware_over_random_scopes(middleware: Any, loop: asyncio.AbstractEventLoop,
                                       scope: dict[str, Any]) -> None:
    if scope["type"] == "lifespan":
        return  # needs a real lifespan conversation; not network input
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if scope["type"] == "websocket":
            return {"type": "websocket.connect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    loop.run_until_complete(asyncio.wait_for(middleware(dict(scope), receive, send), 10))
    if scope["type"] == "http":
        check_start(sent[0])
