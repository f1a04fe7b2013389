"""Limiter: a storage URL turned into an engine, and hit().

The engine is the C core (``rategate._core``): for ``redis://``,
``rediss://`` (TLS) and ``unix://`` a loop thread per shard owns the Redis connection; for
``memory://`` the same GCRA runs in process.  Nothing here touches the
network; the Python side only submits checks and awaits futures that the
core resolves in batches.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Dict, List, Optional, Protocol, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

from . import _core
from ._core import Decision, Spec
from .counts import RuleCounts
from .incidents import IncidentLog
from .rates import Rate, RateLike, parse_rates

__all__ = ["ConcurrencyLimitExceeded", "Limiter", "Decision", "Slot", "as_limiter", "parse_storage_url",
           "shm_unlink"]

logger = logging.getLogger("rategate")

FAILURE_MODES = ("closed", "open")
# Rules (and their specs) registered per limiter for reset_client(): labels,
# and distinct specs per label (a limits callable's plans).
MAX_REGISTERED_RULES = 4096
MAX_REGISTERED_SPECS = 1024
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


class Submit(Protocol):
    """``Limiter.submit``: a Decision when the store answers at once (memory://,
    the deny cache, a lease, a store known to be down), else a future of one.
    ``slot_id``: the concurrency slot to take, for a spec with a concurrency limit."""

    def __call__(self, key: Union[str, bytes], spec: Spec, cost: int, slot_id: Union[str, bytes] = ...,
                 /) -> Union[Decision, "asyncio.Future[Decision]"]: ...


_PASSWORD_IN_QUERY = re.compile(r"((?:^|[?&])sentinel_password=)[^&]*")


def shown_url(url: str) -> str:
    """``url`` with its passwords (the userinfo's, sentinel_password) replaced by ``***``."""
    try:
        u = urlsplit(url)
        password = u.password
    except ValueError:
        return "<a storage URL that does not parse>"
    out = url
    if password is not None:
        userinfo = u.netloc.rpartition("@")[0]
        name, _, _ = userinfo.partition(":")
        out = out.replace(userinfo + "@", f"{name}:***@", 1)
    return _PASSWORD_IN_QUERY.sub(r"\1***", out)


def new_slot_id() -> bytes:
    """A concurrency slot id unique across processes and servers (96 random
    bits; fork-safe: os.urandom has no state a child shares)."""
    return os.urandom(12)


class ConcurrencyLimitExceeded(Exception):
    """``Limiter.concurrency()`` was denied: ``limit`` slots of ``key`` are held.

    ``decision`` is the core's answer: ``decision.error`` is set when the
    store could not be asked (and the failure mode is ``"closed"``);
    ``decision.retry_after`` is a hint (1 second: slots are usually given
    back long before their ttl).
    """

    def __init__(self, key: Union[str, bytes], limit: int, decision: Decision) -> None:
        self.key = key
        self.limit = limit
        self.decision = decision
        why = f" ({decision.error})" if decision.error else ""
        super().__init__(f"concurrency limit of {limit} reached for {key!r}{why}")


class Slot:
    """A concurrency slot held (``async with limiter.concurrency(...) as slot``).

    ``slot.decision`` is the answer that granted it.  :meth:`release` gives
    it back at once (idempotent; the ``async with`` block does it on exit,
    also when the block raises or is cancelled).  A process that dies
    holding it leaks it for at most the ``ttl`` it was taken with.
    """

    __slots__ = ("limiter", "key", "spec", "id", "decision", "_held")

    def __init__(self, limiter: "Limiter", key: Union[str, bytes], spec: Spec, decision: Decision) -> None:
        self.limiter = limiter
        self.key = key
        self.spec = spec
        self.id = new_slot_id()
        self.decision = decision
        self._held = False

    def release(self) -> None:
        """Give the slot back (fire and forget; idempotent)."""
        if self._held:
            self._held = False
            self.limiter._release_held(self.key, self.spec, self.id)

    async def __aenter__(self) -> "Slot":
        lim = self.limiter
        r = lim.submit(self.key, self.spec, 1, self.id)  # one token of the rates, if any
        d = r if type(r) is Decision else await r
        self.decision = d
        if not d.allowed:
            raise ConcurrencyLimitExceeded(self.key, self.spec.concurrency, d)
        self._held = True
        lim._took_slot()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

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


SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_MAX_SEEDS = 16  # csrc/engine.h RG_MAX_SEEDS


def _host_port(url: str, text: str, default: int, what: str) -> Tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` of a multi-host URL; ValueError naming it."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad storage URL {url!r}: {what} {text!r} has no closing ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad storage URL {url!r}: {what} {text!r}: write [address]:port")
        port_text = rest[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not host:
        raise ValueError(f"bad storage URL {url!r}: {what} {text!r} has no host")
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(
            f"bad storage URL {url!r}: {what} {text!r}: the port must be a number from 1 to 65535"
        )
    return host, int(port_text)


def _multi_host(url: str, u: Any, default: int, what: str, example: str
                ) -> Tuple[Optional[str], Optional[str], List[Tuple[str, int]]]:
    """(user, password, [(host, port), ...]) of a URL naming several hosts."""
    userinfo, at, hosts = u.netloc.rpartition("@")
    user: Optional[str] = None
    password: Optional[str] = None
    if at:
        name, colon, pw = userinfo.partition(":")
        user = unquote(name) or None
        password = unquote(pw) if colon else None
    if not hosts:
        raise ValueError(f"bad storage URL {url!r}: no {what}; write it like {example}")
    seeds = [_host_port(url, h, default, f"the {what}") for h in hosts.split(",")]
    if len(seeds) > _MAX_SEEDS:
        raise ValueError(f"bad storage URL {url!r}: {len(seeds)} {what}s, at most {_MAX_SEEDS}")
    return user, password, seeds


def _query(url: str, u: Any, scheme: str, allowed: Tuple[str, ...]) -> Dict[str, str]:
    query = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    unknown = set(query) - set(allowed)
    if unknown:
        bad = sorted(unknown)[0]
        tls_scheme = scheme.replace("redis+", "rediss+")
        hint = f"; TLS options need {tls_scheme}://" if bad in SSL_OPTIONS and tls_scheme != scheme else ""
        raise ValueError(
            f"bad storage URL {url!r}: unknown option {bad!r}; {scheme}:// takes "
            f"{', '.join(allowed) or 'no options'}{hint}"
        )
    return query


def _parse_cluster_url(url: str, u: Any, scheme: str, ssl: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """redis+cluster://[user:pass@]n1:7000,n2:7001[/0][?ssl_...]."""
    user, password, seeds = _multi_host(url, u, 6379, "cluster node",
                                        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    if u.path.strip("/") not in ("", "0"):
        raise ValueError(
            f"bad storage URL {url!r}: Redis Cluster has only database 0; drop the path {u.path!r}"
        )
    query = _query(url, u, scheme, SSL_OPTIONS if scheme == "rediss+cluster" else ())
    tls: Dict[str, Any] = {"tls": False}
    if scheme == "rediss+cluster":
        tls = tls_options(query, ssl or {}, url)
    return {"kind": "redis", "host": None, "port": 0, "path": None, "username": user,
            "password": password, "db": 0, "seeds": seeds, "cluster": True, **tls}


def _parse_sentinel_url(url: str, u: Any, scheme: str, ssl: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """redis+sentinel://[user:pass@]s1:26379,s2:26379/name[/db][?sentinel_password=...]."""
    user, password, sentinels = _multi_host(
        url, u, 26379, "Sentinel", "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/0")
    parts = u.path.split("/")[1:] if u.path else []
    if parts and parts[-1] == "":
        parts.pop()
    if not parts or not parts[0]:
        raise ValueError(
            f"bad storage URL {url!r}: no master name; the path names the service Sentinel "
            "monitors: redis+sentinel://host:26379/mymaster/0"
        )
    if len(parts) > 2:
        raise ValueError(f"bad storage URL {url!r}: the path is /<master name>[/<db>], got {u.path!r}")
    service = unquote(parts[0])
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"bad storage URL {url!r}: the database {parts[1]!r} must be a number, like /0")
        db = _db(url, parts[1])
    query = _query(url, u, scheme, SENTINEL_OPTIONS + (SSL_OPTIONS if scheme == "rediss+sentinel" else ()))
    tls: Dict[str, Any] = {"tls": False}
    if scheme == "rediss+sentinel":
        tls = tls_options({k: v for k, v in query.items() if k in SSL_OPTIONS}, ssl or {}, url)
    return {"kind": "redis", "host": None, "port": 0, "path": None, "username": user,
            "password": password, "db": db, "seeds": sentinels, "service": service,
            "sentinel_username": query.get("sentinel_username") or None,
            "sentinel_password": query.get("sentinel_password"), **tls}


# shm://NAME (csrc/shmstore.c): the segment /dev/shm/rategate.NAME.
SHM_NAME_MAX: int = _core.SHM_NAME_MAX
_SHM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SHM_MAX_CAPACITY = 100_000_000


def shm_name(name: Any) -> str:
    """``name`` if it can name a shm:// segment; ValueError naming it otherwise."""
    if not isinstance(name, str) or not 1 <= len(name) <= SHM_NAME_MAX or not _SHM_NAME.match(name):
        raise ValueError(
            f"bad shm name {name!r}: 1 to {SHM_NAME_MAX} letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (the segment is /dev/shm/rategate.NAME)"
        )
    return name


def _parse_shm_url(url: str, u: Any) -> Dict[str, Any]:
    """shm://NAME[?capacity=N]: a shared memory segment of this host."""
    example = "write it like shm://myapp or shm://myapp?capacity=100000"
    if u.path or not u.netloc:
        raise ValueError(
            f"bad storage URL {url!r}: shm:// takes one NAME and no path ({example})"
            if u.netloc else f"bad storage URL {url!r}: no NAME after shm:// ({example})"
        )
    try:
        name = shm_name(unquote(u.netloc))
    except ValueError as e:
        raise ValueError(f"bad storage URL {url!r}: {e}") from None
    query = _query(url, u, "shm", ("capacity",))
    capacity = 0  # the existing segment's, or the default for a new one
    if "capacity" in query:
        v = query["capacity"].replace("_", "")
        if not v.isdigit() or not 1 <= int(v) <= _SHM_MAX_CAPACITY:
            raise ValueError(
                f"bad storage URL {url!r}: capacity={query['capacity']!r} must be a number of "
                f"buckets from 1 to {_SHM_MAX_CAPACITY:,} (default {_core.SHM_DEFAULT_CAPACITY}: "
                f"about {_core.shm_size(_core.SHM_DEFAULT_CAPACITY) >> 20} MiB)"
            )
        capacity = int(v)
    return {"kind": "shm", "name": name, "capacity": capacity}


def shm_unlink(name: str) -> bool:
    """Remove the segment of ``shm://NAME`` (the file /dev/shm/rategate.NAME).

    True if it was there, False if there was none.  Processes that have it
    open keep using it (and each other's buckets); the next process to open
    NAME makes a new, empty one.  So unlink once every process using it has
    stopped (a deploy that changes ``capacity``, a test), not under load.
    """
    return bool(_core.shm_unlink(shm_name(name)))


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
    if ssl and any(v is not None for v in ssl.values()) and scheme not in ("rediss", "rediss+sentinel", "rediss+cluster"):
        given = sorted(k for k, v in ssl.items() if v is not None)[0]
        raise ValueError(f"{given} is a TLS option: it needs a rediss:// (or rediss+sentinel://, rediss+cluster://) storage URL, got {url!r}")
    if scheme == "memory":
        if u.netloc or u.path or u.query:
            raise ValueError(f"bad storage URL {url!r}: memory:// takes nothing after it")
        return {"kind": "memory"}
    if scheme == "shm":
        return _parse_shm_url(url, u)
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
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _parse_sentinel_url(url, u, scheme, ssl)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _parse_cluster_url(url, u, scheme, ssl)
    if scheme == "redis+tls":
        raise ValueError(f"bad storage URL {url!r}: for TLS write rediss://")
    raise ValueError(
        f"bad storage URL {url!r}: unknown scheme {u.scheme!r}; use redis://, rediss://, redis+sentinel://, redis+cluster:// (rediss+ for TLS), unix://, shm://NAME or memory://"
    )


class Limiter:
    """Checks rate limits against a store.

    ``Limiter("redis://127.0.0.1:6379/0", timeout=0.05, failure_mode="closed")``;
    also ``rediss://`` (TLS), ``redis+sentinel://s1:26379,s2:26379/mymaster/0``
    (the master Sentinel names, followed across failovers),
    ``redis+cluster://n1:7000,n2:7001`` (Redis Cluster), ``rediss+sentinel://``
    and ``rediss+cluster://``, ``unix:///path.sock``, ``memory://``, and
    ``shm://NAME[?capacity=N]`` (every process of this host that opens NAME
    shares its buckets in a shared memory segment, decided at once in C; see
    docs/shm.md).

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
      ``rediss://`` (``rediss+sentinel://``, ``rediss+cluster://``) URL (redis-py's names; they may also be given in the
      URL's query).  By default the server is verified against the system
      CA store and its certificate must name the host.
    * ``spin``: while Redis owes replies, the loop thread may poll (yielding
      the CPU each turn) for up to this many seconds instead of sleeping, so
      handing it a check costs no wake-up syscall.  It polls only while that
      pays: a core is idle, replies come within this window, and recent
      polls caught submits; so this is the upper bound.  0 disables it.
    * ``lease``: the default of :meth:`compile`'s ``lease`` (and so of every
      rule and dependency using this limiter that does not say): hot keys
      answered from tokens leased from Redis, in C, without a round trip.
      Off by default; see :meth:`compile`.

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
        lease: bool = False,
    ) -> None:
        timeout = _seconds("timeout", timeout, 1e-6, _MAX_SECONDS)
        if not isinstance(lease, bool):
            raise ValueError(f"lease must be True or False, got {lease!r}")
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
        self.connect_timeout = connect_timeout
        self._closed = True  # until the engine exists (__del__, __repr__ rely on it)
        cfg = parse_storage_url(storage, {
            "ssl_ca_certs": ssl_ca_certs, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile,
            "ssl_cert_reqs": ssl_cert_reqs, "ssl_check_hostname": ssl_check_hostname,
        })
        self.timeout = float(timeout)
        self.failure_mode = failure_mode
        self.kind = cfg["kind"]
        self.lease = lease
        self._specs: Dict[Any, Spec] = {}
        # The rules of the middlewares and dependencies using this limiter, by
        # label (what stats()["rules"] shows): (rule part of the store key,
        # the distinct specs checked), for reset_client() (see _register).
        self._rules: Dict[str, Tuple[str, List[Spec]]] = {}
        #: The store's failures, logged as incidents (rategate.incidents).
        self.incidents = IncidentLog(shown_url(storage), self.stats)
        self._startup: Optional[Tuple[int, int]] = None
        # Per-rule decision counts of the middlewares and dependencies using
        # this limiter (rategate.counts), by rule label; in stats()["rules"].
        self._rule_counts: Dict[str, RuleCounts] = {}
        # escaped rule name -> its key function's redact (rategate.denials):
        # how stats()["top_denied"] shows that rule's clients.
        self._redacts: Dict[str, Any] = {}
        self._closed = False
        if cfg["kind"] == "memory":
            self._engine: Any = _core.MemoryEngine(failure_mode == "open")
        elif cfg["kind"] == "shm":
            # Decided in the caller's thread; `timeout` bounds the wait for a
            # lock that a stopped process holds.
            self._engine = _core.ShmEngine(cfg["name"], cfg["capacity"], failure_mode == "open", timeout)
        else:
            self._engine = _core.Engine(
                cfg["host"], cfg["port"], cfg["path"], cfg["username"], cfg["password"], cfg["db"],
                timeout, failure_mode == "open", threads, max_pending, deny_cache,
                connect_timeout, stall_timeout, spin, deny_cache_ttl,
                **{k: cfg[k] for k in ("tls", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                                       "ssl_verify", "ssl_check_hostname", "seeds", "service",
                                       "sentinel_username", "sentinel_password", "cluster")
                   if k in cfg},
            )
        self._slots_held = 0  # concurrency slots this process holds (stats()["slots_held"])
        self._closed = False
        # The hot path: bound once, called per request.
        self.submit: Submit = self._engine.submit
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
        return f"Limiter({shown_url(self.storage)!r}, timeout={self.timeout}, failure_mode={self.failure_mode!r})"

    def compile(
        self, rates: Union[RateLike, Spec, None], *, concurrency: int = 0, ttl: float = 60.0,
        lease: Optional[bool] = None,
    ) -> Spec:
        """Compile rates once (cache the result): "10/second; 1000/hour", a Rate or a list.

        ``concurrency``: also at most this many requests of one key in flight
        at once (0: no such limit), each slot held for at most ``ttl``
        seconds if its holder dies; ``rates`` may then be None (only the
        concurrency limit).  A check of such a spec takes a slot id
        (:meth:`concurrency` and the middleware do that).

        ``lease`` (default: the Limiter's ``lease``): for a hot key (one
        global limit that every request hits), each process takes a block of
        tokens from Redis in one check and answers checks of cost 1 from it
        in C, with no round trip.  The block is about 100 ms of this
        process's own rate of that key, at most a sixteenth of the smallest
        burst, and usable for a quarter of the shortest time a rate takes to
        refill its bucket (its period when burst = limit; at most 1 s); what is left is given back.  Never more than the limit is
        admitted across all processes (from a full bucket: at most burst +
        rate * t by time t); tokens parked in other processes' leases can
        deny what a lone process would allow, by at most a sixteenth of the
        burst per process.  Not with ``concurrency``.  memory:// answers
        every check locally already and ignores it.
        """
        if isinstance(rates, Spec):
            return rates
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 0:
            raise ValueError(f"concurrency must be an int >= 1 (0: none), got {concurrency!r}")
        if lease is None:
            lease = self.lease if not concurrency else False
        elif not isinstance(lease, bool):
            raise ValueError(f"lease must be True or False, got {lease!r}")
        if concurrency:
            ttl = _seconds("ttl", ttl, 0.001, _MAX_SECONDS)
        key: Any = rates if isinstance(rates, (str, Rate)) else None
        if lease != self.lease and key is not None:
            key = (rates, "lease" if lease else "no lease")
        if concurrency and (rates is None or key is not None):
            key = (rates, concurrency, ttl, lease)
        if key is not None:
            spec = self._specs.get(key)
            if spec is not None:
                return spec
        if rates is None and not concurrency:
            raise ValueError("rates must be given (like \"10/minute\"), or a concurrency limit")
        parsed = () if rates is None else tuple(parse_rates(rates))
        if concurrency:
            spec = Spec(parsed, concurrency=concurrency, ttl=ttl, lease=lease)
        else:
            spec = Spec(parsed, lease=lease)
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
        if type(r) is Decision:
            return r
        return await r

    async def charge(self, key: Union[str, bytes], rates: Union[RateLike, Spec], cost: int) -> Decision:
        """Consume ``cost`` tokens of ``key``'s buckets for ``rates`` without denying.

        For costs known only afterwards (the tokens of an LLM call): check
        first with an estimate, then charge the difference.  A bucket may go
        into debt: later checks are denied until it has refilled.  A
        negative cost refunds, never beyond a full bucket.  The Decision is
        always allowed (its ``remaining`` and ``reset_after`` describe the
        bucket after the charge) unless the store could not be reached
        (``error`` set; nothing was charged).  Not counted in ``stats()``'s
        checks.
        """
        try:
            spec = self._specs[rates]
        except (KeyError, TypeError):
            spec = self.compile(rates)
        r = self._engine.charge(key, spec, cost)
        if r.__class__ is Decision:
            return r
        return await r  # type: ignore[no-any-return]

    def charge_nowait(self, key: Union[str, bytes], rates: Union[RateLike, Spec], cost: int) -> None:
        """:meth:`charge`, fire and forget (from sync code, or when nobody
        needs the answer): the store is asked, nothing waits for it.  Needs a
        running event loop for a Redis limiter."""
        try:
            spec = self._specs[rates]
        except (KeyError, TypeError):
            spec = self.compile(rates)
        self._engine.charge(key, spec, cost)

    def concurrency(
        self, key: Union[str, bytes], limit: Optional[int] = None, ttl: float = 60.0,
        *, rates: Union[RateLike, Spec, None] = None,
    ) -> Slot:
        """At most ``limit`` holders of ``key`` at once, across every process sharing the store.

        ``async with limiter.concurrency("user:42", limit=4, ttl=60) as slot: ...``

        Entering takes a slot in one round trip (batched with other checks)
        or raises :class:`ConcurrencyLimitExceeded`; leaving gives it back,
        fire and forget, also when the block raises or is cancelled.  A
        process that dies holding slots leaks them for at most ``ttl``
        seconds (the store prunes expired slots in the same call).
        ``rates``: also check (and consume one token of) these rates in the
        same call: if either limit denies, neither is consumed.  ``limit``
        may be left out when ``rates`` is a Spec compiled with a concurrency.
        """
        if isinstance(rates, Spec) and limit is None:
            spec = rates
        else:
            if limit is None or isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"concurrency(): limit must be an int >= 1, got {limit!r}")
            spec = self.compile(rates, concurrency=limit, ttl=ttl)
        if not spec.concurrency:
            raise ValueError("concurrency(): the spec has no concurrency limit; give limit=")
        return Slot(self, key, spec, None)  # type: ignore[arg-type]

    def release(self, key: Union[str, bytes], spec: Spec, slot_id: Union[str, bytes]) -> None:
        """Give back concurrency slot ``slot_id`` of ``key`` (fire and forget:
        nothing waits for the store; a slot that cannot be given back expires
        after its ttl)."""
        self._engine.release(key, spec, slot_id)

    def unlink(self) -> bool:
        """shm:// only: remove the segment's name (:func:`shm_unlink`); True
        if it was there.  This Limiter, and every process that has the
        segment open, keep using it; the next to open the NAME makes a new one."""
        if self.kind != "shm":
            raise ValueError(f"unlink() is for shm:// limiters (a segment to remove); this one is {self.storage!r}")
        return bool(self._engine.unlink())

    # The count of slots this process holds (stats()["slots_held"]), kept by
    # Slot and the middleware around the slots they take and give back.
    def _took_slot(self) -> None:
        self._slots_held += 1

    def _release_held(self, key: Union[str, bytes], spec: Spec, slot_id: Union[str, bytes]) -> None:
        self._slots_held -= 1
        self._engine.release(key, spec, slot_id)

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

    # -- the operator's side (store-key layout: rategate.admin) ----------------------
    async def connect(self) -> None:
        """Connect now, instead of on the first check: returns once the store
        has answered (Redis: every shard's connection is ready and the script
        loaded; Sentinel: the master it names confirmed; Cluster: the slot map
        read and every master connected).  memory:// returns at once.

        Raises ``ConnectionError`` naming the URL (password hidden) and the
        cause when it cannot within ``connect_timeout``; the engine keeps
        reconnecting after that, and checks meanwhile get the failure mode.
        The middleware calls it at the ASGI lifespan startup; an app that uses
        only the FastAPI dependency calls it from its own lifespan.
        """
        connect = getattr(self._engine, "connect", None)
        if connect is None:  # memory://: nothing to connect to
            return
        try:
            await connect(self.connect_timeout)
        except (ConnectionError, TimeoutError, OSError) as e:
            raise ConnectionError(
                f"rategate could not connect to {shown_url(self.storage)} within connect_timeout "
                f"({self.connect_timeout:g}s): {e}"
            ) from None

    async def clear(self) -> int:
        """Remove every bucket and concurrency slot set this limiter's store
        holds under rategate's key prefix (``rg:``), of every rule and client;
        returns how many keys went.  For tests and emergencies: O(keys in the
        store).  Redis: ``SCAN MATCH rg:*`` (never ``KEYS``) on the server,
        the Sentinel's master, or every master of a Cluster, and ``DEL``; this
        process's over-limit cache and leases are emptied too, other
        processes' deny a key they cached for at most their
        ``deny_cache_ttl``.  memory://: the table is emptied at once.
        ``ConnectionError`` when the store cannot be reached.
        """
        from .admin import clear

        return await clear(self)

    async def reset_client(self, client: Union[str, bytes], *, rule: Optional[str] = None,
                           namespace: Optional[str] = None, slots: bool = False) -> List[bytes]:
        """Give ``client`` a full bucket again, by the key the key function
        returns (``"203.0.113.9"``, an API key) and a rule's name or path as
        written (``"default"``, ``"/api/chat"``, ``"POST /login"``; the FastAPI
        dependency's ``"dep:GET /items/{item_id}"``; the labels of
        ``stats()["rules"]``), without knowing how store keys are made.

        ``rule=None``: every rule.  ``namespace``: the middleware's
        ``namespace=`` (or write ``rule="ns:name"``); with ``rule=None``,
        every rule of that namespace.  A rule this process's middlewares and
        dependencies use is reset exactly (its rates are known: one delete
        per rate, no scan); another rule, or every rule, is found by scanning
        the store (O(keys): memory:// looks at its own table; Redis scans
        with SCAN MATCH on every master).  Concurrency slots are left alone
        (they are requests in flight) unless ``slots=True``: then the
        client's slot sets are deleted too on Redis (for a client locked out
        by slots that requests of a dead process hold; ``rategate reset``
        does this); memory:// and shm:// keep theirs (requests in flight on
        this host).  Returns the Redis keys reset (the same layout names
        memory://'s buckets).  ``ConnectionError`` when the store cannot be
        reached.
        """
        from .admin import reset_client

        if not isinstance(slots, bool):
            raise ValueError(f"reset_client: slots must be True or False, got {slots!r}")
        return await reset_client(self, client, rule, namespace, slots)

    def _register(self, label: str, part: str, spec: Any) -> None:
        """A middleware or dependency checks rule ``label`` (its stats label)
        with store keys ``part`` + "|" + client and ``spec``: remembered for
        reset_client() (bounded; a limits callable adds one spec per plan)."""
        if not isinstance(spec, Spec):
            return
        entry = self._rules.get(label)
        if entry is None:
            if len(self._rules) >= MAX_REGISTERED_RULES:
                return
            entry = self._rules[label] = (part, [])
        specs = entry[1]
        if spec not in specs and len(specs) < MAX_REGISTERED_SPECS:
            specs.append(spec)

    def _shown_url(self) -> str:
        return shown_url(self.storage)

    async def _startup_connect(self) -> None:
        """:meth:`connect` at an ASGI lifespan startup: once per process and
        event loop, however many middlewares share this limiter; when the store
        cannot be reached, one warning (the URL, password hidden, and the
        cause), and the app starts anyway: the failure mode answers meanwhile."""
        try:
            here = (os.getpid(), id(asyncio.get_running_loop()))
        except RuntimeError:  # pragma: no cover - called from a running loop only
            here = (os.getpid(), 0)
        if self._startup == here:
            return
        self._startup = here
        try:
            await self.connect()
        except ConnectionError as e:
            treated = "let through" if self.failure_mode == "open" else "refused"
            logger.warning("%s; starting anyway: until it answers, limited requests are %s "
                           "(failure_mode=%r)", e, treated, self.failure_mode)

    def stats(self) -> Dict[str, Any]:
        """Counters: checks, allowed, denied, cached_denials, leased (allowed from a lease, with no
        round trip), errors by kind, in_flight, reconnects,
        connected; ``slots_held``: concurrency slots this process holds now; and ``rules``: per rule label, the decisions of the middlewares and FastAPI
        dependencies using this limiter, by outcome (see :mod:`rategate.counts`).

        The denial summary of this process (csrc/topk.h): ``top_denied``, the
        16 keys denied most since the process started (Space-Saving over 64
        counters: a key denied more than 1/64 of all denials is always
        there), most first, each ``{"rule", "client", "denials",
        "overcount"}`` (``denials`` over-counts by at most ``overcount``; a
        secret key shown as its key function's ``redact`` says, see
        :mod:`rategate.denials`); ``denials_summarized``, the denials fed to
        it; ``denied_clients_1m``, an estimate (HyperLogLog, about 3 %) of the
        distinct clients denied in the last minute."""
        stats: Dict[str, Any] = self._engine.stats()
        if "top_denied" in stats:
            from .denials import describe_top

            stats["top_denied"] = describe_top(stats["top_denied"], self._redacts)
        stats["slots_held"] = self._slots_held
        stats["rules"] = {name: c.as_dict() for name, c in list(self._rule_counts.items())}
        return stats

    async def buckets(self, client: Union[str, bytes], *, rule: Optional[str] = None,
                      namespace: Optional[str] = None) -> List[Any]:
        """The buckets of ``client`` (the key the key function returns: an IP
        address, ``x-api-key=<value>``) under every rule, or ``rule`` (its name
        or label, as ``reset_client`` takes it), across every process sharing
        the store: a list of :class:`rategate.buckets.Bucket` (rule, rate,
        tokens left now, time to full, retry-after; concurrency slots held).
        A client with full buckets has none (a full bucket leaves nothing in
        the store).  Redis: found with ``SCAN`` (never ``KEYS``) on every
        master, O(keys in the store); memory:// and shm://: the engine's
        table.  ``ConnectionError`` when the store cannot be reached."""
        from .buckets import buckets

        return await buckets(self, client, rule, namespace)

    async def blocked(self, *, rule: Optional[str] = None, namespace: Optional[str] = None,
                      limit: int = 100, budget: float = 10.0) -> Tuple[List[Any], bool]:
        """The clients over a limit right now (a request of cost 1 would be
        denied), across every process sharing the store, most blocked (the
        longest retry-after) first, at most ``limit``: ``(buckets,
        complete)``.  Redis: ``SCAN`` with the key prefix (of ``rule``, or of
        ``namespace``'s rules) on every master, never ``KEYS``; it stops after
        ``budget`` seconds, or when a master cannot be scanned, with
        ``complete`` False."""
        from .buckets import blocked

        return await blocked(self, rule, namespace, limit, budget)

    def _redact_keys(self, escaped_rule: str, redact: Any) -> None:
        """Show the clients of rule ``escaped_rule`` (its name as in the
        store key) through ``redact`` in stats()["top_denied"]."""
        if len(self._redacts) < MAX_RULE_LABELS:
            self._redacts[escaped_rule] = redact

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
