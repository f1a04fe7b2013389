"""rategate.LiveLimits: limits from a file or a Redis hash, changed at run time.

The file tests use a fake clock (the stat interval) and real files; the
middleware runs in process on memory:// and on a real Redis.  The Redis hash
is read through Engine.command (Seam 1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import pytest
from asgi_call import get, ok_app

import rategate
from rategate import _core


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def write(path: Any, text: str) -> None:
    """Replace the file as config management does: write a new one, rename it over."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def test_a_file_is_read_again_when_it_changes(tmp_path: Any) -> None:
    path = tmp_path / "limits.toml"
    write(path, 'default = "100/minute"\nchat = "10/minute; 200/day"\nexport = "none"\n')
    clock = Clock()
    live = rategate.LiveLimits.from_file(path, clock=clock)
    chat, export = live.rule("chat"), live.rule("export")
    assert (chat({}), export({})) == ("10/minute; 200/day", None)
    write(path, 'default = "100/minute"\nchat = "20/minute"\nexport = false\n')
    assert chat({}) == "10/minute; 200/day"  # not looked at again within the interval
    clock.t += 1.0
    assert chat({}) == "20/minute" and export({}) is None
    assert live.version == 2
    # a rule the file does not name: its default, or a clear error at start-up
    assert live.rule("new", "5/second")({}) == "5/second"
    with pytest.raises(ValueError, match=r"does not name 'new'.*give a default"):
        live.rule("new")


def test_a_bad_change_is_refused_and_the_previous_limits_stay(tmp_path: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "limits.json"
    write(path, json.dumps({"api": "10/second"}))
    clock = Clock()
    live = rategate.LiveLimits.from_file(path, clock=clock)
    api = live.rule("api")
    caplog.set_level(logging.WARNING, logger="rategate")
    write(path, json.dumps({"api": "10 per fortnight"}))
    for _ in range(3):
        clock.t += 1.0
        assert api({}) == "10/second"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # once per change
    assert "limits.json was not taken, the previous limits stay" in errors[0]
    assert "'api'" in errors[0] and "unknown unit 'fortnight'" in errors[0]
    os.unlink(path)  # gone: still the previous limits, one more line
    clock.t += 1.0
    assert api({}) == "10/second" and "No such file" in str(live.error)
    write(path, json.dumps({"api": "3/second"}))
    clock.t += 1.0
    assert api({}) == "3/second" and live.error is None
    assert any("valid again" in r.getMessage() for r in caplog.records)


def test_mistakes_at_start_up_raise(tmp_path: Any) -> None:
    bad = tmp_path / "l.toml"
    write(bad, 'chat = "ten a minute"\n')
    with pytest.raises(ValueError, match=r"l.toml: 'chat': bad rate string"):
        rategate.LiveLimits.from_file(bad)
    write(bad, "chat = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        rategate.LiveLimits.from_file(bad)
    write(bad, "chat = 10\n")
    with pytest.raises(ValueError, match="must be rates like"):
        rategate.LiveLimits.from_file(bad)
    with pytest.raises(FileNotFoundError):
        rategate.LiveLimits.from_file(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="needs a Redis limiter"):
        rategate.LiveLimits.from_redis(rategate.Limiter("memory://"), "k")


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_new_rate_is_a_new_full_bucket(store: str, tmp_path: Any, make_limiter: Any,
                                               request: pytest.FixtureRequest) -> None:
    """The behaviour the docs state: a client denied under the old rate is
    allowed at once under a new one; back to the old rate, its old bucket."""
    url = "memory://" if store == "memory" else request.getfixturevalue("redis_url")
    path = tmp_path / "limits.toml"
    write(path, 'default = "2/minute"\n')
    clock = Clock()
    live = rategate.LiveLimits.from_file(path, clock=clock)
    mw = rategate.RateLimitMiddleware(ok_app, limiter=make_limiter(url, timeout=1.0),
                                      limits=live.rule("default"), denial_log=False)
    assert [await get(mw, "203.0.113.5") for _ in range(3)] == [200, 200, 429]
    write(path, 'default = "3/minute"\n')
    clock.t += 1.0
    assert [await get(mw, "203.0.113.5") for _ in range(4)] == [200, 200, 200, 429]
    write(path, 'default = "2/minute"\n')
    clock.t += 1.0
    assert await get(mw, "203.0.113.5") == 429  # the 2/minute bucket is still empty
    write(path, 'default = "none"\n')
    clock.t += 1.0
    assert [await get(mw, "203.0.113.5") for _ in range(5)] == [200] * 5  # not limited


needs_command = pytest.mark.skipif(not hasattr(_core.Engine, "command"),
                                   reason="Engine.command (Seam 1) has not landed")


@needs_command
async def test_a_redis_hash_read_at_most_once_per_interval(redis_url: str, redis_server: Any,
                                                           make_limiter: Any) -> None:
    lim = make_limiter(redis_url, timeout=1.0)
    r = redis_server.client()
    r.hset("rategate:limits", mapping={"default": "1/minute"})
    clock = Clock()
    live = rategate.LiveLimits.from_redis(lim, "rategate:limits", clock=clock)
    default = live.rule("default", "5/minute")
    assert default({}) == "5/minute"  # before the first answer: the default, without waiting
    for _ in range(100):
        if live.version:
            break
        await asyncio.sleep(0.01)
    assert default({}) == "1/minute"
    before = int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))
    r.hset("rategate:limits", "default", "7/minute")
    for _ in range(50):
        default({})
        await asyncio.sleep(0)
    assert default({}) == "1/minute"  # not asked again within the interval
    after = int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))
    assert after == before
    clock.t += 1.0
    default({})
    for _ in range(100):
        if default({}) == "7/minute":
            break
        await asyncio.sleep(0.01)
    assert default({}) == "7/minute"
    assert int(r.info("commandstats")["cmdstat_hgetall"]["calls"]) == before + 1
    r.hset("rategate:limits", "default", "lots")  # refused: the previous stays
    clock.t += 1.0
    default({})
    for _ in range(100):
        if live.error:
            break
        await asyncio.sleep(0.01)
    assert default({}) == "7/minute" and "bad rate string 'lots'" in str(live.error)
