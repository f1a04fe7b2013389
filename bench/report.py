"""Turn a run's results into figures: ratios, the six targets, the terminal
table, bench/results/latest.{json,md,png}.  Everything here is computed from
the run's own measurements; nothing is typed in but the targets themselves."""

from __future__ import annotations

import json
from pathlib import Path

# issue 5: the six figures and their targets
TARGETS = [
    # id, short name, description, op, goal, unit
    (1, "allowed ratio", "rategate, all allowed, req/s ÷ /health", ">=", 0.95, "×"),
    (2, "flood ratio", "rategate-flood (all 429), req/s ÷ /health", ">=", 1.30, "×"),
    (3, "CPU per check", "Python-thread CPU per Redis-backed hit() (net)", "<=", 3.0, "µs"),
    (4, "checks/s", "one process, no HTTP, vs redis-benchmark EVALSHA -P 32", ">=", None, "/s"),
    (5, "loop lag p99", "event-loop lag p99 inside the app during the flood", "<=", 1.0, "ms"),
    (6, "RSS growth", "RSS after 1,000,000 checks − after 100,000", "<=", 2048, "KB"),
]


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


# issue 13: the production shape (rategate, all allowed, at workers = cores unless said)
TARGETS_13 = [
    ("cores ratio", "rategate req/s ÷ /health at workers = cores", ">=", 0.90, "×"),
    ("Redis µs/check", "Redis command time per check (INFO commandstats)", "<=", 3.0, "µs"),
    ("loop threads µs/check", "rategate loop threads' CPU per check", "<=", 3.0, "µs"),
    ("added p99 at fixed load", "p99 over /health's at the fixed offered load", "<=", 1.0, "ms"),
    ("hot key, leased", "hot-key-lease req/s ÷ /health at workers = cores", ">=", 0.97, "×"),
    # issue 19: shm://, no Redis on the path
    ("shm allowed", "shm req/s ÷ /health at workers = cores", ">=", 0.97, "×"),
    ("shm flood", "shm-flood req/s ÷ rategate-flood's at workers = cores", ">=", 1.0, "×"),
]


# issue 20: the request path in C and the Redis side of a check
TARGETS_20 = [
    ("middleware CPU, allowed", "event-loop CPU per allowed request over the bare app (bench/middleware_cost.py, "
     "C path; distinct addresses, Redis)", "<=", 5.0, "µs"),
    ("middleware CPU, denied", "the same, per request denied from the deny cache", "<=", 2.5, "µs"),
    ("app-host CPU", "event loop + rategate loops per allowed request over /health's event loop, workers = cores",
     "<=", 6.0, "µs"),
    ("Redis µs/check", "Redis command time per check (INFO commandstats), rategate, workers = cores", "<=", 3.5, "µs"),
    ("allowed ratio, cores", "rategate req/s ÷ /health, workers = cores, median of the rounds", ">=", 0.92, "×"),
    ("allowed ratio, 1 worker", "rategate req/s ÷ /health, 1 worker, median of the rounds", ">=", 0.97, "×"),
]


def _median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def _spread(xs: list) -> dict | None:
    """median, min, max of the rounds' values (None when none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": round(_median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3), "n": len(xs)}


def targets_20(results: dict) -> list[dict]:
    """Issue 20's targets, each with its spread over the rounds (the HTTP ones
    pair /health's round i with rategate's round i)."""
    g = groups(results)
    head_w, head = g[0] if g else (0, {})
    one = next((r for w, r in g if w == 1), {})
    mc = _get(results, "micro", "middleware_cost") or {}

    def rounds(group: dict, name: str, key: str) -> list:
        return [r.get(key) for r in (group.get(name) or {}).get("rounds", [])]

    def ratios(group: dict) -> list:
        return [a / b if a is not None and b else None
                for a, b in zip(rounds(group, "rategate", "rps"), rounds(group, "health", "rps"))]

    host = [None if ev is None or hev is None else ev + (lp or 0.0) - hev
            for ev, lp, hev in zip(rounds(head, "rategate", "event_loop_us"),
                                   rounds(head, "rategate", "rategate_loops_us"),
                                   rounds(head, "health", "event_loop_us"))]
    c = mc.get("c") or {}
    spreads = [
        {"median": _get(c, "allowed_over_bare", "median_us"), "min": _get(c, "allowed_over_bare", "min_us"),
         "max": _get(c, "allowed_over_bare", "max_us"), "n": mc.get("rounds")} if c else None,
        {"median": _get(c, "denied_over_bare", "median_us"), "min": _get(c, "denied_over_bare", "min_us"),
         "max": _get(c, "denied_over_bare", "max_us"), "n": mc.get("rounds")} if c else None,
        _spread(host),
        _spread(rounds(head, "rategate", "redis_us_per_check")),
        _spread(ratios(head)),
        _spread(ratios(one)),
    ]
    py = mc.get("python") or {}
    ab = [f"Python path {_get(py, 'allowed_over_bare', 'median_us')} µs" if py else None,
          f"Python path {_get(py, 'denied_over_bare', 'median_us')} µs" if py else None, None, None, None, None]
    out = []
    for (short, desc, op, goal, unit), sp, cmp in zip(TARGETS_20, spreads, ab):
        v = None if sp is None else sp["median"]
        status = "n/a" if v is None else ("PASS" if (v >= goal if op == ">=" else v <= goal) else "MISS")
        out.append({"name": short, "description": desc, "value": v, "spread": sp, "op": op, "target": goal,
                    "unit": unit, "status": status, "compare": cmp,
                    "note": None if v is not None else "not run (needs --cases with health and rategate, and "
                    "middleware-cost)"})
    return out


def target20_rows(results: dict) -> list[list[str]]:
    rows = []
    for t in results.get("targets_20", []):
        goal = f"{t['op']} {_num(t['target'], t['unit'])}".replace(">=", "≥").replace("<=", "≤")
        sp = t.get("spread")
        measured = _num(t["value"], t["unit"]) if t["value"] is not None else f"— ({t['note']})"
        rng = "—" if not sp else f"{_num(sp['min'], t['unit'])} to {_num(sp['max'], t['unit'])} ({sp['n']} rounds)"
        rows.append([f"{t['name']}: {t['description']}", measured, rng, goal, t["status"], t.get("compare") or ""])
    return rows


TARGET20_COLS = ["figure", "median", "range", "target", "result", "A/B"]


def groups(results: dict) -> list[tuple[int, dict]]:
    """The HTTP results by worker count, headline (the first of --workers) first."""
    http = results.get("http", {})
    order = _get(results, "options", "workers") or sorted(int(w) for w in http)
    return [(int(w), http[str(w)]) for w in order if str(w) in http]


def one_worker(results: dict) -> dict:
    """The one-worker group (issue 5's targets are defined on it), else the first."""
    g = groups(results)
    return next((r for w, r in g if w == 1), g[0][1] if g else {})


def compute(results: dict) -> None:
    """Add ratios and fixed-load differences to the HTTP cases and the target lists to ``results``."""
    for _, group in groups(results):
        health = group.get("health", {})
        health_rps = health.get("rps")
        h_fixed = health.get("fixed_load") or {}
        for r in group.values():
            if "rps" in r and health_rps:
                r["ratio_to_health"] = round(r["rps"] / health_rps, 3)
            f = r.get("fixed_load")
            if f and h_fixed.get("latency_ms") and f["latency_ms"].get("p50") is not None:
                f["added_ms"] = {k: round(f["latency_ms"][k] - h_fixed["latency_ms"][k], 3) for k in ("p50", "p99")}
    results["targets_13"] = targets_13(results)
    results["targets_20"] = targets_20(results)
    http = one_worker(results)
    micro = results.get("micro", {})
    rb = micro.get("redis_benchmark", {})
    rss_marks = _get(micro, "rss", "marks") or []

    def rss_delta():
        if len(rss_marks) >= 2 and rss_marks[-1]["checks"] >= 1_000_000:
            return rss_marks[-1]["rss_kb"] - rss_marks[0]["rss_kb"]
        return None

    def why_missing(http_case=None, micro_key=None):
        if http_case:
            c = http.get(http_case, {})
            return c.get("skipped") or c.get("error") or ("not run" if not c else None)
        if micro_key:
            return _get(micro, "skipped", micro_key) or _get(micro, "errors", micro_key) or "not run"
        return "not run"

    values = {
        1: (_get(http, "rategate", "ratio_to_health"), why_missing("rategate")),
        2: (_get(http, "rategate-flood", "ratio_to_health"), why_missing("rategate-flood")),
        3: (_get(micro, "cpu", "rategate", "hit", "net_us"), why_missing(micro_key="cpu-rategate")),
        4: (_get(micro, "throughput", "rategate", "checks_per_s"), why_missing(micro_key="throughput-rategate")),
        5: (_get(http, "rategate-flood", "lag_ms", "p99_ms"), why_missing("rategate-flood")),
        6: (rss_delta(), why_missing(micro_key="rss") if not rss_marks else
            f"reached {rss_marks[-1]['checks']:,} checks only"),
    }
    # what each figure is compared with, measured in the same run
    pr_ratio = _get(http, "python-redis", "ratio_to_health")
    prf_ratio = _get(http, "python-redis-flood", "ratio_to_health")
    compare = {
        1: _fmt_pairs([("python-redis", pr_ratio, "×"), ("slowapi", _get(http, "slowapi", "ratio_to_health"), "×"),
                       ("fastapi-limiter", _get(http, "fastapi-limiter", "ratio_to_health"), "×")]),
        2: _fmt_pairs([("python-redis-flood", prf_ratio, "×")]),
        3: _fmt_pairs([("bare asyncio future floor", _get(micro, "cpu", "rategate", "future_floor", "net_us"), "µs"),
                       ("raw", _get(micro, "cpu", "rategate", "hit", "raw_us"), "µs"),
                       ("in 1000 looping tasks", _get(micro, "throughput", "rategate", "thread_cpu_us_per_check"),
                        "µs"),
                       ("redis.asyncio net", _get(micro, "cpu", "python-redis", "hit", "net_us"), "µs")]),
        4: _fmt_pairs([("redis-benchmark -P 1", _get(rb, "unpipelined", "rps"), "/s"),
                       ("python-redis", _get(micro, "throughput", "python-redis", "checks_per_s"), "/s")]),
        5: _fmt_pairs([("python-redis-flood", _get(http, "python-redis-flood", "lag_ms", "p99_ms"), "ms"),
                       ("health", _get(http, "health", "lag_ms", "p99_ms"), "ms"),
                       ("idle", _get(http, "rategate-flood", "idle_lag_ms", "p99_ms"), "ms")]),
        6: _fmt_pairs([("100k", rss_marks[0]["rss_kb"] if rss_marks else None, "KB"),
                       ("1M", rss_marks[-1]["rss_kb"] if len(rss_marks) > 1 else None, "KB")]),
    }
    out = []
    for tid, short, desc, op, goal, unit in TARGETS:
        value, missing = values[tid]
        if tid == 4:
            goal = _get(rb, "pipelined_32", "rps")
        if value is None or goal is None:
            status = "n/a"
            note = missing if value is None else "redis-benchmark not run"
        else:
            ok = value >= goal if op == ">=" else value <= goal
            status = "PASS" if ok else "MISS"
            note = None
        out.append({"id": tid, "name": short, "description": desc, "value": value, "op": op, "target": goal,
                    "unit": unit, "status": status, "note": note, "compare": compare[tid]})
    results["targets"] = out


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def targets_13(results: dict) -> list[dict]:
    g = groups(results)
    head_w, head = g[0] if g else (0, {})
    rg = head.get("rategate", {})
    why = rg.get("skipped") or rg.get("error") or ("not run" if not rg else None)
    values = [
        rg.get("ratio_to_health"),
        _get(rg, "redis", "usec_per_check"),
        _get(rg, "cpu_us_per_req", "rategate_loops"),  # all allowed: one check per request
        _get(rg, "fixed_load", "added_ms", "p99"),
        head.get("hot-key-lease", {}).get("ratio_to_health"),
        head.get("shm", {}).get("ratio_to_health"),
        _ratio(head.get("shm-flood", {}).get("rps"), head.get("rategate-flood", {}).get("rps")),
    ]
    out = []
    for (short, desc, op, goal, unit), v in zip(TARGETS_13, values):
        status = "n/a" if v is None else ("PASS" if (v >= goal if op == ">=" else v <= goal) else "MISS")
        note = None if v is not None else ("not run" if short in ("hot key, leased", "shm allowed", "shm flood")
                                           else why)
        out.append({"name": short, "description": f"{desc} ({head_w} workers)", "value": v, "op": op,
                    "target": goal, "unit": unit, "status": status, "note": note})
    return out


def _num(v, unit: str = "") -> str:
    if v is None:
        return "—"
    if unit == "×":
        return f"{v:.2f}×"
    if unit == "/s":
        return f"{v:,.0f}/s"
    if unit == "KB":
        return f"{v:,} KB"
    if unit == "µs":
        return f"{v:.2f} µs"
    if unit == "ms":
        return f"{v:.2f} ms"
    return f"{v}"


def _fmt_pairs(pairs) -> str:
    return ", ".join(f"{name} {_num(v, unit)}" for name, v, unit in pairs if v is not None)


def _ms(v) -> str:
    if v is None:
        return "—"
    v = max(v, 0.0)  # a lag can be "negative": uvloop's timers have 1 ms resolution and may fire early
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


# --------------------------------------------------------------------------
# lines and tables


def one_line(err: str) -> str:
    """First and last lines of an error (the last line of a traceback says what went wrong)."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} … {lines[-1]}"


def case_line(r: dict, health: dict | None) -> str:
    name = r.get("case", "?")
    if "skipped" in r:
        return f"  {name:<20} skipped: {r['skipped']}"
    if "error" in r:
        return f"  {name:<20} ERROR {one_line(r['error'])}"
    ratio = ""
    if health and health.get("rps"):
        ratio = f"{r['rps'] / health['rps']:.2f}× /health  "
    flag = "" if r.get("as_expected") else f"  !! {r.get('unexpected')}"
    cpu = r.get("cpu_us_per_req") or {}
    fixed = r.get("fixed_load") or {}
    extra = f"  CPU µs/req: loop {_us(cpu.get('event_loop'))}, rategate {_us(cpu.get('rategate_loops'))}, " \
            f"redis {_us(cpu.get('redis'))}"
    if fixed:
        extra += f"; at {fixed['rate']:,.0f}/s p99 {_ms(fixed['latency_ms']['p99'])} ms"
    return (f"  {name:<20} {r['rps']:>9,.0f} req/s  {ratio}p50 {_ms(r['latency_ms']['p50'])} ms  "
            f"p99 {_ms(r['latency_ms']['p99'])} ms  non-2xx {r['non_2xx']:,}{extra}{flag}")


def micro_line(name: str, micro: dict) -> str:
    if name in micro.get("skipped", {}):
        return f"  {name:<20} skipped: {micro['skipped'][name]}"
    if name in micro.get("errors", {}):
        return f"  {name:<20} ERROR {one_line(micro['errors'][name])}"
    if name.startswith("cpu-"):
        c = micro["cpu"][name[4:]]
        return (f"  {name:<20} hit: {c['hit']['raw_us']:.2f} µs raw, {c['hit']['net_us']:.2f} µs net "
                f"of Python-thread CPU per check")
    if name == "ffi":
        f = micro["ffi"]
        return (f"  {name:<20} cached denial: submit {f['cached_denial'].get('submit_ns', '—')} ns, "
                f"hit {f['cached_denial'].get('hit_ns', '—')} ns; memory://: submit "
                f"{f['memory'].get('submit_ns', '—')} ns, hit {f['memory'].get('hit_ns', '—')} ns")
    if name.startswith("throughput-"):
        t = micro["throughput"][name[len("throughput-"):]]
        return f"  {name:<20} {t['checks_per_s']:,} checks/s ({t['concurrency']} concurrent, {t['failed']} failed)"
    if name == "redis-benchmark":
        rb = micro["redis_benchmark"]
        return (f"  {name:<20} EVALSHA {rb['unpipelined']['rps']:,.0f}/s unpipelined, "
                f"{rb['pipelined_32']['rps']:,.0f}/s with -P 32")
    if name == "middleware-cost":
        m = micro["middleware_cost"]
        c, p = m["c"], m["python"]
        return (f"  {name:<20} over the bare app ({c['bare']['median_us']:.2f} µs): allowed "
                f"{c['allowed_over_bare']['median_us']:.2f} µs (Python path {p['allowed_over_bare']['median_us']:.2f}), "
                f"denied from the cache {c['denied_over_bare']['median_us']:.2f} µs "
                f"(Python path {p['denied_over_bare']['median_us']:.2f}); {c['denied_from_cache']:,} of "
                f"{c['denied_measured']:,} denials from the cache; medians of {m['rounds']} rounds")
    if name == "rss":
        m = micro["rss"]["marks"]
        return "  {:<20} ".format(name) + ", ".join(f"{x['checks']:,} checks: {x['rss_kb']:,} KB" for x in m)
    return f"  {name}"


HTTP_COLS = ["case", "req/s", "× /health", "p50 ms", "p99 ms", "p99.9 ms", "2xx", "non-2xx",
             "loop lag p50/p99 ms", "CPU µs/req"]


def _us(v) -> str:
    return "—" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def _not_run(r: dict, ncols: int) -> list[str]:
    """The cells after the case's name: dashes, and why in the last column."""
    why = ("skipped: " + r["skipped"]) if "skipped" in r else ("error: " + one_line(r.get("error", "?")))
    return ["—"] * (ncols - 2) + [why]


def _rows(group: dict, cols: list[str], cells) -> list[list[str]]:
    """One row per case: ``cells(r)`` for a measured case (None: no row), else why it was not."""
    rows = []
    for name, r in group.items():
        if "rps" not in r:
            rows.append([name, *_not_run(r, len(cols))])
        elif (c := cells(r)) is not None:
            rows.append([name, *c])
    return rows


def http_rows(group: dict) -> list[list[str]]:
    return _rows(group, HTTP_COLS, _http_cells)


def _http_cells(r: dict) -> list[str]:
    lat, lag = r["latency_ms"], r.get("lag_ms", {})
    non2xx = f"{r['non_2xx']:,}" + ("" if r.get("as_expected", True) else " !!")
    return [
        f"{r['rps']:,.0f}", f"{r['ratio_to_health']:.2f}" if r.get("ratio_to_health") else "—",
        _ms(lat["p50"]), _ms(lat["p99"]), _ms(lat["p99_9"]), f"{r['ok_2xx']:,}", non2xx,
        f"{_ms(lag.get('p50_ms'))} / {_ms(lag.get('p99_ms'))}",
        f"{r['server_cpu_us_per_req']:.0f}" if r.get("server_cpu_us_per_req") else "—",
    ]


CPU_COLS = ["case", "event loop", "rategate loops", "other threads", "server", "redis-server", "wrk",
            "Redis cmds/req", "scripts", "checks/script", "µs/script", "Redis µs/check"]


def cpu_rows(group: dict) -> list[list[str]]:
    """CPU µs per request by place, and the Redis commands, of the saturation (wrk) window."""
    return _rows(group, CPU_COLS, _cpu_cells)


def _cpu_cells(r: dict) -> list[str]:
    c = r.get("cpu_us_per_req") or {}
    rd = r.get("redis") or {}
    checks = "—" if rd.get("checks_per_script_call") is None else f"{rd['checks_per_script_call']:.1f}"
    return [_us(c.get("event_loop")), _us(c.get("rategate_loops")), _us(c.get("other")),
            _us(c.get("server")), _us(c.get("redis")), _us(c.get("load_generator")),
            "—" if rd.get("calls_per_request") is None else f"{rd['calls_per_request']:.2f}",
            f"{rd['script_calls']:,}" if rd else "—", checks,
            _us(rd.get("usec_per_script_call")), _us(rd.get("usec_per_check"))]


FIXED_COLS = ["case", "offered/s", "answered/s", "p50 ms", "p99 ms", "p99.9 ms", "+p50 ms", "+p99 ms",
              "event loop µs/req", "rategate loops µs/req", "redis-server µs/req", "non-2xx"]


def fixed_rows(group: dict) -> list[list[str]]:
    """The fixed offered load (bench/pace.py): latency, and what /health's adds to it."""
    return _rows(group, FIXED_COLS, _fixed_cells)


def _fixed_cells(r: dict) -> list[str] | None:
    f = r.get("fixed_load")
    if not f:
        return None
    lat, add, c = f["latency_ms"], f.get("added_ms") or {}, f.get("cpu_us_per_req") or {}
    non2xx = sum(v for k, v in f["status"].items() if not k.startswith("2")) + f["errors"] + f["unanswered"]
    behind = " !!" if f["achieved_rps"] < 0.95 * f["rate"] else ""  # could not keep up with the load
    return [f"{f['rate']:,.0f}", f"{f['achieved_rps']:,.0f}{behind}", _ms(lat["p50"]),
            _ms(lat["p99"]), _ms(lat["p99_9"]),
            "—" if add.get("p50") is None else f"{add['p50']:+.2f}",
            "—" if add.get("p99") is None else f"{add['p99']:+.2f}",
            _us(c.get("event_loop")), _us(c.get("rategate_loops")), _us(c.get("redis")), f"{non2xx:,}"]


def target13_rows(results: dict) -> list[list[str]]:
    rows = []
    for t in results.get("targets_13", []):
        goal = f"{t['op']} {_num(t['target'], t['unit'])}".replace(">=", "≥").replace("<=", "≤")
        measured = _num(t["value"], t["unit"]) if t["value"] is not None else f"— ({t['note']})"
        rows.append([f"{t['name']}: {t['description']}", measured, goal, t["status"]])
    return rows


TARGET13_COLS = ["figure", "measured", "target", "result"]
TARGET_COLS = ["#", "figure", "measured", "target", "result", "in the same run"]


def target_rows(results: dict) -> list[list[str]]:
    rows = []
    for t in results.get("targets", []):
        goal = t["target"]
        goal_s = "—" if goal is None else f"{t['op']} {_num(goal, t['unit'])}"
        if t["id"] == 4 and goal is not None:
            goal_s = f"≥ {goal:,.0f}/s (redis-benchmark -P 32)"
        else:
            goal_s = goal_s.replace(">=", "≥").replace("<=", "≤")
        measured = _num(t["value"], t["unit"]) if t["value"] is not None else f"— ({t['note']})"
        rows.append([str(t["id"]), f"{t['name']}: {t['description']}", measured, goal_s, t["status"],
                     t["compare"] or ""])
    return rows


def _text_table(cols: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    widths = [min(w, 70) for w in widths]

    def fmt(cells):
        out = []
        for i, c in enumerate(cells):
            c = c if len(c) <= widths[i] else c[: widths[i] - 1] + "…"
            out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([fmt(cols), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _short(commit) -> str:
    c = str(commit)
    return c[:12] if all(ch in "0123456789abcdef" for ch in c) else c


def _rounds_text(o: dict, results: dict | None = None) -> str:
    n = o.get("rounds", 1)
    if n and n > 1:
        return f", best of {n} rounds"
    h = _get(results or {}, "http", "health", "rounds") or []
    return ", /health measured first and last (the better kept)" if len(h) > 1 else ""


def _workers_text(o: dict) -> str:
    ws = o.get("workers") or [1]
    return " and ".join(f"{w} worker{'s' if w > 1 else ''}" for w in ws)


def _group_title(w: int, results: dict) -> str:
    cores = _get(results, "machine", "cores")
    return f"{w} uvicorn worker{'s' if w > 1 else ''}" + (" (= cores)" if w == cores else "")


def _fixed_text(o: dict) -> str:
    return (f"open loop (bench/pace.py) at {o.get('load_fraction', 0.5):.0%} of /health's req/s "
            f"with the same workers, {o.get('load_duration_s', 5):g} s after 0.5 s unmeasured; "
            "+p50/+p99 are over /health's at the same load")


def _machine_line(results: dict) -> str:
    m = results.get("machine", {})
    v = m.get("versions", {})
    o = results.get("options", {})
    return (f"{m.get('cores')} cores {m.get('cpu_model')}, Linux {m.get('kernel')}, Python {m.get('python')}, "
            f"FastAPI {v.get('fastapi')}, uvicorn {v.get('uvicorn')} ({o.get('uvicorn_loop')}, "
            f"{o.get('uvicorn_http')}, {_workers_text(o)}), redis-py {v.get('redis')}, "
            f"{(m.get('redis_server') or '').split(' sha=')[0]}, {m.get('wrk', '').split(' [')[0]}; "
            f"load {m.get('loadavg_start', [0])[0]:.2f} at start; commit {_short(m.get('git_commit'))}"
            + (" (dirty)" if m.get("git_dirty") else ""))


def terminal(results: dict) -> str:
    o = results.get("options", {})
    parts = []
    for w, group in groups(results):
        parts.append(f"\n=== {_group_title(w, results)}: wrk {o.get('connections')} connections, "
                     f"{o.get('duration_s'):g} s per case after {o.get('warmup_s'):g} s warm-up, GET /ping"
                     + _rounds_text(o, results))
        parts.append(_text_table(HTTP_COLS, http_rows(group), right=set(range(1, 10))))
        parts.append("\nCPU µs per request by place, and Redis commands, over the same wrk window")
        parts.append(_text_table(CPU_COLS, cpu_rows(group), right=set(range(1, 12))))
        fr = fixed_rows(group)
        if fr:
            parts.append("\nAt a fixed load: " + _fixed_text(o))
            parts.append(_text_table(FIXED_COLS, fr, right=set(range(1, 12))))
    if results.get("targets_13") and groups(results):
        parts.append("\nTargets (issue 13)")
        parts.append(_text_table(TARGET13_COLS, target13_rows(results), right={1}))
    if any(t["value"] is not None for t in results.get("targets_20", [])):
        parts.append("\nTargets (issue 20), median and range over the rounds")
        parts.append(_text_table(TARGET20_COLS, target20_rows(results), right={1}))
    parts.append("\nTargets (issue 5, one worker)")
    parts.append(_text_table(TARGET_COLS, target_rows(results), right={2}))
    extra = micro_summary(results)
    if extra:
        parts.append("\nDetails")
        parts.extend("  " + x for x in extra)
    parts.append("\nmachine: " + _machine_line(results))
    if results.get("elapsed_s") is not None:
        parts.append(f"the run took {results['elapsed_s'] // 60:.0f} min {results['elapsed_s'] % 60:.0f} s")
    for n in results.get("notes", []):
        parts.append("note: " + n)
    return "\n".join(parts)


def micro_summary(results: dict) -> list[str]:
    micro = results.get("micro", {})
    out = []
    for w, group in groups(results):
        for name, r in group.items():
            st = r.get("limiter_stats")
            if not isinstance(st, dict) or "checks" not in st:
                continue
            errs = {k: v for k, v in (st.get("errors") or {}).items() if v}
            out.append(f"{name}, {w} worker{'s' if w > 1 else ''}: in the wrk window the limiter made "
                       f"{st['checks']:,} checks ({st.get('allowed', 0):,} allowed, {st.get('denied', 0):,} denied, "
                       f"{st.get('cached_denials', 0):,} of them from the local cache"
                       + (f"; errors {errs}" if errs else "") + ")")
            for where, fig in (("wrk window", r), ("fixed load", r.get("fixed_load") or {})):
                wk = fig.get("wakeups_per_check")
                if wk:
                    out.append(f"{name}, {w} worker{'s' if w > 1 else ''}, {where}: per check "
                               f"{wk['wakeups_loop']:.3f} wake-ups of a loop thread, "
                               f"{wk['wakeups_port']:.3f} of asyncio, {wk['spins']:.3f} polls "
                               f"({wk['spin_hits']:.3f} caught a submit)")
    for impl, c in micro.get("cpu", {}).items():
        s = f"CPU per check, {impl}: hit {c['hit']['raw_us']:.2f} µs raw, {c['hit']['net_us']:.2f} µs net"
        if "submit" in c:
            s += f"; submit {c['submit']['raw_us']:.2f} raw, {c['submit']['net_us']:.2f} net"
        if "future_floor" in c:
            s += (f"; the floor, a bare asyncio future awaited the same way: "
                  f"{c['future_floor']['net_us']:.2f} µs net")
        s += f" (baseline gather {c['baseline_us']:.2f} µs, {c['concurrency']} concurrent)"
        out.append(s)
    f = micro.get("ffi")
    if f:
        out.append(f"FFI, no Redis: cached denial submit {f['cached_denial'].get('submit_ns', '—')} ns, "
                   f"await hit {f['cached_denial'].get('hit_ns', '—')} ns; memory:// submit "
                   f"{f['memory'].get('submit_ns', '—')} ns, await hit {f['memory'].get('hit_ns', '—')} ns "
                   f"(a no-op builtin call: {f.get('reference_builtin_call_ns')} ns)")
        for k in ("cached_denial", "memory"):
            if f[k].get("problem"):
                out.append(f"  !! {k}: {f[k]['problem']} ({f[k]})")
    for impl, t in micro.get("throughput", {}).items():
        out.append(f"checks/s, {impl}: {t['checks_per_s']:,} ({t['concurrency']} concurrent tasks, "
                   f"{t['failed']} failed, {t['thread_cpu_us_per_check']:.2f} µs Python-thread CPU per check)")
    one, cl = _get(micro, "throughput", "rategate", "checks_per_s"), _get(micro, "throughput", "cluster", "checks_per_s")
    if one and cl:
        out.append(f"cluster: {cl:,} checks/s against a {micro['throughput']['cluster'].get('masters', 3)}-master "
                   f"Redis Cluster, {cl / one:.2f}× the {one:,} checks/s against one Redis (same run)")
    rb = micro.get("redis_benchmark")
    if rb:
        out.append(f"redis-benchmark EVALSHA ({rb['script']}, {rb['clients']} clients): "
                   f"{rb['unpipelined']['rps']:,.0f}/s unpipelined, {rb['pipelined_32']['rps']:,.0f}/s -P 32")
    rss = micro.get("rss")
    if rss:
        out.append("RSS: " + ", ".join(f"{m['checks']:,} checks {m['rss_kb']:,} KB" for m in rss["marks"])
                   + f" ({rss['failed']} failed)")
    for k, v in micro.get("skipped", {}).items():
        out.append(f"{k}: skipped: {v}")
    for k, v in micro.get("errors", {}).items():
        out.append(f"{k}: ERROR {one_line(v)}")
    return out


def markdown(results: dict) -> str:
    o = results.get("options", {})

    def md_table(cols, rows, right):
        head = "| " + " | ".join(cols) + " |"
        sep = "|" + "|".join("---:" if i in right else "---" for i in range(len(cols))) + "|"
        body = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join([head, sep, *body])

    lines = [f"Command: `{results.get('command')}` · {results.get('started')}  ",
             f"Machine: {_machine_line(results)}", ""]
    if groups(results):
        lines.append(f"HTTP: wrk {o.get('connections')} connections, {o.get('duration_s'):g} s per case after "
                     f"{o.get('warmup_s'):g} s warm-up, GET /ping{_rounds_text(o, results)}; the ratio is to "
                     "`health` with the same workers in this run; loop lag is how late `asyncio.sleep(0.001)` "
                     "wakes up in a task inside the app (every worker's samples); CPU µs/req is the server's "
                     "CPU per request (every worker process). CPU by place: read from /proc per thread over the "
                     "wrk window (event loop = the workers' main threads; rategate loops = threads named "
                     "rategate-loop-N; other = the rest of the workers and uvicorn's supervisor); Redis from "
                     "INFO commandstats over the same window (scripts = EVALSHA + EVAL; checks = the checks that "
                     "reached Redis, one per request for the other limiters). Fixed load: " + _fixed_text(o) + ".")
        lines.append("")
    for w, group in groups(results):
        lines.append(f"**{_group_title(w, results)}**")
        lines.append("")
        lines.append(md_table(HTTP_COLS, http_rows(group), set(range(1, 10))))
        lines.append("")
        lines.append(md_table(CPU_COLS, cpu_rows(group), set(range(1, 12))))
        lines.append("")
        fr = fixed_rows(group)
        if fr:
            lines.append(md_table(FIXED_COLS, fr, set(range(1, 12))))
            lines.append("")
    if results.get("targets_13") and groups(results):
        lines.append(md_table(TARGET13_COLS, target13_rows(results), {1}))
        lines.append("")
    if any(t["value"] is not None for t in results.get("targets_20", [])):
        lines.append(md_table(TARGET20_COLS, target20_rows(results), {1}))
        lines.append("")
    lines.append(md_table(TARGET_COLS, target_rows(results), {2}))
    extra = micro_summary(results)
    if extra:
        lines.append("")
        lines.extend(f"- {x}" for x in extra)
    for n in results.get("notes", []):
        lines.append(f"- note: {n}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# the chart


CPU_PARTS = [("event_loop", "event loop", "#4a78b5"), ("rategate_loops", "rategate loops", "#2e8b57"),
             ("other", "other server threads", "#9ecae1"), ("redis", "redis-server", "#d62728"),
             ("load_generator", "wrk", "#bbbbbb")]


def chart(results: dict, path: Path) -> bool:
    """Draw the PNG; False (and no file) when the run has no HTTP figures.

    Four panels, each case a row and each worker count a bar of its own:
    throughput ÷ /health; CPU µs per request by place (stacked); latency at
    saturation (wrk); latency at the fixed offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    gs = [(w, g) for w, g in groups(results) if any("rps" in r for r in g.values())]
    if not gs:
        return False
    names: list[str] = []
    for _, g in gs:
        names += [n for n, r in g.items() if "rps" in r and n not in names]
    names = names[::-1]  # top to bottom in run order
    nw = len(gs)
    h = 0.8 / nw
    offs = {w: (i - (nw - 1) / 2) * h for i, (w, _) in enumerate(gs)}  # first group on top
    y = list(range(len(names)))
    fig, axes = plt.subplots(2, 2, figsize=(15, 2 * (0.5 * len(names) * max(1, nw * 0.6) + 1.6)))
    (ax1, ax2), (ax3, ax4) = axes
    shades = ["#2e8b57", "#8fd19e", "#c7e9c0"]

    def color(n, i):
        if n == "health":
            return ["#555555", "#9a9a9a", "#cccccc"][i % 3]
        if n.startswith("rategate") or n == "redis-down":
            return shades[i % 3]
        return ["#2b5d9b", "#7fa6d6", "#c6dbef"][i % 3]

    def rows(g):
        for i, n in enumerate(names):
            r = g.get(n)
            if r is not None and "rps" in r:
                yield i, n, r

    # 1: throughput
    xmax = 1.4
    for gi, (w, g) in enumerate(gs):
        for i, n, r in rows(g):
            ratio = r.get("ratio_to_health") or 0
            xmax = max(xmax, ratio)
            b = ax1.barh(i - offs[w], ratio, height=h * 0.9, color=color(n, gi),
                         hatch="///" if r.get("non_2xx") else None, edgecolor="white")
            label = f"{ratio:.2f}×  {r['rps']:,.0f}/s  ({w}w)"
            ax1.text(max(ratio, 0) + 0.02, i - offs[w], label, va="center", fontsize=7)
            del b
    goals = {"rategate": {1: 0.95}, "rategate-flood": {1: 1.30}}
    cores = _get(results, "machine", "cores")
    if cores and cores > 1:
        goals["rategate"][cores] = 0.90
    for i, n in enumerate(names):
        for w, goal in goals.get(n, {}).items():
            if w in offs:
                ax1.plot([goal] * 2, [i - offs[w] - h / 2, i - offs[w] + h / 2], color="#d62728", lw=2)
    ax1.plot([], [], color="#d62728", lw=2, label="target")
    ax1.axvline(1.0, color="black", lw=1, ls="--", label="/health = 1.0")
    ax1.set_xlim(0, xmax * 1.55)
    ax1.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)
    ax1.set_xlabel("req/s ÷ /health's with the same workers (hatched: 429s)", fontsize=9)
    ax1.set_title("Throughput (wrk, saturation)", fontsize=11, loc="left")

    # 2: CPU per request by place, stacked
    cmax = 0.0
    for gi, (w, g) in enumerate(gs):
        for i, n, r in rows(g):
            c = r.get("cpu_us_per_req") or {}
            left = 0.0
            for key, label, col in CPU_PARTS:
                v = c.get(key) or 0.0
                ax2.barh(i - offs[w], v, left=left, height=h * 0.9, color=col,
                         label=label if gi == 0 and i == len(names) - 1 else None)
                left += v
            cmax = max(cmax, left)
            ax2.text(left + 2, i - offs[w], f"{left:.0f} ({w}w)", va="center", fontsize=7)
    ax2.set_xlim(0, cmax * 1.45 + 1)
    ax2.legend(loc="upper right", ncol=1, fontsize=7, framealpha=0.9)
    ax2.set_xlabel("CPU µs per request, by place (/proc per thread over the wrk window)", fontsize=9)
    ax2.set_title("Where the CPU goes", fontsize=11, loc="left")

    # 3 and 4: latency, at saturation and at the fixed load
    marks = [("p50", "p50", "o", "#9ecae1"), ("p99", "p99", "s", "#3182bd"), ("p99.9", "p99_9", "^", "#08306b")]

    def latency(ax, get, title, xlabel):
        vals: list[float] = []
        labelled: set[str] = set()
        for gi, (w, g) in enumerate(gs):
            for i, n, r in rows(g):
                lat = get(r)
                if not lat or lat.get("p50") is None:
                    continue
                yy = i - offs[w]
                ax.plot([lat["p50"], lat["p99_9"]], [yy, yy], color="#bbbbbb", lw=2, zorder=1)
                for lab, key, mk, col in marks:
                    ax.scatter([max(lat[key], 1e-3)], [yy], marker=mk, s=30, color=col, zorder=2,
                               label=lab if lab not in labelled else None)
                    labelled.add(lab)
                    vals.append(max(lat[key], 1e-3))
                ax.text(lat["p99_9"] * 1.15, yy, f"{_ms(lat['p99'])} ms p99 ({w}w)", va="center", fontsize=7)
        if vals:
            ax.set_xscale("log")
            wide = max(vals) / min(vals) > 2000
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(min(vals) / 1.6, max(vals) * 6)
            ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False)
        ax.grid(axis="x", which="both", alpha=0.25)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(title, fontsize=11, loc="left")

    o = results.get("options", {})
    latency(ax3, lambda r: r.get("latency_ms"), "Latency at saturation (wrk)", "ms (log scale)")
    rates = ", ".join(f"{w}w {_get(g, 'health', 'fixed_load', 'rate') or 0:,.0f}/s" for w, g in gs)
    latency(ax4, lambda r: (r.get("fixed_load") or {}).get("latency_ms"), "Latency at a fixed load",
            f"ms (log scale); open loop at {o.get('load_fraction', 0.5):.0%} of /health's req/s: {rates}")
    for ax in (ax1, ax2, ax3, ax4):
        ax.set_yticks(y, names)
        ax.set_ylim(-0.6, len(names) - 0.4)
    m = results.get("machine", {})
    fig.suptitle(f"rategate benchmark · FastAPI, uvicorn {_workers_text(o)} ({o.get('uvicorn_loop')}/"
                 f"{o.get('uvicorn_http')}), wrk {o.get('connections')} conns × {o.get('duration_s'):g} s · "
                 f"{m.get('cores')} cores {m.get('cpu_model')} · {results.get('started', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_all(results: dict, out_dir: Path, png: bool = True) -> list[Path]:
    """Write latest.{json,md,png}; returns the files written.  A chart of an
    earlier run is removed rather than left beside this run's numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    drawn = False
    png_path = out_dir / "latest.png"
    if png_path.exists():
        png_path.unlink()
    if png:
        try:
            drawn = chart(results, png_path)
        except Exception as e:  # the chart must not cost the numbers
            results.setdefault("notes", []).append(f"chart failed: {e!r}")
    for name, text in (("latest.json", json.dumps(results, indent=2, default=str) + "\n"),
                       ("latest.md", markdown(results))):
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    if drawn:
        written.append(png_path)
    return written
