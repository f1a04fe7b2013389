"""rategate under each server and framework a user may run it under, as real
processes (issue 16, "Also expected"): uvicorn (asyncio and uvloop),
gunicorn with uvicorn workers (with and without ``--preload``), hypercorn,
granian; apps of Starlette, FastAPI, Litestar, Quart and Django ASGI
(tests/server_apps.py).  Each: 5 of 10 requests allowed at 5/minute from one
client, the rate-limit headers present, ``exempt`` honoured.

Each server process is started once (module-scoped, one at a time) against
the session's redis-server; every case is its own client (a loopback source
address), so nothing is flushed behind a running server.  Then what
hypercorn and granian do with a startup error (a configuration mistake).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redisserver import free_port
from serverproc import HERE, ServerProcess


class Server(ServerProcess):
    """``python -m <argv>`` (a server) on a free loopback port, in its own process group."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str] | None = None, *, ready: bool = True) -> None:
        super().__init__(argv, port, env=env, cwd=HERE)
        if ready:
            try:
                self.wait("/health")
            except BaseException:
                self.stop()
                raise

    def wait(self, path: str, want: int = 200) -> None:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == want:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"no {want} from {path} in 40 s:\n{self.log()}")


def argv_for(server: str, app: str, port: int) -> list[str]:
    bind = ["--host", "127.0.0.1", "--port", str(port)]
    if server == "uvicorn-asyncio":
        return ["uvicorn", f"server_apps:{app}", *bind, "--loop", "asyncio", "--no-access-log"]
    if server == "uvicorn-uvloop":
        return ["uvicorn", f"server_apps:{app}", *bind, "--loop", "uvloop", "--lifespan", "on", "--no-access-log"]
    if server in ("gunicorn", "gunicorn-preload"):
        return ["gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-w", "2", "-b", f"127.0.0.1:{port}",
                *(["--preload"] if server == "gunicorn-preload" else []), f"server_apps:{app}"]
    if server == "hypercorn":
        # hypercorn evaluates the name in the module's namespace: call the factory.
        return ["hypercorn", "--bind", f"127.0.0.1:{port}", f"server_apps:{app}_app()"]
    if server == "granian":
        return ["granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), f"server_apps:{app}"]
    raise ValueError(server)


# (server, app): each server with the Starlette app, each framework under uvicorn.
CASES = [
    ("uvicorn-asyncio", "starlette"),
    ("uvicorn-uvloop", "starlette"),
    ("gunicorn", "starlette"),
    ("gunicorn-preload", "starlette"),
    ("hypercorn", "starlette"),
    ("granian", "starlette"),
    ("uvicorn-asyncio", "fastapi"),
    ("uvicorn-asyncio", "litestar"),
    ("uvicorn-asyncio", "quart"),
    ("uvicorn-asyncio", "django"),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-{a}" for s, a in CASES])
def server(request: pytest.FixtureRequest, redis_server: Any) -> Iterator[tuple[Server, int]]:
    i = CASES.index(request.param)
    port = free_port()
    srv = Server(argv_for(*request.param, port), port, env={"RATEGATE_REDIS_URL": redis_server.url})
    try:
        yield srv, i
    finally:
        srv.stop()


def test_five_of_ten_headers_and_exempt(server: tuple[Server, int]) -> None:
    srv, i = server
    source = f"127.0.0.{100 + i}"  # this case's own client
    with httpx.Client(base_url=srv.url, transport=httpx.HTTPTransport(local_address=source), timeout=10) as c:
        for _ in range(7):
            r = c.get("/health")
            assert r.status_code == 200 and "ratelimit-limit" not in r.headers, r.headers
        rs = [c.get("/hello") for _ in range(10)]
    assert [r.status_code for r in rs] == [200] * 5 + [429] * 5, srv.log()
    assert [r.headers["ratelimit-remaining"] for r in rs[:5]] == ["4", "3", "2", "1", "0"]
    assert all(r.headers["ratelimit-limit"] == "5" and r.headers["ratelimit-policy"] == "5;w=60" for r in rs)
    assert all(11 <= int(r.headers["retry-after"]) <= 12 for r in rs[5:])
    assert not [ln for ln in srv.log().splitlines() if "rategate" in ln and "limiting requests" not in ln], srv.log()  # no warning but the denial log's: connected at startup, no failure


@pytest.mark.parametrize("server_name,warning", [
    ("hypercorn", "ASGI Framework Lifespan error, continuing without Lifespan support"),
    ("granian", "ASGI Lifespan errored, continuing without Lifespan support"),
])
def test_a_startup_error_under_hypercorn_and_granian(server_name: str, warning: str) -> None:
    """Neither stops on a startup error (uvicorn does with --lifespan on): each logs
    a warning without the error, starts, and answers 500 to every request, the
    error logged with each.  (docs/servers.md says so, and how to fail at import.)"""
    port = free_port()
    srv = Server(argv_for(server_name, "bad", port), port, ready=False)
    try:
        srv.wait("/anything", want=500)
        # The server writes the request's traceback after the 500 has gone
        # out (granian from another thread): wait for it, bounded.
        deadline = time.monotonic() + 10
        while "unknown header style 'draft-7'" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = srv.log()
        assert warning in log, log
        assert "unknown header style 'draft-7'" in log, log
        assert srv.proc.poll() is None
    finally:
        srv.stop()
