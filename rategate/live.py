"""Limits that change without a redeploy: read from a file, or from a Redis hash.

::

    limits = rategate.LiveLimits.from_file("/etc/rategate/limits.toml")
    app.add_middleware(
        rategate.RateLimitMiddleware, limiter=limiter,
        limits=limits.rule("default", "100/minute"),
        rules=[rategate.Rule("/api/chat", limits.rule("chat", "10/minute"), name="chat")],
    )

with ``/etc/rategate/limits.toml``::

    default = "100/minute"
    chat = "20/minute; 500/day"
    export = "none"            # not limited

(or the same as a JSON object, ``limits.json``).  Edit the file (write a new
one and rename it over the old, as editors and config management do) and
every process uses the new limits within ``interval`` seconds (1): the file's
``stat()`` is checked at most that often, on the request path, and it is read
again only when its modification time, size or inode changed.  No thread, no
timer.

``LiveLimits.from_redis(limiter, "rategate:limits")`` reads a Redis hash
instead (``HSET rategate:limits chat "20/minute"``), through the limiter's
own connection, at most once per ``interval`` per process: a request that
finds the values older than that sends one ``HGETALL`` and goes on with the
values it has (nothing waits for Redis); the answer replaces them.

``rule(name, default)`` is a limits callable for the middleware, a ``Rule``
or the FastAPI dependency; ``get(name, default)`` the current value, for a
callable of your own (``lambda scope: limits.get("plan:" + plan_of(scope),
"10/minute")``).  ``default`` applies while the source does not name the
rule; without one, a file that does not name it is refused when the rule is
made.

A value is rates (``"10/second; 1000/hour"``) or ``"none"`` (or an empty
string, JSON ``null``, TOML ``false``): not limited.  A source with a bad
value is refused as a whole: the previous limits stay, and the logger
``rategate`` says once per change what was wrong and where.

**What happens to buckets when a rate changes.**  The rate is part of the
bucket's key (``rg:{<rule>|<client>}:100/60000``), so a new rate is a new
bucket: every client starts the new rate with a full bucket, including one
that was denied under the old rate.  The old buckets are left alone and
expire when they would have been full again; a change back to the old rate
within that time finds them as they were.  Carrying the level over exactly
would need the old rate in every check and a read of the old key in the
same script call; rategate does not do that today.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

from .rates import Rate, parse_rates

__all__ = ["LiveLimits"]

logger = logging.getLogger("rategate")

_NONE_WORDS = ("none", "")
_MISSING: Any = object()


def _value(name: str, v: Any, where: str) -> Optional[str]:
    """A source's value for rule ``name``: rates text (checked), or None (not limited)."""
    if v is None or v is False or (isinstance(v, str) and v.strip().lower() in _NONE_WORDS):
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if not isinstance(v, str):
        raise ValueError(f"{where}: {name!r} must be rates like \"100/minute\" or \"none\", got {v!r}")
    try:
        parse_rates(v)
    except ValueError as e:
        raise ValueError(f"{where}: {name!r}: {e}") from None
    return v.strip()


def _parse_file(path: str, data: bytes) -> dict[str, Optional[str]]:
    where = f"limits file {path}"
    if path.endswith(".json"):
        try:
            raw = json.loads(data)
        except ValueError as e:
            raise ValueError(f"{where}: not valid JSON: {e}") from None
    else:
        import tomllib

        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not valid TOML ({e}); write lines like chat = \"10/minute\", "
                             "or name the file .json for JSON") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: the top level must map rule names to rates, like {{\"chat\": \"10/minute\"}}")
    return {str(k): _value(str(k), v, where) for k, v in raw.items()}


class LiveLimits:
    """Named limits read from a source that changes at run time (see the module docstring).

    Make one with :meth:`from_file` or :meth:`from_redis`; share it between
    middlewares and dependencies.  Used from the event loop's thread.
    """

    def __init__(self, load: Callable[[], Optional[Mapping[str, Optional[str]]]], *, interval: float = 1.0,
                 what: str = "limits", clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 3600:
            raise ValueError(f"LiveLimits: interval must be a number of seconds from 0 to 3600, got {interval!r}")
        self._load = load
        self.interval = float(interval)
        self.what = what
        self.clock = clock
        self.values: dict[str, Optional[str]] = {}
        self._next = -float("inf")
        self.version = 0  # bumped whenever the values change
        self.error: Optional[str] = None  # why the last change was refused (None: it was taken)

    def __repr__(self) -> str:
        return f"LiveLimits({self.what}, {self.values!r})"

    # -- sources ------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, interval: float = 1.0,
                  clock: Callable[[], float] = time.monotonic) -> "LiveLimits":
        """Limits from a TOML (or, named ``*.json``, JSON) file, re-read when it changes.

        The file must exist and be valid now: a mistake raises ValueError
        (or OSError) here, at start-up, rather than at the first request."""
        path = os.fspath(path)
        seen: list[Any] = [None]

        def load() -> Optional[dict[str, Optional[str]]]:
            st = os.stat(path)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            if sig == seen[0]:
                return None  # unchanged
            with open(path, "rb") as f:
                data = f.read()
            seen[0] = sig
            return _parse_file(path, data)

        live = cls(load, interval=interval, what=f"file {path}", clock=clock)
        first = load()
        assert first is not None
        live._take(first)
        return live

    @classmethod
    def from_redis(cls, limiter: Any, key: str, *, interval: float = 1.0,
                   clock: Callable[[], float] = time.monotonic) -> "LiveLimits":
        """Limits from the Redis hash ``key`` in the limiter's store, read with
        ``HGETALL`` at most once per ``interval`` seconds per process, without
        waiting: until the first answer, each rule has its ``default``."""
        engine = getattr(limiter, "_engine", None)
        if getattr(limiter, "kind", None) != "redis" and not hasattr(engine, "command"):
            raise ValueError(
                f"LiveLimits.from_redis needs a Redis limiter (redis://, rediss://, unix://, Sentinel or "
                f"Cluster), got {limiter!r}; for one host, use LiveLimits.from_file")
        if not isinstance(key, str) or not key:
            raise ValueError(f"LiveLimits.from_redis: key must be the name of a Redis hash, got {key!r}")
        pending: list[Any] = [None]
        live: LiveLimits

        def done(fut: Any) -> None:
            pending[0] = None
            if fut.cancelled():
                return
            err = fut.exception()
            if err is not None:
                live._refuse(f"HGETALL {key}: {err}")
                return
            flat = fut.result() or []
            try:
                values = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)):
                          _value(str(k), v, f"Redis hash {key}") for k, v in zip(flat[::2], flat[1::2])}
            except ValueError as e:
                live._refuse(str(e))
                return
            live._take(values)

        def load() -> None:
            if pending[0] is None:  # one read in flight at a time
                try:
                    fut = limiter._engine.command(["HGETALL", key], key=key)
                except Exception as e:  # no running loop, a closed limiter: try again later
                    live._refuse(f"HGETALL {key}: {e}")
                    return None
                pending[0] = fut
                fut.add_done_callback(done)
            return None

        live = cls(load, interval=interval, what=f"Redis hash {key}", clock=clock)
        return live

    # -- reading -----------------------------------------------------------------
    def refresh(self) -> None:
        """Look at the source now if ``interval`` has passed since the last look."""
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.interval
        try:
            new = self._load()
        except (OSError, ValueError) as e:
            self._refuse(str(e))
            return
        if new is not None:
            self._take(new)

    def get(self, name: str, default: Any = _MISSING) -> Optional[str]:
        """The current limits of ``name`` (rates text, or None: not limited)."""
        self.refresh()
        values = self.values
        if name in values:
            return values[name]
        if default is _MISSING:
            raise KeyError(f"{self.what} does not name {name!r}; add it, or give a default")
        return default  # type: ignore[no-any-return]

    def rule(self, name: str, default: Any = _MISSING) -> Callable[[Any], Optional[str]]:
        """A limits callable ``(scope) -> rates | None`` for ``name``: give it as a
        middleware's ``limits``, a ``Rule``'s limits or the dependency's first
        argument.  ``default`` (rates, or None: not limited) applies while the
        source does not name it; without it, the source must name it now."""
        if default is not _MISSING and default is not None:
            if not isinstance(default, (str, Rate, list, tuple)):
                raise ValueError(f"LiveLimits.rule({name!r}): default must be rates like \"100/minute\" or "
                                 f"None, got {default!r}")
            parse_rates(default)
        elif default is _MISSING and name not in self.values:
            raise ValueError(f"{self.what} does not name {name!r}: add it (like {name} = \"100/minute\"), "
                             f"or give a default: limits.rule({name!r}, \"100/minute\")")

        def limits(scope: Any) -> Optional[str]:
            return self.get(name, default)

        limits.__qualname__ = limits.__name__ = f"LiveLimits.rule({name!r})"
        return limits

    # -- changes -----------------------------------------------------------------
    def _take(self, values: Mapping[str, Optional[str]]) -> None:
        if self.error is not None:
            logger.warning("rategate: %s is valid again; its limits are in use", self.what)
        self.error = None
        if values != self.values:
            self.values = dict(values)
            self.version += 1

    def _refuse(self, why: str) -> None:
        if why != self.error:
            logger.error("rategate: %s was not taken, the previous limits stay: %s", self.what, why)
        self.error = why
