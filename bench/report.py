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


def compute(results: dict) -> None:
    """Add ratios to the HTTP cases and the ``targets`` list to ``results``."""
    http = results.get("http", {})
    health_rps = _get(http, "health", "rps")
    for r in http.values():
        if "rps" in r and health_rps:
            r["ratio_to_health"] = round(r["rps"] / health_rps, 3)
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
    return (f"  {name:<20} {r['rps']:>9,.0f} req/s  {ratio}p50 {_ms(r['latency_ms']['p50'])} ms  "
            f"p99 {_ms(r['latency_ms']['p99'])} ms  non-2xx {r['non_2xx']:,}{flag}")


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
    if name == "rss":
        m = micro["rss"]["marks"]
        return "  {:<20} ".format(name) + ", ".join(f"{x['checks']:,} checks: {x['rss_kb']:,} KB" for x in m)
    return f"  {name}"


HTTP_COLS = ["case", "req/s", "× /health", "p50 ms", "p99 ms", "p99.9 ms", "2xx", "non-2xx",
             "loop lag p50/p99 ms", "CPU µs/req"]


def http_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, r in results.get("http", {}).items():
        if "rps" not in r:
            rows.append([name, "—", "—", "—", "—", "—", "—", "—", "—",
                         ("skipped: " + r["skipped"]) if "skipped" in r else ("error: " + one_line(r.get("error", "?")))])
            continue
        lat, lag = r["latency_ms"], r.get("lag_ms", {})
        non2xx = f"{r['non_2xx']:,}" + ("" if r.get("as_expected", True) else " !!")
        rows.append([
            name, f"{r['rps']:,.0f}", f"{r['ratio_to_health']:.2f}" if r.get("ratio_to_health") else "—",
            _ms(lat["p50"]), _ms(lat["p99"]), _ms(lat["p99_9"]), f"{r['ok_2xx']:,}", non2xx,
            f"{_ms(lag.get('p50_ms'))} / {_ms(lag.get('p99_ms'))}",
            f"{r['server_cpu_us_per_req']:.0f}" if r.get("server_cpu_us_per_req") else "—",
        ])
    return rows


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


def _machine_line(results: dict) -> str:
    m = results.get("machine", {})
    v = m.get("versions", {})
    o = results.get("options", {})
    return (f"{m.get('cores')} cores {m.get('cpu_model')}, Linux {m.get('kernel')}, Python {m.get('python')}, "
            f"FastAPI {v.get('fastapi')}, uvicorn {v.get('uvicorn')} ({o.get('uvicorn_loop')}, "
            f"{o.get('uvicorn_http')}, 1 worker), redis-py {v.get('redis')}, "
            f"{(m.get('redis_server') or '').split(' sha=')[0]}, {m.get('wrk', '').split(' [')[0]}; "
            f"load {m.get('loadavg_start', [0])[0]:.2f} at start; commit {_short(m.get('git_commit'))}"
            + (" (dirty)" if m.get("git_dirty") else ""))


def terminal(results: dict) -> str:
    o = results.get("options", {})
    parts = []
    if results.get("http"):
        parts.append(f"\nHTTP: wrk {o.get('connections')} connections, {o.get('duration_s'):g} s per case "
                     f"after {o.get('warmup_s'):g} s warm-up, GET /ping" + _rounds_text(o, results))
        parts.append(_text_table(HTTP_COLS, http_rows(results), right=set(range(1, 10))))
    parts.append("\nTargets (issue 5)")
    parts.append(_text_table(TARGET_COLS, target_rows(results), right={2}))
    extra = micro_summary(results)
    if extra:
        parts.append("\nDetails")
        parts.extend("  " + x for x in extra)
    parts.append("\nmachine: " + _machine_line(results))
    for n in results.get("notes", []):
        parts.append("note: " + n)
    return "\n".join(parts)


def micro_summary(results: dict) -> list[str]:
    micro = results.get("micro", {})
    out = []
    for name, r in results.get("http", {}).items():
        st = r.get("limiter_stats")
        if not isinstance(st, dict) or "checks" not in st:
            continue
        errs = {k: v for k, v in (st.get("errors") or {}).items() if v}
        out.append(f"{name}: the limiter made {st['checks']:,} checks ({st.get('allowed', 0):,} allowed, "
                   f"{st.get('denied', 0):,} denied, {st.get('cached_denials', 0):,} of them from the local "
                   f"cache" + (f"; errors {errs}" if errs else "") + ")")
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
    if results.get("http"):
        lines.append(f"HTTP: one uvicorn worker per case, wrk {o.get('connections')} connections, "
                     f"{o.get('duration_s'):g} s per case after {o.get('warmup_s'):g} s warm-up, GET /ping"
                     f"{_rounds_text(o, results)}; "
                     "the ratio is to `health` in this run; loop lag is how late `asyncio.sleep(0.001)` wakes up "
                     "in a task inside the app; CPU µs/req is the server process's CPU per request.")
        lines.append("")
        lines.append(md_table(HTTP_COLS, http_rows(results), set(range(1, 10))))
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


def chart(results: dict, path: Path) -> bool:
    """Draw the PNG; False (and no file) when the run has no HTTP figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    http = [(n, r) for n, r in results.get("http", {}).items() if "rps" in r]
    if not http:
        return False
    names = [n for n, _ in http][::-1]  # top to bottom in run order
    rs = [r for _, r in http][::-1]
    y = list(range(len(names)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.55 * len(names) + 2.6),
                                   gridspec_kw={"width_ratios": [1.1, 1]})

    def color(n):
        if n == "health":
            return "#8a8a8a"
        if n.startswith("rategate") or n == "redis-down":
            return "#2e8b57"
        return "#4a78b5"

    ratios = [r.get("ratio_to_health") or 0 for r in rs]
    bars = ax1.barh(y, ratios, color=[color(n) for n in names], height=0.65)
    for b, r in zip(bars, rs):
        if r.get("non_2xx"):
            b.set_hatch("///")
            b.set_edgecolor("white")
    ax1.axvline(1.0, color="black", lw=1, ls="--", label="/health = 1.0")
    xmax = max(ratios + [1.4]) * 1.45
    ax1.set_xlim(0, xmax)
    goals = {"rategate": 0.95, "rategate-flood": 1.30}
    has_goal = False
    for i, n in enumerate(names):
        r = rs[i]
        label = f"{r['ratio_to_health']:.2f}×  {r['rps']:,.0f} req/s"
        if r.get("non_2xx"):
            share = r["non_2xx"] / max(1, r["requests"])
            label += f"  ({share:.0%} 429)"
        at = max(ratios[i], goals.get(n, 0), 1.0 if abs(ratios[i] - 1.0) < 0.25 else 0)
        ax1.text(at + xmax * 0.012, i, label, va="center", fontsize=9,
                 bbox=dict(facecolor="white", edgecolor="none", pad=1.0), zorder=5)
        if n in goals:
            has_goal = True
            ax1.plot([goals[n]] * 2, [i - 0.42, i + 0.42], color="#d62728", lw=2.5)
    if has_goal:
        ax1.plot([], [], color="#d62728", lw=2.5, label="target (issue 5)")
    ax1.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False,
               borderaxespad=0.2)
    ax1.set_yticks(y, names)
    ax1.set_ylim(-0.6, len(names) - 0.4)
    ax1.set_xlabel("req/s ÷ req/s of /health in this run  (hatched: the responses were 429s)", fontsize=9)
    ax1.set_title("Throughput ÷ no-op /health", fontsize=11, loc="left")

    marks = [("p50", "p50", "o", "#9ecae1"), ("p99", "p99", "s", "#3182bd"), ("p99.9", "p99_9", "^", "#08306b")]
    for i, r in enumerate(rs):
        lat = r["latency_ms"]
        ax2.plot([lat["p50"], lat["p99_9"]], [i, i], color="#bbbbbb", lw=3, zorder=1)
        for lab, key, mk, col in marks:
            ax2.scatter([lat[key]], [i], marker=mk, s=60, color=col, zorder=2, label=lab if i == 0 else None)
        ax2.text(lat["p50"], i + 0.22, _ms(lat["p50"]), ha="center", fontsize=7, color="#555555")
        ax2.text(lat["p99_9"], i + 0.22, _ms(lat["p99_9"]), ha="center", fontsize=7, color="#08306b")
    ax2.set_xscale("log")
    ax2.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax2.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax2.set_yticks(y, names)
    ax2.set_ylim(-0.6, len(names) - 0.4)
    lo = min(r["latency_ms"]["p50"] for r in rs)
    hi = max(r["latency_ms"]["p99_9"] for r in rs)
    ax2.set_xlim(lo / 1.6, hi * 1.6)
    ax2.set_xlabel("latency, ms (log scale)", fontsize=9)
    ax2.set_title("Latency", fontsize=11, loc="left")
    ax2.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False,
               borderaxespad=0.2)
    ax2.grid(axis="x", which="both", alpha=0.25)
    m = results.get("machine", {})
    o = results.get("options", {})
    fig.suptitle(f"rategate benchmark · FastAPI, uvicorn 1 worker ({o.get('uvicorn_loop')}/{o.get('uvicorn_http')}), "
                 f"wrk {o.get('connections')} conns × {o.get('duration_s'):g} s · {m.get('cores')} cores "
                 f"{m.get('cpu_model')} · {results.get('started', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
