"""The incident log: a store's failures, as the middleware and the dependency
meet them, written to the ``rategate`` logger as a few lines per incident.

One :class:`IncidentLog` per :class:`rategate.Limiter` (``limiter.incidents``),
shared by every middleware and dependency that uses it: an outage of one
store is one incident, however many rules meet it.

- An incident **starts** with the first decision that carries an ``error``
  (the failure mode decided: Redis down, past the deadline, overloaded...).
- It **ends** once the store has answered for :data:`RECOVERY` seconds (2 s)
  with no failure in between: the first answer without an error starts the
  clock, any failure stops it.  One lucky reply (a check sent just before
  Redis died and answered after) does not end it, and on a Redis Cluster
  whose one master is down the answers of the other masters do not end it
  while that master's checks keep failing.
- Its lines: the **start** (the cause, from the limiter's ``last_error``);
  a **"still failing"** line with the counts so far at most a minute apart
  while it lasts; and always an **end** line saying how long it lasted and
  what it cost (the failed checks by kind, and whether they were refused or
  let through).
- **Rate limited, never dropped**: at most :data:`LINE_BURST` lines at once
  and one more per :data:`LINE_EVERY` seconds after that (a token bucket).
  A line that has no token waits, and what it would have said is merged
  into the next line written: a flapping Redis writes about six lines a
  minute, and the end lines still count every incident and every failed
  check.

Lines are written when decisions are noted (no timer, nothing runs while no
request comes): under traffic, an incident's end line follows its recovery
by :data:`RECOVERY` seconds.  :meth:`IncidentLog.flush` writes what is
pending at once; the middleware calls it at the lifespan shutdown.

Not thread-safe beyond what the GIL gives (a line may be merged differently
when event loops in several threads note at once); it never raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["IncidentLog", "LINE_BURST", "LINE_EVERY", "RECOVERY", "STILL_EVERY"]

logger = logging.getLogger("rategate")

#: Seconds the store must answer, with no failure, for an incident to end.
RECOVERY = 2.0
#: A "still failing" line is due this long after the incident's last line.
#: Below a minute so that, delayed by the line budget, lines stay at most a minute apart.
STILL_EVERY = 50.0
#: The line budget: a burst of this many lines, then one per LINE_EVERY seconds.
LINE_BURST = 6
LINE_EVERY = 10.0

_WHY = {
    "timeout": "no answer within the check's deadline",
    "overloaded": "too many checks outstanding (max_pending)",
}


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


class _Incident:
    __slots__ = ("start", "wall", "err", "let_through", "counts", "ok_since", "end", "opened", "last_line")

    def __init__(self, now: float, wall: float, err: str, let_through: bool) -> None:
        self.start = now
        self.wall = wall
        self.err = err
        self.let_through = let_through  # failure_mode="open"
        self.counts: dict[str, int] = {}
        self.ok_since: float | None = None  # answering, with no failure, since
        self.end = 0.0  # when it started answering for good (set when it ends)
        self.opened = False  # its start line was written
        self.last_line = now

    def failed(self) -> int:
        return sum(self.counts.values())


class IncidentLog:
    """See the module docstring.  ``what``: the store as the lines name it (a
    URL without its password); ``cause``: a callable returning the limiter's
    ``stats()`` (its ``last_error`` names the cause), or None.  ``clock`` and
    ``wall``: monotonic and wall-clock time (tests give their own)."""

    def __init__(self, what: str, cause: Callable[[], Any] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        #: True while an incident is open or a line is pending: the request
        #: path calls note() for every decision then, and otherwise only for
        #: decisions with an error (one attribute test per request).
        self.active = False
        self.what = what
        self.cause = cause
        self.clock = clock
        self.wall = wall
        self.incident: _Incident | None = None
        self.ended: list[_Incident] = []  # ended, their end line not yet written
        self.tokens = float(LINE_BURST)
        self.tokens_at = clock()

    def __repr__(self) -> str:
        return f"IncidentLog({self.what!r}, active={self.active})"

    # -- the request path ----------------------------------------------------------
    def note(self, d: Any) -> None:
        """Note decision ``d``: call it for a decision with an error, and for every decision while :attr:`active`."""
        now = self.clock()
        err = d.error
        inc = self.incident
        if err is not None:
            if inc is None:
                inc = self.incident = _Incident(now, self.wall(), err, bool(d.allowed))
                self.active = True
            inc.counts[err] = inc.counts.get(err, 0) + 1
            inc.ok_since = None
        elif inc is not None:
            if inc.ok_since is None:
                inc.ok_since = now
            elif now - inc.ok_since >= RECOVERY:
                inc.end = inc.ok_since
                self.ended.append(inc)
                self.incident = None
        self._write(now, False)
        self.active = self.incident is not None or bool(self.ended)

    def flush(self) -> None:
        """Write every pending line now, budget or not (at shutdown); an open
        incident gets a line with its counts so far."""
        now = self.clock()
        if self.ended:
            self._line(self._ended(self.ended))
            self.ended = []
        inc = self.incident
        if inc is not None:
            self._line(self._still(inc, now, "at shutdown"))
            inc.opened = True
            inc.last_line = now
        self.active = inc is not None

    # -- lines -------------------------------------------------------------------------
    def _take(self, now: float) -> bool:
        t = min(float(LINE_BURST), self.tokens + (now - self.tokens_at) / LINE_EVERY)
        self.tokens_at = now
        if t < 1.0:
            self.tokens = t
            return False
        self.tokens = t - 1.0
        return True

    def _write(self, now: float, force: bool) -> None:
        """Write the lines that are due, while the budget allows (all, with ``force``)."""
        while True:
            inc = self.incident
            if self.ended:
                text = self._ended(self.ended)
            elif inc is not None and not inc.opened:
                text = self._opened(inc, now)
            elif inc is not None and now - inc.last_line >= STILL_EVERY:
                text = self._still(inc, now, "")
            else:
                return
            if not force and not self._take(now):
                return
            if self.ended:
                self.ended = []
            elif inc is not None:
                inc.opened = True
                inc.last_line = now
            self._line(text)

    @staticmethod
    def _line(text: str) -> None:
        logger.warning("%s", text)

    def _cause(self, err: str) -> str:
        if err == "timeout":
            return _WHY[err]
        try:
            stats = self.cause() if self.cause is not None else {}
        except Exception:  # a limiter closing in another thread: no cause, still a line
            stats = {}
        if err == "overloaded":  # shm:// says why (a full segment); Redis: max_pending
            return str(stats.get("overloaded_cause") or _WHY[err])
        last = stats.get("last_error")
        return str(last) if last else ""

    @staticmethod
    def _treated(inc: _Incident) -> str:
        return ("let through (failure_mode='open')" if inc.let_through
                else "refused (failure_mode='closed')")

    def _opened(self, inc: _Incident, now: float) -> str:
        cause = self._cause(inc.err)
        text = (f"rategate: {self.what} failed ({inc.err}{': ' + cause if cause else ''}); until it has "
                f"answered again for {RECOVERY:g}s, limited requests are {self._treated(inc)}")
        if now - inc.start >= 1.0:  # held back by the line budget
            text += (f"; failing since {_clock(inc.wall)} ({now - inc.start:.1f}s), "
                     f"failed checks so far: {_counts(inc.counts)}")
        return text

    def _still(self, inc: _Incident, now: float, when: str) -> str:
        cause = self._cause(inc.err)
        return (f"rategate: {self.what} still failing{' ' + when if when else ''} after {now - inc.start:.1f}s "
                f"(since {_clock(inc.wall)}{'; ' + cause if cause else ''}); failed checks so far: "
                f"{_counts(inc.counts)}, {self._treated(inc)}")

    def _ended(self, ended: list[_Incident]) -> str:
        if len(ended) == 1:
            inc = ended[0]
            return (f"rategate: {self.what} is answering again after an incident of {inc.end - inc.start:.1f}s "
                    f"(from {_clock(inc.wall)}); it cost {inc.failed()} failed checks "
                    f"({_counts(inc.counts)}), {self._treated(inc)}")
        counts: dict[str, int] = {}
        for inc in ended:
            for k, v in inc.counts.items():
                counts[k] = counts.get(k, 0) + v
        first, last = ended[0], ended[-1]
        span = sum(inc.end - inc.start for inc in ended)
        return (f"rategate: {self.what} is answering again after {len(ended)} incidents from "
                f"{_clock(first.wall)} to {_clock(last.wall + (last.end - last.start))} "
                f"({span:.1f}s failing in all); they cost {sum(counts.values())} failed checks "
                f"({_counts(counts)}), {self._treated(last)}")
