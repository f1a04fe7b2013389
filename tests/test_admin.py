"""The store-key layout (rategate.admin, Seam 3) and what tests and operators
get from it (issue 16 #8): ``Limiter.connect()``, ``Limiter.clear()`` and
``Limiter.reset_client()`` on memory://, one Redis, Sentinel and a Cluster.

The Python layout is the reference of the C core's key writer: on random
keys, the keys a real Redis holds after checks are exactly ``redis_key()``'s.
"""

from __future__ import annotations

import asyncio
import random
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from redisserver import RedisServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from topology import ClusterSet, SentinelSet

import rategate
from rategate import admin
from rategate.admin import (
    client_patterns,
    dependency_part,
    fnv1a64,
    key_patterns,
    parse_redis_key,
    rate_of,
    redis_key,
    rule_part,
    split_store_key,
    store_key,
    unescape,
)
from rategate.keys import MAX_KEY_LENGTH
from rategate.middleware import RateLimitMiddleware

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")  # Starlette 1.x prefers httpx2; httpx works
    from starlette.testclient import TestClient


# -- the layout ------------------------------------------------------------------------------
def test_fnv1a64_known_values() -> None:
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C  # the published FNV-1a 64 test vector


def test_layout_round_trips() -> None:
    rnd = random.Random(8)
    alphabet = "ab|#{}%:~*?[]\\ é\x00"
    for _ in range(3000):
        name = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 8)))
        ns = rnd.choice([None, "v2", "a:b{c}"])
        part = rule_part(name, ns)
        assert "|" not in part and "#" not in part and "}" not in part and "{" not in part
        assert unescape(part) == (name if ns is None else f"{ns}:{name}")
        client: str | bytes = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 12)))
        if rnd.random() < 0.3:
            client = client.encode()
        if rnd.random() < 0.1:
            client = client * 60  # past MAX_KEY_LENGTH: hashed
        k = store_key(part, client)
        kb = k.encode("utf-8", "surrogatepass") if isinstance(k, str) else k
        split = split_store_key(kb)
        assert split is not None and split[0] == part.encode()
        assert split[1] == (len(client) > MAX_KEY_LENGTH)
        rate = rategate.Rate(rnd.randint(1, 1000), rnd.choice([1, 60, 0.5, 0.0015, 86400]),
                             rnd.choice([None, 2000]))
        assert rate_of(rate.key_id) == rate
        rk = redis_key(k, rate.key_id)
        assert parse_redis_key(rk) == (kb, rate.key_id.encode())
    assert parse_redis_key(b"other:{x}:1/1000") is None
    assert parse_redis_key(b"rg:{~0000000000000000}~a}b:1/1000") is None  # a wrong FNV tag
    assert parse_redis_key(b"rg:{abc}~1/1000") is None
    assert rate_of(b"c") is None and rate_of(b"5/0") is None and rate_of(b"5/060000") is None
    assert dependency_part("GET /items/{id}") == "dep:GET /items/%7Bid%7D"


@pytest.mark.asyncio
async def test_redis_key_is_what_the_core_writes(redis_server: RedisServer, redis_url: str,
                                                 make_limiter: Any) -> None:
    """The C key writer (csrc/batch.c) and admin.redis_key agree on random keys."""
    lim = make_limiter(redis_url)
    rnd = random.Random(16)
    want: set[bytes] = set()
    for _ in range(300):
        n = rnd.randint(1, 30)  # the core refuses an empty key
        k: str | bytes = bytes(rnd.randrange(256) for _ in range(n)) if rnd.random() < 0.5 else \
            "".join(rnd.choice("ab}{|:~é") for _ in range(n))
        rates = [rategate.Rate(rnd.randint(1, 100), rnd.choice([60, 3600, 86.4]), rnd.choice([None, 300]))]  # buckets outlive the test (TTL: time to full)
        spec = lim.compile(rates, concurrency=rnd.choice([0, 0, 2]))
        if spec.concurrency:
            r = lim.submit(k, spec, 1, b"sid")
            d = r if isinstance(r, rategate.Decision) else await r
        else:
            d = await lim.hit(k, spec)
        assert d.error is None
        want |= {redis_key(k, r.key_id) for r in spec.rates}
        if spec.concurrency:
            want.add(redis_key(k, b"c"))
    got = set(redis_server.client().keys("rg:*"))
    assert got == want
    for key in got:
        parsed = parse_redis_key(key)
        assert parsed is not None and redis_key(*parsed) == key


@pytest.mark.asyncio
async def test_scan_patterns_find_exactly_a_clients_keys(redis_server: RedisServer, redis_url: str,
                                                         make_limiter: Any) -> None:
    lim = make_limiter(redis_url)
    clients: list[str | bytes] = ["1.2.3.4", "a*b", "a?b", "[ab]", "x\\y", "a}b", b"\xff\x00}", "é", "z" * 300]
    spec = lim.compile("5/minute")
    for c in clients:
        for part in ("default", "v2:default", "dep:GET /x", "%ws:default", "a*b"):
            await lim.hit(store_key(part, c), spec)
    await lim.hit("default|1.2.3.4x", spec)  # a longer client with the same start
    for c in clients:
        found = []
        for pattern in client_patterns(c):
            async for page in admin.scan(lim, pattern):
                found += [k for k in page if admin._client_of(parse_redis_key(k)[0], c, None)]  # type: ignore[index]
        assert sorted(found) == sorted(redis_key(store_key(p, c), "5/60000")
                                       for p in ("default", "v2:default", "dep:GET /x", "%ws:default", "a*b")), c
        match, route = key_patterns(store_key("default", c))
        pages = [k async for page in admin.scan(lim, match, key=route) for k in page]
        assert pages == [redis_key(store_key("default", c), "5/60000")]


# -- connect() --------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_connect(redis_url: str, make_limiter: Any) -> None:
    await make_limiter("memory://").connect()  # nothing to connect to: returns
    lim = make_limiter(redis_url)
    await lim.connect()
    assert lim.stats()["connected"]
    port = free_port()
    bad = make_limiter(f"redis://user:s3cret@127.0.0.1:{port}/0", connect_timeout=0.5)
    with pytest.raises(ConnectionError) as e:
        await bad.connect()
    text = str(e.value)
    assert f"redis://user:***@127.0.0.1:{port}/0" in text and "s3cret" not in text, text
    assert "connection refused" in text and "connect_timeout (0.5s)" in text, text


# -- the topologies clear() and reset_client() run on -------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    c = ClusterSet(masters=3)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelSet]:
    s = SentinelSet(replicas=0, sentinels=1)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
def store(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """(storage URL, a function listing the rg: keys in the store, or None for memory://)."""
    kind = request.param
    if kind == "memory":
        return "memory://", None
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        url = request.getfixturevalue("redis_url")
        return url, lambda: sorted(server.client().keys("rg:*"))
    if kind == "sentinel":
        s = request.getfixturevalue("sentinel")
        s.current_master().flushall()
        return s.url(), lambda: sorted(s.current_master().client().keys("rg:*"))
    c = request.getfixturevalue("cluster")
    for n in c.nodes:
        n.flushall()
    return c.url(), lambda: sorted(k for n in c.nodes for k in n.client().keys("rg:*"))


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def app_of(lim: Any, **kw: Any) -> Starlette:
    app = Starlette(routes=[Route("/hello", hello), Route("/api/chat", hello), Route("/login", hello,
                                                                                   methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, limiter=lim, limits="3/minute",
                       rules={"/api/chat": "2/minute", "POST /login": "1/minute"}, **kw)
    return app


def client(app: Any, ip: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 1)), base_url="http://t")


@pytest.mark.asyncio
async def test_clear(store: tuple[str, Any], make_limiter: Any) -> None:
    url, keys = store
    lim = make_limiter(url)
    app = app_of(lim)
    ips = [f"198.51.100.{i}" for i in range(20)]
    for ip in ips:
        async with client(app, ip) as c:
            assert [(await c.get("/hello")).status_code for _ in range(4)] == [200, 200, 200, 429]
            await c.post("/login")
    spec = lim.compile("1/minute", concurrency=2)
    r = lim.submit("slots|x", spec, 1, b"slot-1")  # a concurrency slot set too
    assert (r if isinstance(r, rategate.Decision) else await r).allowed
    if keys is not None:
        assert len(keys()) == 2 * 20 + 2
    assert await lim.clear() == 2 * 20 + 2
    if keys is not None:
        assert keys() == []
    for ip in ips:  # full buckets again, at once: this process's deny cache was emptied too
        async with client(app, ip) as c:
            assert (await c.get("/hello")).headers["ratelimit-remaining"] == "2"
    assert await lim.clear() == 20
    assert await lim.clear() == 0


@pytest.mark.asyncio
async def test_clear_leaves_other_keys_alone(redis_server: RedisServer, redis_url: str, make_limiter: Any) -> None:
    r = redis_server.client()
    r.set("app:session", "1")
    r.set("rg", "2")
    lim = make_limiter(redis_url)
    await lim.hit("default|x", "5/minute")
    assert await lim.clear() == 1
    assert sorted(r.keys("*")) == [b"app:session", b"rg"]


@pytest.mark.asyncio
async def test_reset_client(store: tuple[str, Any], make_limiter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url, keys = store
    lim = make_limiter(url)
    app = app_of(lim, namespace="v1")
    api = FastAPI()

    @api.get("/items/{item_id}", dependencies=[Depends(rategate.RateLimit("1/minute", limiter=lim))])
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    async def use_up(ip: str) -> None:
        async with client(app, ip) as c:
            for _ in range(3):
                await c.get("/hello")
            for _ in range(2):
                await c.get("/api/chat")
            await c.post("/login")
        async with client(api, ip) as c:
            await c.get("/items/1")

    async def codes(ip: str) -> dict[str, int]:
        async with client(app, ip) as c:
            out = {"default": (await c.get("/hello")).status_code, "/api/chat": (await c.get("/api/chat")).status_code,
                   "POST /login": (await c.post("/login")).status_code}
        async with client(api, ip) as c:
            out["dep"] = (await c.get("/items/2")).status_code
        return out

    for ip in ("203.0.113.1", "203.0.113.2"):
        await use_up(ip)

    def no_scan(*a: Any, **k: Any) -> Any:
        raise AssertionError("a known rule is reset without a scan")

    # Known rules: exactly, no scan.
    with monkeypatch.context() as m:
        m.setattr(admin, "scan", no_scan)
        done = await lim.reset_client("203.0.113.1", rule="/api/chat", namespace="v1")
        assert done == [redis_key(store_key(rule_part("/api/chat", "v1"), "203.0.113.1"), "2/60000")]
        assert await lim.reset_client("203.0.113.1", rule="v1:POST /login") != []
        assert await lim.reset_client("203.0.113.1", rule="dep:GET /items/{item_id}") != []
    assert await codes("203.0.113.1") == {"default": 429, "/api/chat": 200, "POST /login": 200, "dep": 200}
    assert await codes("203.0.113.2") == {"default": 429, "/api/chat": 429, "POST /login": 429, "dep": 429}
    # Every rule of one client; the other client keeps its counts.
    await use_up("203.0.113.1")
    await lim.reset_client("203.0.113.1")
    assert await codes("203.0.113.1") == {"default": 200, "/api/chat": 200, "POST /login": 200, "dep": 200}
    assert (await codes("203.0.113.2"))["default"] == 429
    # Every rule of one namespace: the dependency's counter stays.
    await use_up("203.0.113.1")
    await lim.reset_client("203.0.113.1", namespace="v1")
    assert await codes("203.0.113.1") == {"default": 200, "/api/chat": 200, "POST /login": 200, "dep": 429}


@pytest.mark.asyncio
async def test_reset_client_of_a_rule_this_process_does_not_run(store: tuple[str, Any], make_limiter: Any) -> None:
    """Another process's rule (here: keys written by a bare Limiter) is found by a scan, on its own node."""
    redis_url, keys = store
    if keys is None:
        pytest.skip("memory:// holds this process's keys only")
    writer = make_limiter(redis_url)
    for c in ("10.0.0.1", "10.0.0.2", "a}b", "q" * 300, b"\xff"):
        for rates in ("5/minute", "2/second; 100/hour"):
            await writer.hit(store_key(rule_part("search", "other-app"), c), rates)
    lim = make_limiter(redis_url)
    done = await lim.reset_client("10.0.0.1", rule="search", namespace="other-app")
    assert len(done) == 3
    for c in ("a}b", "q" * 300, b"\xff"):
        assert len(await lim.reset_client(c, rule="other-app:search")) == 3, c
    assert keys() == sorted(redis_key(store_key(rule_part("search", "other-app"), "10.0.0.2"), r)
                            for r in ("5/60000", "2/1000", "100/3600000"))
    assert len(await lim.reset_client("10.0.0.2")) == 3  # every rule: a scan of the store (every master)
    assert keys() == []


@pytest.mark.asyncio
async def test_reset_client_errors(make_limiter: Any) -> None:
    lim = make_limiter("memory://")
    app_of(lim)  # registers default, /api/chat, POST /login (built lazily: build it)
    RateLimitMiddleware(hello, limiter=lim, limits="1/minute", namespace="x")
    with pytest.raises(ValueError, match=r"no rule 'defualt' in this process \(known: .*default"):
        await lim.reset_client("1.2.3.4", rule="defualt")
    with pytest.raises(ValueError, match="client must be what the key function returns"):
        await lim.reset_client("")
    with pytest.raises(ValueError, match="rule must be a rule's name or path"):
        await lim.reset_client("1.2.3.4", rule="")
    with pytest.raises(ValueError, match="namespace must be"):
        await lim.reset_client("1.2.3.4", namespace="")


def test_testclient_and_asgitransport_are_keyed_differently() -> None:
    """TestClient's peer is ("testclient", 50000), not an address: client_ip() keys it "unknown";
    httpx.ASGITransport's default peer is 127.0.0.1.  reset_client takes either."""
    lim = rategate.Limiter("memory://")
    app = app_of(lim)
    try:
        with TestClient(app) as tc:
            assert [tc.get("/hello").status_code for _ in range(4)] == [200, 200, 200, 429]
            asyncio.run(lim.reset_client("unknown"))
            assert tc.get("/hello").status_code == 200

        async def via_httpx() -> list[int]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return [(await c.get("/hello")).status_code for _ in range(4)]

        assert asyncio.run(via_httpx()) == [200, 200, 200, 429]  # its own bucket: 127.0.0.1
        asyncio.run(lim.reset_client("127.0.0.1", rule="default"))
        assert asyncio.run(via_httpx())[0] == 200
    finally:
        lim.close()
