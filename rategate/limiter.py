"""Limiter: a storage URL turned into an engine, and hit().

The engine is the C core (``rategate._core``): for ``redis://``,
``rediss://`` (TLS) and ``unix://`` a loop thread per shard owns the Redis connection; for
``memory://`` the same GCRA runs in process.  Nothing here touches the
network; the Python side only submits checks and awaits futures that the
core resolves in batches.
"""

from __future__ import annotations

import atexit
import os
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Dict, Optional, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

from . import _core
from ._core import Decision, Spec
from .counts import RuleCounts
from .rates import Rate, RateLike, parse_rates

__all__ = ["Limiter", "Decision", "as_limiter", "parse_storage_url"]

FAILURE_MODES = ("closed", "open")
# Rule labels counted apart per limiter (stats()["rules"], metrics' "rule" label).
MAX_RULE_LABELS = 4096
# TLS options, by redis-py's names: in a rediss:// URL's query or as Limiter keywords.
SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _ssl_cert_reqs(v: Any, where: str) -> bool:
    """ssl_cert_reqs -> verify?  "required"/"none" (or ssl.CERT_REQUIRED/CERT_NONE)."""
    import ssl

    if isinstance(v, ssl.VerifyMode):
        if v == ssl.CERT_OPTIONAL:
            v = "optional"
        else:
            return v == ssl.CERT_REQUIRED
    if isinstance(v, str) and v.lower() in ("required", "none"):
        return v.lower() == "required"
    raise ValueError(
        f"{where}ssl_cert_reqs must be 'required' (verify the server, the default) or 'none' "
        f"(encrypt without verifying), got {v!r}"
    )


def _ssl_bool(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in _TRUE + _FALSE:
        return v.lower() in _TRUE
    raise ValueError(f"{where}ssl_check_hostname must be true or false, got {v!r}")


def _ssl_file(v: Any, name: str, where: str) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str) or not v:
        raise ValueError(f"{where}{name} must be the path of a PEM file, got {v!r}")
    return v


def tls_options(query: Dict[str, Any], keywords: Dict[str, Any], url: str) -> Dict[str, Any]:
    """The engine's TLS arguments from a rediss:// URL's query and the Limiter keywords."""
    opts: Dict[str, Any] = {}
    for name in SSL_OPTIONS:
        in_url, in_kw = name in query, keywords.get(name) is not None
        if in_url and in_kw:
            raise ValueError(f"bad storage URL {url!r}: {name} is given both in the URL and as a keyword; give it once")
        if in_url:
            opts[name] = query[name]
        elif in_kw:
            opts[name] = keywords[name]
    where = f"bad storage URL {url!r}: " if any(n in query for n in SSL_OPTIONS) else ""
    verify = _ssl_cert_reqs(opts.get("ssl_cert_reqs", "required"), where)
    check = opts.get("ssl_check_hostname")
    check_hostname = verify if check is None else _ssl_bool(check, where)
    if check_hostname and not verify:
        raise ValueError(
            f"{where}ssl_check_hostname=True needs ssl_cert_reqs='required': a name is only "
            "checked on a verified certificate"
        )
    return {
        "tls": True,
        "ssl_ca_certs": _ssl_file(opts.get("ssl_ca_certs"), "ssl_ca_certs", where),
        "ssl_certfile": _ssl_file(opts.get("ssl_certfile"), "ssl_certfile", where),
        "ssl_keyfile": _ssl_file(opts.get("ssl_keyfile"), "ssl_keyfile", where),
        "ssl_verify": verify,
        "ssl_check_hostname": check_hostname,
    }
_live: "weakref.WeakSet[Limiter]" = weakref.WeakSet()

# Ranges of the options (the C core checks them again): a timeout of a day
# is far inside what nanoseconds added to the clock and libuv timers hold.
_MAX_SECONDS = 86400.0
_MAX_DB = 2**31 - 1  # Redis's `databases` is a C int
_MAX_PENDING = 2**31 - 1
_MAX_DENY_CACHE = 2**24


def _seconds(name: str, value: Any, lo: float, hi: float, hint: str = "") -> float:
    """``value`` as float seconds within [lo, hi]; ValueError naming ``name`` and the range."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not lo <= value <= hi):  # False for NaN
        raise ValueError(f"{name} must be a number of seconds from {lo:g} to {hi:g}{hint}, got {value!r}")
    return float(value)


def _whole(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int within [lo, hi]; ValueError naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int from {lo} to {hi}, got {value!r}")
    return value


def _db(url: str, text: str) -> int:
    db = int(text)
    if db > _MAX_DB:
        raise ValueError(f"bad storage URL {url!r}: the database {text} is past {_MAX_DB}; Redis numbers them from 0")
    return db


def parse_storage_url(url: str, ssl: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Split a storage URL into engine arguments; ValueError names the bad part.

    ``ssl``: the TLS keywords given to the Limiter (``ssl_ca_certs`` ...),
    which only a ``rediss://`` URL takes.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(
            f"storage must be a URL string like 'redis://127.0.0.1:6379/0' or 'memory://', got {url!r}"
        )
    try:
        u = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"bad storage URL {url!r}: {e}") from None
    scheme = u.scheme.lower()
    if ssl and any(v is not None for v in ssl.values()) and scheme != "rediss":
        given = sorted(k for k, v in ssl.items() if v is not None)[0]
        raise ValueError(f"{given} is a TLS option: it needs a rediss:// storage URL, got {url!r}")
    if scheme == "memory":
        if u.netloc or u.path or u.query:
            raise ValueError(f"bad storage URL {url!r}: memory:// takes nothing after it")
        return {"kind": "memory"}
    if scheme in ("redis", "rediss", "unix"):
        user = unquote(u.username) if u.username else None
        password = unquote(u.password) if u.password is not None else None
        query = parse_qs(u.query, keep_blank_values=True)
        db = 0
        if scheme in ("redis", "rediss"):
            tls: Dict[str, Any] = {"tls": False}
            if scheme == "rediss":
                unknown = set(query) - set(SSL_OPTIONS)
                if unknown:
                    raise ValueError(
                        f"bad storage URL {url!r}: unknown option {sorted(unknown)[0]!r}; "
                        f"rediss:// takes {', '.join(SSL_OPTIONS)}"
                    )
                tls = tls_options({k: v[-1] for k, v in query.items()}, ssl or {}, url)
            elif u.query:
                raise ValueError(
                    f"bad storage URL {url!r}: redis:// takes no query; the db goes in the path (/0)"
                    + ("; TLS options need rediss://" if set(query) & set(SSL_OPTIONS) else "")
                )
            host = u.hostname
            if not host:
                raise ValueError(f"bad storage URL {url!r}: no host; write it like redis://127.0.0.1:6379/0")
            try:
                port = u.port if u.port is not None else 6379
            except ValueError:
                raise ValueError(
                    f"bad storage URL {url!r}: the port must be a number from 1 to 65535"
                ) from None
            if not 1 <= port <= 65535:
                raise ValueError(f"bad storage URL {url!r}: the port must be a number from 1 to 65535")
            path = u.path.strip("/")
            if path:
                if not path.isdigit():
                    raise ValueError(
                        f"bad storage URL {url!r}: the database {path!r} must be a number, like /0"
                    )
                db = _db(url, path)
            if user == "":
                user = None
            if host.startswith("[") or ":" in host:
                host = host.strip("[]")
            return {"kind": "redis", "host": host, "port": port, "path": None,
                    "username": user, "password": password, "db": db, **tls}
        # unix:///path/to/redis.sock?db=N
        if u.netloc and u.hostname not in (None, "", "localhost"):
            raise ValueError(
                f"bad storage URL {url!r}: unix:// takes a path (three slashes: unix:///run/redis.sock)"
            )
        if not u.path or u.path == "/":
            raise ValueError(f"bad storage URL {url!r}: no socket path; write it like unix:///run/redis.sock?db=0")
        unknown = set(query) - {"db"}
        if unknown:
            raise ValueError(f"bad storage URL {url!r}: unknown option {sorted(unknown)[0]!r}; only db=N")
        if "db" in query:
            v = query["db"][-1]
            if not v.isdigit():
                raise ValueError(f"bad storage URL {url!r}: db={v!r} must be a number")
            db = _db(url, v)
        if len(u.path.encode()) > 107:
            raise ValueError(f"bad storage URL {url!r}: the socket path is longer than 107 bytes")
        return {"kind": "redis", "host": None, "port": 0, "path": u.path,
                "username": user or None, "password": password, "db": db, "tls": False}
    if scheme == "redis+tls":
        raise ValueError(f"bad storage URL {url!r}: for TLS write rediss://")
    raise ValueError(
        f"bad storage URL {url!r}: unknown scheme {u.scheme!r}; use redis://, rediss://, unix:// or memory://"
    )


class Limiter:
    """Checks rate limits against a store.

    ``Limiter("redis://127.0.0.1:6379/0", timeout=0.05, failure_mode="closed")``

    * ``timeout``: the deadline of one check, in seconds; past it the
      failure mode decides (``error="timeout"``).
    * ``failure_mode``: ``"closed"`` (default) denies when Redis cannot
      answer; ``"open"`` allows.  Either way ``Decision.error`` says why.
    * ``threads``: loop threads, each with its own connection; keys are
      sharded among them by hash.
    * ``max_pending``: checks outstanding at once; past it, the failure mode
      decides at once (``error="overloaded"``).
    * ``deny_cache``: the local cache of keys over their limit, answered in
      C without a round trip: True (up to 65536 entries, grown on demand),
      False, or a bound on its entries.
    * ``deny_cache_ttl``: a cached denial is answered locally for at most
      this many seconds (default 1.0) before Redis is asked again, so a
      :meth:`reset` (or keys deleted in Redis) in any process is seen
      within it; a flood costs one Redis check per key per interval.
    * ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``
      (``"required"`` or ``"none"``), ``ssl_check_hostname``: TLS, for a
      ``rediss://`` URL (redis-py's names; they may also be given in the
      URL's query).  By default the server is verified against the system
      CA store and its certificate must name the host.
    * ``spin``: while Redis owes replies, the loop thread may poll (yielding
      the CPU each turn) for up to this many seconds instead of sleeping, so
      handing it a check costs no wake-up syscall.  It polls only while that
      pays: a core is idle, replies come within this window, and recent
      polls caught submits; so this is the upper bound.  0 disables it.

    The engine starts on first use in each process (so a fork after import
    gets its own thread) and is stopped by :meth:`aclose` or at exit.
    """

    def __init__(
        self,
        storage: str = "memory://",
        *,
        timeout: float = 0.05,
        failure_mode: str = "closed",
        threads: int = 1,
        max_pending: int = 100_000,
        deny_cache: Union[bool, int] = True,
        deny_cache_ttl: float = 1.0,
        connect_timeout: float = 1.0,
        stall_timeout: Optional[float] = None,
        spin: float = 0.0002,
        ssl_ca_certs: Optional[str] = None,
        ssl_certfile: Optional[str] = None,
        ssl_keyfile: Optional[str] = None,
        ssl_cert_reqs: Optional[str] = None,
        ssl_check_hostname: Optional[bool] = None,
    ) -> None:
        timeout = _seconds("timeout", timeout, 1e-6, _MAX_SECONDS)
        if failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure_mode must be 'closed' or 'open', got {failure_mode!r}")
        threads = _whole("threads", threads, 1, 64)
        max_pending = _whole("max_pending", max_pending, 1, _MAX_PENDING)
        if deny_cache is True:
            deny_cache = 65536
        elif deny_cache is False:
            deny_cache = 0
        if isinstance(deny_cache, bool) or not isinstance(deny_cache, int) or not 0 <= deny_cache <= _MAX_DENY_CACHE:
            raise ValueError(
                f"deny_cache must be True, False or a number of entries from 0 to {_MAX_DENY_CACHE}, "
                f"got {deny_cache!r}"
            )
        deny_cache_ttl = _seconds("deny_cache_ttl", deny_cache_ttl, 0.001, 3600.0)
        connect_timeout = _seconds("connect_timeout", connect_timeout, 1e-6, _MAX_SECONDS)
        spin = _seconds("spin", spin, 0.0, 0.01, " (0 disables it)")
        if stall_timeout is None:
            stall_timeout = min(max(2.0, 20 * timeout), _MAX_SECONDS)
        stall_timeout = _seconds("stall_timeout", stall_timeout, 1e-6, _MAX_SECONDS)
        self.storage = storage
        self._closed = True  # until the engine exists (__del__, __repr__ rely on it)
        cfg = parse_storage_url(storage, {
            "ssl_ca_certs": ssl_ca_certs, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile,
            "ssl_cert_reqs": ssl_cert_reqs, "ssl_check_hostname": ssl_check_hostname,
        })
        self.timeout = float(timeout)
        self.failure_mode = failure_mode
        self.kind = cfg["kind"]
        self._specs: Dict[Any, Spec] = {}
        # Per-rule decision counts of the middlewares and dependencies using
        # this limiter (rategate.counts), by rule label; in stats()["rules"].
        self._rule_counts: Dict[str, RuleCounts] = {}
        self._closed = False
        if cfg["kind"] == "memory":
            self._engine: Any = _core.MemoryEngine(failure_mode == "open")
        else:
            self._engine = _core.Engine(
                cfg["host"], cfg["port"], cfg["path"], cfg["username"], cfg["password"], cfg["db"],
                timeout, failure_mode == "open", threads, max_pending, deny_cache,
                connect_timeout, stall_timeout, spin, deny_cache_ttl,
                **{k: cfg[k] for k in ("tls", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                                       "ssl_verify", "ssl_check_hostname") if k in cfg},
            )
        self._closed = False
        # The hot path: bound once, called per request.
        self.submit = self._engine.submit
        _live.add(self)

    def __del__(self) -> None:
        # Dropped without aclose(): the event loop's reader keeps the engine
        # alive (it must, to resolve futures), so stop it here, or its thread
        # and connection would live as long as the loop.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # pragma: no cover - interpreter teardown
                pass

    def __repr__(self) -> str:
        u = urlsplit(self.storage)
        shown = self.storage if u.password is None else self.storage.replace(f":{u.password}@", ":***@")
        return f"Limiter({shown!r}, timeout={self.timeout}, failure_mode={self.failure_mode!r})"

    def compile(self, rates: Union[RateLike, Spec]) -> Spec:
        """Compile rates once (cache the result): "10/second; 1000/hour", a Rate or a list."""
        if isinstance(rates, Spec):
            return rates
        key = rates if isinstance(rates, (str, Rate)) else None
        if key is not None:
            spec = self._specs.get(key)
            if spec is not None:
                return spec
        spec = Spec(parse_rates(rates))
        if key is not None and len(self._specs) < 10_000:
            self._specs[key] = spec
        return spec

    async def hit(self, key: Union[str, bytes], rates: Union[RateLike, Spec], cost: int = 1) -> Decision:
        """Check ``key`` against ``rates``, consuming ``cost`` tokens if allowed (0: peek)."""
        # The hot path: one dict look-up for the compiled rates (a list is
        # unhashable: compile it), the checks of key and cost are done in C.
        try:
            spec = self._specs[rates]
        except (KeyError, TypeError):
            spec = self.compile(rates)
        r = self.submit(key, spec, cost)
        if r.__class__ is Decision:
            return r
        return await r  # type: ignore[no-any-return]

    async def reset(self, key: Union[str, bytes], rates: Union[RateLike, Spec]) -> bool:
        """Forget ``key``'s buckets for ``rates``: its next hit starts from a full bucket.

        Deletes them in the store (Redis, or memory://) and forgets the key in
        this process's deny cache at once; other processes see it within their
        ``deny_cache_ttl``.  Returns True once the store has done it, False if
        the store could not be reached (Redis down, or past ``timeout``).
        """
        r = self._engine.reset(key, self.compile(rates))
        if isinstance(r, bool):
            return r
        return bool(await r)

    def stats(self) -> Dict[str, Any]:
        """Counters: checks, allowed, denied, cached_denials, errors by kind, in_flight, reconnects,
        connected; and ``rules``: per rule label, the decisions of the middlewares and FastAPI
        dependencies using this limiter, by outcome (see :mod:`rategate.counts`)."""
        stats: Dict[str, Any] = self._engine.stats()
        stats["rules"] = {name: c.as_dict() for name, c in list(self._rule_counts.items())}
        return stats

    def rule_counts(self, name: str) -> RuleCounts:
        """The decision counts of rule label ``name`` (created on first use), shared by every
        middleware and dependency that uses this limiter with that label."""
        c = self._rule_counts.get(name)
        if c is None:
            # Labels are rule names and route templates, but a dependency
            # on a route that has no template falls back to the raw path:
            # past a bound, every new label is counted as one, "(other)".
            if len(self._rule_counts) >= MAX_RULE_LABELS:
                name = "(other)"
                c = self._rule_counts.get(name)
            if c is None:
                c = self._rule_counts[name] = RuleCounts(name)
        return c

    async def aclose(self) -> None:
        """Stop the engine: checks in flight resolve with error "closed"; hit() then raises."""
        self.close()

    def close(self) -> None:
        """Synchronous :meth:`aclose` (for atexit and sync code)."""
        if not self._closed:
            self._closed = True
            self._engine.close()

    async def __aenter__(self) -> "Limiter":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def as_limiter(limiter: Any, who: str) -> Any:
    """A Limiter given as itself or as a storage URL; TypeError naming ``who`` otherwise."""
    if isinstance(limiter, str):
        return Limiter(limiter)
    if limiter is None or not (hasattr(limiter, "submit") or hasattr(limiter, "hit")):
        raise TypeError(
            f"{who}: limiter must be a rategate.Limiter or a storage URL like "
            f"\"redis://127.0.0.1:6379/0\", got {limiter!r}"
        )
    return limiter


@atexit.register
def _close_all() -> None:
    # Stop and join every loop thread before the interpreter finalizes.
    for lim in list(_live):
        try:
            lim.close()
        except Exception:  # pragma: no cover - best effort at exit
            pass
