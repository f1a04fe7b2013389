"""Rate-limit response headers, rendered from a Decision.

Three styles, chosen by the ``headers=`` option:

``"draft-6"`` (draft-ietf-httpapi-ratelimit-headers-06, what most clients parse)::

    RateLimit-Limit: 100
    RateLimit-Remaining: 42
    RateLimit-Reset: 30
    RateLimit-Policy: 100;w=60

``"draft-11"`` (the structured-field form of the later drafts)::

    RateLimit-Policy: "default";q=100;w=60
    RateLimit: "default";r=42;t=30

``"x-ratelimit"`` (the GitHub-style legacy headers; Reset is a Unix time)::

    X-RateLimit-Limit: 100
    X-RateLimit-Remaining: 42
    X-RateLimit-Reset: 1767225630

Choices, so they are written down once:

- With several rates on one check, the reported one is the rate closest to its
  limit (``Decision.rate``, chosen by the core).  Policies list every rate,
  the reported one first in draft-6 (the draft says the first policy is the
  one ``RateLimit-Limit`` describes).
- ``RateLimit-Limit`` and ``q`` are the bucket size (``burst``, the most a
  client can send at once); a rate with a burst different from its limit says
  so with a ``burst`` parameter on its policy.
- Reset is the time until the bucket is full again (the quota fully reset),
  in whole seconds rounded up; ``Retry-After`` (on 429 only) is the time until
  this request would be allowed, rounded up and at least 1.  A request that can
  never be allowed (cost above the burst) gets no ``Retry-After``.
- Windows ``w`` are whole seconds rounded up (structured fields have no
  fractions there).
- A concurrency limit (requests in flight) is one more policy, after the
  rates, with the draft's quota unit ``qu="concurrent-requests"`` and no
  window: ``4;qu="concurrent-requests"`` (draft-6) or
  ``"name-concurrency";q=4;qu="concurrent-requests"`` (draft-11); it is the
  reported one when it decided (``Decision.rate`` equal to the number of
  rates).
- draft-11's ``t`` is the effective window, "the number of seconds within
  which the client can use no more than the available quota": with quota
  left, the time until the bucket is full; with none left (``r=0``), the
  time until the next token arrives.  On a 429 it is never later than
  ``Retry-After`` (the draft: Retry-After SHOULD NOT point earlier than the
  end of the window), and with a cost of 1 the two are equal.

All constant parts (names, policies) are rendered once per rule; per request
only a few small integers are turned into bytes.  The result is a raw ASGI
header list: ``list[tuple[bytes, bytes]]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .rates import Rate

__all__ = [
    "HEADER_STYLES",
    "RateLimitHeaders",
    "make_headers",
    "retry_after_seconds",
    "sf_string",
]

HEADER_STYLES = ("draft-6", "draft-11", "x-ratelimit")

Headers = list[tuple[bytes, bytes]]

# Small non-negative integers as bytes, the common case for every header value.
_INTS = tuple(str(i).encode() for i in range(4096))


def _int(n: int) -> bytes:
    if 0 <= n < 4096:
        return _INTS[n]
    return str(n).encode()


def retry_after_seconds(retry_after: float) -> int | None:
    """The ``Retry-After`` of a denial: rounded up, at least 1; ``None`` if never."""
    if retry_after != retry_after or retry_after == math.inf:
        return None
    if retry_after <= 0.0:
        return 1
    return max(1, math.ceil(retry_after))


def sf_string(text: str) -> str:
    """``text`` as an RFC 8941 sf-string (quoted, escaped, printable ASCII only)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return '"' + "".join(out) + '"'


def _window(period: float) -> int:
    return max(1, math.ceil(period - 1e-9))


def _period_label(period: float) -> str:
    for suffix, secs in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if period >= secs and period % secs == 0:
            return f"{period / secs:g}{suffix}"
    return f"{period * 1000:g}ms"


def _policy_names(name: str, rates: Sequence[Rate]) -> list[str]:
    """One name per rate: the rule's name, plus the window when there are several."""
    if len(rates) == 1:
        return [name]
    names = [f"{name}-{_period_label(r.period)}" for r in rates]
    if len(set(names)) != len(names):  # two rates with one window: index them
        names = [f"{name}-{i}" for i in range(len(rates))]
    return names


_RETRY_AFTER = b"retry-after"


class RateLimitHeaders:
    """Renders one rule's headers; built once per rule, used per request.

    ``render(d)`` returns the rate-limit headers of decision ``d`` (a fresh
    list the caller may extend); ``render_denied(d)`` adds ``Retry-After``.
    """

    __slots__ = ("style", "rates", "name", "concurrency", "render", "_n", "_pre", "_items", "_full")

    def __init__(self, style: str, rates: Sequence[Rate], name: str = "default", concurrency: int = 0) -> None:
        if style not in HEADER_STYLES:
            raise ValueError(
                f"unknown header style {style!r}: use one of {', '.join(map(repr, HEADER_STYLES))}, "
                "or None for no rate-limit headers"
            )
        if not rates and not concurrency:
            raise ValueError("RateLimitHeaders needs at least one rate or a concurrency limit")
        self.style = style
        self.rates = tuple(rates)
        self.name = name
        self.concurrency = concurrency
        # Policies: one per rate, then the concurrency limit's (index n).
        self._n = len(self.rates) + (1 if concurrency else 0)
        # _pre[i]: the constant header when rate i is the reported one (the
        # policy); _items[i]: draft-11's b'"name";r=' for rate i.
        pre: list[tuple[bytes, bytes]] = []
        items: list[bytes] = []
        names = _policy_names(name, self.rates)
        if style == "draft-6":
            pols = []
            for r in self.rates:
                p = f"{r.limit};w={_window(r.period)}"
                if r.burst != r.limit:
                    p += f";burst={r.burst}"
                pols.append(p)
            if concurrency:
                pols.append(f'{concurrency};qu="concurrent-requests"')
            for i in range(self._n):
                ordered = [pols[i]] + [p for j, p in enumerate(pols) if j != i]
                pre.append((b"ratelimit-policy", ", ".join(ordered).encode("ascii")))
            self.render = self._render_draft6
        elif style == "draft-11":
            pols = []
            for r, n in zip(self.rates, names):
                p = f"{sf_string(n)};q={r.limit};w={_window(r.period)}"
                if r.burst != r.limit:
                    p += f";burst={r.burst}"
                pols.append(p)
            if concurrency:
                names = [*names, f"{name}-concurrency"] if self.rates else [name]
                pols.append(f'{sf_string(names[-1])};q={concurrency};qu="concurrent-requests"')
            policy = (b"ratelimit-policy", ", ".join(pols).encode("ascii"))
            for n in names:
                pre.append(policy)
                items.append(f"{sf_string(n)};r=".encode("ascii"))
            self.render = self._render_draft11
        else:
            self.render = self._render_x
        self._pre = tuple(pre)
        self._items = tuple(items)
        # Per rate: the refill time of all tokens but one, so that
        # reset_after - _full[i] is the wait for the next token.
        self._full = tuple(((r.burst or r.limit) - 1) * r.period / r.limit for r in self.rates) + (
            (0.0,) if concurrency else ())

    def __repr__(self) -> str:
        return f"RateLimitHeaders({self.style!r}, {[str(r) for r in self.rates]!r}, name={self.name!r})"

    # render(d) is one of the three below, chosen in __init__ (an instance
    # slot): no per-request style dispatch.  They are written out flat, with
    # no helper calls, because they run on every allowed request.

    def _render_draft6(self, d: Any, _ints: tuple[bytes, ...] = _INTS) -> Headers:
        i = d.rate
        if i >= self._n or i < 0:  # a failure decision may not name a rate
            i = 0
        lim = d.limit
        rem = d.remaining
        r = d.reset_after
        reset = (math.ceil(r) if r < 1e12 else 0) if r > 0.0 else 0
        return [
            (b"ratelimit-limit", _ints[lim] if 0 <= lim < 4096 else _int(lim)),
            (b"ratelimit-remaining", _ints[rem] if 0 <= rem < 4096 else _int(max(rem, 0))),
            (b"ratelimit-reset", _ints[reset] if reset < 4096 else _int(reset)),
            self._pre[i],
        ]

    def _render_draft11(self, d: Any, _ints: tuple[bytes, ...] = _INTS, cap: int | None = None) -> Headers:
        i = d.rate
        if i >= self._n or i < 0:
            i = 0
        rem = d.remaining
        r = d.reset_after
        if rem <= 0:
            r -= self._full[i]  # r=0: the window ends with the next token
        reset = (math.ceil(r) if r < 1e12 else 0) if r > 0.0 else 0
        if cap is not None and reset > cap:  # a 429's Retry-After
            reset = cap
        return [
            self._pre[i],
            (b"ratelimit", b"%b%b;t=%b" % (
                self._items[i],
                _ints[rem] if 0 <= rem < 4096 else _int(max(rem, 0)),
                _ints[reset] if reset < 4096 else _int(reset),
            )),
        ]

    def _render_x(self, d: Any, _ints: tuple[bytes, ...] = _INTS) -> Headers:
        lim = d.limit
        rem = d.remaining
        r = d.reset_after
        reset = math.ceil(time.time() + (r if 0.0 < r < 1e12 else 0.0))
        return [
            (b"x-ratelimit-limit", _ints[lim] if 0 <= lim < 4096 else _int(lim)),
            (b"x-ratelimit-remaining", _ints[rem] if 0 <= rem < 4096 else _int(max(rem, 0))),
            (b"x-ratelimit-reset", _int(reset)),
        ]

    def render_denied(self, d: Any) -> Headers:
        """``render(d)`` (the rate-limit headers of decision ``d``) plus ``Retry-After``."""
        ra = retry_after_seconds(d.retry_after)
        out = self._render_draft11(d, cap=ra) if self.style == "draft-11" else self.render(d)
        if ra is not None:
            out.append((_RETRY_AFTER, _int(ra)))
        return out


def make_headers(
    style: str | None, rates: Sequence[Rate], name: str = "default", concurrency: int = 0
) -> RateLimitHeaders | None:
    """A :class:`RateLimitHeaders` for ``style``, or ``None`` when style is None."""
    if style is None:
        return None
    if not isinstance(style, str):
        raise ValueError(
            f"headers must be one of {', '.join(map(repr, HEADER_STYLES))} or None, got {style!r}"
        )
    return RateLimitHeaders(style, rates, name, concurrency)


def retry_after_header(d: Any) -> Headers:
    """Only ``Retry-After`` (for 429s when rate-limit headers are off)."""
    ra = retry_after_seconds(d.retry_after)
    return [] if ra is None else [(_RETRY_AFTER, _int(ra))]
