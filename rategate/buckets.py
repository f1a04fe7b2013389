"""What the store holds, read for operators: one client's buckets, and who is blocked now.

``Limiter.buckets(client)`` and ``Limiter.blocked()`` (and ``rategate show``
/ ``rategate blocked``) are built here on the store-key layout of
:mod:`rategate.admin`: nothing here knows how a key is spelled.

A bucket's state is the time until it is full again, ``x`` (microseconds):
Redis holds its theoretical arrival time (``GET``), read against Redis's own
clock (``TIME`` of the node that holds it); memory:// and shm:// report ``x``
through the engine's ``entries()``.  From ``x`` and the rate (``T`` =
period / limit, ``tau`` = burst * T, the slack of csrc/gcra.h), exactly as the
script decides:

- tokens left now: ``floor((tau - x + slack) / T)``, at least 0;
- a cost of 1 is denied while ``x + T > tau + slack``, for
  ``ceil(x + T - tau)`` microseconds more: the retry-after.

Reading is O(keys in the store) on Redis: ``SCAN`` with the key prefix on
every master (never ``KEYS``), a page at a time, so the server serves other
clients in between; ``blocked()`` stops at its time budget and says so.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from . import admin
from .rates import Rate

__all__ = ["Bucket", "blocked", "buckets"]


@dataclass(frozen=True)
class Bucket:
    """One bucket (or concurrency slot set) of one client under one rule, as the store holds it now.

    ``rule`` is the rule's label (as in ``stats()["rules"]``: ``"default"``,
    ``"v2:default"`` with a namespace, ``"dep:GET /items/{item_id}"``,
    ``"default (messages)"``), None for a key no middleware made;
    ``client`` the client key as stored (``"#<digest>"`` for one longer than
    200, which the middleware hashes); ``rate`` the rate (``"100/minute"``),
    None for a slot set; ``key`` the Redis key.  For a rate: ``tokens``
    left now, ``time_to_full`` and ``retry_after`` in seconds (0: a request
    would be allowed now).  For a slot set: ``slots`` held (requests in
    flight, across every process).
    """

    rule: Optional[str]
    client: str
    rate: Optional[str]
    key: str
    kind: str = "rate"
    tokens: int = 0
    time_to_full: float = 0.0
    retry_after: float = 0.0
    slots: int = 0
    raw_key: bytes = field(default=b"", repr=False, compare=False)  # the key as bytes (key is its text)

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain data (what ``rategate --json`` prints)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "raw_key"}


def _text(b: Union[str, bytes]) -> str:
    return b if isinstance(b, str) else b.decode("utf-8", "backslashreplace")


def _label(part: bytes) -> str:
    """The rule label of rule part N (see :mod:`rategate.admin`)."""
    text = _text(part)
    if text.startswith(admin.MESSAGES_PREFIX):
        return admin.unescape(text[len(admin.MESSAGES_PREFIX):]) + " (messages)"
    return admin.unescape(text)


def _bucket(store_key: bytes, key_id: bytes, value: float, redis_key: bytes) -> Optional[Bucket]:
    """The Bucket of (K, R) whose state is ``value`` (x in microseconds, or
    live slots for R = b"c"); None for a key_id this version does not write."""
    split = admin.split_store_key(store_key)
    if split is None:
        rule, client = None, _text(store_key)
    else:
        part, hashed, who = split
        rule, client = _label(part), ("#" if hashed else "") + _text(who)
    if key_id == admin.CONCURRENCY_ID:
        return Bucket(rule, client, None, _text(redis_key), kind="concurrency", slots=int(value),
                      raw_key=redis_key)
    rate = admin.rate_of(key_id)
    if rate is None:
        return None
    return _rate_bucket(rule, client, rate, redis_key, max(0.0, value))


def _rate_bucket(rule: Optional[str], client: str, rate: Rate, key: bytes, x: float) -> Bucket:
    burst = rate.burst if rate.burst is not None else rate.limit
    t = rate.period * 1e6 / rate.limit
    tau = burst * t
    slack = t / 2 if t < 2.0 else 1.0
    tokens = max(0, math.floor((tau - x + slack) / t))
    retry = math.ceil(x + t - tau) / 1e6 if x + t > tau + slack else 0.0
    return Bucket(rule, client, str(rate), _text(key), tokens=tokens, time_to_full=x / 1e6, retry_after=retry,
                  raw_key=key)


# -- reading the store -----------------------------------------------------------------
def _local(limiter: Any) -> bool:
    return getattr(limiter, "kind", "memory") != "redis"


def _entries(limiter: Any, prefix: bytes = b"") -> list[tuple[bytes, bytes, float]]:
    """memory:// and shm://: (K, R, value) of every live entry whose K starts with ``prefix``."""
    entries = getattr(limiter._engine, "entries", None)
    if entries is None:
        raise ValueError(f"this store ({limiter.kind}://) cannot list its buckets")
    return [(admin._bytes(k), admin._bytes(r), float(v)) for k, r, v in entries(prefix)]


async def _read_page(limiter: Any, page: list[bytes]) -> list[Bucket]:
    """The Buckets of one SCAN page (keys of one node): their values against
    that node's clock, every read pipelined."""
    engine = limiter._engine
    parsed: list[tuple[bytes, tuple[bytes, bytes]]] = [
        (k, p) for k in page if (p := admin.parse_redis_key(k)) is not None]
    if not parsed:
        return []
    sec, usec = await engine.command([b"TIME"], key=parsed[0][0])
    now = (int(sec) - 1_700_000_000) * 1_000_000 + int(usec)  # the script's clock (script.c)
    reads = []
    for k, (_, key_id) in parsed:
        if key_id == admin.CONCURRENCY_ID:
            reads.append(engine.command([b"ZCOUNT", k, b"(%d" % now, b"+inf"], key=k))
        else:
            reads.append(engine.command([b"GET", k], key=k))
    values = await asyncio.gather(*reads, return_exceptions=True)
    out = []
    for (k, (store_key, key_id)), v in zip(parsed, values):
        if isinstance(v, BaseException) or v is None:
            continue  # gone since the SCAN (expired: full), or not ours (another type)
        try:
            x = float(v) if key_id == admin.CONCURRENCY_ID else float(v) - now
        except (TypeError, ValueError):
            continue
        if key_id == admin.CONCURRENCY_ID and x <= 0:
            continue
        b = _bucket(store_key, key_id, x, k)
        if b is not None:
            out.append(b)
    return out


async def buckets(limiter: Any, client: Union[str, bytes], rule: Optional[str],
                  namespace: Optional[str]) -> list[Bucket]:
    """``Limiter.buckets()``: see there."""
    if not isinstance(client, (str, bytes)) or not client:
        raise ValueError(f"buckets: client must be what the key function returns (like \"203.0.113.9\"), got {client!r}")
    label, part = admin._resolve_rule(limiter, rule, namespace)
    if _local(limiter):
        want_k = admin._bytes(admin.store_key(part, client)) if part is not None else None
        out = []
        for k, r, v in _entries(limiter):
            if (k == want_k) if want_k is not None else admin._client_of(k, client, namespace):
                b = _bucket(k, r, v, admin.redis_key(k, r))
                if b is not None:
                    out.append(b)
        return sorted(out, key=lambda b: (b.rule or "", b.kind, b.key))
    await limiter.connect()
    found: list[Bucket] = []
    if part is not None:
        patterns = [admin.key_patterns(admin.store_key(part, client))]
    else:
        patterns = [(m, None) for m in admin.client_patterns(client)]
    for match, route in patterns:
        async for page in admin.scan(limiter, match, key=route):
            keep = [k for k in page if _mine(k, client, namespace, part)]
            found += await _read_page(limiter, keep)
    return sorted(found, key=lambda b: (b.rule or "", b.kind, b.key))


def _mine(key: bytes, client: Union[str, bytes], namespace: Optional[str], part: Optional[str]) -> bool:
    p = admin.parse_redis_key(bytes(key))
    if p is None:
        return False
    if part is not None:
        return p[0] == admin._bytes(admin.store_key(part, client))
    return admin._client_of(p[0], client, namespace)


def _selection(limiter: Any, rule: Optional[str], namespace: Optional[str]
               ) -> tuple[list[bytes], Any]:
    """(SCAN MATCH patterns, accept(K) -> bool) of the buckets of ``rule``
    (or of every rule of ``namespace``, or of all): the patterns may find
    more (a glob cannot say "the first | or #"), accept decides."""
    if rule is not None:
        _, part = admin._resolve_rule(limiter, rule, namespace)
        assert part is not None
        starts: tuple[str, ...] = (part + "|", part + "#")
    elif namespace is not None:
        ns = admin.escape_namespace(namespace) + ":"
        starts = (ns, admin.MESSAGES_PREFIX + ns)
    else:
        return [b"rg:*"], lambda k: True
    prefixes = tuple(admin._bytes(p) for p in starts)

    def accept(k: bytes) -> bool:
        return k.startswith(prefixes)

    return admin.part_patterns(starts), accept


async def blocked(limiter: Any, rule: Optional[str], namespace: Optional[str], limit: int,
                  budget: float, notes: Optional[list[str]] = None) -> tuple[list[Bucket], bool]:
    """``Limiter.blocked()``: see there.  ``notes`` gets why the answer is
    partial, if it is."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"blocked: limit must be an int >= 1, got {limit!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 86400:
        raise ValueError(f"blocked: budget must be a number of seconds above 0, got {budget!r}")
    patterns, accept = _selection(limiter, rule, namespace)
    notes = notes if notes is not None else []
    # The `limit` most blocked so far (a min-heap: the least blocked on top),
    # and their keys: SCAN may return a key twice.  Memory: `limit` buckets.
    heap: list[tuple[float, int, Bucket]] = []
    held: set[str] = set()
    n = 0

    def keep(b: Bucket) -> None:
        nonlocal n
        if b.kind != "rate" or b.retry_after <= 0 or b.key in held:
            return
        n += 1
        item = (b.retry_after, -n, b)
        if len(heap) < limit:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            held.discard(heapq.heapreplace(heap, item)[2].key)
        else:
            return
        held.add(b.key)

    complete = True
    if _local(limiter):
        for k, r, v in _entries(limiter):
            b = _bucket(k, r, v, admin.redis_key(k, r)) if accept(k) else None
            if b is not None:
                keep(b)
    else:
        await limiter.connect()
        deadline = time.monotonic() + budget
        try:
            for match in patterns:
                pages = admin.scan(limiter, match)
                try:
                    async for page in pages:
                        mine = []
                        for k in page:
                            p = admin.parse_redis_key(bytes(k))
                            if p is not None and accept(p[0]):
                                mine.append(bytes(k))
                        for b in await _read_page(limiter, mine):
                            keep(b)
                        if time.monotonic() >= deadline:
                            complete = False
                            notes.append(f"the time budget of {budget:g} s ran out")
                            break
                finally:
                    await pages.aclose()  # type: ignore[attr-defined]
                if not complete:
                    break
        except (ConnectionError, TimeoutError, OSError) as e:
            complete = False
            notes.append(f"a master could not be scanned: {e}")
    return [b for _, _, b in sorted(heap, reverse=True)], complete
