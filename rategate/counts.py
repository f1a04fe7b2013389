"""Per-rule decision counts: the Python-side figures of ``Limiter.stats()`` and of the metrics.

The C core counts checks (``Limiter.stats()``: checks, allowed, denied,
cached_denials, errors, in_flight, reconnects, connected).  What only the
Python layer knows is *which rule* a decision belongs to and what became of
it (shadow mode lets a denial through), so the middleware and the FastAPI
dependency count here, one :class:`RuleCounts` per rule, shared by every
middleware that uses the same limiter and rule label (they share the rule's
counters in Redis too).

Outcomes, each decision counted in exactly one:

- ``allowed``: let through;
- ``denied``: answered 429 (or a WebSocket message refused) after a check;
- ``denied_cached``: the same, answered by the core's local over-limit cache
  without a round trip;
- ``shadow_would_deny``: shadow mode let through a request it would deny;
- ``failure``: the failure mode decided (Redis down, past the deadline,
  overloaded, ...); ``failures`` splits them by error kind.

No client key is ever stored: the label sets stay as small as the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["OUTCOMES", "RuleCounts", "Sink"]

OUTCOMES = ("allowed", "denied", "denied_cached", "shadow_would_deny", "failure")

# A sink is told of every decision counted: (outcome, error kind or None, the
# Decision).  rategate.metrics feeds Prometheus through one.
Sink = Callable[[str, Any, Any], None]


class RuleCounts:
    """The decisions of one rule in this process, by outcome (see the module docstring)."""

    __slots__ = ("name", "allowed", "denied", "denied_cached", "shadow_would_deny", "failures", "sinks")

    def __init__(self, name: str) -> None:
        self.name = name
        self.allowed = 0
        self.denied = 0
        self.denied_cached = 0
        self.shadow_would_deny = 0
        self.failures: dict[str, int] = {}
        self.sinks: tuple[Sink, ...] = ()

    def __repr__(self) -> str:
        return f"RuleCounts({self.name!r}, {self.as_dict()!r})"

    def note(self, d: Any, cached: bool, shadow: bool) -> None:
        """Count decision ``d``.  ``cached``: it was answered synchronously
        by a store that has a local over-limit cache (a Redis engine), so a
        denial without error came from that cache.  ``shadow``: denials are
        let through."""
        err = d.error
        if err is not None:
            f = self.failures
            f[err] = f.get(err, 0) + 1
            outcome = "failure"
        elif d.allowed:
            self.allowed += 1
            outcome = "allowed"
        elif shadow:
            self.shadow_would_deny += 1
            outcome = "shadow_would_deny"
        elif cached:
            self.denied_cached += 1
            outcome = "denied_cached"
        else:
            self.denied += 1
            outcome = "denied"
        for sink in self.sinks:
            sink(outcome, err, d)

    def as_dict(self) -> dict[str, Any]:
        """The counts as plain data (a copy)."""
        return {"allowed": self.allowed, "denied": self.denied, "denied_cached": self.denied_cached,
                "shadow_would_deny": self.shadow_would_deny, "failures": dict(self.failures)}


def counts_for(limiter: Any, name: str) -> RuleCounts:
    """The RuleCounts of rule label ``name`` on ``limiter``: shared through
    the limiter when it keeps them (``Limiter.rule_counts``), else a fresh one."""
    get = getattr(limiter, "rule_counts", None)
    return get(name) if get is not None else RuleCounts(name)
