"""Where a measured window's CPU and Redis time went, read from outside the processes.

- CPU by thread: ``/proc/PID/task/TID/stat`` utime+stime of every thread of
  the app's worker processes, before and after the window.  A worker's main
  thread (TID == PID) is its event loop; threads whose name
  (``/proc/PID/task/TID/comm``) starts with ``rategate-loop`` are rategate's
  loop threads; the rest of the process's time (its whole-process counters,
  so threads that ended in the window count too), and uvicorn's supervisor
  when there are several workers, is "other".  redis-server is read as one
  process (all its threads).
- The load generator (wrk, the pacer): ``getrusage(RUSAGE_CHILDREN)`` of this
  process around the window; it is the only child reaped in the window.
- Redis: ``INFO commandstats`` before and after: calls and usec per command.
  Scripts are EVALSHA, EVAL and their _RO forms.  Redis 7 counts the commands
  a script runs (its GET, SET, TIME) under their own names too, and their time
  is inside the script's: so "calls" counts them, and the Redis time of a
  window is the scripts' usec when there are scripts.

The kernel counts CPU time in clock ticks (``SC_CLK_TCK``, 10 ms here): over a
window of seconds and thousands of requests that is well under a microsecond
per request.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

TICK = 1.0 / os.sysconf("SC_CLK_TCK")
LOOP_THREAD_PREFIX = "rategate-loop"
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro")


def _stat_seconds(path: str) -> float | None:
    """utime+stime of /proc/.../stat in seconds; None when it is gone."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm, in parentheses, may hold spaces: the fields start after the last ')'
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * TICK


def _comm(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass
class CpuSnapshot:
    workers: dict[int, dict] = field(default_factory=dict)  # pid -> {"total": s, "main": s, "loops": {tid: s}}
    others: dict[int, float | None] = field(default_factory=dict)  # supervisor: whole process
    redis: float | None = None
    children: float = 0.0


def snapshot(worker_pids: list[int], other_pids: list[int], redis_pid: int | None) -> CpuSnapshot:
    snap = CpuSnapshot()
    for pid in worker_pids:
        w: dict = {"total": _stat_seconds(f"/proc/{pid}/stat"), "main": None, "loops": {}}
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            tids = []
        for tid in tids:
            if tid == pid:
                w["main"] = _stat_seconds(f"/proc/{pid}/task/{tid}/stat")
            elif _comm(pid, tid).startswith(LOOP_THREAD_PREFIX):
                w["loops"][tid] = _stat_seconds(f"/proc/{pid}/task/{tid}/stat")
        snap.workers[pid] = w
    for pid in other_pids:
        snap.others[pid] = _stat_seconds(f"/proc/{pid}/stat")
    if redis_pid:
        snap.redis = _stat_seconds(f"/proc/{redis_pid}/stat")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    snap.children = ru.ru_utime + ru.ru_stime
    return snap


def _d(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else max(0.0, after - before)


def cpu_split(before: CpuSnapshot, after: CpuSnapshot) -> dict:
    """CPU seconds of the window by place: event_loop, rategate_loops, other, redis, load_generator.

    ``rategate_loop_threads`` is how many named loop threads were seen (0: none,
    so the column is absent rather than zero for a limiter without them)."""
    ev = loops = other = 0.0
    nloops = 0
    for pid, a in after.workers.items():
        b = before.workers.get(pid)
        if b is None:
            continue
        main = _d(a["main"], b["main"]) or 0.0
        lp = sum(_d(s, b["loops"].get(tid, 0.0)) or 0.0 for tid, s in a["loops"].items())
        nloops += len(a["loops"])
        total = _d(a["total"], b["total"])
        ev += main
        loops += lp
        other += max(0.0, (total if total is not None else main + lp) - main - lp)
    for pid, s in after.others.items():
        other += _d(s, before.others.get(pid)) or 0.0
    return {
        "event_loop": ev,
        "rategate_loops": loops if nloops else None,
        "rategate_loop_threads": nloops,
        "other": other,
        "server": ev + loops + other,
        "redis": _d(after.redis, before.redis),
        "load_generator": _d(after.children, before.children),
        "workers": len(after.workers),
    }


def per_request(cpu_s: dict, requests: int) -> dict:
    """The seconds of :func:`cpu_split` as µs per request."""
    out: dict = {}
    for k, v in cpu_s.items():
        if k in ("rategate_loop_threads", "workers"):
            out[k] = v
        else:
            out[k] = round(v / requests * 1e6, 2) if v is not None and requests else None
    return out


# --------------------------------------------------------------------------
# Redis


def parse_commandstats(text: str | bytes) -> dict[str, dict[str, int]]:
    """``INFO commandstats`` -> {command: {"calls": n, "usec": n}}."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, _, rest = line[len("cmdstat_"):].partition(":")
        kv = dict(x.split("=", 1) for x in rest.split(",") if "=" in x)
        try:
            out[name.lower()] = {"calls": int(kv.get("calls", 0)), "usec": int(kv.get("usec", 0))}
        except ValueError:
            continue
    return out


def redis_split(before: dict | None, after: dict | None, checks: int | None, requests: int) -> dict | None:
    """Redis commands of the window: scripts (EVALSHA/EVAL) and everything else.

    ``checks`` is how many limiter checks reached Redis in the window (None:
    unknown, then one per request is assumed and said so)."""
    if before is None or after is None:
        return None
    diff = {}
    for name, a in after.items():
        if name == "info":  # the measurement's own
            continue
        b = before.get(name, {"calls": 0, "usec": 0})
        calls, usec = a["calls"] - b["calls"], a["usec"] - b["usec"]
        if calls > 0:
            diff[name] = {"calls": calls, "usec": usec}
    scripts = [diff[c] for c in SCRIPT_COMMANDS if c in diff]
    s_calls = sum(x["calls"] for x in scripts)
    s_usec = sum(x["usec"] for x in scripts)
    all_calls = sum(x["calls"] for x in diff.values())
    all_usec = sum(x["usec"] for x in diff.values())
    checks_assumed = checks is None
    if checks is None:
        checks = requests
    return {
        "commands": diff,
        "calls": all_calls,
        "usec": all_usec,
        "calls_per_request": round(all_calls / requests, 3) if requests else None,
        "usec_per_request": round((s_usec if s_calls else all_usec) / requests, 2) if requests else None,
        "script_calls": s_calls,
        "script_usec": s_usec,
        "usec_per_script_call": round(s_usec / s_calls, 2) if s_calls else None,
        "checks": checks,
        "checks_assumed_one_per_request": checks_assumed,
        "checks_per_script_call": round(checks / s_calls, 2) if s_calls and checks else None,
        # Redis time per check.  Commands a script runs are counted in commandstats
        # too, inside the script's own usec: with scripts, their usec is the total.
        "usec_per_check": round((s_usec if s_calls else all_usec) / checks, 2) if all_calls and checks else None,
    }
