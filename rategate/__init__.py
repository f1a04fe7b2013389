"""rategate: rate limiting for ASGI apps, with a C core that checks GCRA limits in Redis off the event loop."""

from ._core import Decision, Spec
from .headers import RateLimitHeaders
from .keys import client_ip, header
from .limiter import ConcurrencyLimitExceeded, Limiter, Slot, shm_unlink
from .middleware import RateLimitMiddleware, Rule, set_cost
from .rates import Rate, parse_rates

# RateLimit (the FastAPI dependency) is left out of __all__ and imported on
# first use, so Starlette-only users need not install FastAPI.
__all__ = [
    "ConcurrencyLimitExceeded",
    "Decision",
    "Limiter",
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


def __getattr__(name: str) -> object:
    if name == "RateLimit":
        from .fastapi import RateLimit

        return RateLimit
    raise AttributeError(f"module 'rategate' has no attribute {name!r}")
