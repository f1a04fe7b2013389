"""The store-key layout, in one place: how rategate names what it stores, and
the operator's side built on it (``Limiter.clear()``, ``Limiter.reset_client()``,
and the scans ``rategate``'s command line reuses).

The layout, from the inside out::

    client key  C   what the key function returned (str or bytes), e.g. "203.0.113.9"
    rule part   N   the escaped rule name: escape_name("POST /login") -> "POST /login",
                    "<escaped namespace>:<escaped name>" with a namespace ("v2:default"),
                    "dep:<escaped name>" for the FastAPI dependency ("dep:GET /items/%7Bid%7D"),
                    "%ws:" + N for a rule's WebSocket messages
    store key   K   N + "|" + C, or N + "#" + blake2b-160 hex of C when C is longer
                    than MAX_KEY_LENGTH (200): what ``Limiter.submit()`` is given
    Redis key       "rg:{" K "}:" R, where R is a rate's key_id ("100/60000",
                    "100/60000b150", "5/1500us") or "c" (a concurrency limit's slots,
                    a sorted set); or, when K is empty or contains "}" (which would end
                    the Cluster hash tag early), "rg:{~" <16 hex of 64-bit FNV-1a of K>
                    "}~" K ":" R

Escaping: a rule name has ``%``, ``|``, ``#``, ``{`` and ``}`` written as
``%XX`` (a namespace ``:`` too), so the first ``|`` or ``#`` of K ends N, N
never contains ``}`` (only a client key can), and an escaped name never
starts with ``%w`` (so "%ws:" parts never collide with a rule's).  The C core
writes the Redis key (csrc/batch.c ``write_key``); :func:`redis_key` is its
Python reference, and tests/test_admin.py checks the two agree on random keys
against a real Redis.

Both stores use the same layout: memory:// keeps (K, R) pairs in process.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from .keys import MAX_KEY_LENGTH, key_digest
from .rates import Rate

if TYPE_CHECKING:  # pragma: no cover
    from ._core import Spec
    from .limiter import Limiter

__all__ = [
    "DEPENDENCY_PREFIX",
    "MESSAGES_PREFIX",
    "client_patterns",
    "dependency_part",
    "drop_slots",
    "escape_name",
    "escape_namespace",
    "fnv1a64",
    "key_patterns",
    "parse_redis_key",
    "part_patterns",
    "prefixed_key",
    "rate_of",
    "redis_key",
    "rule_part",
    "scan",
    "split_store_key",
    "store_key",
    "unescape",
]

NAME_ESCAPES = {ord(c): f"%{ord(c):02X}" for c in "%|#{}"}
NAMESPACE_ESCAPES = {ord(c): f"%{ord(c):02X}" for c in "%|#{}:"}
DEPENDENCY_PREFIX = "dep:"
# A rule's WebSocket messages: the rule's part with this in front.  An escaped
# name never starts with "%w" ("%" is always followed by two hex digits).
MESSAGES_PREFIX = "%ws:"
CONCURRENCY_ID = b"c"

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1

# SCAN's COUNT: keys a server looks at per call (a hint; Redis's default is 10).
SCAN_COUNT = 1000


# -- building ------------------------------------------------------------------------
def escape_name(name: str) -> str:
    """A rule name as it appears in a store key."""
    return name.translate(NAME_ESCAPES)


def escape_namespace(namespace: str) -> str:
    return namespace.translate(NAMESPACE_ESCAPES)


def rule_part(name: str, namespace: str | None = None) -> str:
    """N of a middleware rule ``name`` (under ``namespace``, if any)."""
    esc = escape_name(name)
    return esc if namespace is None else escape_namespace(namespace) + ":" + esc


def dependency_part(name: str) -> str:
    """N of the FastAPI dependency's counter ``name`` (its route, "GET /items/{id}", or name=)."""
    return DEPENDENCY_PREFIX + escape_name(name)


def prefixes(part: str) -> tuple[str, bytes, str, bytes]:
    """(str, bytes, hashed str, hashed bytes) prefixes of rule part N: what
    :func:`prefixed_key` puts in front of a client key."""
    plain, hashed = part + "|", part + "#"
    return plain, plain.encode("utf-8", "surrogatepass"), hashed, hashed.encode("utf-8", "surrogatepass")


def prefixed_key(k: Any, sp: str, bp: bytes, shp: str, bhp: bytes, owner: Any) -> str | bytes:
    """The store key K of client key ``k`` (the request path's form of
    :func:`store_key`, with the prefixes worked out once): ``sp + k``, or past
    MAX_KEY_LENGTH the hashed prefix + its digest, so a huge header never
    makes a huge Redis key.  Subclasses of str/bytes are made plain; any other
    type is a TypeError naming ``owner`` (something with a ``name``, or a string)."""
    t = type(k)
    if t is not str and t is not bytes:
        if isinstance(k, str):
            k, t = str(k), str
        elif isinstance(k, (bytes, bytearray, memoryview)):
            k, t = bytes(k), bytes
        else:
            name = getattr(owner, "name", None)
            who = f"rule {name!r}" if name is not None else str(owner)
            raise TypeError(
                f"the key function of {who} returned {type(k).__name__}; "
                "it must return str, bytes, or None (do not limit)"
            )
    if t is str:
        return sp + k if len(k) <= MAX_KEY_LENGTH else shp + key_digest(k)
    return bp + k if len(k) <= MAX_KEY_LENGTH else bhp + key_digest(k).encode()


def store_key(part: str, client: str | bytes) -> str | bytes:
    """K of ``client`` under rule part ``part`` (see the module docstring)."""
    return prefixed_key(client, *prefixes(part), "store_key")


def _bytes(s: str | bytes) -> bytes:
    return s.encode("utf-8", "surrogatepass") if isinstance(s, str) else bytes(s)


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a (csrc/batch.c ``fnv1a``)."""
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK64
    return h


def _tagged(k: bytes) -> bool:
    return not k or b"}" in k


def redis_key(key: str | bytes, key_id: str | bytes) -> bytes:
    """The Redis key of store key ``key`` (K) and rate ``key_id`` (R, or b"c")."""
    k, r = _bytes(key), _bytes(key_id)
    if _tagged(k):
        return b"rg:{~%016x}~%b:%b" % (fnv1a64(k), k, r)
    return b"rg:{%b}:%b" % (k, r)


# -- parsing -------------------------------------------------------------------------
_TAGGED_RE = re.compile(rb"rg:\{~([0-9a-f]{16})\}~(.*):([^:]*)", re.DOTALL)


def parse_redis_key(key: bytes) -> tuple[bytes, bytes] | None:
    """(K, R) of a rategate Redis key, or None for anything else (another
    program's key, or one whose FNV tag does not match its K)."""
    if not key.startswith(b"rg:{"):
        return None
    m = _TAGGED_RE.fullmatch(key)
    if m is not None:
        k = m.group(2)
        if int(m.group(1), 16) != fnv1a64(k) or not _tagged(k):
            return None
        return k, m.group(3)
    end = key.find(b"}", 4)
    if end < 0 or key[end + 1:end + 2] != b":":
        return None
    k, r = key[4:end], key[end + 2:]
    if not k or b":" in r:
        return None
    return k, r


_PART_END = re.compile(rb"[|#]")


def split_store_key(k: bytes) -> tuple[bytes, bool, bytes] | None:
    """(N, hashed, client part) of store key K: client part is C itself, or
    (hashed) the hex digest of C.  None: not a key the middleware or the
    dependency made (no "|" or "#")."""
    m = _PART_END.search(k)
    if m is None or m.start() == 0:
        return None
    return k[:m.start()], k[m.start():m.start() + 1] == b"#", k[m.end():]


_ESCAPED = re.compile(r"%([0-9A-F]{2})")


def unescape(part: str | bytes) -> str:
    """A rule part (N) as the rule label it was made from ("dep:GET /items/{id}", "v2:default")."""
    text = part.decode("utf-8", "surrogateescape") if isinstance(part, bytes) else part
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), text)


_KEY_ID_RE = re.compile(r"([1-9][0-9]*)/(?:([1-9][0-9]*)|([1-9][0-9]*)us)(?:b([1-9][0-9]*))?")


def rate_of(key_id: str | bytes) -> Rate | None:
    """The Rate whose ``key_id`` is ``key_id`` (the inverse of Rate.key_id), or
    None (b"c", or not a rate this version writes)."""
    text = key_id.decode("ascii", "replace") if isinstance(key_id, bytes) else key_id
    m = _KEY_ID_RE.fullmatch(text)
    if m is None:
        return None
    limit = int(m.group(1))
    period = int(m.group(2)) / 1000 if m.group(2) else int(m.group(3)) / 1_000_000
    burst = int(m.group(4)) if m.group(4) else None
    try:
        rate = Rate(limit, period, burst)
    except ValueError:
        return None
    return rate if rate.key_id == text else None


# -- patterns for SCAN MATCH -----------------------------------------------------------
def glob_escape(data: bytes) -> bytes:
    """``data`` matched literally by a Redis glob (SCAN MATCH, KEYS)."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", data)


def key_patterns(key: str | bytes) -> tuple[bytes, bytes | None]:
    """(SCAN MATCH pattern, routing key) for every Redis key of store key K
    (every rate it was ever checked with, and its slot set): they share one
    hash tag, so one node holds them all; the routing key names it."""
    k = _bytes(key)
    if _tagged(k):
        return b"rg:{~%016x}~%b:*" % (fnv1a64(k), glob_escape(k)), redis_key(k, CONCURRENCY_ID)
    return b"rg:{%b}:*" % glob_escape(k), redis_key(k, CONCURRENCY_ID)


def client_patterns(client: str | bytes) -> list[bytes]:
    """SCAN MATCH patterns that find the keys of ``client`` under every rule
    (a superset: check each key with :func:`split_store_key`)."""
    c = _bytes(client)
    if len(client) > MAX_KEY_LENGTH:
        return [b"rg:{*#" + key_digest(client).encode() + b"}:*"]
    e = glob_escape(c)
    if b"}" in c:
        return [b"rg:{~*}~*|" + e + b":*"]
    return [b"rg:{*|" + e + b"}:*"]


def part_patterns(starts: Iterable[str]) -> list[bytes]:
    """SCAN MATCH patterns that find the keys whose store key K starts with
    one of ``starts`` (a rule part + "|" or "#", a namespace part + ":"),
    tagged or not (a superset: check K with ``startswith``)."""
    out = []
    for p in starts:
        e = glob_escape(_bytes(p))
        out += [b"rg:{" + e + b"*", b"rg:{~*}~" + e + b"*"]
    return out


# -- the store -----------------------------------------------------------------------
def _redis(limiter: Any) -> bool:
    """A Redis engine (it takes commands); memory:// and shm:// keep their table in this host."""
    return hasattr(limiter._engine, "command")


async def scan(limiter: Limiter, match: bytes, *, key: bytes | None = None,
               count: int = SCAN_COUNT) -> AsyncIterator[list[bytes]]:
    """Every key of ``limiter``'s Redis matching the glob ``match``, a page at
    a time: SCAN (never KEYS) on every master of the topology (Cluster: each
    master; Sentinel: the master it names), or, with ``key``, only on the
    node that owns ``key``'s hash slot.  O(keys in the store): for tests,
    operators and emergencies, not for a request path.  ConnectionError when
    a master cannot be asked."""
    if not _redis(limiter):
        raise ValueError("scan() reads a Redis store; memory:// has no SCAN (use the engine's entries())")
    await limiter.connect()
    engine = limiter._engine
    if key is not None:
        nodes: list[str | None] = [None]
    else:
        topo = engine.topology()
        nodes = [m["address"] for m in topo["masters"]] if topo["kind"] == "cluster" else [None]
    for node in nodes:
        cursor = b"0"
        while True:
            args: list[bytes | str | int] = [b"SCAN", cursor, b"MATCH", match, b"COUNT", count]
            reply = await (engine.command(args, key=key) if key is not None else engine.command(args, node=node))
            cursor, keys = reply[0], list(reply[1])
            if keys:
                yield keys
            if cursor in (b"0", 0, "0"):
                break


async def clear(limiter: Limiter) -> int:
    """``Limiter.clear()``: remove every bucket and slot set under ``rg:``; how many went."""
    engine = limiter._engine
    if not _redis(limiter):
        return int(engine.clear())
    await limiter.connect()
    cluster = engine.topology()["kind"] == "cluster"
    total = 0
    async for page in scan(limiter, b"rg:*"):
        if cluster:
            # The keys of one page may lie in different slots of that node:
            # one DEL each (the engine pipelines them), never a CROSSSLOT error.
            replies = await asyncio.gather(*(engine.command([b"DEL", k], key=k) for k in page))
            total += sum(int(r) for r in replies)
        else:
            total += int(await engine.command([b"DEL", *page]))
    # This process's over-limit cache and leases speak of buckets that are gone.
    engine.forget_local()
    return total


def _resolve_rule(limiter: Any, rule: str | None, namespace: str | None) -> tuple[str | None, str | None]:
    """(label, rule part N) of reset_client's ``rule`` and ``namespace``; (None, None): every rule."""
    if rule is None:
        return None, None
    if not isinstance(rule, str) or not rule:
        raise ValueError("reset_client: rule must be a rule's name or path (like \"default\", "
                         f"\"/api/chat\", \"dep:GET /items/{{item_id}}\"), got {rule!r}")
    label = rule if namespace is None else f"{namespace}:{rule}"
    known = limiter._rules.get(label)
    if known is not None:
        return label, known[0]
    if rule.startswith(DEPENDENCY_PREFIX) and namespace is None:
        return label, dependency_part(rule[len(DEPENDENCY_PREFIX):])
    return label, rule_part(rule, namespace)


async def reset_client(limiter: Limiter, client: str | bytes, rule: str | None,
                       namespace: str | None, slots: bool = False) -> list[bytes]:
    """``Limiter.reset_client()``: see there."""
    done = await _reset_rates(limiter, client, rule, namespace)
    if slots:
        done += await drop_slots(limiter, client, rule, namespace)
    return done


async def drop_slots(limiter: Limiter, client: str | bytes, rule: str | None,
                     namespace: str | None) -> list[bytes]:
    """Delete the concurrency slot sets of ``client`` (under ``rule``, or
    every rule of ``namespace``, or all) in a Redis store; the keys deleted.
    Slots held by requests still running are then not counted: for a client
    locked out by slots its dead requests hold.  memory:// and shm://: none
    (their slots are requests in flight on this host, given back when they
    end or expire)."""
    if not _redis(limiter):
        return []
    label, part = _resolve_rule(limiter, rule, namespace)
    await limiter.connect()
    if part is not None:
        k = _bytes(store_key(part, client))
        patterns = [key_patterns(k)]

        def mine(key: bytes) -> bool:
            return key == k
    else:
        patterns = [(m, None) for m in client_patterns(client)]

        def mine(key: bytes) -> bool:
            return _client_of(key, client, namespace)
    engine = limiter._engine
    done: list[bytes] = []
    for match, route in patterns:
        async for page in scan(limiter, match, key=route):
            for key in page:
                parsed = parse_redis_key(bytes(key))
                if parsed is not None and parsed[1] == CONCURRENCY_ID and mine(parsed[0]):
                    if int(await engine.command([b"DEL", key], key=key)):
                        done.append(bytes(key))
    return done


async def _reset_rates(limiter: Limiter, client: str | bytes, rule: str | None,
                       namespace: str | None) -> list[bytes]:
    if not isinstance(client, (str, bytes)) or not client:
        raise ValueError("reset_client: client must be what the key function returns "
                         f"(like \"203.0.113.9\"), got {client!r}")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ValueError("reset_client: namespace must be a middleware's namespace= (a non-empty str), "
                         f"got {namespace!r}")
    label, part = _resolve_rule(limiter, rule, namespace)
    rules = limiter._rules
    if label is not None and label in rules:
        # A rule this process runs: its specs are known, reset exactly, no scan.
        return await _reset_known(limiter, [rules[label]], client)
    redis = _redis(limiter)
    if not redis and getattr(limiter._engine, "entries", None) is None:
        # memory:// (one process) without entries(): the rules registered here are all there is.
        if label is not None:
            known = ", ".join(sorted(rules)) or "none yet"
            raise ValueError(f"reset_client: no rule {label!r} in this process (known: {known})")
        ns = None if namespace is None else escape_namespace(namespace) + ":"
        return await _reset_known(
            limiter, [v for v in list(rules.values()) if ns is None or v[0].startswith(ns)], client)
    if label is not None:
        assert part is not None
        k = store_key(part, client)
        if not redis:
            done = await _reset_entries(limiter, lambda key: key == _bytes(k))
            if not done and getattr(limiter, "kind", None) == "memory":
                # One process: a rule nobody here registered and no bucket
                # holds is most likely a misspelt name: say which exist.
                known = ", ".join(sorted(rules)) or "none yet"
                raise ValueError(f"reset_client: no rule {label!r} in this process (known: {known})")
            return done
        match, route = key_patterns(k)
        return await _reset_scanned(limiter, [(match, route)], client, None)
    if not redis:
        return await _reset_entries(limiter, lambda key: _client_of(key, client, namespace))
    return await _reset_scanned(limiter, [(m, None) for m in client_patterns(client)], client, namespace)


def _client_of(k: bytes, client: str | bytes, namespace: str | None) -> bool:
    """Whether store key ``k`` is ``client``'s (under ``namespace``'s rules, if given)."""
    s = split_store_key(k)
    if s is None:
        return False
    part, hashed, who = s
    long = len(client) > MAX_KEY_LENGTH
    if hashed != long or who != (key_digest(client).encode() if long else _bytes(client)):
        return False
    return namespace is None or part.startswith(escape_namespace(namespace).encode() + b":")


async def _reset(limiter: Any, k: str | bytes, spec: Spec) -> None:
    """engine.reset(): the store's buckets, and this process's deny cache and lease of ``k``."""
    r = limiter._engine.reset(k, spec)
    if not (r if isinstance(r, bool) else await r):
        raise ConnectionError(f"reset_client: {limiter._shown_url()} could not be reached (or did not "
                              "answer within timeout); what it lists before this was reset")


async def _reset_known(limiter: Any, rules: list[tuple[str, Any]], client: str | bytes) -> list[bytes]:
    done: list[bytes] = []
    for part, specs in rules:
        k = store_key(part, client)
        for spec in list(specs):
            if spec.rates:
                await _reset(limiter, k, spec)
                done += [redis_key(k, r.key_id) for r in spec.rates]
    return done


async def _reset_scanned(limiter: Any, patterns: list[tuple[bytes, bytes | None]], client: str | bytes,
                         namespace: str | None) -> list[bytes]:
    """Reset the rate buckets of ``client`` that SCAN finds with ``patterns``
    ((match, routing key or None: every master)): each through the engine, so
    this process's deny cache and lease of the key go too.  A concurrency
    limit's slot set is left alone: its slots are requests in flight."""
    from ._core import Spec

    done: list[bytes] = []
    for match, route in patterns:
        async for page in scan(limiter, match, key=route):
            for key in page:
                parsed = parse_redis_key(bytes(key))
                rate = None if parsed is None else rate_of(parsed[1])
                if parsed is None or rate is None or not _client_of(parsed[0], client, namespace):
                    continue
                await _reset(limiter, parsed[0], Spec((rate,)))
                done.append(bytes(key))
    return done


async def _reset_entries(limiter: Any, want: Any) -> list[bytes]:
    """memory:// with the engine's entries(): reset the buckets whose store key satisfies ``want``."""
    from ._core import Spec

    engine = limiter._engine
    done = []
    for k, key_id, _value in engine.entries():
        rate = rate_of(key_id)
        if rate is not None and want(_bytes(k)):
            engine.reset(k, Spec((rate,)))
            done.append(redis_key(k, key_id))
    return done
