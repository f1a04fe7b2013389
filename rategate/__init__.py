"""rategate: rate limiting for ASGI apps, with a C core that checks GCRA limits in Redis off the event loop."""

from typing import TYPE_CHECKING

from ._core import Decision, Spec
from .headers import RateLimitHeaders
from .keys import client_ip, header
from .limiter import ConcurrencyLimitExceeded, Limiter, Slot, shm_unlink
from .live import LiveLimits
from .middleware import RateLimitMiddleware, Rule, set_cost
from .rates import Rate, parse_rates

__all__ = [
    "ConcurrencyLimitExceeded",
    "Decision",
    "Limiter",
    "LiveLimits",
    "Rate",
    "RateLimitHeaders",
    "RateLimitMiddleware",
    "Rule",
    "Slot",
    "Spec",
    "client_ip",
    "header",
    "parse_rates",
    "set_cost",
    "shm_unlink",
    "__version__",
]
__version__ = "0.1.0"

# RateLimit (the FastAPI dependency) is imported on first use, so Starlette-only
# users need not install FastAPI; `from rategate import *` leaves it out for the
# same reason.  Type checkers see the real class (and a public name): the
# import and the __all__ entry below are theirs only, and the module
# __getattr__ is hidden from them, so a misspelt name is an error, not `object`.
if TYPE_CHECKING:
    from .fastapi import RateLimit as RateLimit

    __all__ += ["RateLimit"]
else:

    def __getattr__(name: str) -> object:
        if name == "RateLimit":
            from .fastapi import RateLimit

            return RateLimit
        raise AttributeError(f"module 'rategate' has no attribute {name!r}")
