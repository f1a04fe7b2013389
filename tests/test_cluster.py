"""redis+cluster://: checks routed by hash slot, following the cluster.

Real processes only (tests/topology.py): a 3-master cluster, the same over
TLS, and a 3-master-3-replica cluster for the node-failure test, each
started once for the module (about 2 s each).  The failure test prints what
it measures (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import rategate
from rategate import _core
from rategate.limiter import parse_storage_url
from tlscerts import Certs
from topo_checks import exact, fails_fast, traffic
from topology import ClusterSet, key_slot, wait_until

TIMEOUT = 0.5
SLACK = 1.5  # on the 1 s targets, for a loaded 2-core machine


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    with ClusterSet(masters=3, password="cpw") as cs:
        yield cs


def keys_per_node(cs: ClusterSet, prefix: str) -> dict[int, int]:
    """How many buckets of keys starting with prefix each master holds
    (KEYS is local to the node asked)."""
    return {m.port: len(m.client().keys(f"rg:{{{prefix}*")) for m in cs.masters()}


def test_url_forms() -> None:
    cfg = parse_storage_url("redis+cluster://u:pw@n1:7000,n2,[::1]:7002")
    assert cfg["seeds"] == [("n1", 7000), ("n2", 6379), ("::1", 7002)]
    assert (cfg["cluster"], cfg["db"], cfg["username"], cfg["password"], cfg["tls"]) == (True, 0, "u", "pw", False)
    cfg = parse_storage_url("rediss+cluster://n1:7000/0?ssl_ca_certs=/ca.pem&ssl_check_hostname=false")
    assert cfg["tls"] and cfg["ssl_ca_certs"] == "/ca.pem" and not cfg["ssl_check_hostname"]


def test_exact_over_every_node(cluster: ClusterSet) -> None:
    keys = [f"exact-{i}" for i in range(300)]
    asyncio.run(exact(cluster.url(), keys, 10, 5))
    per = keys_per_node(cluster, "exact-")
    assert len(per) == 3 and all(n > 0 for n in per.values()), per


def test_exact_over_tls(tls_certs: Certs) -> None:
    with ClusterSet(masters=3, tls=tls_certs.server_tls,
                    tls_client=(tls_certs.client_cert, tls_certs.client_key)) as cs:
        keys = [f"tls-{i}" for i in range(300)]
        asyncio.run(exact(cs.url(), keys, 10, 5))
        per = keys_per_node(cs, "tls-")
        assert len(per) == 3 and all(n > 0 for n in per.values()), per


def test_unreachable_cluster_fails_fast() -> None:
    err = asyncio.run(fails_fast("redis+cluster://127.0.0.1:1,127.0.0.1:2", TIMEOUT, SLACK))
    assert "CLUSTER SLOTS" in err and "refused" in err, err


def test_slot_migrated_mid_run(cluster: ClusterSet) -> None:
    """Checks on keys of one slot while it moves to another node (the ASK
    phase held for a moment, then MIGRATE, then SETSLOT NODE): none fails,
    and the limit stays exact across the move."""
    slot = key_slot("mig-0")
    keys = [k for k in (f"mig-{i}" for i in range(200000)) if key_slot(k) == slot][:12]
    assert len(keys) == 12
    src = cluster.node_for_slot(slot)
    dst = next(m for m in cluster.masters() if m.port != src.port)
    log: list[tuple[Any, ...]] = []
    half = threading.Event()

    async def main() -> None:
        lim = rategate.Limiter(cluster.url(), timeout=2.0, threads=2)
        stop = asyncio.Event()
        try:
            # Half the keys get buckets on the source first.
            for k in keys[:6]:
                assert (await lim.hit(k, "5/minute")).error is None
            # The other half only once the slot is half-moved: their first
            # checks meet the ASK phase (a key the source does not have).
            def key(i: int, n: int) -> str:
                return keys[(i * 3 + n) % (12 if half.is_set() else 6)]

            tasks = [asyncio.create_task(traffic(lim, stop, log, lambda i, n=n: key(i, n),
                                                 rate="5/minute", pause=0.002)) for n in range(3)]
            await asyncio.to_thread(cluster.migrate_slot, slot, dst,
                                    between=lambda: (half.set(), time.sleep(0.5)))
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
            # The first 6 had one allowed hit before the traffic.
            allowed = {k: (1 if k in keys[:6] else 0) for k in keys}
            for e in log:
                allowed[e[4]] += e[2]
            assert set(allowed.values()) == {5}, allowed
        finally:
            await lim.aclose()

    asyncio.run(main())
    assert half.is_set()
    failed = [e for e in log if e[3] is not None]
    print(f"\nslot {slot} moved {src.port} -> {dst.port} under {len(log)} checks: {len(failed)} failed")
    assert not failed, failed[:3]
    assert cluster.node_for_slot(slot).port == dst.port
    assert keys_per_node(cluster, "mig-")[dst.port] == 12
    # The half-moved phase was really met: the target was ASKed.
    assert dst.client().info("commandstats").get("cmdstat_asking", {}).get("calls", 0) > 0


def test_master_killed() -> None:
    """A master is killed under traffic on keys of every node: only its
    slots' checks fail, and they heal once its replica is promoted."""
    with ClusterSet(masters=3, replicas=1) as cs:
        victim = cs.masters()[0]
        dead = [(b, e) for b, e, p in cs.slots() if p == victim.port]
        log: list[tuple[Any, ...]] = []
        healthy_at: list[float] = []

        async def main() -> float:
            lim = rategate.Limiter(cs.url(), timeout=TIMEOUT, threads=2)
            stop = asyncio.Event()
            try:
                assert (await lim.hit("warm", "5/minute")).error is None
                tasks = [asyncio.create_task(traffic(lim, stop, log, lambda i, n=n: f"kill{n}-{i}"))
                         for n in range(4)]
                await asyncio.sleep(0.5)
                t_kill = time.monotonic()
                victim.stop()
                await asyncio.to_thread(cs.wait_healthy, 30.0)
                healthy_at.append(time.monotonic())
                await asyncio.sleep(2.0)
                stop.set()
                await asyncio.gather(*tasks)
                return t_kill
            finally:
                await lim.aclose()

        t_kill = asyncio.run(main())

    def on_victim(key: str) -> bool:
        s = key_slot(key)
        return any(b <= s <= e for b, e in dead)

    failed = [e for e in log if e[3] is not None]
    wrong = [e for e in failed if not on_victim(e[4])]
    late = [e for e in failed if e[1] > healthy_at[0] + 1.0 + SLACK]
    recovered = max((e[1] for e in failed), default=t_kill) - healthy_at[0]
    print(f"\ncluster master killed: {len(log)} checks, {len(failed)} failure decisions, all on its slots: "
          f"{not wrong}; last failure {recovered:+.3f} s from the cluster healthy again; "
          f"longest check {max(e[1] - e[0] for e in log):.3f} s")
    assert failed  # its slots had no master for a while
    assert not wrong, wrong[:3]
    assert not late, late[:3]
    assert max(e[1] - e[0] for e in log) < TIMEOUT + SLACK
    # The other nodes' checks went on deciding throughout.
    during = [e for e in log if t_kill < e[0] < healthy_at[0] and not on_victim(e[4])]
    assert during and all(e[3] is None for e in during)


def test_concurrency_charge_and_reset_on_every_node(cluster: ClusterSet) -> None:
    # The ops of issue 12 ride the same per-node call as checks (keys of many
    # slots, undeclared): a concurrency slot, a charge into debt and a reset
    # must each land on the node that owns the key, for keys on every node.
    async def go() -> None:
        lim = rategate.Limiter(cluster.url(), timeout=TIMEOUT)
        try:
            keys = [f"ops-{i}" for i in range(60)]
            slots = [lim.concurrency(k, limit=1, ttl=30) for k in keys]
            for s in slots:
                await s.__aenter__()
            with pytest.raises(rategate.ConcurrencyLimitExceeded):
                async with lim.concurrency(keys[0], limit=1, ttl=30):
                    pass
            for s in slots:
                await s.__aexit__(None, None, None)
            async with lim.concurrency(keys[0], limit=1, ttl=30):
                pass
            for k in keys:
                d = await lim.charge(k, "10/hour", 15)  # 5 tokens of debt
                assert d.error is None, d
                assert not (await lim.hit(k, "10/hour")).allowed
            assert keys_per_node(cluster, "ops-") and all(n > 0 for n in keys_per_node(cluster, "ops-").values())
            for k in keys:
                assert await lim.reset(k, "10/hour") is True
                d = await lim.hit(k, "10/hour")
                assert d.allowed and d.remaining == 9, d
        finally:
            await lim.aclose()

    asyncio.run(go())


# -- the operator's interface (Engine.connect, command, topology) ---------------

def test_topology_and_commands_on_every_master(cluster: ClusterSet) -> None:
    async def main() -> None:
        lim = rategate.Limiter(cluster.url(), timeout=TIMEOUT, threads=2)
        e = lim._engine
        try:
            await e.connect()
            topo = e.topology()
            assert topo["kind"] == "cluster" and topo["sentinel"] is None
            want = {}
            for b, end, p in cluster.slots():
                want.setdefault(f"127.0.0.1:{p}", []).append((b, end))
            assert {m["address"]: m["slots"] for m in topo["masters"]} == want
            assert all(m["connected"] for m in topo["masters"])
            assert lim.stats()["connected"] is True
            # By key: each lands on the master of its slot.
            keys = [f"op:{i}" for i in range(30)]
            for k in keys:
                assert await e.command(["SET", k, k], key=k) == "OK"
            for k in keys:
                assert cluster.node_for_slot(key_slot(k)).client().get(k) == k.encode()
            # By node: every master answers for itself; SCAN sees its own keys only.
            found = []
            for m in topo["masters"]:
                cursor = b"0"
                while True:
                    cursor, batch = await e.command(["SCAN", cursor, "MATCH", "op:*", "COUNT", 100],
                                                    node=m["address"])
                    found += batch
                    if cursor == b"0":
                        break
            assert sorted(found) == sorted(k.encode() for k in keys)
            # A key asked of a master that does not own it: Redis's own answer.
            k = keys[0]
            other = next(m["address"] for m in topo["masters"]
                         if m["address"] != f"127.0.0.1:{cluster.node_for_slot(key_slot(k)).port}")
            with pytest.raises(_core.ReplyError, match="^MOVED"):
                await e.command(["GET", k], node=other)
            # With neither: any master.
            assert await e.command(["PING"]) == "PONG"
        finally:
            await lim.aclose()

    asyncio.run(main())


def test_command_by_key_follows_moved(cluster: ClusterSet) -> None:
    """The slot moves after the engine read the map: the command by key is
    answered MOVED by the old owner, and followed."""
    key = "op:moving"

    async def main() -> None:
        lim = rategate.Limiter(cluster.url(), timeout=TIMEOUT)
        e = lim._engine
        try:
            await e.connect()
            assert await e.command(["SET", key, "1"], key=key) == "OK"
            src = cluster.node_for_slot(key_slot(key))
            dst = next(m for m in cluster.masters() if m.port != src.port)
            await asyncio.to_thread(cluster.migrate_slot, key_slot(key), dst)
            assert await e.command(["INCR", key], key=key) == 2
            assert dst.client().get(key) == b"2"
        finally:
            await lim.aclose()

    asyncio.run(main())


# -- failovers on a replicated cluster (issue 17 #5 and #6) ----------------------

@pytest.fixture(scope="module")
def replicated() -> Iterator[ClusterSet]:
    """3 masters, each with a replica; the tests fail over and kill nodes and
    put them back, so each starts from whatever the last left (healthy)."""
    with ClusterSet(masters=3, replicas=1) as cs:
        yield cs


def replica_of(cs: ClusterSet, master: Any) -> Any:
    """A running replica of `master`, in sync with it."""
    def find() -> Any:
        for n in cs.nodes:
            if n.running and n.port != master.port:
                info = n.client().info("replication")
                if (info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port
                        and info.get("master_link_status") == "up"):
                    return n
        return None
    return wait_until(find, 30.0, f"a replica of {master.port} in sync")


def test_cluster_failover_under_traffic_gives_no_redis_error(replicated: ClusterSet) -> None:
    """CLUSTER FAILOVER demotes a master under a call without declared keys:
    it answers READONLY, not MOVED.  That means the map is stale: it is read
    again and the checks are sent to the new master (they wrote nothing),
    so no check gets a redis_error (94 of 300 per round did, before)."""
    cs = replicated
    cs.wait_healthy()
    old = cs.masters()[0]
    new = replica_of(cs, old)
    log: list[tuple[Any, ...]] = []

    async def main() -> None:
        lim = rategate.Limiter(cs.url(), timeout=TIMEOUT, threads=2)
        stop = asyncio.Event()
        try:
            await lim._engine.connect()
            tasks = [asyncio.create_task(traffic(lim, stop, log, lambda i, n=n: f"fo{n}-{i % 60}",
                                                 rate="1000000/day"))
                     for n in range(4)]
            await asyncio.sleep(0.5)
            with new._raw_client() as c:
                c.execute_command("CLUSTER", "FAILOVER")
            await asyncio.to_thread(wait_until, lambda: new.client().info("replication")["role"] == "master",
                                    20.0, "the replica promoted")
            await asyncio.to_thread(cs.wait_healthy, 30.0)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            await lim.aclose()

    asyncio.run(main())
    errors: dict[Any, int] = {}
    for e in log:
        errors[e[3]] = errors.get(e[3], 0) + 1
    print(f"\nCLUSTER FAILOVER {old.port} -> {new.port} under {len(log)} checks: {errors}")
    assert errors.get("redis_error", 0) == 0, errors
    assert len(log) > 100


def test_killed_master_every_check_answered_by_its_deadline(replicated: ClusterSet) -> None:
    """A master SIGKILLed under traffic, with the CPUs busy: every check is
    answered by its deadline (the loop thread's own measure, Decision.latency,
    so asyncio's scheduling is not counted) plus a small allowance, in
    RATEGATE_KILL_RUNS runs (2 here; 20 for the measurement, see
    docs/topologies.md).  The killed node comes back as a replica after each."""
    cs = replicated
    runs = int(os.environ.get("RATEGATE_KILL_RUNS", "2"))
    timeout, allowance = 0.2, 0.2
    worst: list[float] = []
    for run in range(runs):
        cs.wait_healthy()
        victim = cs.masters()[run % 3]
        replica_of(cs, victim)
        lat: list[tuple[float, Any]] = []
        hogs = [subprocess.Popen([sys.executable, "-c",
                                  "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
                for _ in range(2)]

        async def main() -> None:
            lim = rategate.Limiter(cs.url(), timeout=timeout, threads=2)
            stop = asyncio.Event()

            async def go(n: int) -> None:
                i = 0
                while not stop.is_set():
                    d = await lim.hit(f"kill{run}-{n}-{i % 60}", "1000000/day")
                    lat.append((d.latency if d.latency is not None else 0.0, d.error))
                    i += 1
                    await asyncio.sleep(0.002)

            try:
                await lim._engine.connect()
                tasks = [asyncio.create_task(go(n)) for n in range(4)]
                await asyncio.sleep(0.3)
                victim.stop()
                await asyncio.to_thread(cs.wait_healthy, 30.0)
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*tasks)
            finally:
                await lim.aclose()

        try:
            asyncio.run(main())
        finally:
            for h in hogs:
                h.kill()
                h.wait()
            victim.start()  # back, as a replica of its promoted replica
        late = [x for x in lat if x[0] > timeout + allowance]
        worst.append(max(x[0] for x in lat))
        print(f"\nrun {run + 1}/{runs}: {len(lat)} checks, {sum(1 for x in lat if x[1])} failure decisions, "
              f"longest {worst[-1]:.3f} s, {len(late)} past {timeout} + {allowance} s")
        assert not late, late[:5]
    cs.wait_healthy()


def test_one_call_per_slot_only_where_script_flags_are_missing(cluster: ClusterSet) -> None:
    """On Redis < 7.0 ("ERR Error compiling script" for the flagged script)
    the batch falls back to one call per slot, and checks still decide; on
    Redis 7 and Valkey the cross-slot call stays."""
    from redisserver import OLD_SERVER

    async def main() -> tuple[list[Any], Any]:
        lim = rategate.Limiter(cluster.url(), timeout=2.0)
        try:
            ds = await asyncio.gather(*[lim.hit(f"flags-{i}", "5/minute") for i in range(60)])
            return ds, lim.stats()["last_error"]
        finally:
            await lim.aclose()

    ds, last = asyncio.run(main())
    assert [d.error for d in ds] == [None] * 60, last
    assert ("no cross-slot script on this server" in (last or "")) == OLD_SERVER, last
