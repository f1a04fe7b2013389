"""The `rategate` command line, driven as a subprocess (python -m rategate), as an operator runs it.

This file: the options, the URL and TLS handling, exit codes, --json, and
that no password is ever printed, against memory://, a real Redis (up, down,
with a password) and a TLS Redis.  The operations on limited clients (show,
reset, blocked) after a real uvicorn has limited them, on one server, a
Sentinel set and a cluster: tests/test_cli_ops.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from typing import Any

import pytest
from redisserver import RedisServer, free_port
from source_tree import HAVE_SOURCE, ROOT

PASSWORD = "pw-Zq8-never-printed"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m rategate ARGS``: its exit status, stdout and stderr."""
    e = {k: v for k, v in os.environ.items() if k != "RATEGATE_URL"}
    if HAVE_SOURCE:
        e["PYTHONPATH"] = str(ROOT)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "rategate", *args], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=str(ROOT) if HAVE_SOURCE else None)


def no_secret(p: subprocess.CompletedProcess[str], secret: str = PASSWORD) -> None:
    assert secret not in p.stdout and secret not in p.stderr, (p.stdout, p.stderr)


def test_usage_errors_exit_2() -> None:
    p = run("ping")
    assert p.returncode == 2 and "no store given: pass --url" in p.stderr and "RATEGATE_URL" in p.stderr
    p = run("--url", "memory://", "frobnicate")
    assert p.returncode == 2 and "invalid choice: 'frobnicate'" in p.stderr
    p = run("--url", "memory://", "blocked", "--limit", "0")
    assert p.returncode == 2 and "--limit" in p.stderr
    p = run("--url", "memory://", "show")
    assert p.returncode == 2 and "CLIENT" in p.stderr
    p = run("--version")
    assert p.returncode == 0 and p.stdout.startswith("rategate ")


@pytest.mark.parametrize("url", [
    f"redis://:{PASSWORD}@127.0.0.1:6379/zero",
    f"redis://user:{PASSWORD}@127.0.0.1:99999/0",
    f"redis+sentinel://:{PASSWORD}@127.0.0.1:26379/?sentinel_password={PASSWORD}x",
    f"rediss://:{PASSWORD}@127.0.0.1:6380/0?ssl_ca_certs=/nonexistent/ca.pem",
    f"redis+cluster://:{PASSWORD}@127.0.0.1:7000/3",
])
def test_a_bad_url_is_usage_and_never_prints_its_password(url: str) -> None:
    p = run("ping", env={"RATEGATE_URL": url})
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("rategate: ")
    if "bad storage URL" in p.stderr:  # the URL is named, its password masked
        assert ":***@" in p.stderr
    no_secret(p)
    no_secret(p, PASSWORD + "x")
    j = run("--json", "ping", env={"RATEGATE_URL": url})
    doc = json.loads(j.stdout)
    assert j.returncode == 2 and doc["ok"] is False and doc["exit"] == 2 and doc["error"]
    no_secret(j)


def test_a_tls_file_that_does_not_exist(tls_certs: Any) -> None:
    p = run("--url", "rediss://127.0.0.1:6380/0", "--ssl-ca-certs", "/nonexistent/ca.pem", "ping")
    assert p.returncode == 2 and "ssl_ca_certs" in p.stderr and "/nonexistent/ca.pem" in p.stderr
    p = run("--url", "redis://127.0.0.1:6380/0", "--ssl-ca-certs", tls_certs.ca, "ping")
    assert p.returncode == 2 and "needs a rediss:// " in p.stderr


def test_ping_memory(tmp_path: Any) -> None:
    p = run("--url", "memory://", "ping")
    assert p.returncode == 0 and "check     ok" in p.stdout
    j = run("ping", "--json", "--url", "memory://")  # options after the command too
    doc = json.loads(j.stdout)
    assert j.returncode == 0 and doc["ok"] is True and doc["kind"] == "memory"


def test_ping_redis_up(redis_url: str) -> None:
    p = run("ping", env={"RATEGATE_URL": redis_url})
    assert p.returncode == 0, p.stdout + p.stderr
    j = run("--json", "ping", env={"RATEGATE_URL": redis_url})
    doc = json.loads(j.stdout)
    assert doc["ok"] is True and j.returncode == 0


def test_ping_redis_down_exits_1_with_the_cause() -> None:
    port = free_port()
    p = run("--timeout", "0.5", "ping", env={"RATEGATE_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"})
    assert p.returncode == 1
    assert f"127.0.0.1:{port}: connection refused" in p.stdout + p.stderr
    no_secret(p)
    j = run("--json", "--timeout", "0.5", "ping", env={"RATEGATE_URL": f"redis://127.0.0.1:{port}/0"})
    assert j.returncode == 1 and json.loads(j.stdout)["ok"] is False


def test_ping_wrong_password_exits_1_with_the_cause() -> None:
    with RedisServer(password="the-right-one") as server:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        p = run("--timeout", "1", "ping", env={"RATEGATE_URL": url})
        assert p.returncode == 1
        out = p.stdout + p.stderr
        assert "WRONGPASS" in out or "invalid password" in out or "NOAUTH" in out, out
        no_secret(p)
        ok = run("ping", env={"RATEGATE_URL": f"redis://:the-right-one@127.0.0.1:{server.port}/0"})
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "the-right-one" not in ok.stdout + ok.stderr


def test_ping_tls(redis_tls_url: str, tls_certs: Any) -> None:
    url = redis_tls_url.split("?")[0]
    p = run("--url", url, "--ssl-ca-certs", tls_certs.ca, "ping")
    assert p.returncode == 0, p.stdout + p.stderr
    bad = run("--url", url, "--timeout", "1", "ping")  # the system CA store does not know the test CA
    assert bad.returncode == 1 and "certificate verify failed" in bad.stdout + bad.stderr


def test_a_password_in_url_warns_and_the_env_does_not(redis_url: str) -> None:
    url = redis_url.replace("redis://", f"redis://default:{PASSWORD}@")
    p = run("--url", url, "ping")  # the server has no password: AUTH fails, and says so
    assert "visible to other users in the process list" in p.stderr
    no_secret(p)
    q = run("ping", env={"RATEGATE_URL": url})
    assert "process list" not in q.stderr
    no_secret(q)


def test_the_console_script_is_declared() -> None:
    if HAVE_SOURCE:
        with open(ROOT / "pyproject.toml", "rb") as f:
            scripts = tomllib.load(f)["project"]["scripts"]
        assert scripts == {"rategate": "rategate.cli:main"}
    from rategate.cli import main

    assert main(["--version"]) == 0
    exe = shutil.which("rategate", path=os.path.dirname(sys.executable))
    if exe is not None:  # an installed rategate (make test-wheel): the script itself
        p = subprocess.run([exe, "--url", "memory://", "ping"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
