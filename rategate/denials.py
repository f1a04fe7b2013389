"""The denial log: who was limited, by which rule, on which path, like nginx's ``limit_req``.

Every denial the limiter enforces (a 429, a refused WebSocket handshake or
message; not shadow mode's would-be denials, not the failure mode's answers,
which :class:`rategate.middleware.FailureLog` reports) is offered to
:meth:`DenialLog.note`, and a bounded share of them become lines on the
logger ``rategate.denials``::

    limiting requests: rule "api", client 203.0.113.9, path "/api/search", retry after 12 s

- At most one line per client per rule per ``per_client`` seconds (60): the
  next line of that client says how many of its denials were left out.
- At most ``per_second`` lines per second in total (10, a token bucket with
  a burst of as many): a line after a stretch over that budget says how many
  denials of other clients were left out.  So a flood from any number of
  distinct clients writes at most ``per_second * (T + 1)`` lines in T
  seconds.
- Memory is bounded by the lines: a client is remembered only once it got a
  line, and only for ``per_client`` seconds, so at most
  ``per_second * (per_client + 1)`` clients (610 by default, each its rule
  and store key: at most a few hundred bytes).

**On by default**, at level ``WARNING``, as nginx logs ``limit_req``
denials at ``error`` by default: the question "who was limited, when, on
what" comes after the incident, when it is too late to switch a log on, and
the budget above makes the log's volume and memory small and fixed whatever
the traffic.  Turn it off per middleware (``denial_log=False``) or for the
process with logging's own switches
(``logging.getLogger("rategate.denials").setLevel(logging.ERROR)``); then a
denial costs one method call and a level check.

**Client keys.** IP addresses are logged as they are.  A key function whose
keys are secrets (an API key) says so with a ``redact`` attribute, a
callable from the key to the text shown: :func:`rategate.header` has one by
default (``header("x-api-key")`` keys are logged as ``x-api-key=#<hash of
the value>``), and :func:`hashed` makes any key function's keys logged as a
hash::

    def tenant(scope): ...
    tenant.redact = rategate.denials.hashed

The hash is 16 hex digits of BLAKE2b, the same in every process, so lines
about one client can be matched; it does not hide a key that can be guessed
(a user id), only one that cannot (a random API key).  ``Limiter.stats()``'s
``top_denied`` shows keys the same way.

Each line carries the fields for structured logging as ``extra``:
``rategate_rule``, ``rategate_client``, ``rategate_path``,
``rategate_retry_after`` (seconds; ``inf`` when the cost can never be
allowed).

The hook, for the middleware's Python path and its C path (csrc/gate.c)
alike, is one call per enforced denial::

    denial_log.note(rule_label, store_key, path, retry_after, redact)

``rule_label`` is the rule's label (``stats()["rules"]``'s); ``store_key``
the key given to ``submit`` (``"<rule>|<client>"`` or
``"<rule>#<digest>"``, bounded in length: the client shown is the part after
the first ``|`` or ``#``); ``path`` the request's path; ``redact`` the key
function's ``redact`` attribute or None.  It never raises and never blocks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Union

__all__ = ["DEFAULT", "DenialLog", "client_of", "hashed", "logger"]

logger = logging.getLogger("rategate.denials")

Key = Union[str, bytes]
Redact = Callable[[Key], str]

# What a line shows of a key or a path: longer text is cut here.
_SHOWN = 200


def hashed(key: Key) -> str:
    """``"#"`` + 16 hex digits of BLAKE2b of ``key``: how a secret key is shown.

    Give it to a key function as its ``redact`` attribute to have its keys
    logged (and shown in ``stats()``) as a hash."""
    data = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else bytes(key)
    return "#" + hashlib.blake2b(data, digest_size=8).hexdigest()


def _text(v: Key) -> str:
    """Printable text of a key or path from the network: never a newline
    or a control character in a log line (log injection), cut at _SHOWN."""
    s = v.decode("latin-1") if isinstance(v, (bytes, bytearray)) else str(v)
    if len(s) > _SHOWN:
        s = s[:_SHOWN] + "..."
    if s.isprintable():
        return s
    return s.encode("unicode_escape").decode("ascii")


def client_of(store_key: Key, redact: Redact | None = None) -> str:
    """The client part of a middleware's store key, as logs and ``stats()`` show it.

    ``"<rule>|<client>"`` -> the client (through ``redact`` if given);
    ``"<rule>#<digest>"`` (a client key longer than 200, hashed by the
    middleware) -> ``"#<digest>"``; a key with neither (``Limiter.hit()``
    with a key of your own) as it is."""
    bar, sharp = (b"|", b"#") if isinstance(store_key, (bytes, bytearray)) else ("|", "#")
    i, j = store_key.find(bar), store_key.find(sharp)  # type: ignore[arg-type]
    if j >= 0 and (i < 0 or j < i):
        return _text(store_key[j:])
    client = store_key[i + 1:] if i >= 0 else store_key
    if redact is not None:
        try:
            return _text(redact(client))
        except Exception:  # a broken redact must not leak the key, nor fail a request
            return hashed(client)
    return _text(client)


def describe_top(top: list[dict[str, Any]], redacts: dict[str, Redact]) -> list[dict[str, Any]]:
    """The core's ``top_denied`` entries ({"key", "denials", "overcount",
    "truncated"}) as ``Limiter.stats()`` shows them: {"rule", "client",
    "denials", "overcount"}, the client shown as the rule's key function
    wants (``redacts``: escaped rule name -> redact), never the raw key of
    a rule whose keys are secret."""
    from urllib.parse import unquote

    out = []
    for e in top:
        key = e["key"]
        i, j = key.find("|"), key.find("#")
        cut = min(x for x in (i, j) if x >= 0) if (i >= 0 or j >= 0) else -1
        escaped = key[:cut] if cut >= 0 else None
        client = client_of(key, redacts.get(escaped) if escaped is not None else None)
        if e.get("truncated"):
            client += " (cut)"
        out.append({"rule": unquote(escaped) if escaped is not None else None, "client": client,
                    "denials": e["denials"], "overcount": e["overcount"]})
    return out


class DenialLog:
    """Writes a bounded share of denials to ``logger`` (see the module docstring).

    ``per_client``: seconds between two lines about one client under one
    rule.  ``per_second``: lines per second in total (a token bucket with a
    burst of ``per_second``).  ``level``: the level of the lines.
    ``clock``: a monotonic clock in seconds (tests give a fake one).

    Used from the event loop's thread (the middleware's); the counters are
    plain ints, so several threads sharing one log may lose a count, never a
    bound.
    """

    __slots__ = ("per_client", "per_second", "level", "logger", "clock", "_seen", "_tokens", "_t",
                 "_over", "lines", "suppressed")

    def __init__(self, *, per_client: float = 60.0, per_second: float = 10.0, level: int = logging.WARNING,
                 logger: logging.Logger = logger, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(per_client, bool) or not isinstance(per_client, (int, float)) or not 0 <= per_client <= 86400:
            raise ValueError(f"DenialLog: per_client must be a number of seconds from 0 to 86400, got {per_client!r}")
        if (isinstance(per_second, bool) or not isinstance(per_second, (int, float))
                or not 0 < per_second <= 1_000_000):
            raise ValueError(f"DenialLog: per_second must be a number of lines above 0, got {per_second!r}")
        if isinstance(level, bool) or not isinstance(level, int):
            raise ValueError(f"DenialLog: level must be a logging level like logging.WARNING, got {level!r}")
        self.per_client = float(per_client)
        self.per_second = float(per_second)
        self.level = level
        self.logger = logger
        self.clock = clock
        # (rule, store key) -> [time its next line may be written, denials not
        # logged since its last line]; in insertion order, which is the order
        # of those times (every entry lives per_client), so the expired ones
        # are at the front.
        self._seen: OrderedDict[tuple[str, Key], list[Any]] = OrderedDict()
        self._tokens = self.per_second
        self._t = -math.inf
        self._over = 0  # denials left out for the line budget, since the last line
        self.lines = 0  # lines written
        self.suppressed = 0  # denials not written (either reason)

    def __repr__(self) -> str:
        return (f"DenialLog(per_client={self.per_client:g}, per_second={self.per_second:g}, "
                f"level={logging.getLevelName(self.level)!r})")

    def clear(self) -> None:
        """Forget who got a line and refill the budget (a test's fresh start:
        :data:`DEFAULT` is shared by the whole process)."""
        self._seen.clear()
        self._tokens = self.per_second
        self._t = -math.inf
        self._over = 0

    def note(self, rule: str, key: Key, path: str, retry_after: float, redact: Redact | None = None) -> None:
        """One enforced denial (see the module docstring for the arguments)."""
        if not self.logger.isEnabledFor(self.level):
            return
        now = self.clock()
        seen = self._seen
        e = seen.get((rule, key))
        if e is not None and e[0] > now:
            e[1] += 1
            self.suppressed += 1
            return
        tokens = self._tokens + (now - self._t) * self.per_second
        self._t = now
        if tokens < 1.0:
            self._tokens = tokens
            self._over += 1
            self.suppressed += 1
            return
        self._tokens = min(tokens, self.per_second) - 1.0
        # The front entries whose time has passed go: a bound on memory.
        while seen:
            first = next(iter(seen.values()))
            if first[0] > now:
                break
            seen.popitem(last=False)
        seen.pop((rule, key), None)
        seen[(rule, key)] = [now + self.per_client, 0]
        self._write(rule, key, path, retry_after, redact, e[1] if e is not None else 0)

    def _write(self, rule: str, key: Key, path: str, retry_after: float, redact: Redact | None,
               repeats: int) -> None:
        client = client_of(key, redact)
        if retry_after == math.inf:
            wait = "never (the cost is larger than the bucket)"
        else:
            wait = f"{retry_after:.2f}".rstrip("0").rstrip(".") + " s"
        msg = f'limiting requests: rule "{_text(rule)}", client {client}, path "{_text(path)}", retry after {wait}'
        if repeats:
            msg += f"; {repeats} more denials of this client since its last line"
        if self._over:
            msg += f"; {self._over} denials of other clients not logged (over {self.per_second:g} lines/s)"
            self._over = 0
        self.lines += 1
        try:
            self.logger.log(self.level, "%s", msg, extra={
                "rategate_rule": rule, "rategate_client": client, "rategate_path": path,
                "rategate_retry_after": retry_after})
        except Exception:  # pragma: no cover - a broken handler must not fail the request
            pass


#: The log every middleware and dependency writes to unless given another
#: (``denial_log=``): one budget for the process.
DEFAULT = DenialLog()


def denial_log_option(value: Any, who: str) -> DenialLog | None:
    """A middleware's ``denial_log=`` option: True (the process's
    :data:`DEFAULT`), False or None (off), or a :class:`DenialLog`."""
    if value is True:
        return DEFAULT
    if value is False or value is None:
        return None
    if isinstance(value, DenialLog) or (hasattr(value, "note") and callable(value.note)):
        return value  # type: ignore[no-any-return]
    raise TypeError(f"{who}: denial_log must be True (the default log), False (off) or a "
                    f"rategate.denials.DenialLog, got {value!r}")
