"""Real Redis topologies for the tests: Sentinel and Cluster.

:class:`SentinelSet` starts a master, its replicas and several
``redis-sentinel`` processes watching it; :class:`ClusterSet` starts
``redis-server --cluster-enabled yes`` nodes and joins them with
``redis-cli --cluster create``.  Every process is a :class:`RedisServer`
(tests/redisserver.py) or a :class:`SentinelServer`, on free loopback ports, in
private temporary directories, killed by ``close()`` and by finalizers, never
left behind.  Both are slow to start (a second or two), so test modules start
them once per module.

Nothing here talks to rategate: the fixtures are plain Redis, driven with
redis-py and ``redis-cli``, so a test sees what a real deployment does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from redisserver import REDIS_SERVER, RedisServer, RedisServerError, _kill, _reap, free_port, log_tail

__all__ = ["SentinelServer", "SentinelSet", "ClusterSet", "key_slot", "wait_until"]

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
_SETPRIV = shutil.which("setpriv")


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``pred`` until it returns something true; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except (redis.RedisError, OSError) as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout}s" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


# -- hash slots (the tests' own reference, to check where keys land) ----------

def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM (poly 0x1021, init 0), the checksum Redis Cluster uses."""
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def key_slot(key: bytes | str) -> int:
    """The cluster slot of ``key``: CRC16 of its hash tag (the first non-empty
    ``{...}``) or of the whole key, mod 16384."""
    k = key.encode() if isinstance(key, str) else key
    s = k.find(b"{")
    if s >= 0:
        e = k.find(b"}", s + 1)
        if e > s + 1:
            k = k[s + 1:e]
    return _crc16(k) % 16384


# -- Sentinel ------------------------------------------------------------------

class SentinelServer:
    """One ``redis-sentinel`` on 127.0.0.1:<free port>, watching nothing yet.

    Sentinel rewrites its config file, so each one gets its own directory.
    """

    def __init__(self, *, port: int | None = None, password: str | None = None,
                 extra_conf: Sequence[str] = (), tls: tuple[str, str, str] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="rategate-sentinel-")
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.extra_conf = list(extra_conf)
        self._state: dict[str, Any] = {"proc": None, "dir": self.dir}
        self._finalizer = weakref.finalize(self, _reap, self._state)
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def _write_conf(self) -> str:
        path = os.path.join(self.dir, "sentinel.conf")
        if not os.path.exists(path):
            lines = [
                "bind 127.0.0.1",
                f"port {0 if self.tls else self.port}",
                f"dir {self.dir}",
                "daemonize no",
                f"logfile {os.path.join(self.dir, 'sentinel.log')}",
                "loglevel notice",
                # Addresses as they are: 127.0.0.1, never a resolved name.
                "sentinel resolve-hostnames no",
            ]
            if self.password:
                lines.append(f"requirepass {self.password}")
            if self.tls:
                # TLS only: to its clients, to the data nodes, to the other Sentinels.
                cert, key, ca = self.tls
                lines += [f"tls-port {self.port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
                          f"tls-ca-cert-file {ca}", "tls-auth-clients no", "tls-replication yes"]
            lines += self.extra_conf
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        if self.running:
            return
        argv = [REDIS_SERVER, self._write_conf(), "--sentinel"]
        if _SETPRIV and threading.current_thread() is threading.main_thread():
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--"] + argv
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=self.dir)
        self._state["proc"] = proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RedisServerError(f"redis-sentinel exited with {proc.returncode}:\n{self.log()}")
            with self.client(socket_timeout=0.5) as c:
                return bool(c.ping())

        try:
            wait_until(up, 10.0, f"redis-sentinel on port {self.port} answering PING")
        except BaseException:
            _kill(proc)
            self._state["proc"] = None
            raise

    @property
    def running(self) -> bool:
        p = self._state["proc"]
        return p is not None and p.poll() is None

    def stop(self) -> None:
        proc, self._state["proc"] = self._state["proc"], None
        if proc is not None:
            _kill(proc)

    def close(self) -> None:
        self._finalizer()

    def client(self, socket_timeout: float = 5.0) -> redis.Redis:
        kw: dict[str, Any] = {}
        if self.tls:
            kw.update(ssl=True, ssl_ca_certs=self.tls[2], ssl_check_hostname=False)
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                           retry=Retry(NoBackoff(), 0), **kw)

    def log(self) -> str:
        return log_tail(os.path.join(self.dir, "sentinel.log"))


class SentinelSet:
    """A master, ``replicas`` replicas and ``sentinels`` Sentinels monitoring it.

    ``password`` protects the data nodes (and is given to the Sentinels so they
    can talk to them); ``sentinel_password`` protects the Sentinels themselves.
    ``down_after_ms`` is how long a silent master takes to be judged down: the
    tests keep it short so a failover takes about a second or two.
    """

    def __init__(self, name: str = "mymaster", *, replicas: int = 1, sentinels: int = 3,
                 password: str | None = None, sentinel_password: str | None = None,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 tls: tuple[str, str, str] | None = None) -> None:
        """``tls=(cert, key, ca)``: every node and Sentinel serves TLS only
        (replication and the Sentinels' own links too)."""
        self.name = name
        self.tls = tls
        self.password = password
        self.sentinel_password = sentinel_password
        self.master: RedisServer | None = None
        self.replicas: list[RedisServer] = []
        self.sentinels: list[SentinelServer] = []
        try:
            auth = ["--masterauth", password] if password else []
            if tls:
                auth += ["--tls-replication", "yes"]
            self.master = RedisServer(password=password, extra_args=list(auth), tls=tls)
            for _ in range(replicas):
                self.replicas.append(RedisServer(
                    password=password, tls=tls,
                    extra_args=auth + ["--replicaof", "127.0.0.1", str(self.master.port)],
                ))
            for r in self.replicas:
                wait_until(lambda r=r: r.client().info("replication").get("master_link_status") == "up",
                           10.0, f"replica {r.port} in sync")
            conf = [
                f"sentinel monitor {name} 127.0.0.1 {self.master.port} {max(1, sentinels // 2 + 1)}",
                f"sentinel down-after-milliseconds {name} {down_after_ms}",
                f"sentinel failover-timeout {name} {failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
            ]
            if password:
                conf.append(f"sentinel auth-pass {name} {password}")
            for _ in range(sentinels):
                self.sentinels.append(SentinelServer(password=sentinel_password, extra_conf=conf, tls=tls))
            # Every Sentinel knows the replicas and the other Sentinels.
            for s in self.sentinels:
                wait_until(lambda s=s: self._sees_all(s, replicas, sentinels), 15.0,
                           f"sentinel {s.port} discovering the set")
        except BaseException:
            self.close()
            raise

    def _sees_all(self, s: SentinelServer, replicas: int, sentinels: int) -> bool:
        with s.client() as c:
            m = c.execute_command("SENTINEL", "MASTER", self.name)
            info = dict(zip(m[::2], m[1::2])) if isinstance(m, list) else m
            info = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                    for k, v in info.items()}
            return int(info.get("num-slaves", 0)) >= replicas and int(info.get("num-other-sentinels", 0)) >= sentinels - 1

    @property
    def nodes(self) -> list[RedisServer]:
        return ([self.master] if self.master else []) + self.replicas

    def url(self, db: int = 0, *, scheme: str | None = None) -> str:
        """``redis+sentinel://[:password@]s1,s2,s3/name/db[?sentinel_password=...]``
        (``rediss+sentinel://...&ssl_ca_certs=<ca>`` with TLS)."""
        scheme = scheme or ("rediss+sentinel" if self.tls else "redis+sentinel")
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        q = [f"sentinel_password={self.sentinel_password}"] if self.sentinel_password else []
        if self.tls:
            q.append(f"ssl_ca_certs={self.tls[2]}")
        return f"{scheme}://{auth}{hosts}/{self.name}/{db}" + ("?" + "&".join(q) if q else "")

    def master_addr(self) -> tuple[str, int]:
        """Where the Sentinels say the master is (the first that answers)."""
        last: BaseException | None = None
        for s in self.sentinels:
            if not s.running:
                continue
            try:
                with s.client() as c:
                    host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
                    return (host.decode() if isinstance(host, bytes) else host), int(port)
            except redis.RedisError as e:
                last = e
        raise RuntimeError(f"no Sentinel answered for {self.name}: {last}")

    def node_at(self, port: int) -> RedisServer:
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def current_master(self) -> RedisServer:
        return self.node_at(self.master_addr()[1])

    def wait_new_master(self, old_port: int, timeout: float = 20.0) -> RedisServer:
        """Block until the Sentinels announce a master other than ``old_port``
        and it answers ROLE as a master; return it."""
        def moved() -> RedisServer | None:
            host, port = self.master_addr()
            if port == old_port:
                return None
            node = self.node_at(port)
            with node._raw_client(socket_timeout=0.5) as c:
                role = c.execute_command("ROLE")
            return node if (role[0] in (b"master", "master")) else None

        return wait_until(moved, timeout, f"a new master replacing port {old_port}")

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: a planned switch, asked of the first Sentinel."""
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", self.name)

    def close(self) -> None:
        for s in self.sentinels:
            s.close()
        for n in self.nodes:
            n.close()
        self.sentinels, self.replicas, self.master = [], [], None

    def __enter__(self) -> "SentinelSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Cluster -------------------------------------------------------------------

class ClusterSet:
    """``masters`` cluster masters, each with ``replicas`` replicas, slots spread
    evenly by ``redis-cli --cluster create``.

    The cluster bus port of each node is chosen free too (``cluster-port``), so
    no node depends on port+10000 being available.
    """

    def __init__(self, *, masters: int = 3, replicas: int = 0, password: str | None = None,
                 node_timeout_ms: int = 1000, tls: tuple[str, str, str] | None = None,
                 tls_client: tuple[str, str] | None = None) -> None:
        """``tls=(cert, key, ca)``: every node serves TLS only, and the cluster
        bus and replication run over TLS too.  The bus always asks for a
        client certificate, so ``tls_client=(cert, key)`` (one made for
        clientAuth) is what the nodes present to each other."""
        self.password = password
        self.tls = tls
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters * (1 + replicas)):
                args = [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--cluster-port", str(free_port()),
                    # A replica takes over at once: the tests measure rategate,
                    # not Redis's election delay.
                    "--cluster-replica-validity-factor", "0",
                    "--cluster-require-full-coverage", "no",
                ]
                if password:
                    args += ["--masterauth", password]
                if tls:
                    args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
                if tls_client:
                    args += ["--tls-client-cert-file", tls_client[0], "--tls-client-key-file", tls_client[1]]
                self.nodes.append(RedisServer(password=password, extra_args=args, tls=tls))
            cmd = [REDIS_CLI, "--cluster", "create",
                   *[f"127.0.0.1:{n.port}" for n in self.nodes],
                   "--cluster-replicas", str(replicas), "--cluster-yes"]
            if password:
                cmd[1:1] = ["-a", password, "--no-auth-warning"]
            if tls:
                cmd[1:1] = ["--tls", "--cacert", tls[2]]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RedisServerError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
            self.wait_healthy()
        except BaseException:
            self.close()
            raise

    def url(self, *, scheme: str | None = None) -> str:
        """``redis+cluster://[:password@]n1,n2,n3`` (the first three nodes), or
        ``rediss+cluster://...?ssl_ca_certs=<ca>`` with TLS."""
        scheme = scheme or ("rediss+cluster" if self.tls else "redis+cluster")
        auth = f":{self.password}@" if self.password else ""
        q = f"?ssl_ca_certs={self.tls[2]}" if self.tls else ""
        return f"{scheme}://{auth}" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3]) + q

    def _live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.running]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says cluster_state:ok and agrees on the slot owners."""
        def ok() -> bool:
            views = set()
            for n in self._live():
                with n._raw_client(socket_timeout=1.0) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
                    views.add(tuple(sorted((s[0], s[1], int(s[2][1]))
                                           for s in c.execute_command("CLUSTER", "SLOTS"))))
            if len(views) != 1:
                return False
            view = next(iter(views))
            live = {n.port for n in self._live()}
            # Every slot covered, and by a node that is running (a killed
            # master still owns its slots until its replica is promoted).
            return sum(e - b + 1 for b, e, _ in view) == 16384 and all(p in live for _, _, p in view)

        wait_until(ok, timeout, "the cluster healthy: all 16384 slots agreed, each on a live node")

    def slots(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) from the first live node."""
        with self._live()[0]._raw_client() as c:
            return sorted((s[0], s[1], int(s[2][1])) for s in c.execute_command("CLUSTER", "SLOTS"))

    def masters(self) -> list[RedisServer]:
        ports = {p for _, _, p in self.slots()}
        return [n for n in self.nodes if n.port in ports]

    def node_for_slot(self, slot: int) -> RedisServer:
        for b, e, p in self.slots():
            if b <= slot <= e:
                return next(n for n in self.nodes if n.port == p)
        raise KeyError(slot)

    def node_id(self, node: RedisServer) -> str:
        with node._raw_client() as c:
            v = c.execute_command("CLUSTER", "MYID")
        return v.decode() if isinstance(v, bytes) else str(v)

    def migrate_slot(self, slot: int, dst: RedisServer, *, between: Callable[[], None] | None = None) -> None:
        """Move ``slot`` to ``dst`` the way ``redis-cli --cluster reshard`` does:
        IMPORTING/MIGRATING, MIGRATE the keys in batches, SETSLOT NODE on every
        master.  ``between`` runs after the slot is half-moved (ASK phase)."""
        src = self.node_for_slot(slot)
        if src.port == dst.port:
            return
        src_id, dst_id = self.node_id(src), self.node_id(dst)
        with dst._raw_client() as d, src._raw_client() as s:
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            if between is not None:
                between()
            while True:
                keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                args: list[Any] = ["MIGRATE", "127.0.0.1", dst.port, "", 0, 5000]
                if self.password:
                    args += ["AUTH", self.password]
                s.execute_command(*args, "KEYS", *keys)
            for n in self.masters():
                with n._raw_client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def close(self) -> None:
        for n in self.nodes:
            n.close()
        self.nodes = []

    def __enter__(self) -> "ClusterSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
