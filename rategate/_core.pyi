"""Types of the C extension rategate._core (see csrc/)."""

import asyncio
from typing import Any, Dict, FrozenSet, List, Literal, Optional, Sequence, Tuple, TypedDict, Union, final

from .rates import Rate

MAX_KEY: int
BATCH_MAX: int
SCRIPT: str

@final
class Decision:
    """The answer to one check (immutable)."""

    @property
    def allowed(self) -> bool:
        """Whether the check was allowed (its cost consumed)."""
    @property
    def limit(self) -> int:
        """The bucket size (burst) of the reported rate: with several rates,
        the one closest to its limit."""
    @property
    def remaining(self) -> int:
        """Tokens left in that rate's bucket after this check."""
    @property
    def reset_after(self) -> float:
        """Seconds until that bucket is full again."""
    @property
    def retry_after(self) -> float:
        """0 when allowed; else seconds until this cost would be allowed
        (``math.inf``: never, the cost is larger than the bucket)."""
    @property
    def error(self) -> Optional[str]:
        """None, or why the failure mode decided: ``"timeout"``,
        ``"unavailable"``, ``"overloaded"``, ``"closed"``, ``"redis_error"``."""
    @property
    def rate(self) -> int:
        """The index of the reported rate in the spec's rates (the number
        of rates: the concurrency limit)."""
    @property
    def latency(self) -> Optional[float]:
        """Seconds from submit to decision, stamped on the loop thread; None
        when answered at once (the deny cache, memory://, the failure mode)."""
    def __new__(
        cls,
        allowed: bool,
        limit: int,
        remaining: int,
        reset_after: float,
        retry_after: float,
        error: Optional[str] = None,
        rate: int = 0,
    ) -> "Decision": ...

@final
class Spec:
    """A compiled tuple of rates."""

    @property
    def rates(self) -> Tuple[Rate, ...]:
        """The rates, decided together (a denial by any consumes from none)."""
    @property
    def concurrency(self) -> int:
        """At most this many holders of a key at once (0: no such limit)."""
    @property
    def ttl(self) -> float:
        """Seconds a concurrency slot lives if its holder dies."""
    @property
    def lease(self) -> bool:
        """Whether checks of cost 1 are answered from leased tokens."""
    def __new__(cls, rates: Tuple[Rate, ...], /, *, concurrency: int = 0, ttl: float = 60.0,
                lease: bool = False) -> "Spec": ...

class ReplyError(Exception):
    """An error reply from the server to Engine.command(); str() is the server's text
    (match it on its prefix: "NOSCRIPT", "MOVED", "READONLY"...; servers word the rest
    differently)."""

# For annotations only (these names do not exist at run time).
class TopologyMaster(TypedDict):
    address: str  # "host:port" ("[v6]:port"), or the unix socket path
    connected: bool
    slots: List[Tuple[int, int]]  # [first, last] ranges on a cluster, else []

class Topology(TypedDict):
    kind: Literal["server", "sentinel", "cluster"]
    masters: List[TopologyMaster]
    sentinel: Optional[str]  # the Sentinel that last named the master

@final
class Engine:
    def __new__(
        cls,
        host: Optional[str],
        port: int,
        path: Optional[str],
        username: Optional[str],
        password: Optional[str],
        db: int,
        timeout: float,
        failure_open: bool,
        threads: int,
        max_pending: int,
        cache_size: int,
        connect_timeout: float,
        stall_timeout: float,
        spin: float = 0.0,
        deny_cache_ttl: float = 1.0,
        tls: bool = False,
        ssl_ca_certs: Optional[str] = None,
        ssl_certfile: Optional[str] = None,
        ssl_keyfile: Optional[str] = None,
        ssl_verify: bool = True,
        ssl_check_hostname: bool = True,
        seeds: Optional[List[Tuple[str, int]]] = None,
        service: Optional[str] = None,
        sentinel_username: Optional[str] = None,
        sentinel_password: Optional[str] = None,
        cluster: bool = False,
    ) -> "Engine": ...
    def submit(
        self, key: Union[str, bytes], spec: Spec, cost: int, slot_id: Union[str, bytes] = ..., /
    ) -> Union[Decision, "asyncio.Future[Decision]"]: ...
    def reset(self, key: Union[str, bytes], spec: Spec, /) -> Union[bool, "asyncio.Future[bool]"]: ...
    def charge(
        self, key: Union[str, bytes], spec: Spec, cost: int, /
    ) -> Union[Decision, "asyncio.Future[Decision]"]: ...
    def release(self, key: Union[str, bytes], spec: Spec, slot_id: Union[str, bytes], /) -> bool: ...
    def forget_local(self) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> Dict[str, Any]: ...
    def connect(self, timeout: Optional[float] = None, /) -> "asyncio.Future[None]":
        """Start the engine in this process if needed; resolves once the store has answered
        (every shard: the server; the Sentinels' master confirmed by ROLE; the slot map and
        every master of it connected).  ConnectionError naming the cause when connecting
        failed, or nothing answered within ``timeout`` (default connect_timeout); the
        engine goes on reconnecting either way."""
    def command(
        self,
        args: Sequence[Union[bytes, str, int]],
        /,
        *,
        key: Union[bytes, str, None] = None,
        node: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> "asyncio.Future[Any]":
        """One command, each argument a bulk string, to the master owning ``key``'s slot (the
        one server or Sentinel master when not a cluster), to the master ``node`` ("host:port"
        as topology() lists it), or with neither to any connected master.  The reply as
        Python: int, bytes (bulk), str (status), None (nil), list; an error reply raises
        ReplyError, no connection ConnectionError, ``timeout`` (default connect_timeout)
        TimeoutError.  MOVED/ASK are followed for a key-routed command.  Not a check: not
        counted, no deny cache."""
    def topology(self) -> Topology:
        """What the first loop thread knows of the store (a snapshot).  Before the engine
        ran, "masters" is empty; a single server is listed from then on, connected or not."""

@final
class MemoryEngine:
    def __new__(cls, failure_open: bool = False) -> "MemoryEngine": ...
    def submit(
        self, key: Union[str, bytes], spec: Spec, cost: int, slot_id: Union[str, bytes] = ..., /
    ) -> Decision: ...
    def reset(self, key: Union[str, bytes], spec: Spec, /) -> bool: ...
    def charge(self, key: Union[str, bytes], spec: Spec, cost: int, /) -> Decision: ...
    def release(self, key: Union[str, bytes], spec: Spec, slot_id: Union[str, bytes], /) -> bool: ...
    def clear(self) -> int: ...
    def close(self) -> None: ...
    def stats(self) -> Dict[str, Any]: ...
    def entries(self, prefix: Union[bytes, str] = b"", /) -> List[Tuple[bytes, bytes, float]]: ...

@final
class ShmEngine:
    """shm://NAME: buckets in a shared memory segment of this host (csrc/shmstore.c)."""

    def __new__(
        cls, name: str, capacity: int = 0, failure_open: bool = False, timeout: float = 0.05
    ) -> "ShmEngine": ...
    def submit(
        self, key: Union[str, bytes], spec: Spec, cost: int, slot_id: Union[str, bytes] = ..., /
    ) -> Decision: ...
    def reset(self, key: Union[str, bytes], spec: Spec, /) -> bool: ...
    def charge(self, key: Union[str, bytes], spec: Spec, cost: int, /) -> Decision: ...
    def release(self, key: Union[str, bytes], spec: Spec, slot_id: Union[str, bytes], /) -> bool: ...
    def clear(self) -> int: ...
    def entries(self, prefix: Union[bytes, str] = b"", /) -> List[Tuple[bytes, bytes, float]]: ...
    def unlink(self) -> bool: ...
    def close(self) -> None: ...
    def stats(self) -> Dict[str, Any]: ...
    def _test_fault(self, hold_ns: int, hang: int, /) -> None: ...

SHM_DEFAULT_CAPACITY: int
SHM_NAME_MAX: int

def shm_unlink(name: str, /) -> bool: ...
def shm_size(capacity: int, /) -> int: ...
def _shm_test_euid(uid: int, /) -> None: ...

@final
class Port:
    def _drain(self) -> None: ...

def _gcra_check(
    spec: Spec, now_us: float, cost: int, tats: List[float], charge: bool = False, /
) -> Tuple[int, int, int, int, int, int, List[float]]: ...
def _live() -> Dict[str, int]: ...

# The middleware's request path in C (csrc/pygate.c), built by RateLimitMiddleware.
@final
class GatePending:
    @property
    def future(self) -> "asyncio.Future[Decision]": ...
    @property
    def key(self) -> bytes: ...

@final
class GateSend:
    @property
    def record(self) -> List[Any]: ...
    def __call__(self, message: Any, /) -> Any: ...

@final
class Gate:
    def __new__(
        cls, exempt: FrozenSet[str], route_cache: Dict[str, Any], passed: Any, rules: Sequence[Tuple[Any, ...]],
        submit: Any, incidents: Any, key_digest: Any, sync_cached: bool, limiter: Any, record_key: str,
        failure_status: int, failure_headers: Tuple[Tuple[bytes, bytes], ...], failure_body: bytes, denials: Any, /
    ) -> "Gate": ...
    def __call__(self, scope: Any, send: Any, /) -> Union[None, Any, List[Any], GatePending]: ...
    def resume(self, pending: GatePending, decision: Decision, send: Any, /) -> Union[Any, List[Any]]: ...
