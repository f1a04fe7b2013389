"""The middleware's request path in C (rategate._core.Gate, csrc/pygate.c and
gate.c) against its reference, the Python path (issue 20).

For random configurations (rules of each kind, exempt paths, key sources,
trusted proxies, IPv6 grouping, header styles) and random scopes (paths,
methods, hostile X-Forwarded-For and header values, IPv4/IPv6 in every
spelling), one middleware with the gate and one without (what
RATEGATE_PYTHON_PATH=1 gives) see the same requests and must agree: the same
checks submitted (store key, spec, cost), the same messages sent (status,
header bytes, body), the same counts and failure log.  The decisions come
from a fake limiter that answers both alike (random Decisions, at once or
through a future), so that time cannot make them differ.  Also: the fuzz of
test_fuzz through the C path, and that the switch turns the gate off.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rategate
from rategate import _core
from rategate.denials import DenialLog
from rategate.middleware import PYTHON_PATH, RateLimitMiddleware, route_path
from test_fuzz import check_start
from test_fuzz import clients as fuzz_clients
from test_fuzz import headers as fuzz_headers

pytestmark = pytest.mark.skipif(PYTHON_PATH, reason="RATEGATE_PYTHON_PATH is set: there is no C path to compare")

EQ = settings(deadline=None, database=None, max_examples=int(os.environ.get("RATEGATE_GATE_EXAMPLES", "1000")),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# -- addresses in every spelling ----------------------------------------------------------------
def spellings(a: ipaddress.IPv4Address | ipaddress.IPv6Address, how: int) -> str:
    if a.version == 4:
        s = str(a)
        return [s, f"{s}:80", f"::ffff:{s}", f"[::ffff:{s}]:8080", f"0:0:0:0:0:ffff:{s}",
                ".".join(f"0{o}" for o in s.split(".")), f"{s}%eth0", f" {s}\t", f"\xa0{s}\x85",
                f"[{s}]", f"{s}:", f"{s}:²", s.replace(".", ",", 1)][how % 13]
    s = a.compressed
    return [s, a.exploded, a.exploded.upper(), f"[{s}]", f"[{s}]:443", f"[{s}]x", f"{s}%eth0",
            f"[{s}%25eth0]:1", ":".join(h.lstrip("0") or "0" for h in a.exploded.split(":")),
            s.replace("::", ":0:", 1), f"{s}:1", f"[{s}", s.upper() + " "][how % 12]


addresses = st.one_of(
    st.builds(spellings, st.ip_addresses(), st.integers(0, 50)),
    st.builds(spellings, st.ip_addresses(network="2001:db8::/120"), st.integers(0, 50)),
    st.builds(spellings, st.ip_addresses(network="10.0.0.0/30"), st.integers(0, 50)),
    st.sampled_from(["", "unknown", "testclient", "/run/x.sock", "1.2.3", "1.2.3.4.5", "256.1.1.1", "::", "::1",
                     "1::", ":1:", "1:2:3:4:5:6:7:8:9", "1::2::3", "fe80::1%eth0", "[::1]:", "::ffff:1.2.3.4",
                     "::1.2.3.4", "1:2:3:4:5:6:1.2.3.4", "1:2:3:4:5:6:7:1.2.3.4", "::ffff:01.2.3.4",
                     "12345::1", "g::1", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "1.2.3.4:80:90"]),
    st.text(max_size=20),
)
header_values = st.one_of(
    st.builds(lambda hs, sep: sep.join(hs).encode("utf-8", "surrogatepass"), st.lists(addresses, max_size=40),
              st.sampled_from([",", ", ", " ,", ",,", ", ,", ",\xa0"])),
    st.lists(addresses, max_size=5).map(lambda hs: ",".join(hs).encode("latin-1", "replace")),
    st.binary(max_size=300),
    st.sampled_from([b"", b" ", b"\xa01.2.3.4", b"1.2.3.4\x85", b"a" * 250, b"\x00", b",,,", b"k" * 201]),
)
header_names = st.sampled_from([b"x-forwarded-for", b"X-Forwarded-For", b"forwarded", b"x-real-ip", b"X-Real-IP",
                                b"x-api-key", b"X-API-KEY", b"host"])
headers = st.lists(st.tuples(header_names, header_values), max_size=6)
clients = st.one_of(st.none(), st.tuples(addresses, st.integers(0, 65535)), st.just(()),
                    st.tuples(addresses, st.integers(0, 65535)).map(list))

# -- configurations -------------------------------------------------------------------------------
nets = st.lists(st.one_of(
    st.sampled_from(["10.0.0.0/8", "127.0.0.1", "::1", "2001:db8::/32", "::ffff:10.0.0.0/104", "unix",
                     "0.0.0.0/0", "::/0", "192.168.1.7", "fe80::/10"]),
    st.ip_addresses().map(str)), max_size=4)
ip_keys = st.builds(lambda n, p, h: rategate.client_ip(trusted_proxies=n, ipv6_prefix=p, proxy_header=h),
                    nets, st.one_of(st.none(), st.integers(1, 128)),
                    st.sampled_from(["x-forwarded-for", "x-forwarded-for", "x-real-ip", "forwarded"]))
key_funcs = st.one_of(
    st.none(), ip_keys,
    st.builds(lambda n, fb: rategate.header(n, fallback=fb), st.sampled_from(["x-api-key", "X-Api-Key"]),
              st.one_of(st.none(), ip_keys)),
    st.just(lambda scope: "custom"),
)
rule_paths = st.sampled_from(["/api", "/api/", "/api/v1", "/login", "/", "/ünï", "/a|b{c}#%"])
methods = st.one_of(st.none(), st.sampled_from(["GET", "POST", "GET,POST", "DELETE"]))
rules = st.lists(st.one_of(
    st.builds(lambda p, m, k, c: rategate.Rule(p, "10/minute; 100/hour", methods=m, key=k, cost=c),
              rule_paths, methods, key_funcs, st.one_of(st.none(), st.integers(0, 3))),
    st.builds(lambda p, m: rategate.Rule(p, None, methods=m), rule_paths, methods),
    st.builds(lambda p: rategate.Rule(re.compile(p), "3/second"), st.sampled_from(["^/re", "/x+", "^/api/[0-9]+$"])),
    st.builds(lambda p: rategate.Rule(p, "5/minute", concurrency=2), st.sampled_from(["/conc"])),
    st.builds(lambda p: rategate.Rule(p, "5/minute", charge=True), st.sampled_from(["/charge"])),
    st.builds(lambda p: rategate.Rule(p, lambda scope: "7/minute"), st.sampled_from(["/dyn"])),
), max_size=5, unique_by=lambda r: r.name)
configs = st.fixed_dictionaries({
    "limits": st.sampled_from(["100/minute", "5/second; 1000/day", None]),
    "rules": rules,
    "key": key_funcs,
    "exempt": st.lists(st.sampled_from(["/health", "/api/v1", "/", "/metrics"]), max_size=2),
    "headers": st.sampled_from(["draft-6", "draft-11", "x-ratelimit", None]),
    "namespace": st.sampled_from([None, "ns", "a:b"]),
    "cost": st.one_of(st.none(), st.integers(0, 5)),
    "failure_status": st.sampled_from([429, 503]),
})
paths = st.one_of(st.sampled_from(["/", "/api", "/api/", "/api/v1", "/api/v1/x", "/api/12", "/apiary", "/login",
                                   "/health", "/re", "/rexx", "/xx", "/conc", "/charge", "/dyn", "/ünï", "",
                                   "/a|b{c}#%", "/metrics"]),
                  st.text(max_size=12).map(lambda t: "/" + t))
scopes = st.fixed_dictionaries({
    "type": st.sampled_from(["http"] * 6 + ["websocket"]),
    "method": st.sampled_from(["GET", "POST", "HEAD", "DELETE", "get", "PURGE"]),
    "path": paths,
    "headers": st.one_of(headers, fuzz_headers),
    "client": st.one_of(clients, fuzz_clients),
}, optional={
    # a mounted app or --root-path: rules match the path with it removed
    "root_path": st.sampled_from(["", "/api", "/root", "/a|b{c}#%", "/ü"]),
    "state": st.sampled_from([{}, {"other": 1}]),
})
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 4000),
                   st.sampled_from([0.0, -1.0, 0.5, 1.0, 1e12, 1e16, 3599.9999, 1e300]))
decisions = st.builds(
    lambda allowed, limit, remaining, reset, retry, error, rate: rategate.Decision(
        allowed, limit, remaining, reset, retry, error, rate),
    st.booleans(), st.one_of(st.integers(0, 5000), st.integers(-10, 2**62)),
    st.one_of(st.integers(-5, 5000), st.integers(-2**62, 2**62)), floats, floats,
    st.sampled_from([None, None, None, "timeout", "unavailable", "redis_error"]), st.integers(-2, 4))


class FakeLimiter:
    """compile() of a real memory:// Limiter; submit() records the check and
    answers the next Decision given (at once, or through a done future)."""

    def __init__(self, kind: str) -> None:
        self.real = rategate.Limiter("memory://")
        self.kind = kind
        self.calls: list[tuple[bytes, tuple[Any, ...], int]] = []
        self.answers: list[tuple[Any, bool]] = []
        self._counts: dict[str, Any] = {}

    def compile(self, *a: Any, **kw: Any) -> Any:
        return self.real.compile(*a, **kw)

    def submit(self, key: str | bytes, spec: Any, cost: int, *sid: Any) -> Any:
        k = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else bytes(key)
        self.calls.append((k, tuple(str(r) for r in spec.rates), cost))
        d, later = self.answers.pop(0) if self.answers else (rategate.Decision(True, 1, 0, 0.0, 0.0), False)
        if not later:
            return d
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(d)
        return fut

    def rule_counts(self, name: str) -> Any:
        from rategate.counts import RuleCounts

        return self._counts.setdefault(name, RuleCounts(name))

    def stats(self) -> dict[str, Any]:
        return {}

    def _release_held(self, *a: Any) -> None:
        pass

    def _took_slot(self) -> None:
        pass

    def charge_nowait(self, *a: Any) -> None:
        pass


class NotedDenials(DenialLog):
    """A denial log that keeps what it was told: the C path must tell it
    exactly what the Python path does (rule label, store key, path,
    retry_after, redact)."""

    def __init__(self) -> None:
        super().__init__()
        self.noted: list[tuple[Any, ...]] = []

    def note(self, *args: Any) -> None:  # type: ignore[override]
        self.noted.append(args)


def noted(mw: Any) -> list[tuple[Any, ...]]:
    """What the middleware told its denial log, floats by repr (the C path
    makes its own float of retry_after: a NaN is then not equal to itself)."""
    return [tuple(repr(a) if isinstance(a, float) else a for a in n) for n in mw._denial_log.noted]


def build(cfg: dict[str, Any], gate: bool, kind: str) -> tuple[RateLimitMiddleware, FakeLimiter, list[Any]]:
    lim = FakeLimiter(kind)
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        sent.append("app")
        await send({"type": "http.response.start", "status": 200, "headers": ((b"x-app", b"1"),)})
        await send({"type": "http.response.body", "body": b"ok"})

    rs = [rategate.Rule(r.path, r.limits, methods=r.methods, key=r.key, cost=r.cost, name=r.name,
                        concurrency=r.concurrency or None, charge=r.charge) for r in cfg["rules"]]
    mw = RateLimitMiddleware(app, limiter=lim, limits=cfg["limits"], rules=rs, key=cfg["key"],
                             exempt=cfg["exempt"], headers=cfg["headers"], namespace=cfg["namespace"],
                             cost=cfg["cost"], failure_status=cfg["failure_status"], denial_log=NotedDenials())
    if not gate:
        mw._gate = None
    return mw, lim, sent


def normal(msgs: list[Any]) -> list[Any]:
    """Messages with the wall-clock x-ratelimit-reset made comparable (to 2 s)."""
    out: list[Any] = []
    for m in msgs:
        if isinstance(m, dict) and "headers" in m:
            hs = [(k, int(v) // 2 if k == b"x-ratelimit-reset" else v) for k, v in m["headers"]]
            m = dict(m, headers=hs)
        out.append(m)
    return out


def record(scope: dict[str, Any], d: Any) -> Any:
    """The request's record (middleware.RECORD_KEY), comparable across two
    middlewares: limiters by position, renderers by what they render."""
    from rategate.middleware import RECORD_KEY

    rec = (scope.get("state") or {}).get(RECORD_KEY)
    if rec is None:
        return None
    h = rec[1]
    out = [rec[0] is d if rec[0] is not None else None, None if h is None else (h.style, h.name, h.rates),
           rec[2], rec[3]]
    for i in range(4, len(rec), 4):
        out += [type(rec[i]).__name__, rec[i + 1], rec[i + 2].rates, rec[i + 3] is d]
    return out


def run(loop: asyncio.AbstractEventLoop, mw: Any, scope: dict[str, Any], sent: list[Any]) -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"} if scope["type"] == "websocket" else {"type": "http.request",
                                                                                  "body": b""}

    async def send(m: Any) -> None:
        sent.append(m)

    try:
        loop.run_until_complete(asyncio.wait_for(mw(scope, receive, send), 10))
    except Exception as e:  # the two paths must fail alike too
        return type(e)
    return None


def route_first(mws: list[Any], scope: dict[str, Any]) -> None:
    """Route the scope's path in each middleware's Python path first: the gate
    answers only paths the Python path has routed (and cached)."""
    if scope["type"] != "http":
        return
    for m in mws:
        try:
            m.rule_for(route_path(scope), scope["method"])
        except Exception:  # a path or method the middleware refuses: the run compares that too
            pass


def copy(scope: dict[str, Any]) -> dict[str, Any]:
    out = dict(scope)
    if "state" in out:
        out["state"] = dict(out["state"])
    return out


@settings(EQ)
@given(cfg=configs, reqs=st.lists(st.tuples(scopes, decisions, st.booleans()), min_size=1, max_size=6),
       kind=st.sampled_from(["redis", "memory"]))
def test_c_path_equals_python_path(loop: asyncio.AbstractEventLoop, cfg: dict[str, Any],
                                   reqs: list[tuple[dict[str, Any], Any, bool]], kind: str) -> None:
    try:
        c_mw, c_lim, c_sent = build(cfg, True, kind)
    except (ValueError, TypeError):
        return  # a configuration the middleware refuses (two rules of one name...)
    p_mw, p_lim, p_sent = build(cfg, False, kind)
    assert c_mw._gate is not None
    for scope, d, later in reqs:
        # routed once first (the gate takes a path the Python path has routed)
        route_first([c_mw], scope)
        c_lim.answers = [(d, later)] * 2
        p_lim.answers = [(d, later)] * 2
        c_scope, p_scope = copy(scope), copy(scope)
        c_err = run(loop, c_mw, c_scope, c_sent)
        p_err = run(loop, p_mw, p_scope, p_sent)
        assert c_err == p_err
        assert c_lim.calls == p_lim.calls
        assert normal(c_sent) == normal(p_sent)
        assert record(c_scope, d) == record(p_scope, d)
        assert {k: v.as_dict() for k, v in c_lim._counts.items()} == \
            {k: v.as_dict() for k, v in p_lim._counts.items()}
        assert c_mw._incidents.active == p_mw._incidents.active
        assert noted(c_mw) == noted(p_mw)


def test_the_gate_takes_the_common_case() -> None:
    # Not a test that could pass by handing everything back: a plain
    # configuration's requests are answered by the gate itself.
    lim = FakeLimiter("redis")
    mw = RateLimitMiddleware(lambda *a: None, limiter=lim, limits="10/minute")
    mw.rule_for("/x", "GET")
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "client": ("2001:DB8::0:1", 5)}
    lim.answers = [(rategate.Decision(True, 10, 9, 6.0, 0.0), False)]
    r = mw._gate(scope, print)
    assert type(r) is _core.GateSend
    assert lim.calls == [(b"default|2001:db8::1", ("10/minute",), 1)]
    # the request's record, as the Python path makes it: the store key as str
    rec = scope["state"]["rategate.record"]
    assert rec[2] == 1 and rec[4] is lim and rec[5] == "default|2001:db8::1" and r.record is rec
    msg = {"type": "http.response.start", "status": 200, "headers": ((b"x", b"1"),)}
    r(msg)
    assert msg["headers"] == [(b"x", b"1"), (b"ratelimit-limit", b"10"), (b"ratelimit-remaining", b"9"),
                              (b"ratelimit-reset", b"6"), (b"ratelimit-policy", b"10;w=60")]
    assert rec[2] == 3  # DONE: headers once
    del scope["state"]
    lim.answers = [(rategate.Decision(False, 10, 0, 6.0, 1.5), False)]
    r = mw._gate(scope, print)
    assert type(r) is list and r[0]["status"] == 429 and (b"retry-after", b"2") in r[0]["headers"]
    assert lim.rule_counts("default").as_dict()["denied_cached"] == 1


# -- the fuzz of today, through the C path ----------------------------------------------------
@pytest.fixture(scope="module")
def c_middleware() -> Iterator[Any]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"y")]})
        await send({"type": "http.response.body", "body": b"ok"})

    lim = rategate.Limiter("memory://")
    mw = rategate.RateLimitMiddleware(
        app, limiter=lim, limits="5/minute",
        rules={"/api": "2/second; 10/minute", "POST /login": "1/minute", "/k": {"limits": "3/minute",
                                                                               "key": rategate.header("x-api-key")}},
        key=rategate.client_ip(trusted_proxies=["10.0.0.0/8", "::1", "unix"], ipv6_prefix=64),
        headers="draft-11", exempt=["/health"])
    assert mw._gate is not None
    yield mw
    lim.close()


@settings(EQ, max_examples=500)
@given(path=st.sampled_from(["/", "/api", "/api/x", "/login", "/health", "/k"]),
       method=st.sampled_from(["GET", "POST", "HEAD"]), hdrs=st.one_of(headers, fuzz_headers),
       client=st.one_of(clients, fuzz_clients))
def test_fuzz_through_the_c_path(c_middleware: Any, loop: asyncio.AbstractEventLoop, path: str, method: str,
                                 hdrs: Any, client: Any) -> None:
    # routed first: the gate answers every path the Python path has routed
    # (it still hands back a peer address given as non-ASCII text)
    c_middleware.rule_for(path, method)
    scope = {"type": "http", "method": method, "path": path, "headers": hdrs, "client": client}
    sent: list[Any] = []
    assert run(loop, c_middleware, scope, sent) is None
    check_start(sent[0])


def test_switch_forces_the_python_path() -> None:
    code = ("import rategate; m = rategate.RateLimitMiddleware(lambda *a: None, limiter='memory://', "
            "limits='1/second'); print(m._gate is None)")
    for env, want in (({"RATEGATE_PYTHON_PATH": "1"}, "True"), ({"RATEGATE_PYTHON_PATH": "0"}, "False"), ({}, "False")):
        e = {k: v for k, v in os.environ.items() if k != "RATEGATE_PYTHON_PATH"}
        out = subprocess.run([sys.executable, "-c", code], env={**e, **env}, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=60)
        assert out.stdout.strip() == want, out.stderr


def test_each_proxy_header_as_configured() -> None:
    # Found by the equivalence test: the proxy header's kind was read as a
    # flag, so a Forwarded header was walked as X-Real-IP.  Each kind, with a
    # trusted peer: X-Forwarded-For and X-Real-IP in C, Forwarded handed back.
    for header, value, want in (("x-forwarded-for", b"198.51.100.7, 10.1.1.1", b"default|198.51.100.7"),
                                ("x-real-ip", b"198.51.100.8", b"default|198.51.100.8"),
                                ("forwarded", b"::", None)):
        lim = FakeLimiter("redis")
        mw = RateLimitMiddleware(lambda *a: None, limiter=lim, limits="10/minute",
                                 key=rategate.client_ip(trusted_proxies=["10.0.0.0/8"], proxy_header=header))
        mw.rule_for("/", "GET")
        scope = {"type": "http", "method": "GET", "path": "/", "headers": [(header.encode(), value)],
                 "client": ("10.0.0.1", 5)}
        r = mw._gate(scope, print)
        if want is None:
            assert r is None and lim.calls == []
        else:
            assert r is not None and lim.calls[0][0] == want


@settings(EQ, max_examples=int(os.environ.get("RATEGATE_GATE_EXAMPLES", "1000")) // 3)
@given(outer=configs, inner=configs, reqs=st.lists(st.tuples(scopes, decisions, st.booleans()), min_size=1,
                                                    max_size=4))
def test_nested_middlewares_c_equals_python(loop: asyncio.AbstractEventLoop, outer: dict[str, Any],
                                            inner: dict[str, Any], reqs: list[tuple[dict[str, Any], Any, bool]]) -> None:
    # Two middlewares on one limiter, one inside the other (Seam 4: a limit
    # checked once, one set of headers): the outer takes the C path, the
    # inner meets the record and takes the Python path; all against both on
    # the Python path.
    def stack(gate: bool) -> tuple[Any, FakeLimiter, list[Any]]:
        mw_in, lim, sent = build(inner, gate, "redis")
        rs = [rategate.Rule(r.path, r.limits, methods=r.methods, key=r.key, cost=r.cost, name=r.name,
                            concurrency=r.concurrency or None, charge=r.charge) for r in outer["rules"]]
        mw_out = RateLimitMiddleware(mw_in, limiter=lim, limits=outer["limits"], rules=rs, key=outer["key"],
                                     exempt=outer["exempt"], headers=outer["headers"], namespace="outer",
                                     cost=outer["cost"], failure_status=outer["failure_status"])
        if not gate:
            mw_out._gate = None
        return mw_out, lim, sent

    try:
        c_mw, c_lim, c_sent = stack(True)
    except (ValueError, TypeError):
        return
    p_mw, p_lim, p_sent = stack(False)
    for scope, d, later in reqs:
        route_first([c_mw, c_mw.app], scope)
        c_lim.answers = [(d, later)] * 4
        p_lim.answers = [(d, later)] * 4
        c_scope, p_scope = copy(scope), copy(scope)
        assert run(loop, c_mw, c_scope, c_sent) == run(loop, p_mw, p_scope, p_sent)
        assert c_lim.calls == p_lim.calls
        assert normal(c_sent) == normal(p_sent)
        assert record(c_scope, d) == record(p_scope, d)


def test_disabled_and_shadow_take_no_gate() -> None:
    for kw in ({"enabled": False}, {"shadow": True}):
        mw = RateLimitMiddleware(lambda *a: None, limiter=FakeLimiter("redis"), limits="10/minute", **kw)
        assert mw._gate is None
