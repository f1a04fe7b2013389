"""rategate: rate limiting for ASGI apps, with a C core that checks GCRA limits in Redis off the event loop."""

from ._core import Decision, Spec
from .limiter import Limiter
from .rates import Rate, parse_rates

__all__ = ["Decision", "Limiter", "Rate", "Spec", "parse_rates", "__version__"]
__version__ = "0.1.0"
