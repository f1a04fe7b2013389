"""`rategate blocked / show / reset / ping` as an operator runs them, against what a real app did.

For each store (one Redis server, a Sentinel set with a replica, a 3-master
Redis Cluster; each started once for the module, with a password), a real
uvicorn serves an app whose middleware limits clients (tests/cli_app.py).
After a client has been limited there, the CLI, run as a subprocess:

- `blocked` lists it (not a client within its limit), `--json` parses;
- `show` shows its bucket: the rule, the rate, no tokens left, a retry-after;
- `reset` removes it, and the client's next request is allowed once the
  app's deny_cache_ttl has passed (the app's process cached the denial);
- `ping` exits 0 naming the topology, and 1 with the cause when the store is
  down or the password is wrong.

The Limiter methods behind them, on memory:// in process, and the slot sets
`reset` removes: at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from asgi_call import get, ok_app
from redisserver import RedisServer, free_port
from source_tree import HAVE_SOURCE, ROOT
from test_uvicorn import Uvicorn
from topology import ClusterSet, SentinelSet

import rategate

PASSWORD = "ops-pw-7d1e"
DENY_CACHE_TTL = 0.5  # the app's (tests/cli_app.py reads it from the environment)


def cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RATEGATE_URL"}
    env["RATEGATE_URL"] = url
    if HAVE_SOURCE:
        env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "rategate", "--timeout", "3", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def cli_json(url: str, *args: str) -> tuple[int, Any]:
    p = cli(url, "--json", *args)
    assert PASSWORD not in p.stdout + p.stderr
    return p.returncode, json.loads(p.stdout)


class Store:
    def __init__(self, kind: str, url: str, bad_password: str, down: str, closer: Any) -> None:
        self.kind, self.url, self.bad_password, self.down, self.close = kind, url, bad_password, down, closer


@pytest.fixture(scope="module", params=["server", "sentinel", "cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[tuple[Store, Uvicorn]]:
    kind = request.param
    if kind == "server":
        s: Any = RedisServer(password=PASSWORD)
        url = f"redis://:{PASSWORD}@127.0.0.1:{s.port}/0"
        st = Store(kind, url, url.replace(PASSWORD, "wrong-" + PASSWORD),
                   f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0", s.close)
    elif kind == "sentinel":
        s = SentinelSet(password=PASSWORD, replicas=1, sentinels=1)
        url = s.url()
        st = Store(kind, url, url.replace(PASSWORD, "wrong-" + PASSWORD),
                   f"redis+sentinel://:{PASSWORD}@127.0.0.1:{free_port()}/{s.name}/0", s.close)
    else:
        s = ClusterSet(masters=3, password=PASSWORD)
        url = s.url()
        st = Store(kind, url, url.replace(PASSWORD, "wrong-" + PASSWORD),
                   f"redis+cluster://:{PASSWORD}@127.0.0.1:{free_port()}", s.close)
    server = None
    try:
        server = Uvicorn("cli_app:app", "--no-proxy-headers", "--lifespan", "on",
                         env={"RATEGATE_TEST_URL": url, "RATEGATE_TEST_DENY_CACHE_TTL": str(DENY_CACHE_TTL)})
        yield st, server
    finally:
        if server is not None:
            server.stop()
        st.close()


def statuses(server: Uvicorn, source: str, n: int, path: str = "/") -> list[int]:
    with server.client(source) as c:
        return [c.get(path).status_code for _ in range(n)]


def test_blocked_show_reset(store: tuple[Store, Uvicorn]) -> None:
    st, server = store
    a, b = "127.0.0.2", "127.0.0.3"
    # ping first: the operator's first command; the topology it names
    code, doc = cli_json(st.url, "ping")
    assert code == 0 and doc["ok"] is True, doc
    assert doc["kind"] == st.kind
    assert all(m["check"]["ok"] for m in doc["masters"])
    if st.kind == "cluster":
        assert len(doc["masters"]) == 3 and doc["slots_covered"] == 16384
    if st.kind == "sentinel":
        assert doc["sentinel"] is not None
    assert statuses(server, a, 5) == [200, 200, 200, 429, 429]   # the app's limit: 3/minute
    assert statuses(server, b, 1) == [200]
    assert statuses(server, a, 3, "/api/x") == [200, 200, 429]   # the /api rule: 2/minute

    code, doc = cli_json(st.url, "blocked")
    assert code == 0 and doc["complete"] is True
    found = {(e["rule"], e["client"]) for e in doc["blocked"]}
    assert found == {("default", a), ("/api", a)}
    assert all(e["retry_after"] > 0 for e in doc["blocked"])
    first = doc["blocked"][0]  # most blocked first: /api's token comes back later (2/minute)
    assert first["rule"] == "/api"
    code, doc = cli_json(st.url, "blocked", "--rule", "default")
    assert code == 0 and [(e["rule"], e["client"]) for e in doc["blocked"]] == [("default", a)]

    code, doc = cli_json(st.url, "show", a)
    assert code == 0
    by_rule = {bk["rule"]: bk for bk in doc["buckets"]}
    assert set(by_rule) == {"default", "/api"}
    assert by_rule["default"]["rate"] == "3/minute" and by_rule["default"]["tokens"] == 0
    assert 0 < by_rule["default"]["retry_after"] <= 20 and 40 < by_rule["default"]["time_to_full"] <= 60
    code, doc = cli_json(st.url, "show", b)
    assert [(bk["rule"], bk["tokens"], bk["retry_after"]) for bk in doc["buckets"]] == [("default", 2, 0.0)]
    human = cli(st.url, "show", a)
    assert human.returncode == 0 and "BLOCKED" in human.stdout and "3/minute" in human.stdout

    code, doc = cli_json(st.url, "reset", a, "--rule", "default")
    assert code == 0 and len(doc["removed"]) == 1 and "default|127.0.0.2" in doc["removed"][0]
    time.sleep(DENY_CACHE_TTL + 0.05)  # the app's process cached a's denial for at most this long
    assert statuses(server, a, 1) == [200]
    assert statuses(server, a, 1, "/api/x") == [429]  # the other rule was left alone
    code, doc = cli_json(st.url, "reset", a)
    assert code == 0 and len(doc["removed"]) == 2  # every rule: /api's, and default's new bucket
    time.sleep(DENY_CACHE_TTL + 0.05)
    assert statuses(server, a, 1, "/api/x") == [200]
    code, doc = cli_json(st.url, "blocked")
    assert doc["blocked"] == [] and doc["complete"] is True
    human = cli(st.url, "blocked")
    assert human.returncode == 0 and "no client is over a limit" in human.stdout


def test_ping_fails_with_the_cause(store: tuple[Store, Uvicorn]) -> None:
    st, _ = store
    p = cli(st.bad_password, "ping")
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "WRONGPASS" in out or "invalid password" in out or "NOAUTH" in out, out
    assert PASSWORD not in out
    p = cli(st.down, "--timeout", "1", "ping")
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "connection refused" in out, out
    assert PASSWORD not in out
    code, doc = cli_json(st.down, "--timeout", "1", "ping")
    assert code == 1 and doc["ok"] is False and "connection refused" in doc["error"]


# -- the Limiter methods, in process -------------------------------------------------


@pytest.mark.parametrize("store_kind", [
    pytest.param("memory", marks=pytest.mark.skipif(not hasattr(rategate._core.MemoryEngine, "entries"),
                                                    reason="MemoryEngine.entries() (Seam 2) has not landed")),
    "redis"])
async def test_the_limiter_methods(store_kind: str, make_limiter: Any, request: pytest.FixtureRequest) -> None:
    url = "memory://" if store_kind == "memory" else request.getfixturevalue("redis_url")
    lim = make_limiter(url, timeout=2.0)
    mw = rategate.RateLimitMiddleware(ok_app, limiter=lim, limits="2/minute", namespace="v2",
                                      rules={"/api": "1/minute"}, denial_log=False)
    for ip, n in (("203.0.113.1", 4), ("203.0.113.2", 3), ("203.0.113.3", 1)):
        for _ in range(n):
            await get(mw, ip)
    await get(mw, "203.0.113.2", "/api")
    await get(mw, "203.0.113.2", "/api")
    found, complete = await lim.blocked()
    assert complete
    assert [(b.rule, b.client) for b in found][:1] == [("v2:/api", "203.0.113.2")]  # 1/minute: the longest wait
    assert {(b.rule, b.client) for b in found} == {("v2:/api", "203.0.113.2"), ("v2:default", "203.0.113.1"),
                                                   ("v2:default", "203.0.113.2")}
    top, _ = await lim.blocked(limit=1)
    assert [(b.rule, b.client) for b in top] == [("v2:/api", "203.0.113.2")]
    only, _ = await lim.blocked(namespace="v2", rule="default")
    assert {b.client for b in only} == {"203.0.113.1", "203.0.113.2"}
    assert (await lim.blocked(namespace="other"))[0] == []
    bs = await lim.buckets("203.0.113.3")
    assert [(b.rule, b.rate, b.tokens, b.retry_after) for b in bs] == [("v2:default", "2/minute", 1, 0.0)]
    assert await lim.buckets("198.51.100.7") == []
    removed = await lim.reset_client("203.0.113.1", namespace="v2")
    assert len(removed) == 1
    assert await get(mw, "203.0.113.1") == 200
    with pytest.raises(ValueError, match="limit must be"):
        await lim.blocked(limit=0)


async def test_reset_removes_leaked_slots(redis_url: str, make_limiter: Any) -> None:
    """A client locked out by slots its dead requests still hold: `reset` lets it in."""
    lim = make_limiter(redis_url, timeout=2.0)
    spec = lim.compile(None, concurrency=1, ttl=600)
    key = "slow|203.0.113.50"
    slot = lim.concurrency(key, rates=spec)
    await slot.__aenter__()  # held, never given back: a process that died holding it
    with pytest.raises(rategate.ConcurrencyLimitExceeded):
        async with lim.concurrency(key, rates=spec):
            pass
    bs = await lim.buckets("203.0.113.50")
    assert [(b.rule, b.kind, b.slots) for b in bs] == [("slow", "concurrency", 1)]
    assert await lim.reset_client("203.0.113.50") == []  # by default slots are requests in flight: kept
    p = await asyncio.to_thread(cli, redis_url, "--json", "reset", "203.0.113.50")
    doc = json.loads(p.stdout)
    assert p.returncode == 0 and doc["removed"] == ["rg:{slow|203.0.113.50}:c"] and doc["left"] == []
    async with lim.concurrency(key, rates=spec) as s:
        assert s.decision.allowed
    # the Limiter's own flag, on a rule by name
    slot = lim.concurrency(key, rates=spec)
    await slot.__aenter__()
    assert await lim.reset_client("203.0.113.50", rule="slow", slots=True) == [b"rg:{slow|203.0.113.50}:c"]
    assert await lim.buckets("203.0.113.50") == []
    with pytest.raises(ValueError, match="slots must be True or False"):
        await lim.reset_client("203.0.113.50", slots="yes")  # type: ignore[arg-type]


def test_shm_across_processes(tmp_path: Any) -> None:
    """shm://: two uvicorn workers share the buckets; the CLI, a third
    process, finds, shows and resets them (no deny cache: at once)."""
    name = f"rg-cli-{os.getpid()}"
    url = f"shm://{name}"
    server = Uvicorn("cli_app:app", "--no-proxy-headers", "--lifespan", "on", workers=2,
                     env={"RATEGATE_TEST_URL": url})
    try:
        assert statuses(server, "127.0.0.2", 5) == [200, 200, 200, 429, 429]  # across both workers
        code, doc = cli_json(url, "ping")
        assert code == 0 and doc["segment"]["path"] == f"/dev/shm/rategate.{name}"
        code, doc = cli_json(url, "blocked")
        assert code == 0 and [(e["rule"], e["client"]) for e in doc["blocked"]] == [("default", "127.0.0.2")]
        code, doc = cli_json(url, "show", "127.0.0.2")
        assert [(b["rule"], b["tokens"]) for b in doc["buckets"]] == [("default", 0)]
        code, doc = cli_json(url, "reset", "127.0.0.2")
        assert code == 0 and len(doc["removed"]) == 1
        assert statuses(server, "127.0.0.2", 4) == [200, 200, 200, 429]
    finally:
        server.stop()
        rategate.shm_unlink(name)
    p = cli(url, "ping")
    assert p.returncode == 1 and "no segment" in p.stderr
