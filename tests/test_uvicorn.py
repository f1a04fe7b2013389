"""The middleware under a real uvicorn process, against a real redis-server.

One server (module-scoped) runs :func:`make_app`: a Starlette app with one
``RateLimitMiddleware`` per mount, each configured for one behaviour.  Tests
keep their counters apart by connecting from different loopback source
addresses (127.0.0.X: Linux routes all of 127/8 to lo), which is also how an
"untrusted client" and a "trusted proxy" are told apart.  uvicorn runs with
``--no-proxy-headers`` so that rategate, not uvicorn, reads X-Forwarded-For.

The examples (``uvicorn examples.fastapi_app:app`` and the Starlette one) are
run as written, from the repository root.

:class:`Uvicorn` is also used by ``test_uvicorn_workers.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redisserver import free_port
from serverproc import REPO, ServerProcess

HANG = 5.0  # hang detection for one request; the limiter's deadline is 0.05 s


class Uvicorn(ServerProcess):
    """``python -m uvicorn ARGS`` on a free 127.0.0.1 port, in its own process group.

    Waits until ``ready_path`` answers (and, with ``--workers N``, until N
    workers say "Application startup complete"); :meth:`stop` ends the group
    (SIGTERM: the workers shut down; SIGKILL after 5 s).
    """

    term_wait = 5.0

    def __init__(self, app: str, *args: str, env: dict[str, str] | None = None, workers: int = 1,
                 ready_path: str = "/health", cwd: str = REPO) -> None:
        port = free_port()
        argv = ["uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *args]
        if workers > 1:
            argv += ["--workers", str(workers)]
        super().__init__(argv, port, env=env, cwd=cwd, log_prefix="rategate-uvicorn-")
        try:
            self._wait(ready_path, workers)
        except BaseException:
            self.stop(graceful=False)
            raise

    def _wait(self, path: str, workers: int) -> None:
        # Below the suite's 60 s watchdog, so a broken app fails with its log.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}:\n{self.log()}")
            log = self.log()
            if "Traceback (most recent call last)" in log:
                # With --workers, uvicorn restarts a worker that failed to
                # import the app instead of exiting: fail now.
                raise RuntimeError(f"uvicorn failed to start the app:\n{log}")
            if log.count("Application startup complete") >= workers:
                try:
                    if httpx.get(self.url + path, timeout=2).status_code < 500:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"uvicorn did not start in 40 s:\n{self.log()}")

    def client(self, source: str = "127.0.0.1", **kw: Any) -> httpx.Client:
        """A client connecting from loopback address ``source``."""
        return httpx.Client(base_url=self.url, transport=httpx.HTTPTransport(local_address=source),
                            timeout=HANG, **kw)


# -- the app the server runs -------------------------------------------------------
def make_app() -> Any:
    """One mount per behaviour (``uvicorn --factory test_uvicorn:make_app``)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    import rategate
    from rategate.keys import client_ip
    from rategate.middleware import RateLimitMiddleware

    url = os.environ["RATEGATE_REDIS_URL"]
    closed = rategate.Limiter(url, failure_mode="closed")
    opened = rategate.Limiter(url, failure_mode="open")

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/{p:path}", echo, methods=["GET", "POST", "PUT"])])

    def internal_or_ip(scope: Any) -> Any:
        return None if (b"x-internal", b"1") in scope["headers"] else client_ip()(scope)

    def mount(path: str, **kw: Any) -> Mount:
        kw.setdefault("limiter", closed)
        return Mount(path, RateLimitMiddleware(inner, namespace=path, **kw))

    # Inside a Mount, exempt and rules name paths below the mount (as the
    # mounted app routes them: issue 16 #1).
    return Starlette(routes=[
        Route("/health", echo),
        mount("/d6", limits="3/minute", headers="draft-6", exempt=["/health"],
              rules={"/rule": "2/minute", "POST /post": "1/minute", "/free": None}),
        mount("/d11", limits="2/minute", headers="draft-11"),
        mount("/xr", limits="2/minute", headers="x-ratelimit"),
        mount("/shadow", limits="1/minute", shadow=True),
        mount("/nokey", limits="1/minute", key=internal_or_ip),
        mount("/spoof", limits="2/minute", key=client_ip(trusted_proxies=["10.0.0.0/8"])),
        mount("/proxied", limits="1/minute", key=client_ip(trusted_proxies=["127.0.0.1"])),
        mount("/closed", limits="100/minute", exempt=["/health"]),
        mount("/open", limits="100/minute", limiter=opened),
    ])


def make_bad_app() -> Any:
    """A configuration mistake (``uvicorn --factory test_uvicorn:make_bad_app``)."""
    from starlette.applications import Starlette

    from rategate.middleware import RateLimitMiddleware

    app = Starlette()
    app.add_middleware(RateLimitMiddleware, limiter="memory://", limits="1/minute", headers="draft-7")
    return app


@pytest.fixture(scope="module")
def server(redis_server: Any) -> Iterator[Uvicorn]:
    redis_server.flushall()
    srv = Uvicorn("test_uvicorn:make_app", "--factory", "--no-proxy-headers",
                  env={"RATEGATE_REDIS_URL": redis_server.url})
    try:
        yield srv
    finally:
        srv.stop()


def rl(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if "ratelimit" in k or k == "retry-after"}


def assert_429(r: httpx.Response, low: int, high: int) -> None:
    assert r.status_code == 429, r
    assert r.json() == {"detail": "Too Many Requests"}
    assert r.headers["content-type"] == "application/json"
    assert low <= int(r.headers["retry-after"]) <= high, r.headers


# -- behaviour under uvicorn ------------------------------------------------------------
def test_burst_then_429_in_each_format(server: Uvicorn) -> None:
    with server.client("127.0.0.10") as c:
        for remaining in (2, 1, 0):
            r = c.get("/d6/a")
            assert r.status_code == 200 and r.text == "ok"
            assert rl(r) == {"ratelimit-limit": "3", "ratelimit-remaining": str(remaining),
                             "ratelimit-reset": str(20 * (3 - remaining)), "ratelimit-policy": "3;w=60"}
        r = c.get("/d6/a")
        assert_429(r, 19, 20)
        assert r.headers["ratelimit-remaining"] == "0" and r.headers["ratelimit-policy"] == "3;w=60"

        assert rl(c.get("/d11/a")) == {"ratelimit-policy": '"default";q=2;w=60', "ratelimit": '"default";r=1;t=30'}
        c.get("/d11/a")
        r = c.get("/d11/a")
        assert_429(r, 29, 30)
        # t is the time to the next token, equal to Retry-After (issue 8 #16).
        assert r.headers["ratelimit"] == f'"default";r=0;t={r.headers["retry-after"]}'


        now = time.time()
        r = c.get("/xr/a")
        assert r.headers["x-ratelimit-limit"] == "2" and r.headers["x-ratelimit-remaining"] == "1"
        assert now + 29 <= int(r.headers["x-ratelimit-reset"]) <= now + 32
        c.get("/xr/a")
        assert_429(c.get("/xr/a"), 29, 30)


def test_exempt_and_unmatched_untouched(server: Uvicorn) -> None:
    with server.client("127.0.0.11") as c:
        for _ in range(6):
            for path in ("/d6/health", "/d6/free", "/d6/free/x", "/health"):
                r = c.get(path)
                assert r.status_code == 200 and rl(r) == {}, path


def test_rules_and_default_keep_separate_counters(server: Uvicorn) -> None:
    with server.client("127.0.0.12") as c:
        assert [c.get("/d6/rule").status_code for _ in range(3)] == [200, 200, 429]
        assert [c.get("/d6/other").status_code for _ in range(4)] == [200, 200, 200, 429]


def test_method_filters(server: Uvicorn) -> None:
    with server.client("127.0.0.13") as c:
        assert [c.post("/d6/post").status_code for _ in range(2)] == [200, 429]
        r = c.get("/d6/post")  # GET is not in the rule: the default's counter
        assert r.status_code == 200 and r.headers["ratelimit-limit"] == "3"
        assert c.put("/d6/post").headers["ratelimit-remaining"] == "1"


def test_shadow_never_blocks_and_still_counts(server: Uvicorn, redis_server: Any) -> None:
    with server.client("127.0.0.14") as c:
        rs = [c.get("/shadow/a") for _ in range(5)]
    assert [r.status_code for r in rs] == [200] * 5
    assert [r.headers["ratelimit-remaining"] for r in rs] == ["0"] * 5
    assert redis_server.client().exists("rg:{/shadow:default|127.0.0.14}:1/60000") == 1
    assert "would deny '/shadow:default|127.0.0.14'" in server.log()


def test_key_returning_none_skips_limiting(server: Uvicorn) -> None:
    with server.client("127.0.0.15") as c:
        for _ in range(4):
            r = c.get("/nokey/a", headers={"x-internal": "1"})
            assert r.status_code == 200 and rl(r) == {}
        assert [c.get("/nokey/a").status_code for _ in range(2)] == [200, 429]


def test_spoofed_forwarded_for_from_an_untrusted_client(server: Uvicorn) -> None:
    with server.client("127.0.0.2") as c:
        codes = [c.get("/spoof/a", headers={"x-forwarded-for": f"1.2.3.{i}"}).status_code for i in range(5)]
    assert codes == [200, 200, 429, 429, 429]


def test_behind_a_trusted_proxy_the_real_client_counts(server: Uvicorn) -> None:
    with server.client("127.0.0.1") as proxy:
        for i in range(3):
            h = {"x-forwarded-for": f"6.6.6.6, 198.51.100.{i}"}
            assert [proxy.get("/proxied/a", headers=h).status_code for _ in range(2)] == [200, 429]
    # The same header from a client that is not the proxy is ignored.
    with server.client("127.0.0.3") as c:
        codes = [c.get("/proxied/a", headers={"x-forwarded-for": f"198.51.100.{50 + i}"}).status_code
                 for i in range(2)]
    assert codes == [200, 429]


# -- Redis killed while serving -------------------------------------------------------------
def test_redis_killed_while_serving(own_redis: Any) -> None:
    srv = Uvicorn("test_uvicorn:make_app", "--factory", "--no-proxy-headers",
                  env={"RATEGATE_REDIS_URL": own_redis.url})
    try:
        with srv.client("127.0.0.20") as c:
            assert c.get("/closed/a").status_code == 200
            assert c.get("/open/a").status_code == 200
            own_redis.stop()
            for _ in range(10):
                r = c.get("/closed/a")
                assert_429(r, 1, 1)
                assert c.get("/open/a").status_code == 200
                assert c.get("/closed/health").status_code == 200
                assert c.get("/health").status_code == 200
            own_redis.start()
            deadline = time.monotonic() + 20
            while c.get("/closed/a").status_code != 200:
                assert time.monotonic() < deadline, "no recovery after Redis came back:\n" + srv.log()
                time.sleep(0.1)
            r = c.get("/closed/a")
            assert r.status_code == 200 and r.headers["ratelimit-limit"] == "100"
            deadline = time.monotonic() + 20
            while srv.log().count("is answering again") < 2 and time.monotonic() < deadline:
                c.get("/open/a")  # an incident ends after 2 s of answers (issue 16 #3)
                c.get("/closed/a")
                time.sleep(0.1)
        log = srv.log()
        # One incident, logged once per middleware: not once per request.
        assert log.count("failed (") == 2, log
        assert log.count("is answering again") == 2, log
    finally:
        srv.stop()


def test_config_mistake_stops_the_server_at_startup_with_lifespan_on() -> None:
    # Starlette builds its middleware (and so runs our __init__) on the first
    # ASGI event: the lifespan startup.  With --lifespan on, uvicorn exits.
    with pytest.raises(RuntimeError) as e:
        Uvicorn("test_uvicorn:make_bad_app", "--factory", "--lifespan", "on")
    assert "unknown header style 'draft-7'" in str(e.value)
    assert "Application startup failed" in str(e.value)


# -- the examples, run as written ------------------------------------------------------------
@pytest.mark.parametrize("module", ["examples.fastapi_app", "examples.starlette_app"])
def test_examples_run_as_written(module: str, redis_server: Any) -> None:
    redis_server.flushall()
    srv = Uvicorn(f"{module}:app", env={"RATEGATE_REDIS_URL": redis_server.url})
    try:
        with srv.client("127.0.0.30") as c:
            for _ in range(8):
                r = c.get("/health")
                assert r.status_code == 200 and rl(r) == {}
            rs = [c.get("/limited") for _ in range(6)]
            assert [r.status_code for r in rs] == [200] * 5 + [429]
            assert rs[0].headers["ratelimit-policy"] == "5;w=60"
            assert_429(rs[5], 11, 12)
            assert c.get("/").headers["ratelimit-limit"] == "100"
            if module == "examples.fastapi_app":
                codes = [c.get(f"/items/{i}").status_code for i in range(11)]
                assert codes == [200] * 10 + [429]
                r = c.get("/items/1")
                assert r.json() == {"detail": "Too Many Requests"} and "retry-after" in r.headers
            else:
                assert [c.post("/login").status_code for _ in range(4)] == [200] * 3 + [429]
    finally:
        srv.stop()
