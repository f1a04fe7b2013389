"""redis+sentinel://: the master Sentinel names, followed across failovers.

Real processes only (tests/topology.py): one master, one replica and three
Sentinels, started once for the module (about 7 s), plus the same over TLS.
The failover tests print what they measure (run with ``-s`` to see it):
failure decisions during the switch, the recovery time after Sentinel
announces the new master, and how many just-written buckets the old master
took with it (replication is asynchronous).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import rategate
from rategate.limiter import parse_storage_url
from tlscerts import Certs
from topo_checks import exact, fails_fast, traffic
from topology import SentinelSet, wait_until

# "Fast" and "recovered" with slack for a loaded 2-core machine: the targets
# are 1 s (see the README); these bound them without timing the machine.
TIMEOUT = 0.5
SLACK = 1.5


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    with SentinelSet(password="data-pw", sentinel_password="sent-pw") as ss:
        yield ss


@pytest.fixture(scope="module")
def tls_sentinels(tls_certs: Certs) -> Iterator[SentinelSet]:
    with SentinelSet(tls=tls_certs.server_tls) as ss:
        yield ss


# -- URLs ---------------------------------------------------------------------

def test_url_forms() -> None:
    cfg = parse_storage_url("redis+sentinel://u:p%40ss@s1:26379,[::1]:26380,s3/mymaster/2"
                            "?sentinel_password=spw&sentinel_username=su")
    assert cfg["seeds"] == [("s1", 26379), ("::1", 26380), ("s3", 26379)]
    assert (cfg["service"], cfg["db"], cfg["username"], cfg["password"]) == ("mymaster", 2, "u", "p@ss")
    assert (cfg["sentinel_username"], cfg["sentinel_password"], cfg["tls"]) == ("su", "spw", False)
    cfg = parse_storage_url("rediss+sentinel://s1:1/m?ssl_ca_certs=/ca.pem")
    assert cfg["tls"] and cfg["ssl_ca_certs"] == "/ca.pem" and cfg["db"] == 0
    assert parse_storage_url("redis+sentinel://s1/m/")["service"] == "m"


@pytest.mark.parametrize("url, part", [
    ("redis+sentinel:///mymaster/0", "no Sentinel"),
    ("redis+sentinel://s1:26379", "no master name"),
    ("redis+sentinel://s1:26379/", "no master name"),
    ("redis+sentinel://s1:26379/m/x", "the database 'x'"),
    ("redis+sentinel://s1:26379/m/0/1", "the path is"),
    ("redis+sentinel://s1:99999/m", "the port"),
    ("redis+sentinel://s1:abc,s2/m", "the port"),
    ("redis+sentinel://:26379/m", "has no host"),
    ("redis+sentinel://[::1/m", "IPv6"),
    ("redis+sentinel://s1/m?bogus=1", "unknown option 'bogus'"),
    ("redis+sentinel://s1/m?ssl_ca_certs=/x", "need rediss+sentinel://"),
    ("rediss+sentinel://s1/m?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("redis+cluster://n1:7000/1", "only database 0"),
    ("redis+cluster://n1:7000?ssl_ca_certs=/x", "need rediss+cluster://"),
    ("redis+cluster://", "no cluster node"),
])
def test_malformed_urls(url: str, part: str) -> None:
    with pytest.raises(ValueError, match="bad storage URL") as e:
        parse_storage_url(url)
    assert part in str(e.value)


def test_tls_keyword_needs_rediss_sentinel() -> None:
    with pytest.raises(ValueError, match="rediss"):
        rategate.Limiter("redis+sentinel://s1/m", ssl_ca_certs="/ca.pem")


# -- helpers --------------------------------------------------------------------

class SwitchWatch:
    """Subscribes to +switch-master on a Sentinel (redis-py, its own thread)
    and records when the announcement came."""

    def __init__(self, ss: SentinelSet) -> None:
        self.at: float | None = None
        self._stop = threading.Event()
        self._ps = ss.sentinels[-1].client().pubsub()
        self._ps.subscribe("+switch-master")
        self._ps.get_message(timeout=2.0)  # the confirmation
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            m = self._ps.get_message(timeout=0.05)
            if m and m["type"] == "message" and self.at is None:
                self.at = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self._ps.close()


# -- behaviour ----------------------------------------------------------------

def test_exact_through_sentinel(sentinels: SentinelSet) -> None:
    asyncio.run(exact(sentinels.url(), [f"exact-{i}" for i in range(200)], 20, 5))
    # The buckets are on the master, and replicated.
    m = sentinels.current_master()
    assert m.client().dbsize() > 0


def test_exact_through_sentinel_tls(tls_sentinels: SentinelSet) -> None:
    asyncio.run(exact(tls_sentinels.url(), [f"exact-{i}" for i in range(200)], 20, 5))
    assert tls_sentinels.current_master().client().dbsize() > 0


def test_db_and_auth_from_the_url(sentinels: SentinelSet) -> None:
    async def main() -> None:
        lim = rategate.Limiter(sentinels.url(db=3), timeout=5.0)
        try:
            d = await lim.hit("db3-key", "5/minute")
            assert d.allowed and d.error is None
        finally:
            await lim.aclose()

    asyncio.run(main())
    assert sentinels.current_master().client(db=3).keys("rg:{db3-key}*")


@pytest.mark.parametrize("url, cause", [
    # A name no Sentinel monitors.
    (lambda ss: ss.url().replace("/mymaster/", "/nosuchmaster/"), "does not know the master name"),
    # The Sentinels' password missing.
    (lambda ss: ss.url().split("?")[0], "NOAUTH"),
    # No Sentinel listening at all.
    (lambda ss: "redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster", "connection refused"),
])
def test_no_master_fails_fast_naming_the_cause(sentinels: SentinelSet, url: Any, cause: str) -> None:
    err = asyncio.run(fails_fast(url(sentinels), TIMEOUT, SLACK))
    assert "Sentinel" in err and cause.lower() in err.lower(), err


def run_failover(ss: SentinelSet, action: str) -> dict[str, Any]:
    """Steady traffic (4 tasks, 2 shards) across a failover; what happened."""
    old = ss.current_master()
    # A master demoted by an earlier failover takes a moment to sync as a
    # replica: measure loss only once replication is up.
    for n in ss.nodes:
        if n is not old and n.running:
            wait_until(lambda n=n: n.client().info("replication").get("master_link_status") == "up",
                       20.0, f"replica {n.port} linked")
            # Linked is not caught up: with no traffic yet, the replica's
            # offset must reach the master's, so the loss measured is what
            # replication lags behind steady traffic, not a sync in progress.
            wait_until(lambda n=n: n.client().info("replication").get("slave_repl_offset")
                       == old.client().info("replication").get("master_repl_offset"),
                       20.0, f"replica {n.port} caught up with the master")
    watch = SwitchWatch(ss)
    log: list[tuple[Any, ...]] = []

    async def main() -> float:
        lim = rategate.Limiter(ss.url(), timeout=TIMEOUT, threads=2)
        stop = asyncio.Event()
        try:
            d = await lim.hit("warm", "5/minute")
            assert d.error is None, lim.stats()["last_error"]
            tasks = [asyncio.create_task(traffic(lim, stop, log, lambda i, n=n: f"{action}{n}-{i}"))
                     for n in range(4)]
            await asyncio.sleep(0.5)
            t_act = time.monotonic()
            if action == "kill":
                old.stop()
            else:
                ss.failover()
            await asyncio.to_thread(wait_until, lambda: watch.at, 30.0, "+switch-master")
            await asyncio.sleep(2.0)  # recovered traffic
            stop.set()
            await asyncio.gather(*tasks)
            return t_act
        finally:
            await lim.aclose()

    try:
        t_act = asyncio.run(main())
    finally:
        watch.close()
    assert watch.at is not None
    new = ss.node_at(ss.master_addr()[1])
    failed = [e for e in log if e[3] is not None]
    # Buckets written (allowed, answered) before the master went away, that
    # the new master does not hold.
    written = [e[4] for e in log if e[2] and e[1] < t_act]
    c = new.client()
    lost = sum(1 for k in written if not c.keys(f"rg:{{{k}}}:*"))
    return {
        "checks": len(log), "failed": len(failed), "written_before": len(written), "lost": lost,
        "recovery_after_switch": (max(e[1] for e in failed) - watch.at) if failed else 0.0,
        "failed_after": [e for e in failed if e[1] > watch.at + 1.0 + SLACK],
        "longest_check": max(e[1] - e[0] for e in log), "old": old, "new": new,
    }


def checked(ss: SentinelSet, action: str, label: str) -> dict[str, Any]:
    """run_failover, its figures printed, and what holds for every failover:
    a new master, no check past its deadline, none failing after the
    announcement plus the target."""
    r = run_failover(ss, action)
    print(f"\n{label}: {r['checks']} checks, {r['failed']} failure decisions, "
          f"recovered {r['recovery_after_switch']:.3f} s after +switch-master, "
          f"{r['lost']} of {r['written_before']} buckets lost, longest check {r['longest_check']:.3f} s")
    assert r["new"] is not r["old"]
    assert not r["failed_after"], r["failed_after"][:3]
    assert r["longest_check"] < TIMEOUT + SLACK
    return r


def test_planned_failover(sentinels: SentinelSet) -> None:
    r = checked(sentinels, "planned", "SENTINEL FAILOVER")
    assert r["lost"] == 0  # a planned failover waits for the replica to catch up


def test_master_killed(sentinels: SentinelSet) -> None:
    r = checked(sentinels, "kill", "master killed")
    assert r["failed"] > 0  # there was no master for a while (down-after 1 s)
    # The loss (printed by checked()) is Redis's, not rategate's: what the
    # replica had not received when the master died.  It is measured and
    # documented, not asserted: usually 0 here, but in 2 of about 10 runs of
    # this module on the loaded 2-core test machine the replica had almost
    # none of the half second's writes (504 of 520, 524 of 524), although it
    # had caught up with the master's offset just before the traffic.


# -- the operator's interface (Engine.connect, command, topology) ---------------

def test_connect_command_topology_behind_sentinel(sentinels: SentinelSet) -> None:
    async def main() -> None:
        lim = rategate.Limiter(sentinels.url(db=2), timeout=TIMEOUT, threads=2)
        e = lim._engine
        try:
            await e.connect()
            topo = e.topology()
            host, port = sentinels.master_addr()
            assert topo["kind"] == "sentinel"
            assert topo["masters"] == [{"address": f"{host}:{port}", "connected": True, "slots": []}]
            assert topo["sentinel"] in {f"127.0.0.1:{s.port}" for s in sentinels.sentinels}
            role = await e.command(["ROLE"])
            assert role[0] == b"master"
            assert await e.command(["SET", "op:sent", "v"], key="op:sent") == "OK"
            assert await e.command(["GET", "op:sent"], node=f"{host}:{port}") == b"v"
            assert lim.stats()["connected"] is True
        finally:
            await lim.aclose()

    asyncio.run(main())
    # The data went to the master, in the URL's database.
    assert sentinels.current_master().client(db=2).get("op:sent") == b"v"


def test_connect_fails_naming_the_sentinels_cause(sentinels: SentinelSet) -> None:
    async def main() -> str:
        lim = rategate.Limiter(sentinels.url().replace("/mymaster/", "/nosuchmaster/"), timeout=TIMEOUT)
        try:
            with pytest.raises(ConnectionError) as ei:
                await lim._engine.connect()
            return str(ei.value)
        finally:
            await lim.aclose()

    msg = asyncio.run(main())
    assert "no Sentinel named the master" in msg and "does not know the master name" in msg, msg
