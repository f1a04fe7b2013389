"""The ``rategate`` command line, for operators: ping, show, reset, blocked.

::

    export RATEGATE_URL='redis://:secret@10.0.0.5:6379/0'   # or --url; every Limiter URL form
    rategate ping                       # reachable? topology, versions, round trip; a check made
    rategate blocked --limit 20         # who is over a limit right now, most blocked first
    rategate show 203.0.113.9           # that client's buckets, every rule (or --rule NAME)
    rategate reset 203.0.113.9          # delete them: its next request is allowed
    rategate --json blocked             # one JSON document on stdout, for scripts

Each command is built on the same :class:`rategate.Limiter` API that
applications use (``Limiter.connect()``, ``buckets()``, ``blocked()``,
``reset_client()``), so it connects exactly as the application would:
topology, TLS (``--ssl-ca-certs`` ... or the URL's query), AUTH.  A CLIENT is
the key the rule's key function returns: an IP address for
``rategate.client_ip()``, ``x-api-key=<value>`` for
``rategate.header("x-api-key")``.

Passwords are never printed: the URL is shown with ``***`` for its password,
and every message is scrubbed of the passwords it was given (the store's,
the Sentinels').  A password in ``--url`` is visible to other users in the
process list: prefer ``RATEGATE_URL``.

Exit status:

- 0: done (ping: a check was made on every master and every slot is served);
- 1: the store could not be reached or refused (connection refused, no
  answer within ``--timeout``, wrong password, TLS), or a check failed;
- 2: usage: a bad option, a bad URL, a TLS file that does not exist;
- 3: a partial answer (``blocked`` stopped at its time budget, or a master
  could not be scanned): what was found is printed, and says so;
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import statistics
import sys
import time
from typing import Any, Optional, Sequence, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130

ENV_URL = "RATEGATE_URL"
# A check made by `ping`: a peek (cost 0, nothing consumed) of a key no
# middleware makes ("%" starts no escaped rule name but "%XX" and "%ws:").
PING_KEY = "%cli:ping|"
PING_RATE = "1/second"
RTT_PINGS = 5


class CliError(Exception):
    """A failure reported to the user: a message and an exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# -- secrets -------------------------------------------------------------------------
def secrets_of(url: str) -> list[str]:
    """The passwords in a storage URL (its userinfo's, the Sentinels'), raw and decoded."""
    out: list[str] = []
    try:
        u = urlsplit(url)
    except ValueError:
        u = None
    if u is not None:
        userinfo, at, _ = u.netloc.rpartition("@")
        if at and ":" in userinfo:
            raw = userinfo.partition(":")[2]
            out += [raw, unquote(raw)]
        for name in ("sentinel_password",):
            for v in parse_qs(u.query, keep_blank_values=True).get(name, []):
                out += [v, unquote(v)]
    return [s for s in dict.fromkeys(out) if s]


def mask_url(url: str) -> str:
    """``url`` with its passwords shown as ``***``."""
    out = url
    try:
        u = urlsplit(url)
        userinfo, at, hosts = u.netloc.rpartition("@")
        if at and ":" in userinfo:
            out = out.replace(u.netloc, userinfo.partition(":")[0] + ":***@" + hosts, 1)
    except ValueError:
        pass
    return scrub(out, secrets_of(url))


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by ``***``, longest first."""
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    return text


# -- output --------------------------------------------------------------------------
class Output:
    """Where results and errors go: text for people, or one JSON document."""

    def __init__(self, as_json: bool, secrets: Sequence[str], out: TextIO, err: TextIO) -> None:
        self.json = as_json
        self.secrets = list(secrets)
        self.out = out
        self.err = err

    def clean(self, v: Any) -> Any:
        """``v`` with every secret scrubbed from its strings."""
        if isinstance(v, str):
            return scrub(v, self.secrets)
        if isinstance(v, dict):
            return {self.clean(k): self.clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [self.clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else "inf"
        return v

    def result(self, doc: dict[str, Any], lines: list[str]) -> None:
        if self.json:
            self.out.write(json.dumps(self.clean(doc), indent=2, ensure_ascii=False) + "\n")
        else:
            for line in lines:
                self.out.write(self.clean(line) + "\n")
        self.out.flush()

    def error(self, message: str, code: int) -> int:
        message = scrub(message, self.secrets)
        if self.json:
            self.out.write(json.dumps({"ok": False, "error": message, "exit": code}) + "\n")
            self.out.flush()
        else:
            self.err.write(f"rategate: {message}\n")
            self.err.flush()
        return code

    def warn(self, message: str) -> None:
        self.err.write(f"rategate: warning: {scrub(message, self.secrets)}\n")


# -- the parser ----------------------------------------------------------------------
def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < v <= 3600 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 seconds, got {text}")
    return v


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 1000000, got {text!r}")
    return int(text)


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """The options every command takes, before or after its name."""
    d: Any = None if top else argparse.SUPPRESS
    g = parser.add_argument_group("store")
    g.add_argument("--url", default=d if not top else None, metavar="URL",
                   help=f"the storage URL, as the Limiter takes it (default: ${ENV_URL})")
    g.add_argument("--timeout", type=_positive, default=d if not top else 2.0, metavar="SECONDS",
                   help="connect and command deadline (default 2)")
    g.add_argument("--ssl-ca-certs", default=d, metavar="FILE", help="PEM CA file (rediss://)")
    g.add_argument("--ssl-certfile", default=d, metavar="FILE", help="PEM client certificate (rediss://)")
    g.add_argument("--ssl-keyfile", default=d, metavar="FILE", help="PEM client key (rediss://)")
    g.add_argument("--ssl-cert-reqs", choices=("required", "none"), default=d,
                   help="verify the server's certificate (default required)")
    g.add_argument("--no-ssl-check-hostname", dest="ssl_check_hostname", action="store_false",
                   default=d if not top else None, help="do not check the certificate's host name")
    parser.add_argument("--json", action="store_true", default=d if not top else False,
                        help="print one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rategate",
        description="Operate rategate's rate limits in a store shared by your app servers.",
        epilog="Exit status: 0 done, 1 the store could not be reached or refused, 2 usage, "
               "3 a partial answer (blocked stopped early), 130 interrupted.",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"rategate {__version__}")
    _common(p, True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        _common(c, False)
        return c

    command("ping", "connect as the Limiter would, make a check, print the topology and round trip")
    for name, what in (("show", "print a client's buckets (every rule, or one)"),
                       ("reset", "delete a client's buckets and slots: its next request is allowed")):
        c = command(name, what)
        c.add_argument("client", metavar="CLIENT",
                       help="the key the key function returns: an IP address, x-api-key=<value>, ...")
        c.add_argument("--rule", metavar="NAME", help="one rule (its name, as in stats()['rules'])")
        c.add_argument("--namespace", metavar="NS", help="the middleware's namespace, if it has one")
    c = command("blocked", "list the clients over a limit right now, most blocked first")
    c.add_argument("--rule", metavar="NAME", help="only this rule")
    c.add_argument("--namespace", metavar="NS", help="only this namespace")
    c.add_argument("--limit", type=_count, default=100, metavar="N", help="at most N clients (default 100)")
    c.add_argument("--budget", type=_positive, default=10.0, metavar="SECONDS",
                   help="stop scanning after this long and say so (default 10)")
    return p


# -- the limiter ---------------------------------------------------------------------
SHM_DIR = "/dev/shm"


def make_limiter(args: argparse.Namespace, url: str) -> Any:
    """The Limiter of ``url`` with the TLS options given; CliError(2) when they
    are wrong.  shm://NAME: only a segment that exists (an operator's command
    must not create an empty one under a mistyped name)."""
    from .limiter import Limiter, parse_storage_url

    try:
        cfg = parse_storage_url(url)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    if cfg["kind"] == "shm":
        path = os.path.join(SHM_DIR, f"rategate.{cfg['name']}")
        if not os.path.exists(path):
            raise CliError(f"no segment shm://{cfg['name']} on this host ({path} does not exist): no process "
                           "has opened it; is the name the app's?")

    tls = {k: getattr(args, k, None) for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                                               "ssl_cert_reqs", "ssl_check_hostname")}
    try:
        return Limiter(url, timeout=args.timeout, connect_timeout=args.timeout, deny_cache=False,
                       **{k: v for k, v in tls.items() if v is not None})
    except (ValueError, TypeError, OSError) as e:
        raise CliError(str(e), EXIT_USAGE) from None


async def connect(limiter: Any, timeout: float) -> None:
    """Connect as the Limiter does (Seam 1): ConnectionError/TimeoutError name the cause."""
    fn = getattr(limiter, "connect", None)
    if fn is not None:
        await asyncio.wait_for(fn(), timeout + 1.0)
        return
    engine = limiter._engine
    if hasattr(engine, "connect"):
        await asyncio.wait_for(engine.connect(timeout), timeout + 1.0)


def key_slot(key: bytes) -> int:
    """The Redis Cluster slot of ``key`` (CRC16/XMODEM of its hash tag)."""
    s = key.find(b"{")
    if s >= 0:
        e = key.find(b"}", s + 1)
        if e > s + 1:
            key = key[s + 1:e]
    crc = 0
    for b in key:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


def _probe_key(slots: list[tuple[int, int]]) -> str:
    """A ping key whose check goes to a master serving ``slots`` (any key without them)."""
    base = PING_KEY + socket.gethostname()[:40] + "-"
    for i in range(100_000):
        k = f"{base}{i}"
        if not slots or any(a <= key_slot(k.encode()) <= b for a, b in slots):
            return k
    return base  # pragma: no cover - 100,000 tries miss a slot range with probability ~0


def _server_info(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


async def _timed(engine: Any, args: list[Any], node: Optional[str], timeout: float) -> tuple[Any, float]:
    t = time.perf_counter()
    r = await asyncio.wait_for(engine.command(args, node=node, timeout=timeout), timeout + 1.0)
    return r, (time.perf_counter() - t) * 1000.0


async def ping(limiter: Any, args: argparse.Namespace, url: str) -> tuple[int, dict[str, Any], list[str]]:
    """Connect, make a check on every master, report the topology and round trips."""
    from .limiter import Limiter

    assert isinstance(limiter, Limiter)
    doc: dict[str, Any] = {"store": mask_url(url), "kind": limiter.kind, "ok": False}
    lines = [f"store     {mask_url(url)}"]
    if limiter.kind != "redis":
        t = time.perf_counter()
        d = await limiter.hit(PING_KEY + "local", PING_RATE, 0)
        ms = (time.perf_counter() - t) * 1000.0
        doc.update(ok=d.error is None, check={"ok": d.error is None, "ms": round(ms, 3), "error": d.error})
        seg = limiter.stats().get("shm")
        if seg:
            doc["segment"] = seg
            lines.append(f"segment   {seg.get('path')}: {seg.get('live')} live buckets of {seg.get('capacity')}, "
                         f"{seg.get('bytes', 0) >> 20} MiB, shared by this host's processes")
        else:
            lines.append(f"kind      {limiter.kind}: in this process, nothing to reach")
        lines.append(f"check     {'ok' if d.error is None else 'FAILED: ' + str(d.error)} ({ms:.2f} ms)")
        return (EXIT_OK if d.error is None else EXIT_FAILED), doc, lines
    engine = limiter._engine
    t0 = time.perf_counter()
    try:
        await connect(limiter, args.timeout)
    except (ConnectionError, OSError, asyncio.TimeoutError) as e:
        cause = str(e) or (limiter.stats().get("last_error") or type(e).__name__)
        raise CliError(f"cannot connect to {mask_url(url)}: {cause}") from None
    connect_ms = (time.perf_counter() - t0) * 1000.0
    topo = engine.topology() if hasattr(engine, "topology") else {"kind": "server", "masters": [], "sentinel": None}
    kind = topo.get("kind", "server")
    doc.update(kind=kind, sentinel=topo.get("sentinel"), connect_ms=round(connect_ms, 3))
    masters = list(topo.get("masters") or [])
    if kind == "cluster":
        covered = sum(b - a + 1 for m in masters for a, b in m.get("slots", []))
        doc["slots_covered"] = covered
    failed = 0
    out_masters = []
    for m in masters:
        addr = m["address"]
        entry: dict[str, Any] = {"address": addr, "connected": bool(m.get("connected")),
                                 "slots": [list(r) for r in m.get("slots", [])]}
        try:
            info, _ = await _timed(engine, ["INFO", "server"], addr, args.timeout)
            fields = _server_info(info.decode() if isinstance(info, bytes) else str(info))
            entry["server"] = fields.get("server_name") or ("valkey" if "valkey_version" in fields else "redis")
            entry["version"] = fields.get("valkey_version") or fields.get("redis_version")
            rtts = []
            for _ in range(RTT_PINGS):
                _, ms = await _timed(engine, ["PING"], addr, args.timeout)
                rtts.append(ms)
            entry["rtt_ms"] = {"min": round(min(rtts), 3), "median": round(statistics.median(rtts), 3),
                               "max": round(max(rtts), 3)}
        except Exception as e:  # the master's error, reported; the others still checked
            entry["error"] = str(e) or type(e).__name__
        # A check on this master: a peek of a key of its slots.
        t = time.perf_counter()
        d = await limiter.hit(_probe_key([tuple(r) for r in m.get("slots", [])]), PING_RATE, 0)
        entry["check"] = {"ok": d.error is None, "ms": round((time.perf_counter() - t) * 1000.0, 3),
                          "error": None if d.error is None else (limiter.stats().get("last_error") or d.error)}
        failed += d.error is not None or "error" in entry
        out_masters.append(entry)
    if not masters:  # an engine without topology(): one check
        d = await limiter.hit(_probe_key([]), PING_RATE, 0)
        failed += d.error is not None
        doc["check"] = {"ok": d.error is None,
                        "error": None if d.error is None else (limiter.stats().get("last_error") or d.error)}
    doc["masters"] = out_masters
    uncovered = kind == "cluster" and doc.get("slots_covered", 0) < 16384
    doc["ok"] = ok = not failed and not uncovered
    where = {"server": "one server", "sentinel": f"Sentinel ({topo.get('sentinel') or 'none'} named the master)",
             "cluster": f"cluster, {len(masters)} masters, {doc.get('slots_covered', 0)} of 16384 slots served"}
    lines.append(f"topology  {where.get(kind, kind)}")
    if hasattr(engine, "connect"):
        lines.append(f"connect   {connect_ms:.1f} ms (script loaded)")
    for m_doc in out_masters:
        who = f"{m_doc.get('server', '?')} {m_doc.get('version', '?')}"
        slots = " slots " + ",".join(f"{a}-{b}" for a, b in m_doc["slots"]) if m_doc["slots"] else ""
        rtt = m_doc.get("rtt_ms")
        rtt_text = f"rtt {rtt['median']:.2f} ms (min {rtt['min']:.2f}, max {rtt['max']:.2f})" if rtt else ""
        chk = "check ok" if m_doc["check"]["ok"] else f"check FAILED: {m_doc['check']['error']}"
        lines.append(f"master    {m_doc['address']}  {who}{slots}  {rtt_text}  {chk}")
        if "error" in m_doc:
            lines.append(f"          error: {m_doc['error']}")
    if uncovered:
        lines.append(f"FAILED    {16384 - doc.get('slots_covered', 0)} slots are served by no master")
    if not out_masters and "check" in doc:
        lines.append("check     " + ("ok" if doc["check"]["ok"] else f"FAILED: {doc['check']['error']}"))
    return (EXIT_OK if ok else EXIT_FAILED), doc, lines


def _bucket_doc(b: Any) -> dict[str, Any]:
    if isinstance(b, (bytes, str)):
        return {"key": b.decode("utf-8", "backslashreplace") if isinstance(b, bytes) else b}
    return b.as_dict() if hasattr(b, "as_dict") else dict(vars(b))


def _cut(text: str, n: int = 60) -> str:
    """A client key for a terminal line: long ones cut (--json has them whole)."""
    return text if len(text) <= n else text[:n - 3] + "..."


def _bucket_line(b: dict[str, Any]) -> str:
    rule = b.get("rule") or "-"
    if b.get("kind") == "concurrency":
        return f"{rule:<24} {'concurrency':<14} {b.get('slots', 0)} slots held (requests in flight)"
    ra = b.get("retry_after", 0.0)
    state = f"BLOCKED, retry after {ra:.2f} s" if ra else "not blocked"
    return (f"{rule:<24} {b['rate']:<14} {b.get('tokens', 0):>6} tokens left, full in "
            f"{b.get('time_to_full', 0.0):.2f} s, {state}")


async def show(limiter: Any, args: argparse.Namespace, url: str) -> tuple[int, dict[str, Any], list[str]]:
    buckets = await limiter.buckets(args.client, rule=args.rule, namespace=args.namespace)
    docs = [_bucket_doc(b) for b in buckets]
    head = [f"client {_cut(args.client)}: {len(docs)} bucket{'s' if len(docs) != 1 else ''}"
            + (f" under rule {args.rule!r}" if args.rule else "")]
    lines = head + [_bucket_line(b) for b in docs] if docs else [
        f"no buckets for client {_cut(args.client)!r}" + (f" under rule {args.rule!r}" if args.rule else "")
        + ": it is not limited now (a full bucket leaves nothing in the store)"]
    return EXIT_OK, {"ok": True, "client": args.client, "buckets": docs}, lines


async def reset(limiter: Any, args: argparse.Namespace, url: str) -> tuple[int, dict[str, Any], list[str]]:
    """Limiter.reset_client(slots=True): the client's buckets, and its
    concurrency slot sets (on Redis), so a client locked out by slots its
    dead requests hold is let in too."""
    removed = [_bucket_doc(r)["key"] for r in
               await limiter.reset_client(args.client, rule=args.rule, namespace=args.namespace, slots=True)]
    left = [b.key for b in await limiter.buckets(args.client, rule=args.rule, namespace=args.namespace)
            if b.kind == "concurrency"]
    lines = [f"removed {k}" for k in removed]
    if removed:
        lines.append(f"{len(removed)} removed (buckets and concurrency slots): the client's next request is "
                     "allowed (processes that cached its denial see this within their deny_cache_ttl, 1 s by "
                     "default)")
    else:
        lines.append(f"nothing to remove for client {_cut(args.client)!r}: it is not limited now")
    for k in left:
        lines.append(f"left {k}: this store's slots are requests in flight on this host; they are given "
                     "back when those end, or expire after their ttl")
    return EXIT_OK, {"ok": True, "client": args.client, "removed": removed, "left": left}, lines


async def blocked(limiter: Any, args: argparse.Namespace, url: str) -> tuple[int, dict[str, Any], list[str]]:
    from .buckets import blocked as find_blocked

    notes: list[str] = []
    found, complete = await find_blocked(limiter, args.rule, args.namespace, args.limit, args.budget, notes)
    docs = [_bucket_doc(b) for b in found]
    lines = [f"{d['rule'] or '-':<24} {_cut(d['client'], 40):<40} {d['rate']:<14} retry after "
             f"{d['retry_after']:.2f} s" for d in docs] or ["no client is over a limit"]
    if not complete:
        lines.append(f"PARTIAL: stopped early ({'; '.join(notes)}); there may be more")
    doc = {"ok": True, "complete": complete, "blocked": docs, "notes": notes}
    return (EXIT_OK if complete else EXIT_PARTIAL), doc, lines


COMMANDS = {"ping": ping, "show": show, "reset": reset, "blocked": blocked}


async def _run(args: argparse.Namespace, url: str, out: Output) -> int:
    limiter = make_limiter(args, url)
    try:
        code, doc, lines = await COMMANDS[args.command](limiter, args, url)
        out.result(doc, lines)
        return code
    finally:
        await limiter.aclose()


def main(argv: Optional[Sequence[str]] = None, *, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage (2) or --help/--version (0)
        return int(e.code or 0)
    url = args.url or os.environ.get(ENV_URL) or ""
    out = Output(bool(args.json), secrets_of(url), stdout, stderr)
    if not url:
        return out.error(f"no store given: pass --url redis://host:6379/0 (any Limiter URL) or set {ENV_URL}",
                         EXIT_USAGE)
    if args.url and secrets_of(args.url):
        out.warn(f"a password in --url is visible to other users in the process list; set {ENV_URL} instead")
    try:
        return asyncio.run(_run(args, url, out))
    except CliError as e:
        return out.error(str(e), e.code)
    except KeyboardInterrupt:
        return out.error("interrupted", EXIT_INTERRUPTED)
    except (ConnectionError, OSError, asyncio.TimeoutError, TimeoutError) as e:
        return out.error(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, EXIT_FAILED)
    except Exception as e:  # a store's error reply, a bug: the cause, never a password
        name = type(e).__name__
        return out.error(f"{name}: {e}", EXIT_FAILED)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
