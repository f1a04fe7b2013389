"""Types of the C extension rategate._core (see csrc/)."""

import asyncio
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union, final

from .rates import Rate

MAX_KEY: int
BATCH_MAX: int
SCRIPT: str

@final
class Decision:
    """The answer to one check (immutable)."""

    @property
    def allowed(self) -> bool: ...
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_after(self) -> float: ...
    @property
    def retry_after(self) -> float: ...
    @property
    def error(self) -> Optional[str]: ...
    @property
    def rate(self) -> int: ...
    @property
    def latency(self) -> Optional[float]: ...
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
    def rates(self) -> Tuple[Rate, ...]: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def ttl(self) -> float: ...
    @property
    def lease(self) -> bool: ...
    def __new__(cls, rates: Tuple[Rate, ...], /, *, concurrency: int = 0, ttl: float = 60.0,
                lease: bool = False) -> "Spec": ...

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
    def close(self) -> None: ...
    def stats(self) -> Dict[str, Any]: ...

@final
class MemoryEngine:
    def __new__(cls, failure_open: bool = False) -> "MemoryEngine": ...
    def submit(
        self, key: Union[str, bytes], spec: Spec, cost: int, slot_id: Union[str, bytes] = ..., /
    ) -> Decision: ...
    def reset(self, key: Union[str, bytes], spec: Spec, /) -> bool: ...
    def charge(self, key: Union[str, bytes], spec: Spec, cost: int, /) -> Decision: ...
    def release(self, key: Union[str, bytes], spec: Spec, slot_id: Union[str, bytes], /) -> bool: ...
    def close(self) -> None: ...
    def stats(self) -> Dict[str, Any]: ...

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
    def headers(self) -> List[Tuple[bytes, bytes]]: ...
    def __call__(self, message: Any, /) -> Any: ...

@final
class Gate:
    def __new__(
        cls, exempt: FrozenSet[str], route_cache: Dict[str, Any], passed: Any, rules: Sequence[Tuple[Any, ...]],
        submit: Any, failures: Any, key_digest: Any, sync_cached: bool, /
    ) -> "Gate": ...
    def __call__(self, scope: Any, send: Any, /) -> Union[None, Any, List[Any], GatePending]: ...
    def resume(self, pending: GatePending, decision: Decision, send: Any, /) -> Union[Any, List[Any]]: ...
