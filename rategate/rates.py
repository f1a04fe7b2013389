"""Rate strings: "100/minute", "100 per minute", "5/s", "10/5 seconds".

A :class:`Rate` is ``limit`` requests per ``period`` seconds, with a bucket of
``burst`` tokens (``burst`` defaults to ``limit``).  Parsing is strict: every
mistake raises ``ValueError`` naming the bad part and showing a good example,
because a typo in a rate string is a production outage waiting to happen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Union

__all__ = ["Rate", "RateLike", "parse_rates"]

_UNITS = {
    "ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}

# "<limit> (/|per) [<count>] <unit>"
_RATE_RE = re.compile(
    r"^\s*(?P<limit>\d+)\s*(?:/|\s+per\s+)\s*(?P<count>\d+(?:\.\d+)?)?\s*(?P<unit>[a-z]+)\s*$",
    re.IGNORECASE | re.ASCII,
)

_EXAMPLE = 'write it like "100/minute", "100 per minute", "5/s" or "10/5 seconds"'

# Bounds that keep the arithmetic exact in both C and Lua (doubles of
# microseconds): a period of at most a year, and at most 10^9 tokens.
_MAX_PERIOD = 366 * 86400.0
_MAX_LIMIT = 10**9
# ... and a bucket that refills within 10 years (burst * period / limit):
# past that, a stored time stops being an exact double and Redis's PX TTL
# leaves int64 milliseconds (gcra.h, RG_MAX_TAU_US).
_MAX_REFILL = 10 * 365 * 86400.0


@dataclass(frozen=True)
class Rate:
    """``limit`` requests per ``period`` seconds, bucket size ``burst``."""

    limit: int
    period: float
    burst: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            raise ValueError(f"Rate limit must be an int, got {self.limit!r}")
        if not 1 <= self.limit <= _MAX_LIMIT:
            raise ValueError(f"Rate limit must be between 1 and {_MAX_LIMIT}, got {self.limit}")
        if isinstance(self.period, bool) or not isinstance(self.period, (int, float)):
            raise ValueError(f"Rate period must be a number of seconds, got {self.period!r}")
        if not 0.001 <= float(self.period) <= _MAX_PERIOD:
            raise ValueError(
                f"Rate period must be between 0.001 and {_MAX_PERIOD:.0f} seconds, got {self.period}"
            )
        object.__setattr__(self, "period", float(self.period))
        burst = self.limit if self.burst is None else self.burst
        if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= _MAX_LIMIT:
            raise ValueError(f"Rate burst must be an int between 1 and {_MAX_LIMIT}, got {self.burst!r}")
        object.__setattr__(self, "burst", burst)
        if self.period * 1e6 / self.limit < 1.0:  # the C core's T >= 1 us, same arithmetic
            raise ValueError(f"Rate {self.limit}/{self.period:g}s is too fast: at most 1,000,000 per second")
        if burst * self.period / self.limit > _MAX_REFILL:
            raise ValueError(
                f"Rate {self.limit}/{self.period:g}s with burst {burst} takes more than 10 years to refill "
                "its bucket (burst * period / limit): use a smaller burst or a shorter period"
            )

    @classmethod
    def parse(cls, text: str) -> "Rate":
        """Parse one rate: ``"100/minute"``, ``"100 per minute"``, ``"10/5 seconds"``."""
        if not isinstance(text, str):
            raise ValueError(f"a rate must be a string like \"100/minute\", got {text!r}")
        m = _RATE_RE.match(text)
        if m is None:
            raise ValueError(f"bad rate string {text!r}: {_EXAMPLE}")
        unit = m.group("unit").lower()
        if unit not in _UNITS:
            raise ValueError(
                f"bad rate string {text!r}: unknown unit {m.group('unit')!r}; "
                "use one of ms, second (s), minute (m, min), hour (h), day (d)"
            )
        count = float(m.group("count")) if m.group("count") else 1.0
        if count <= 0:
            raise ValueError(f"bad rate string {text!r}: the period must be more than 0")
        limit = int(m.group("limit"))
        if limit < 1:
            raise ValueError(f"bad rate string {text!r}: the limit must be at least 1")
        try:
            return cls(limit, count * _UNITS[unit])
        except ValueError as e:
            raise ValueError(f"bad rate string {text!r}: {e}") from None

    @property
    def key_id(self) -> str:
        """The rate's part of a Redis key: changes whenever the rate does."""
        us = round(self.period * 1_000_000)
        # Whole milliseconds (every unit-based rate) keep the short form.
        per = str(us // 1000) if us % 1000 == 0 else f"{us}us"
        return f"{self.limit}/{per}" if self.burst == self.limit else f"{self.limit}/{per}b{self.burst}"

    def __str__(self) -> str:
        p = self.period
        for name, secs in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0), ("second", 1.0)):
            if p == secs:
                per = name
                break
            if p % secs == 0:
                per = f"{p / secs:g} {name}s"
                break
        else:
            per = f"{p:g} seconds"
        s = f"{self.limit}/{per}"
        return s if self.burst == self.limit else f"{s} (burst {self.burst})"


RateLike = Union[str, Rate, Iterable[Union[str, Rate]]]


def parse_rates(rates: RateLike) -> tuple[Rate, ...]:
    """Normalise a rate spec into a non-empty tuple of :class:`Rate`.

    Accepts ``"10/second; 1000/hour"`` (``;`` or ``,`` between rates), a
    :class:`Rate`, or a list of either.
    """
    out: list[Rate] = []
    if isinstance(rates, Rate):
        out.append(rates)
    elif isinstance(rates, str):
        parts = [p for p in re.split(r"[;,]", rates) if p.strip()]
        if not parts:
            raise ValueError(f"empty rate string {rates!r}: {_EXAMPLE}")
        out.extend(Rate.parse(p) for p in parts)
    elif isinstance(rates, (list, tuple)):
        for r in rates:
            if isinstance(r, Rate):
                out.append(r)
            elif isinstance(r, str):
                out.extend(parse_rates(r))
            else:
                raise ValueError(f"a rate must be a string or a Rate, got {r!r}")
    else:
        raise ValueError(f"rates must be a string, a Rate or a list of them, got {rates!r}")
    if not out:
        raise ValueError(f"no rate given: {_EXAMPLE}")
    if len(out) > 16:
        raise ValueError(f"at most 16 rates per check, got {len(out)}")
    if len({r.key_id for r in out}) != len(out):
        raise ValueError(f"the same rate is given twice in {rates!r}")
    return tuple(out)
