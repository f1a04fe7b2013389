"""Rate-limit header rendering: draft-6, draft-11, x-ratelimit, Retry-After.

Pure Python: decisions are stand-ins with the Decision attributes.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import pytest

from rategate.headers import (
    HEADER_STYLES,
    RateLimitHeaders,
    make_headers,
    retry_after_header,
    retry_after_seconds,
    sf_string,
)
from rategate.rates import Rate, parse_rates


def decision(**kw: Any) -> Any:
    base = dict(allowed=True, limit=100, remaining=42, reset_after=29.2, retry_after=0.0, error=None, rate=0)
    base.update(kw)
    return SimpleNamespace(**base)


def as_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    for name, value in headers:
        assert isinstance(name, bytes) and isinstance(value, bytes)
        assert name == name.lower()
    names = [n for n, _ in headers]
    assert len(names) == len(set(names)), "a header rendered twice"
    return {n.decode(): v.decode() for n, v in headers}


def test_draft6() -> None:
    h = RateLimitHeaders("draft-6", parse_rates("100/minute"))
    assert as_dict(h.render(decision())) == {
        "ratelimit-limit": "100",
        "ratelimit-remaining": "42",
        "ratelimit-reset": "30",
        "ratelimit-policy": "100;w=60",
    }


def test_draft6_several_rates_reports_the_chosen_one_first() -> None:
    h = RateLimitHeaders("draft-6", parse_rates("10/second; 1000/hour"))
    got = as_dict(h.render(decision(limit=1000, remaining=3, reset_after=3590.0, rate=1)))
    assert got["ratelimit-limit"] == "1000"
    assert got["ratelimit-remaining"] == "3"
    assert got["ratelimit-reset"] == "3590"
    assert got["ratelimit-policy"] == "1000;w=3600, 10;w=1"
    got = as_dict(h.render(decision(limit=10, remaining=9, reset_after=0.1, rate=0)))
    assert got["ratelimit-policy"] == "10;w=1, 1000;w=3600"
    assert got["ratelimit-reset"] == "1"


def test_draft6_burst_and_fractional_window() -> None:
    h = RateLimitHeaders("draft-6", [Rate(100, 60.0, burst=150), Rate(5, 0.5)])
    got = as_dict(h.render(decision(limit=150, remaining=149)))
    assert got["ratelimit-limit"] == "150"
    assert got["ratelimit-policy"] == "100;w=60;burst=150, 5;w=1"


def test_draft11() -> None:
    h = RateLimitHeaders("draft-11", parse_rates("100/minute"))
    assert as_dict(h.render(decision())) == {
        "ratelimit-policy": '"default";q=100;w=60',
        "ratelimit": '"default";r=42;t=30',
    }


def test_draft11_several_rates_and_rule_names() -> None:
    h = RateLimitHeaders("draft-11", parse_rates("10/second; 1000/hour"), name="/api/chat")
    got = as_dict(h.render(decision(limit=1000, remaining=7, reset_after=12.5, rate=1)))
    assert got["ratelimit-policy"] == '"/api/chat-1s";q=10;w=1, "/api/chat-1h";q=1000;w=3600'
    assert got["ratelimit"] == '"/api/chat-1h";r=7;t=13'
    # Two rates with one window (a burst variant) still get distinct names.
    h = RateLimitHeaders("draft-11", [Rate(10, 60.0), Rate(20, 60.0, burst=5)], name="x")
    assert as_dict(h.render(decision()))["ratelimit-policy"].startswith('"x-0";q=10;w=60, "x-1";q=20;w=60;burst=5')


def test_draft11_names_are_escaped_structured_strings() -> None:
    assert sf_string('a"b\\c') == '"a\\"b\\\\c"'
    assert sf_string("caf\u00e9\n") == '"caf??"'
    h = RateLimitHeaders("draft-11", parse_rates("1/second"), name='we"ird')
    assert as_dict(h.render(decision(limit=1, remaining=0)))["ratelimit"] == '"we\\"ird";r=0;t=30'


def test_x_ratelimit_reset_is_a_unix_time() -> None:
    h = RateLimitHeaders("x-ratelimit", parse_rates("100/minute"))
    before = time.time()
    got = as_dict(h.render(decision(reset_after=29.2)))
    after = time.time()
    assert set(got) == {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}
    assert got["x-ratelimit-limit"] == "100" and got["x-ratelimit-remaining"] == "42"
    # The moment the bucket is full again, as a Unix time rounded up.
    assert math.ceil(before + 29.2) <= int(got["x-ratelimit-reset"]) <= math.ceil(after + 29.2)


@pytest.mark.parametrize(
    "seconds, expected",
    [(0.0001, 1), (0.2, 1), (1.0, 1), (1.01, 2), (59.5, 60), (3600.0, 3600), (0.0, 1), (-1.0, 1),
     (math.inf, None), (math.nan, None)],
)
def test_retry_after_rounds_up(seconds: float, expected: int | None) -> None:
    assert retry_after_seconds(seconds) == expected


def test_denied_adds_retry_after_to_every_style() -> None:
    d = decision(allowed=False, remaining=0, retry_after=4.2, reset_after=59.9)
    for style in HEADER_STYLES:
        h = RateLimitHeaders(style, parse_rates("100/minute"))
        got = as_dict(h.render_denied(d))
        assert got["retry-after"] == "5", style
        assert "retry-after" not in as_dict(h.render(d))
    # Never allowed (cost above the burst): no Retry-After to promise.
    h = RateLimitHeaders("draft-6", parse_rates("100/minute"))
    assert "retry-after" not in as_dict(h.render_denied(decision(allowed=False, retry_after=math.inf)))
    assert retry_after_header(d) == [(b"retry-after", b"5")]
    assert retry_after_header(decision(retry_after=math.inf)) == []


def test_failure_decision_renders() -> None:
    # Failure decisions: remaining 0, reset 0, rate may be anything in range or not.
    h = RateLimitHeaders("draft-6", parse_rates("10/second; 1000/hour"))
    for rate in (0, 5, -1):
        d = decision(allowed=False, limit=10, remaining=0, reset_after=0.0, retry_after=1.0,
                     error="timeout", rate=rate)
        got = as_dict(h.render_denied(d))
        assert got == {
            "ratelimit-limit": "10", "ratelimit-remaining": "0", "ratelimit-reset": "0",
            "ratelimit-policy": "10;w=1, 1000;w=3600", "retry-after": "1",
        }


def test_large_and_odd_numbers() -> None:
    h = RateLimitHeaders("draft-6", [Rate(10**9, 86400.0)])
    got = as_dict(h.render(decision(limit=10**9, remaining=10**9 - 1, reset_after=86400.0)))
    assert got["ratelimit-limit"] == "1000000000"
    assert got["ratelimit-remaining"] == "999999999"
    assert got["ratelimit-reset"] == "86400"
    got = as_dict(h.render(decision(remaining=-3, reset_after=math.nan)))
    assert got["ratelimit-remaining"] == "0" and got["ratelimit-reset"] == "0"


def test_render_returns_a_fresh_list() -> None:
    h = RateLimitHeaders("draft-6", parse_rates("100/minute"))
    a = h.render(decision())
    a.append((b"x", b"y"))
    assert (b"x", b"y") not in h.render(decision())


def test_styles_and_errors() -> None:
    assert make_headers(None, parse_rates("1/s")) is None
    assert isinstance(make_headers("draft-11", parse_rates("1/s")), RateLimitHeaders)
    with pytest.raises(ValueError, match="unknown header style 'draft-7'"):
        make_headers("draft-7", parse_rates("1/s"))
    with pytest.raises(ValueError, match="or None"):
        make_headers(True, parse_rates("1/s"))  # type: ignore[arg-type]
