"""The rategate benchmark: one command, one machine, one run.

    python -m bench.run                 # every case at workers = cores and at 1 worker, 2 rounds
    python -m bench.run --quick         # 3 s each, one round, shorter micro-benchmarks (about 6 minutes)
    python -m bench.run --cases health,rategate,rategate-flood --workers 2 --duration 20

It starts its own redis-server on a free 127.0.0.1 port (or uses
RATEGATE_REDIS_URL), runs each HTTP case's app under uvicorn on a free port at
each worker count of --workers, warms it up, measures it with wrk (same
duration and connections for every case) while reading every thread's CPU from
/proc and Redis's INFO commandstats, then offers it a fixed open-loop load
(bench/pace.py, half of /health's req/s at the same worker count) for the
latency a user feels at normal load.  Then come the measurements without HTTP
(bench/micro.py) and redis-benchmark.  It prints the tables and the targets
with PASS/MISS, and writes bench/results/latest.{json,md,png}.  Every process
it starts is in its own process group and is stopped when it ends, fails or is
interrupted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, str(ROOT))

from bench import measure, procs, report  # noqa: E402

BENCH = ROOT / "bench"
PY = sys.executable
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_BENCHMARK = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
WRK = shutil.which("wrk") or "/usr/bin/wrk"


# --------------------------------------------------------------------------
# the cases


@dataclass
class HttpCase:
    """One row of the HTTP table.  A new case is one entry below: the app
    (bench/apps/), the limit mode, the Redis it runs against (a key of
    REDIS_KINDS), and any environment its app reads (``env``)."""
    name: str
    app: str
    mode: str = "allowed"            # allowed | flood (BENCH_MODE)
    expect_denied: bool = False      # the case must show 429s (else: none)
    needs: tuple[str, ...] = ()      # modules that must import, else the case is skipped
    redis: str = "shared"            # which Redis: a key of REDIS_KINDS
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the app
    what: str = ""


RG = ("rategate", "rategate.middleware")
HTTP_CASES = [
    HttpCase("health", "bench.apps.health:app", what="FastAPI no-op GET, no middleware: the baseline"),
    HttpCase("rategate", "bench.apps.rategate_app:app", needs=RG,
             what="RateLimitMiddleware, a Redis check per request, all allowed, headers on"),
    HttpCase("rategate-flood", "bench.apps.rategate_app:app", mode="flood", expect_denied=True, needs=RG,
             what="limit 5/minute for the one client: all but the first 5 get 429"),
    HttpCase("python-redis", "bench.apps.python_redis:app", needs=("redis",),
             what="pure-ASGI middleware by hand, redis.asyncio + the same GCRA script (EVALSHA)"),
    HttpCase("python-redis-flood", "bench.apps.python_redis:app", mode="flood", expect_denied=True,
             needs=("redis",), what="the same, limit 5/minute: all but the first 5 get 429"),
    HttpCase("slowapi", "bench.apps.slowapi_app:app", needs=("slowapi", "limits", "redis"),
             what="slowapi per its docs, storage_uri=redis://, all allowed"),
    HttpCase("fastapi-limiter", "bench.apps.fastapi_limiter_app:app",
             needs=("fastapi_limiter", "pyrate_limiter", "redis"),
             what="fastapi-limiter per its docs, pyrate-limiter RedisBucket (redis.asyncio), all allowed"),
    HttpCase("fastapi-limiter-flood", "bench.apps.fastapi_limiter_app:app", mode="flood", expect_denied=True,
             needs=("fastapi_limiter", "pyrate_limiter", "redis"), what="the same, limit 5/minute"),
    HttpCase("traffik", "bench.apps.traffik_app:app", needs=("traffik", "redis"),
             what="Traffik 1.2 per its README: RedisBackend (redis.asyncio), HTTPThrottle dependency, all allowed"),
    HttpCase("traffik-flood", "bench.apps.traffik_app:app", mode="flood", expect_denied=True,
             needs=("traffik", "redis"), what="the same, limit 5/minute"),
    HttpCase("throttled-py", "bench.apps.throttled_app:app", needs=("throttled", "redis"),
             what="throttled-py 3.5's FastAPI integration: Redis store, GCRA, @limiter.limit(), all allowed"),
    HttpCase("throttled-py-flood", "bench.apps.throttled_app:app", mode="flood", expect_denied=True,
             needs=("throttled", "redis"), what="the same, limit 5/minute"),
    HttpCase("limits", "bench.apps.limits_app:app", needs=("limits", "redis"),
             what="limits 5.8 limits.aio moving window on async+redis://, behind a minimal ASGI middleware"),
    HttpCase("limits-flood", "bench.apps.limits_app:app", mode="flood", expect_denied=True, needs=("limits", "redis"),
             what="the same, limit 5/minute"),
    HttpCase("redis-down", "bench.apps.rategate_app:app", expect_denied=True, redis="down", needs=RG,
             what="rategate, Redis killed after the warm-up: fail-closed 429s"),
    HttpCase("rategate-tls", "bench.apps.rategate_app:app", needs=RG, redis="tls",
             what="rategate as in 'rategate', over rediss:// (verified TLS, a private redis-server)"),
    HttpCase("hot-key", "bench.apps.rategate_app:app", needs=RG, env={"BENCH_KEY": "global"},
             what="one global limit every request shares (one Redis key), a Redis check per request"),
    HttpCase("hot-key-lease", "bench.apps.rategate_app:app", needs=RG,
             env={"BENCH_KEY": "global", "BENCH_LEASE": "1"},
             what="the same with lease=True: tokens leased in blocks, answered in C"),
    # issue 19: shm:// (a shared memory segment of this host, no Redis), the same app
    HttpCase("shm", "bench.apps.rategate_app:app", needs=RG, redis="shm",
             what="RateLimitMiddleware on shm:// (every worker shares one segment, no Redis), all allowed"),
    HttpCase("shm-flood", "bench.apps.rategate_app:app", mode="flood", expect_denied=True, needs=RG, redis="shm",
             what="the same on shm://, limit 5/minute for the one client: all but the first 5 get 429"),
]
HTTP_BY_NAME = {c.name: c for c in HTTP_CASES}

# A figure without HTTP is one name here and one branch in run_micro_step.
# "throughput-cluster": rategate's checks/s against a private 3-master Redis Cluster,
# beside "throughput-rategate" against one Redis.
# "middleware-cost": bench/middleware_cost.py (issue 20's first two targets), the C request
# path and the Python one (RATEGATE_PYTHON_PATH=1) in interleaved processes, --rounds each.
MICRO_STEPS = ["cpu-rategate", "cpu-python-redis", "ffi", "throughput-rategate", "throughput-cluster",
               "throughput-python-redis", "redis-benchmark", "rss", "middleware-cost"]
GROUPS = {"http": [c.name for c in HTTP_CASES], "micro": MICRO_STEPS,
          "all": [c.name for c in HTTP_CASES] + MICRO_STEPS}


# --------------------------------------------------------------------------
# progress


class Progress:
    """One progress line on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.i = 0
        self.label = ""
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self._last_plain = ""

    def next(self, label: str) -> None:
        self.i += 1
        self.label = label
        self.update("starting")

    def update(self, what: str) -> None:
        line = f"[{self.i}/{self.total}] {self.label}: {what}  ({time.monotonic() - self.t0:.0f}s)"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        else:
            # no terminal: one line per phase, not per tick
            phase = f"{self.i}:{what.split(' ')[0]}"
            if phase != self._last_plain:
                self._last_plain = phase
                sys.stderr.write(line + "\n")
                sys.stderr.flush()

    def say(self, text: str) -> None:
        """A permanent line (a finished case), above the progress line."""
        try:
            if self.tty:
                sys.stderr.write("\r\033[K")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: keep measuring, the files are still written
            pass

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# --------------------------------------------------------------------------
# helpers


def available(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def check_import(stmt: str) -> str | None:
    """Run ``stmt`` in a fresh interpreter: None if it works, else the last error line."""
    r = subprocess.run([PY, "-c", stmt], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if r.returncode == 0:
        return None
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"exit {r.returncode}"


def parse_redis_url(url: str) -> dict:
    u = urlparse(url)
    if u.scheme == "unix":
        q = parse_qs(u.query)
        return {"socket": u.path, "db": int(q.get("db", ["0"])[0]), "password": unquote(u.password or "") or None}
    if u.scheme not in ("redis", ""):
        raise SystemExit(f"RATEGATE_REDIS_URL: unsupported scheme in {url!r} (use redis:// or unix://)")
    db = int(u.path.strip("/") or 0)
    return {"host": u.hostname or "127.0.0.1", "port": u.port or 6379, "db": db,
            "password": unquote(u.password) if u.password else None}


def redis_cmd(conf: dict, *args):
    if "socket" in conf:
        # raw RESP over the unix socket
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(conf["socket"])
            f = s.makefile("rb")
            parts = []
            if conf.get("password"):
                parts.append(("AUTH", conf["password"]))
            if conf.get("db"):
                parts.append(("SELECT", str(conf["db"])))
            parts.append(args)
            for p in parts:
                s.sendall(b"*%d\r\n" % len(p) + b"".join(
                    b"$%d\r\n%s\r\n" % (len(x.encode() if isinstance(x, str) else x),
                                        x.encode() if isinstance(x, str) else x) for x in p))
            replies = [procs._read_resp(f) for _ in parts]
            if isinstance(replies[-1], Exception):
                raise replies[-1]
            return replies[-1]
    return procs.redis_command(conf["host"], conf["port"], *args, password=conf.get("password"), db=conf["db"])


def http_get(port: int, path: str = "/ping", timeout: float = 2.0) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


class ControlClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.sock.makefile("rb")

    def __call__(self, cmd: str) -> dict:
        self.sock.sendall(cmd.encode() + b"\n")
        line = self.f.readline()
        if not line:
            raise ConnectionError("the app closed its control port")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def wait_proc(p: subprocess.Popen, timeout: float, progress: Progress, label: str, total: float | None = None):
    """Wait for ``p`` to exit while updating the progress line; returns its stdout."""
    t0 = time.monotonic()
    out_chunks: list[bytes] = []
    os.set_blocking(p.stdout.fileno(), False) if p.stdout else None
    while True:
        if p.stdout:
            try:
                chunk = p.stdout.read()
                if chunk:
                    out_chunks.append(chunk)
            except (BlockingIOError, TypeError):
                pass
        if p.poll() is not None:
            break
        el = time.monotonic() - t0
        if el > timeout:
            procs.stop(p)
            raise TimeoutError(f"{label} did not finish in {timeout:.0f}s")
        progress.update(f"{label} {el:.0f}/{total:.0f}s" if total else f"{label} {el:.0f}s")
        time.sleep(0.25)
    if p.stdout:
        os.set_blocking(p.stdout.fileno(), True)
        rest = p.stdout.read()
        if rest:
            out_chunks.append(rest)
        p.stdout.close()
    procs.stop(p)
    return b"".join(out_chunks).decode(errors="replace")


def marker_json(text: str, marker: str) -> dict | None:
    for line in text.splitlines():
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1:])
    return None


# --------------------------------------------------------------------------
# the run


@dataclass
class Ctx:
    args: argparse.Namespace
    tmp: Path
    progress: Progress
    redis_url: str = ""
    redis_conf: dict = field(default_factory=dict)
    redis_pid: int | None = None
    owns_redis: bool = False
    pace_rate: dict[int, float] = field(default_factory=dict)  # workers -> the fixed offered load
    loop: str = "asyncio"
    http_impl: str = "h11"
    rategate_error: str | None = None
    middleware_error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class CaseRedis:
    """The Redis one case runs against."""
    url: str
    conf: dict | None                        # for INFO commandstats; None: not readable
    pid: int | None                          # redis-server's pid on this machine, for its CPU
    server: procs.RedisServer | None = None  # private to the case: stopped after it
    kill_after_warmup: bool = False


def redis_shared(ctx: Ctx, case: HttpCase) -> CaseRedis:
    if ctx.owns_redis:
        redis_cmd(ctx.redis_conf, "FLUSHALL")
    return CaseRedis(ctx.redis_url, ctx.redis_conf, ctx.redis_pid)


def redis_down(ctx: Ctx, case: HttpCase) -> CaseRedis:
    if not os.path.exists(REDIS_SERVER):  # no redis-server here: a port nobody listens on
        return CaseRedis(f"redis://127.0.0.1:{procs.free_port()}/0", None, None)
    server = procs.RedisServer(REDIS_SERVER, ctx.tmp, case.name).start()
    return CaseRedis(server.url, parse_redis_url(server.url), server.proc.pid if server.proc else None,
                     server=server, kill_after_warmup=True)


def redis_tls(ctx: Ctx, case: HttpCase) -> CaseRedis:
    """A private redis-server serving TLS with a throwaway CA (tests/tlscerts.py), the app
    on its rediss:// port, INFO read on its plain port."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tlscerts import make_certs  # the suite's own CA maker: one place that makes certificates

    d = ctx.tmp / "tls-certs"
    d.mkdir(parents=True, exist_ok=True)
    server = procs.RedisServer(REDIS_SERVER, ctx.tmp, case.name, certs=make_certs(str(d))).start()
    return CaseRedis(server.tls_url, parse_redis_url(server.url), server.proc.pid if server.proc else None,
                     server=server)


class ShmSegment:
    """The shm:// cases' store: a segment of the case's own (its name is the
    app's storage URL), removed when the case ends (as a Redis it started)."""

    proc = None

    def __init__(self, name: str) -> None:
        self.name = name

    def stop(self) -> None:
        try:  # what rategate.shm_unlink does, without importing rategate here
            os.unlink(f"/dev/shm/rategate.{self.name}")
        except FileNotFoundError:
            pass

    kill = stop


def shm_segment(ctx: Ctx, case: HttpCase) -> CaseRedis:
    seg = ShmSegment(f"bench-{os.getpid()}-{case.name}-{time.monotonic_ns()}")
    return CaseRedis(f"shm://{seg.name}", None, None, server=seg)  # type: ignore[arg-type]


# case.redis -> how to get it.
REDIS_KINDS = {"shared": redis_shared, "down": redis_down, "tls": redis_tls, "shm": shm_segment}


def local_redis_pid(conf: dict) -> int | None:
    """redis-server's pid when it runs on this machine (INFO server's process_id), else None."""
    if conf.get("host") not in (None, "127.0.0.1", "localhost", "::1"):
        return None
    try:
        info = redis_cmd(conf, "INFO", "server")
        info = info.decode() if isinstance(info, bytes) else str(info)
        pid = int(next(x for x in info.splitlines() if x.startswith("process_id:")).split(":")[1])
        with open(f"/proc/{pid}/comm") as f:
            return pid if f.read().startswith("redis") else None
    except (OSError, StopIteration, ValueError, RuntimeError):
        return None


def commandstats(conf: dict | None) -> dict | None:
    if conf is None:
        return None
    try:
        return measure.parse_commandstats(redis_cmd(conf, "INFO", "commandstats"))
    except (OSError, RuntimeError, ValueError):
        return None  # killed (redis-down), or not ours to read


def run_wrk(ctx: Ctx, port: int, seconds: float, label: str, measured: bool, name: str) -> dict | None:
    a = ctx.args
    cmd = [WRK, f"-t{a.wrk_threads}", f"-c{a.connections}", f"-d{int(seconds)}s", "--timeout", "5s"]
    if measured:
        cmd += ["--latency", "-s", str(BENCH / "wrk_report.lua")]
    cmd.append(f"http://127.0.0.1:{port}/ping")
    p = procs.spawn(cmd, capture=True, log=ctx.tmp / f"{name}.wrk.err")
    out = wait_proc(p, seconds + 30, ctx.progress, label, seconds)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed (exit {p.returncode}): {procs.tail(ctx.tmp / f'{name}.wrk.err', 5)}")
    if not measured:
        return None
    (ctx.tmp / f"{name}.wrk.txt").write_text(out)
    data = marker_json(out, "WRK_JSON")
    if data is None:
        raise RuntimeError(f"wrk printed no WRK_JSON line:\n{out[-800:]}\n{procs.tail(ctx.tmp / f'{name}.wrk.err')}")
    return data


def run_pace(ctx: Ctx, port: int, rate: float, name: str) -> dict:
    """The fixed offered load (bench/pace.py): open loop at ``rate`` req/s."""
    a = ctx.args
    cmd = [PY, "-m", "bench.pace", "--port", str(port), "--rate", f"{rate:.1f}", "--seconds", f"{a.load_duration:g}",
           "--warmup", "0.5", "--drain", "2"]
    p = procs.spawn(cmd, capture=True, log=ctx.tmp / f"{name}.pace.err", cwd=ROOT)
    out = wait_proc(p, a.load_duration + 40, ctx.progress, f"fixed load {rate:,.0f}/s", a.load_duration + 0.5)
    data = marker_json(out, "PACE_JSON")
    if data is None:
        raise RuntimeError(f"bench.pace failed (exit {p.returncode}): {procs.tail(ctx.tmp / f'{name}.pace.err', 5)}")
    return data


def connect_controls(cdir: Path, workers: int, server: subprocess.Popen, log: Path,
                     timeout: float = 30) -> list[tuple[int, ControlClient]]:
    """Every worker's control client, found by the port files they write (bench/apps/common.py)."""
    t0 = time.monotonic()
    while True:
        files = sorted(cdir.glob("*.port"))
        if len(files) >= workers:
            break
        if server.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {server.returncode}:\n{procs.tail(log)}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{len(files)} of {workers} workers started their control port in {timeout:.0f}s")
        time.sleep(0.05)
    return [(int(f.stem), ControlClient(int(f.read_text()))) for f in files]


def sum_stats(parts: list):
    """The workers' limiter counters added up (nested dicts too); other values from the first."""
    first = parts[0]
    if isinstance(first, dict):
        keys = {k for p in parts if isinstance(p, dict) for k in p}
        return {k: sum_stats([p.get(k) for p in parts if isinstance(p, dict) and k in p]) for k in keys}
    if all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        return sum(parts)
    if all(isinstance(p, bool) for p in parts):
        return all(parts)
    return first


def merged_lag(stats: list[dict]) -> dict:
    """The event-loop lag over every worker: their samples merged."""
    samples = sorted(x for st in stats for x in st.get("lag", {}).get("samples_us", []))
    n = len(samples)
    if not n:
        return {"count": 0}

    def q(p: float) -> float:
        return round(samples[min(n - 1, int(p * n))] / 1e3, 4)

    return {"count": n, "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "max_ms": round(samples[-1] / 1e3, 4),
            "mean_ms": round(sum(samples) / n / 1e3, 4), "workers": len(stats)}


def redis_checks(limiter: dict | None) -> int | None:
    """Checks that reached Redis in the window: decided ones less the local cache's and the failures."""
    if not isinstance(limiter, dict) or "allowed" not in limiter:
        return None
    errors = sum(v for v in (limiter.get("errors") or {}).values() if isinstance(v, int))
    return max(0, limiter["allowed"] + limiter["denied"] - limiter.get("cached_denials", 0) - errors)


@dataclass
class Server:
    """A running app: its processes, control clients and Redis, for measure_window."""
    controls: list[tuple[int, ControlClient]]
    other_pids: list[int]
    redis: CaseRedis


def measure_window(srv: Server, load) -> tuple[dict, dict]:
    """Run ``load()`` (wrk or the pacer) and measure around it: CPU by thread,
    Redis commands, the limiter's counters and the event loop's lag.
    Returns (what load returned, the window's figures in totals)."""
    for _, c in srv.controls:
        c("reset")
    worker_pids = [pid for pid, _ in srv.controls]
    cs0 = commandstats(srv.redis.conf)
    snap0 = measure.snapshot(worker_pids, srv.other_pids, srv.redis.pid)
    out = load()
    snap1 = measure.snapshot(worker_pids, srv.other_pids, srv.redis.pid)
    cs1 = commandstats(srv.redis.conf)
    stats = [c("stats") for _, c in srv.controls]
    limiter = sum_stats([st["limiter"] for st in stats]) if all("limiter" in st for st in stats) else None
    return out, {"cpu_s": measure.cpu_split(snap0, snap1), "commandstats": (cs0, cs1), "limiter": limiter,
                 "lag": merged_lag(stats), "rss_kb": sum(st.get("rss_kb", 0) for st in stats)}


def wakeups_per_check(limiter: dict | None, checks: int | None) -> dict | None:
    """The cross-thread wake-ups per Redis check (rategate's stats(): submit ->
    loop thread, loop thread -> asyncio) and the loop threads' polls."""
    keys = ("wakeups_loop", "wakeups_port", "spins", "spin_hits")
    if not isinstance(limiter, dict) or not checks or any(k not in limiter for k in keys):
        return None
    return {k: round(limiter[k] / checks, 3) for k in keys}


def window_figures(win: dict, requests: int) -> dict:
    """Per-request figures of a window measured by measure_window."""
    checks = redis_checks(win["limiter"])
    return {
        "cpu_us_per_req": measure.per_request(win["cpu_s"], requests),
        "redis": measure.redis_split(*win["commandstats"], checks, requests),
        "lag_ms": win["lag"],
        "wakeups_per_check": wakeups_per_check(win["limiter"], checks),
    }


def run_http_case(ctx: Ctx, case: HttpCase, workers: int) -> dict:
    a = ctx.args
    res: dict = {"case": case.name, "what": case.what, "mode": case.mode, "expect_denied": case.expect_denied,
                 "workers": workers, "loadavg": round(os.getloadavg()[0], 2)}
    if not os.path.exists(WRK):
        res["skipped"] = f"wrk is not installed ({WRK}; Debian: apt-get install wrk)"
        return res
    missing = [m for m in case.needs if not available(m)]
    if "rategate" in case.needs:
        err = ctx.rategate_error or ctx.middleware_error
        if err:
            res["skipped"] = err
            return res
    if missing:
        res["skipped"] = f"not installed: {', '.join(missing)}"
        return res
    if not case.app.startswith(("bench.apps.rategate_app", "bench.apps.health")):
        # a peer: say why it cannot run rather than leave a blank
        err = check_import(f"import bench.apps.{case.app.split('.')[-1].split(':')[0]}")
        if err:
            res["skipped"] = f"import failed: {err}"
            return res

    redis = REDIS_KINDS[case.redis](ctx, case)
    tag = f"{case.name}-w{workers}"
    port = procs.free_port()
    cdir = ctx.tmp / f"control-{tag}"
    cdir.mkdir(exist_ok=True)
    for old in cdir.iterdir():
        old.unlink()
    env = dict(os.environ, BENCH_REDIS_URL=redis.url, BENCH_MODE=case.mode, BENCH_CONTROL_DIR=str(cdir),
               PYTHONDONTWRITEBYTECODE="1", **case.env)
    log = ctx.tmp / f"{tag}.log"
    log.write_text("")
    cmd = [PY, "-m", "uvicorn", case.app, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
           "--no-access-log", "--log-level", "warning", "--loop", ctx.loop, "--http", ctx.http_impl,
           "--lifespan", "on", "--backlog", "4096"]
    res["server"] = {"cmd": " ".join(cmd[1:]), "loop": ctx.loop, "http": ctx.http_impl, "env": case.env}
    server = procs.spawn(cmd, log=log, cwd=ROOT, env=env)
    srv: Server | None = None
    fixed: dict | None = None
    try:
        ctx.progress.update("starting uvicorn")
        t0 = time.monotonic()
        status = None
        while time.monotonic() - t0 < 30:
            if server.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {server.returncode}:\n{procs.tail(log)}")
            try:
                status = http_get(port)
                break
            except OSError:
                time.sleep(0.1)
        if status is None:
            raise RuntimeError(f"uvicorn did not answer in 30s:\n{procs.tail(log)}")
        res["first_status"] = status
        controls = connect_controls(cdir, workers, server, log)
        # one worker: uvicorn serves in its own process; more: a supervisor process too
        srv = Server(controls, [server.pid] if all(pid != server.pid for pid, _ in controls) else [], redis)
        # the loop's lag with nothing to do: the floor of the measurement
        ctx.progress.update("idle lag")
        for _, c in controls:
            c("reset")
        time.sleep(0.5)
        idle_lag = merged_lag([c("stats") for _, c in controls])
        if a.warmup > 0:
            run_wrk(ctx, port, a.warmup, "warm-up", False, tag)
        if redis.kill_after_warmup and redis.server is not None:
            ctx.progress.update("killing redis")
            redis.server.kill()
            redis.pid = None
            time.sleep(0.2)
        w, win = measure_window(srv, lambda: run_wrk(ctx, port, a.duration, "wrk", True, tag))
        if case.name == "health" and workers not in ctx.pace_rate and a.load_fraction > 0 and w["duration_us"]:
            # the fixed load of this worker count, for every case and round: a share of
            # /health's capacity at the same worker count, measured first in this run
            ctx.pace_rate[workers] = round(w["requests"] / (w["duration_us"] / 1e6) * a.load_fraction, 1)
        rate = ctx.pace_rate.get(workers)
        if rate:
            pace, pwin = measure_window(srv, lambda: run_pace(ctx, port, rate, tag))
            fixed = dict(pace, **window_figures(pwin, pace["answered_total"]), limiter_stats=pwin["limiter"])
        if server.poll() is not None:
            raise RuntimeError(f"uvicorn died during the run:\n{procs.tail(log)}")
    finally:
        for _, c in (srv.controls if srv is not None else []):
            c.close()
        procs.stop(server, timeout=8)
        if redis.server is not None:
            redis.server.stop()
    secs = w["duration_us"] / 1e6
    n = w["requests"]
    e = w["errors"]
    res.update({
        "requests": n,
        "seconds": round(secs, 3),
        "rps": round(n / secs, 1) if secs else 0.0,
        "non_2xx": e["status"],
        "ok_2xx": n - e["status"],
        "socket_errors": {k: e[k] for k in ("connect", "read", "write", "timeout")},
        "latency_ms": {k: round(v / 1000, 3) for k, v in w["latency_us"].items()},
        "idle_lag_ms": idle_lag,
        **window_figures(win, n),
        "server_rss_kb": win["rss_kb"],
        "limiter_stats": win["limiter"],
        "fixed_load": fixed,
    })
    res["server_cpu_us_per_req"] = res["cpu_us_per_req"]["server"]
    denied = res["non_2xx"] > 0
    res["as_expected"] = denied == case.expect_denied and sum(res["socket_errors"].values()) == 0
    if not res["as_expected"]:
        why = "no 429s" if case.expect_denied and not denied else (
            f"{res['non_2xx']} non-2xx responses" if denied and not case.expect_denied else "socket errors")
        res["unexpected"] = why
    return res


def run_micro(ctx: Ctx, figure: str, *extra: str, timeout: float = 120, total: float | None = None) -> dict:
    cmd = [PY, "-m", "bench.micro", figure, "--url", ctx.redis_url, "--loop", ctx.loop, *extra]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"micro-{figure}-{'-'.join(x for x in extra if not x.startswith('-'))[:40]}")
    p = procs.spawn(cmd, capture=True, log=ctx.tmp / f"{name}.err", cwd=ROOT)
    out = wait_proc(p, timeout, ctx.progress, figure, total)
    data = marker_json(out, "MICRO_JSON")
    if data is None:
        raise RuntimeError(f"bench.micro {figure} failed (exit {p.returncode}):\n{procs.tail(ctx.tmp / f'{name}.err')}")
    data["cmd"] = " ".join(cmd[1:])
    return data


def run_middleware_cost(ctx: Ctx) -> dict:
    """bench/middleware_cost.py in fresh processes, the C request path and the
    Python path (RATEGATE_PYTHON_PATH=1) alternately, --rounds times each (at
    least 3): each process measures one round of bare / allowed / denied; the
    figures are the medians over the processes, with their range."""
    a = ctx.args
    n = 5_000 if a.quick else 20_000
    runs: dict[str, list[dict]] = {"c": [], "python": []}
    for _ in range(max(3, a.rounds)):
        for path in ("c", "python"):
            env = dict(os.environ)
            env.pop("RATEGATE_PYTHON_PATH", None)
            if path == "python":
                env["RATEGATE_PYTHON_PATH"] = "1"
            cmd = [PY, "-m", "bench.micro", "middleware", "--url", ctx.redis_url, "--loop", ctx.loop,
                   "--checks", str(n), "--reps", "1"]
            p = procs.spawn(cmd, capture=True, log=ctx.tmp / f"micro-middleware-{path}.err", cwd=ROOT, env=env)
            out = wait_proc(p, 300, ctx.progress, f"middleware cost ({path} path)")
            data = marker_json(out, "MICRO_JSON")
            if data is None:
                raise RuntimeError(f"bench.micro middleware failed (exit {p.returncode}):\n"
                                   f"{procs.tail(ctx.tmp / f'micro-middleware-{path}.err')}")
            runs[path].append(data)
            if ctx.owns_redis:
                redis_cmd(ctx.redis_conf, "FLUSHALL")

    def fig(rs: list[dict], key: str) -> dict:
        xs = sorted(r[key]["median_us"] for r in rs)
        return {"median_us": round(xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2, 3),
                "min_us": xs[0], "max_us": xs[-1], "rounds_us": [r[key]["median_us"] for r in rs]}

    out: dict = {"requests_per_round": n, "rounds": len(runs["c"]),
                 "cmd": "python -m bench.micro middleware --url URL --checks N --reps 1 "
                        "(and with RATEGATE_PYTHON_PATH=1), alternately"}
    for path, rs in runs.items():
        out[path] = {k: fig(rs, k) for k in ("bare", "allowed", "denied", "allowed_over_bare", "denied_over_bare")}
        out[path]["c_path"] = all(r["c_path"] for r in rs)
        out[path]["denied_from_cache"] = sum(r["denied_from_cache"] for r in rs)
        out[path]["denied_measured"] = sum(r["denied_measured"] for r in rs)
    return out


def run_cluster_throughput(ctx: Ctx) -> dict:
    """rategate's checks/s (as throughput-rategate: 1000 tasks, one Limiter, one loop
    thread) against a private 3-master Redis Cluster on this machine, started with the
    suite's own topology fixture (tests/topology.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from topology import ClusterSet  # the suite's cluster maker: one place that makes clusters

    a = ctx.args
    with ClusterSet(masters=3) as cluster:
        out = run_micro(ctx, "throughput", "--impl", "rategate", "--url", cluster.url(),
                        "--seconds", str(a.tp_seconds), "--concurrency", "1000", total=a.tp_seconds)
        out["masters"] = 3
        out["checks_per_node"] = {}
        for node in cluster.masters():
            info = redis_cmd({"host": "127.0.0.1", "port": node.port, "db": 0, "password": None},
                             "INFO", "commandstats")
            text = info.decode() if isinstance(info, bytes) else str(info)
            line = next((x for x in text.splitlines() if x.startswith("cmdstat_evalsha:")), "")
            out["checks_per_node"][node.port] = line.split(",")[0].split("=")[-1] if line else "0"
    return out


def run_redis_benchmark(ctx: Ctx) -> dict:
    """Redis's own ceiling for one check per EVALSHA, without and with pipelining.

    The script and arguments are rategate's own (``rategate._core.SCRIPT``, one
    check of one rate per call: what rategate sends for a lone check), as the
    python-redis case runs it.  Keys: 10,000 random ones, rate 1000000/second
    (all allowed).
    """
    if not os.path.exists(REDIS_BENCHMARK):
        raise RuntimeError(f"redis-benchmark is not installed ({REDIS_BENCHMARK}; Debian: apt-get install redis-tools)")
    r = subprocess.run([PY, "-c", "import sys, rategate._core as c; sys.stdout.write(c.SCRIPT)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"rategate is not built (make build): {r.stderr.strip()[-300:]}")
    script, which = r.stdout, "rategate._core.SCRIPT (one check per call)"
    # ARGV (csrc/script.c): checks=1, MGET, one spec "=1" (T=1 µs, tau=burst*T=1000000 µs,
    # a hit's TTL 1 ms); the check in the common form: spec "=1", cost 1
    args = ["1", "rg:{bench:__rand_int__}:1000000/1000", "1", "1", "1", "=1", "1", "1000000", "1", "=1", "1"]
    sha = redis_cmd(ctx.redis_conf, "SCRIPT", "LOAD", script)
    sha = sha.decode() if isinstance(sha, bytes) else sha
    conf = ctx.redis_conf
    base = [REDIS_BENCHMARK]
    if "socket" in conf:
        base += ["-s", conf["socket"]]
    else:
        base += ["-h", conf["host"], "-p", str(conf["port"])]
    if conf.get("password"):
        base += ["-a", conf["password"], "--no-auth-warning"]
    if conf.get("db"):
        base += ["--dbnum", str(conf["db"])]
    evalsha = ["EVALSHA", sha, *args]
    out: dict = {"script": which, "sha": sha, "clients": 50, "keys": 10000}
    secs = ctx.args.rb_seconds
    for label, pipeline, rate_guess in (("unpipelined", 1, 50_000), ("pipelined_32", 32, 140_000)):
        n = max(20_000, int(secs * rate_guess))
        cmd = base + ["-c", "50", "-n", str(n), "-r", "10000", "-P", str(pipeline), "--csv", *evalsha]
        p = procs.spawn(cmd, capture=True, log=ctx.tmp / f"redis-benchmark-{label}.err")
        text = wait_proc(p, 120, ctx.progress, f"redis-benchmark -P {pipeline}")
        rows = [line for line in text.splitlines() if line.startswith('"EVALSHA')]
        if not rows:
            raise RuntimeError(f"redis-benchmark printed no result:\n{text[-500:]}")
        cols = [c.strip('"') for c in rows[-1].split('","')]
        out[label] = {"pipeline": pipeline, "requests": n, "rps": float(cols[1]), "p50_ms": float(cols[4]),
                      "p99_ms": float(cols[6]), "cmd": " ".join(cmd[1:])}
    return out


def machine_info(ctx: Ctx) -> dict:
    def cmd_out(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    os_name = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    from importlib import metadata

    versions = {}
    for dist in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "h11", "redis", "hiredis", "slowapi",
                 "limits", "fastapi-limiter", "pyrate-limiter", "matplotlib", "rategate"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    if versions.get("rategate") is None and not ctx.rategate_error:  # built in place, not installed
        versions["rategate"] = cmd_out(PY, "-c", "import rategate; print(rategate.__version__)") or None
    commit = cmd_out("git", "rev-parse", "--verify", "-q", "HEAD") or "no commit yet"
    # The results of an earlier run (bench/results) do not make the code dirty.
    dirty = bool(cmd_out("git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"))
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "versions": versions,
        "redis_server": cmd_out(REDIS_SERVER, "--version"),
        "redis_server_used": ctx.redis_url if not ctx.owns_redis else f"private {REDIS_SERVER} on 127.0.0.1",
        "wrk": (cmd_out(WRK, "-v").splitlines() or [""])[0],
        "git_commit": commit,
        "git_dirty": dirty,
        "loadavg_start": list(os.getloadavg()),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark rategate against a no-op /health baseline and the limiters people use today.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="cases: " + ", ".join(GROUPS["all"]) + "\ngroups: http, micro, all\n"
               "env: RATEGATE_REDIS_URL=redis://host:port/db uses that Redis instead of a private one "
               "(it is then not flushed; redis-down still starts a private one).",
    )
    p.add_argument("--quick", action="store_true",
                   help="short run (3 s per case, 1 s warm-up, one round, shorter micro-benchmarks): "
                        "about 6 minutes on 2 cores")
    p.add_argument("--duration", type=float,
                   help="seconds of measurement per HTTP case, whole (default 10, quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per HTTP case, whole, 0 = none "
                                                "(default 3, quick 1)")
    p.add_argument("--connections", type=int, default=100, help="wrk connections (default 100)")
    p.add_argument("--rounds", type=int, help="rounds of the HTTP cases; each case keeps its best round "
                                              "(default 2, quick 1)")
    p.add_argument("--wrk-threads", type=int, default=1,
                   help="wrk threads (default 1: leaves the cores to the server and Redis)")
    p.add_argument("--workers", default=None,
                   help="uvicorn worker counts, comma-separated; every HTTP case runs at each "
                        f"(default: the core count, then 1: {os.cpu_count() or 1},1)")
    p.add_argument("--load-fraction", type=float, default=0.5,
                   help="the fixed offered load, as a share of /health's req/s at the same worker count "
                        "(default 0.5; 0 = no fixed-load run)")
    p.add_argument("--load-duration", type=float,
                   help="seconds of the fixed-load run per case, after 0.5 s unmeasured (default 5, quick 1.5)")
    p.add_argument("--cases", default="all", help="comma-separated cases or groups (default all)")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="uvicorn event loop (auto: uvloop if installed)")
    p.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                   help="uvicorn HTTP parser (auto: httptools if installed)")
    p.add_argument("--out", default=str(BENCH / "results"), help="where latest.{json,md,png} go")
    p.add_argument("--no-png", action="store_true", help="skip the chart")
    a = p.parse_args(argv)
    a.duration = a.duration if a.duration is not None else (3.0 if a.quick else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 3.0)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 2)
    a.load_duration = a.load_duration if a.load_duration is not None else (1.5 if a.quick else 5.0)
    try:
        ws = [int(x) for x in (a.workers or f"{os.cpu_count() or 1},1").split(",") if x.strip()]
    except ValueError:
        ws = []
    if not ws or min(ws) < 1:
        p.error(f"--workers takes worker counts >= 1, comma-separated, like 2,1; got {a.workers!r}")
    a.workers = list(dict.fromkeys(ws))  # the first is the headline table
    if not 0 <= a.load_fraction <= 1 or a.load_duration <= 0:
        p.error("--load-fraction must be in [0, 1] and --load-duration > 0")
    # wrk takes whole seconds
    a.duration = float(math.ceil(a.duration)) if a.duration > 0 else a.duration
    a.warmup = float(math.ceil(a.warmup)) if a.warmup > 0 else 0.0
    if a.duration <= 0 or a.connections < 1 or a.wrk_threads < 1 or a.wrk_threads > a.connections or a.rounds < 1:
        p.error("--duration must be > 0, --connections >= 1, --rounds >= 1, 1 <= --wrk-threads <= --connections")
    selected: list[str] = []
    for part in (x.strip() for x in a.cases.split(",")):
        if not part:
            continue
        if part in GROUPS:
            selected += GROUPS[part]
        elif part in GROUPS["all"]:
            selected.append(part)
        else:
            p.error(f"unknown case {part!r}; choose from: {', '.join(GROUPS['all'])}, or a group: http, micro, all")
    if any(s in HTTP_BY_NAME for s in selected) and "health" not in selected:
        selected.insert(0, "health")  # every ratio is to /health measured in this run
    a.selected = [s for s in GROUPS["all"] if s in selected]  # canonical order, no duplicates
    # micro-benchmark sizes
    a.cpu_checks = 10_000 if a.quick else 20_000
    a.cpu_reps = 3 if a.quick else 5
    a.tp_seconds = 2.0 if a.quick else 5.0
    a.rb_seconds = 1.5 if a.quick else 4.0
    a.ffi_calls = 100_000 if a.quick else 300_000
    a.rss_deadline = 40.0 if a.quick else 120.0
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    procs.install_signal_handlers()
    out_dir = Path(a.out)
    tmp = out_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for old in tmp.iterdir():
        if old.is_file():
            old.unlink()
    n_http = sum(1 for n in a.selected if n in HTTP_BY_NAME)
    nw = len(a.workers)
    progress = Progress(1 + nw * (n_http * a.rounds + (a.rounds == 1 and n_http > 1 and not a.quick))
                        + len(a.selected) - n_http)
    ctx = Ctx(args=a, tmp=tmp, progress=progress)
    started = _dt.datetime.now(_dt.timezone.utc)
    results: dict = {"version": 2, "started": started.isoformat(timespec="seconds"),
                     "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
                     "http": {}, "micro": {}, "notes": ctx.notes}
    for tool in (WRK, REDIS_SERVER, REDIS_BENCHMARK):
        if not os.path.exists(tool):
            ctx.notes.append(f"{tool} not found (Debian packages: wrk, redis-server, redis-tools)")
    try:
        progress.next("setup")
        ctx.loop = a.loop if a.loop != "auto" else ("uvloop" if available("uvloop") else "asyncio")
        ctx.http_impl = a.http if a.http != "auto" else ("httptools" if available("httptools") else "h11")
        for mod, want in (("uvloop", ctx.loop), ("httptools", ctx.http_impl)):
            if want == mod and not available(mod):
                raise SystemExit(f"--{'loop' if mod == 'uvloop' else 'http'} {mod}: {mod} is not installed "
                                 f"(pip install -r bench/requirements.txt)")
            if a.loop == "auto" and mod == "uvloop" and not available(mod) or \
               a.http == "auto" and mod == "httptools" and not available(mod):
                ctx.notes.append(f"{mod} is not installed: using the slower default "
                                 f"(pip install -r bench/requirements.txt)")
        progress.update("checking rategate")
        ctx.rategate_error = check_import("import rategate; rategate.Limiter('memory://')")
        if ctx.rategate_error:
            ctx.rategate_error = f"rategate does not import ({ctx.rategate_error}); run `make build`"
            ctx.notes.append(ctx.rategate_error)
        else:
            ctx.middleware_error = check_import("from rategate.middleware import RateLimitMiddleware")
            if ctx.middleware_error:
                ctx.middleware_error = f"rategate.middleware is not usable ({ctx.middleware_error})"
                ctx.notes.append(ctx.middleware_error)
        env_url = os.environ.get("RATEGATE_REDIS_URL")
        if env_url:
            ctx.redis_url = env_url
            ctx.redis_conf = parse_redis_url(env_url)
            ctx.redis_pid = local_redis_pid(ctx.redis_conf)
            if ctx.redis_pid is None:
                ctx.notes.append("RATEGATE_REDIS_URL: its redis-server is not a local process; no redis-server CPU")
            ctx.notes.append("RATEGATE_REDIS_URL set: using that Redis (not flushed between cases)")
        else:
            if not os.path.exists(REDIS_SERVER):
                raise SystemExit(f"redis-server is not installed ({REDIS_SERVER}; Debian: apt-get install "
                                 "redis-server), and RATEGATE_REDIS_URL is not set")
            progress.update("starting redis-server")
            server = procs.RedisServer(REDIS_SERVER, tmp, "redis").start()
            ctx.redis_url, ctx.owns_redis = server.url, True
            ctx.redis_conf = parse_redis_url(server.url)
            ctx.redis_pid = server.proc.pid if server.proc else None
        redis_cmd(ctx.redis_conf, "PING")
        results["machine"] = machine_info(ctx)
        results["options"] = {"duration_s": a.duration, "warmup_s": a.warmup, "connections": a.connections,
                              "wrk_threads": a.wrk_threads, "rounds": a.rounds, "cases": a.selected, "quick": a.quick,
                              "uvicorn_loop": ctx.loop, "uvicorn_http": ctx.http_impl, "workers": a.workers,
                              "load_fraction": a.load_fraction, "load_duration_s": a.load_duration,
                              "route": "GET /ping -> {\"ok\": true}"}
        if results["machine"]["loadavg_start"][0] > 0.5 * (os.cpu_count() or 1):
            ctx.notes.append(f"the machine was busy at the start (load {results['machine']['loadavg_start'][0]:.2f}): "
                             "absolute numbers are noisy, the ratios less so")

        http_names = [n for n in a.selected if n in HTTP_BY_NAME]
        micro_names = [n for n in a.selected if n not in HTTP_BY_NAME]
        # HTTP cases in rounds, each round every worker count, each worker count every
        # case: a case keeps its best round (other load on the machine only ever
        # lowers a figure, so the best is the least disturbed).  With one round
        # (not --quick, which is kept short), /health is measured again after the
        # other cases: the baseline is then the better of a measurement at each end.
        plan = [(rnd, w, name) for rnd in range(1, a.rounds + 1) for w in a.workers for name in http_names]
        if a.rounds == 1 and len(http_names) > 1 and not a.quick:
            plan += [(2, w, "health") for w in a.workers]
        for rnd, w, name in plan:
            group = results["http"].setdefault(str(w), {})
            prev = group.get(name)
            if prev is not None and "skipped" in prev:
                continue
            progress.next(f"{name}, {w} worker{'s' if w > 1 else ''}"
                          + (f" (round {rnd})" if a.rounds > 1 or rnd > 1 else ""))
            try:
                r = run_http_case(ctx, HTTP_BY_NAME[name], w)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # a failing case is reported, and the run goes on
                err = f"{type(e).__name__}: {e}"
                (tmp / f"{name}-w{w}.traceback.txt").write_text(traceback.format_exc())
                r = {"case": name, "workers": w, "error": err}
            group[name] = pick_best(prev, r)
            progress.say(report.case_line(r, group.get("health"))
                         + (f"   [round {rnd}]" if a.rounds > 1 or rnd > 1 else ""))
        for name in micro_names:
            progress.next(name)
            try:
                run_micro_step(ctx, name, results["micro"])
                progress.say(report.micro_line(name, results["micro"]))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # a failing step is reported, and the run goes on
                err = f"{type(e).__name__}: {e}"
                (tmp / f"{name}.traceback.txt").write_text(traceback.format_exc())
                results["micro"].setdefault("errors", {})[name] = err
                progress.say(f"  {name:<20} ERROR {report.one_line(err)[:300]}")
        progress.done()
    except KeyboardInterrupt:
        progress.done()
        print("\ninterrupted: stopped every process it started; no results written", file=sys.stderr)
        return 130
    except SystemExit as e:
        if e.code and isinstance(e.code, int) and e.code > 128:  # SIGTERM/SIGHUP
            progress.done()
            print(f"\nstopped by signal {e.code - 128}: stopped every process it started; no results written",
                  file=sys.stderr)
        raise
    finally:
        procs.stop_all()

    results["machine"]["loadavg_end"] = list(os.getloadavg())
    finished = _dt.datetime.now(_dt.timezone.utc)
    results["finished"] = finished.isoformat(timespec="seconds")
    results["elapsed_s"] = round((finished - started).total_seconds())
    report.compute(results)
    written = report.write_all(results, out_dir, png=not a.no_png)
    print(report.terminal(results))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def pick_best(prev: dict | None, new: dict) -> dict:
    """Keep the round with the most requests/s; remember every round's figure."""
    rounds = (prev or {}).get("rounds", [])
    if "rps" in new:
        fixed = new.get("fixed_load") or {}
        cpu = new.get("cpu_us_per_req") or {}
        rounds = rounds + [{"rps": new["rps"], "p99_ms": new["latency_ms"]["p99"], "loadavg": new.get("loadavg"),
                            "fixed_load_p99_ms": (fixed.get("latency_ms") or {}).get("p99"),
                            "event_loop_us": cpu.get("event_loop"), "rategate_loops_us": cpu.get("rategate_loops"),
                            "redis_us_per_check": (new.get("redis") or {}).get("usec_per_check")}]
    else:
        rounds = rounds + [{"error": new.get("error") or new.get("skipped")}]
    best = new if prev is None or "rps" not in prev or ("rps" in new and new["rps"] > prev["rps"]) else prev
    best = dict(best, rounds=rounds)
    return best


def run_micro_step(ctx: Ctx, name: str, micro: dict) -> None:
    a = ctx.args
    rg_needed = name in ("cpu-rategate", "ffi", "throughput-rategate", "throughput-cluster", "rss",
                         "middleware-cost")
    if rg_needed and ctx.rategate_error:
        micro.setdefault("skipped", {})[name] = ctx.rategate_error
        return
    if name.startswith("cpu-"):
        impl = name[4:]
        # redis.asyncio costs ~30 times more per check: half the checks are plenty
        checks = a.cpu_checks if impl == "rategate" else a.cpu_checks // 2
        micro.setdefault("cpu", {})[impl] = run_micro(
            ctx, "cpu", "--impl", impl, "--checks", str(checks), "--reps", str(a.cpu_reps),
            "--concurrency", "100")
    elif name == "ffi":
        micro["ffi"] = run_micro(ctx, "ffi", "--calls", str(a.ffi_calls))
    elif name == "throughput-cluster":
        micro.setdefault("throughput", {})["cluster"] = run_cluster_throughput(ctx)
    elif name.startswith("throughput-"):
        impl = name[len("throughput-"):]
        conc = "1000" if impl == "rategate" else "100"
        micro.setdefault("throughput", {})[impl] = run_micro(
            ctx, "throughput", "--impl", impl, "--seconds", str(a.tp_seconds), "--concurrency", conc,
            total=a.tp_seconds)
    elif name == "redis-benchmark":
        micro["redis_benchmark"] = run_redis_benchmark(ctx)
    elif name == "rss":
        micro["rss"] = run_micro(ctx, "rss", "--impl", "rategate", "--concurrency", "500",
                                 "--deadline", str(a.rss_deadline), timeout=a.rss_deadline + 60)
    elif name == "middleware-cost":
        micro["middleware_cost"] = run_middleware_cost(ctx)
    if ctx.owns_redis:
        redis_cmd(ctx.redis_conf, "FLUSHALL")


if __name__ == "__main__":
    sys.exit(main())
