"""rediss://: TLS to a real redis-server (tls-port), verified and mutual, and
every way it can fail, failing fast with a message that names the cause.

The servers and certificates are made once for the module (tests/tlscerts.py
makes a throwaway CA with the ``openssl`` command).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

import rategate
from rategate.limiter import parse_storage_url
from redisserver import RedisServer
from tlscerts import Certs

# Failure decisions come within the check's deadline; this bounds "fast"
# with slack for a loaded machine (it is no speed test).
FAST = 2.0


@pytest.fixture(scope="module")
def mutual_server(tls_certs: Certs) -> Iterator[RedisServer]:
    with RedisServer(tls=tls_certs.server_tls, tls_auth_clients="yes",
                     client_cert=(tls_certs.client_cert, tls_certs.client_key)) as s:
        yield s


@pytest.fixture(scope="module")
def wrongname_server(tls_certs: Certs) -> Iterator[RedisServer]:
    with RedisServer(tls=(tls_certs.wrongname_cert, tls_certs.wrongname_key, tls_certs.ca)) as s:
        yield s


@pytest.fixture(scope="module")
def acl_servers(tls_certs: Certs) -> Iterator[tuple[RedisServer, RedisServer]]:
    # An ACL user besides the default one (whose password the fixture's
    # own probe uses).
    acl = ["--user", "alice", "on", ">s3cret", "~*", "&*", "+@all"]
    with RedisServer(password="probe-pw", extra_args=acl) as plain, \
            RedisServer(password="probe-pw", extra_args=acl, tls=tls_certs.server_tls) as tls:
        yield plain, tls


def tls_port(url: str) -> int:
    return int(url.split("127.0.0.1:")[1].split("/")[0])


async def hits(lim: Any, n: int, key: str = "k", rate: str = "3/minute") -> list[Any]:
    return [await lim.hit(key, rate) for _ in range(n)]


async def assert_exact(lim: Any, key: str = "k") -> None:
    ds = await hits(lim, 4, key)
    assert [d.error for d in ds] == [None] * 4, lim.stats()["last_error"]
    assert [d.allowed for d in ds] == [True, True, True, False]
    assert [d.remaining for d in ds[:3]] == [2, 1, 0]


async def assert_fails_fast(lim: Any, *needles: str) -> str:
    t0 = time.monotonic()
    ds = await hits(lim, 3)
    elapsed = time.monotonic() - t0
    assert [d.allowed for d in ds] == [False] * 3
    assert all(d.error in ("unavailable", "timeout") for d in ds), [d.error for d in ds]
    assert elapsed < 3 * FAST
    # The first decision may come before the failed attempt is known (the
    # check waited for the connection): wait for the cause to be recorded.
    for _ in range(200):
        err = lim.stats()["last_error"] or ""
        if all(n in err for n in needles):
            break
        await asyncio.sleep(0.01)
    for n in needles:
        assert n in err, err
    return err


# -- verified ------------------------------------------------------------------------------------
async def test_verified_by_address(redis_tls_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_tls_url, timeout=FAST)
    await assert_exact(lim)
    st = lim.stats()
    assert st["connected"] is True and st["last_error"] is None


async def test_verified_by_localhost_name(redis_tls_url: str, tls_certs: Certs, make_limiter: Any) -> None:
    url = f"rediss://localhost:{tls_port(redis_tls_url)}/0"
    lim = make_limiter(url, timeout=FAST, ssl_ca_certs=tls_certs.ca)
    await assert_exact(lim)


async def test_options_in_the_url_and_as_keywords_agree(redis_tls_url: str, tls_certs: Certs,
                                                         make_limiter: Any) -> None:
    port = tls_port(redis_tls_url)
    a = make_limiter(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls_certs.ca}&ssl_cert_reqs=required"
                     "&ssl_check_hostname=true", timeout=FAST)
    await assert_exact(a, "url")
    b = make_limiter(f"rediss://127.0.0.1:{port}/0", timeout=FAST, ssl_ca_certs=tls_certs.ca,
                     ssl_cert_reqs="required", ssl_check_hostname=True)
    await assert_exact(b, "kw")


async def test_cert_reqs_none_encrypts_without_verifying(redis_tls_url: str, make_limiter: Any) -> None:
    # No CA given, and the system store does not know the test CA: only
    # ssl_cert_reqs=none lets this through.
    url = f"rediss://127.0.0.1:{tls_port(redis_tls_url)}/0?ssl_cert_reqs=none"
    lim = make_limiter(url, timeout=FAST)
    await assert_exact(lim)


async def test_system_store_does_not_know_the_test_ca(redis_tls_url: str, make_limiter: Any) -> None:
    lim = make_limiter(f"rediss://127.0.0.1:{tls_port(redis_tls_url)}/0", timeout=FAST)
    await assert_fails_fast(lim, "certificate verify failed", "ssl_ca_certs")


# -- mutual TLS ------------------------------------------------------------------------------------
async def test_mutual_tls_with_a_client_certificate(mutual_server: RedisServer, tls_certs: Certs,
                                                    make_limiter: Any) -> None:
    mutual_server.flushall()
    lim = make_limiter(mutual_server.url, timeout=FAST, ssl_certfile=tls_certs.client_cert,
                       ssl_keyfile=tls_certs.client_key)
    await assert_exact(lim)


async def test_mutual_tls_without_a_client_certificate(mutual_server: RedisServer, make_limiter: Any) -> None:
    lim = make_limiter(mutual_server.url, timeout=FAST)
    err = await assert_fails_fast(lim, "TLS", f"127.0.0.1:{mutual_server.port}")
    assert "certificate" in err, err
    assert lim.stats()["connected"] is False


# -- failures ------------------------------------------------------------------------------------
async def test_wrong_ca(redis_tls_url: str, tls_certs: Certs, make_limiter: Any) -> None:
    url = f"rediss://127.0.0.1:{tls_port(redis_tls_url)}/0"
    lim = make_limiter(url, timeout=FAST, ssl_ca_certs=tls_certs.other_ca)
    err = await assert_fails_fast(lim, "certificate verify failed", "is ssl_ca_certs the CA")
    assert err.startswith(f"TLS handshake with 127.0.0.1:{tls_port(redis_tls_url)} failed"), err


async def test_hostname_mismatch(wrongname_server: RedisServer, tls_certs: Certs, make_limiter: Any) -> None:
    lim = make_limiter(wrongname_server.url, timeout=FAST)
    await assert_fails_fast(lim, "certificate verify failed", "does not name this host")
    name = make_limiter(f"rediss://localhost:{wrongname_server.port}/0", timeout=FAST,
                        ssl_ca_certs=tls_certs.ca)
    await assert_fails_fast(name, "certificate verify failed", "does not name this host")
    # The same certificate, the name check turned off: the CA still vouches.
    off = make_limiter(wrongname_server.url, timeout=FAST, ssl_check_hostname=False)
    ds = await hits(off, 1)
    assert ds[0].error is None and ds[0].allowed


async def test_plain_client_on_the_tls_port(redis_tls_url: str, make_limiter: Any) -> None:
    lim = make_limiter(f"redis://127.0.0.1:{tls_port(redis_tls_url)}/0", timeout=FAST)
    await assert_fails_fast(lim, f"127.0.0.1:{tls_port(redis_tls_url)}", "rediss://")


async def test_tls_client_on_the_plain_port(redis_url: str, tls_certs: Certs, make_limiter: Any) -> None:
    plain = redis_url.replace("redis://", "rediss://")
    lim = make_limiter(plain, timeout=FAST, ssl_ca_certs=tls_certs.ca)
    await assert_fails_fast(lim, "TLS handshake", "is this port speaking TLS?")


async def test_killed_and_restarted_behind_tls(tls_certs: Certs, make_limiter: Any) -> None:
    with RedisServer(tls=tls_certs.server_tls) as srv:
        lim = make_limiter(srv.url, timeout=0.5)
        await assert_exact(lim, "before")
        srv.stop()
        ds = await hits(lim, 3, "during")
        assert all(not d.allowed and d.error in ("unavailable", "timeout") for d in ds)
        srv.start()
        for _ in range(300):  # reconnects back off to 500 ms at most
            d = await lim.hit("after", "3/minute")
            if d.error is None:
                break
            await asyncio.sleep(0.02)
        assert d.error is None, lim.stats()["last_error"]
        assert lim.stats()["reconnects"] >= 1
        await assert_exact(lim, "after2")


@pytest.mark.parametrize("transport", ["plain", "tls"])
async def test_acl_user_and_password(acl_servers: tuple[RedisServer, RedisServer], tls_certs: Certs,
                                     make_limiter: Any, transport: str) -> None:
    srv = acl_servers[0] if transport == "plain" else acl_servers[1]
    scheme, q = ("redis", "") if transport == "plain" else ("rediss", f"?ssl_ca_certs={tls_certs.ca}")
    good = make_limiter(f"{scheme}://alice:s3cret@127.0.0.1:{srv.port}/0{q}", timeout=FAST)
    await assert_exact(good, f"acl-{transport}")
    bad = make_limiter(f"{scheme}://alice:wrong@127.0.0.1:{srv.port}/0{q}", timeout=FAST)
    await assert_fails_fast(bad, "WRONGPASS")


async def test_slow_name_resolution_never_holds_a_check(redis_tls_url: str, tls_certs: Certs,
                                                        make_limiter: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The resolver is held 1.5 s (a test hook of the engine, read when its
    # thread starts).  The loop thread goes on answering meanwhile: a
    # connect() with a 50 ms deadline fails on time, naming the server.
    monkeypatch.setenv("RATEGATE_TEST_RESOLVE_DELAY_MS", "1500")
    port = tls_port(redis_tls_url)
    lim = make_limiter(f"rediss://localhost:{port}/0", timeout=0.05, connect_timeout=5.0,
                       ssl_ca_certs=tls_certs.ca)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no answer from localhost:{port} within the timeout"):
        await lim._engine.connect(0.05)
    assert time.monotonic() - t0 < 1.0
    # A check waits for the first connection (up to connect_timeout, the
    # first-connection rule), which comes up once the name is resolved.
    d = await lim.hit("k", "3/minute")
    assert d.error is None and d.allowed, lim.stats()["last_error"]
    assert time.monotonic() - t0 >= 1.4  # it did wait for the resolver
    # From then on the 50 ms timeout holds alone.
    assert (await lim.hit("k", "3/minute")).error is None


# -- construction -----------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["ssl_ca_certs", "ssl_certfile", "ssl_keyfile"])
def test_missing_file_is_named(opt: str, tls_certs: Certs, tmp_path: Any) -> None:
    missing = str(tmp_path / "nope.pem")
    kw = {opt: missing}
    if opt == "ssl_keyfile":
        kw["ssl_certfile"] = tls_certs.client_cert
    with pytest.raises(ValueError, match=rf"{opt}.*{missing}"):
        rategate.Limiter("rediss://127.0.0.1:6380/0", **kw)


@pytest.mark.parametrize("opt", ["ssl_ca_certs", "ssl_certfile"])
def test_unparsable_file_is_named(opt: str, tls_certs: Certs) -> None:
    garbage = tls_certs.path("garbage.pem")
    with pytest.raises(ValueError, match=rf"{opt}.*{garbage}"):
        rategate.Limiter("rediss://127.0.0.1:6380/0", **{opt: garbage})


def test_key_that_does_not_match_the_certificate(tls_certs: Certs) -> None:
    with pytest.raises(ValueError, match="is not the key of the certificate"):
        rategate.Limiter("rediss://127.0.0.1:6380/0", ssl_certfile=tls_certs.client_cert,
                         ssl_keyfile=tls_certs.server_key)


@pytest.mark.parametrize(("url", "kw", "match"), [
    ("redis://127.0.0.1:6379/0", {"ssl_ca_certs": "/x.pem"}, "needs a rediss://"),
    ("redis://127.0.0.1:6379/0?ssl_ca_certs=/x.pem", {}, "TLS options need rediss://"),
    ("rediss://127.0.0.1:6380/0?ssl_cert_reqs=optional", {}, "ssl_cert_reqs must be"),
    ("rediss://127.0.0.1:6380/0?ssl_check_hostname=maybe", {}, "ssl_check_hostname must be"),
    ("rediss://127.0.0.1:6380/0?bogus=1", {}, "unknown option 'bogus'"),
    ("rediss://127.0.0.1:6380/0?ssl_cert_reqs=none", {"ssl_cert_reqs": "none"}, "both in the URL"),
    ("rediss://127.0.0.1:6380/0?ssl_cert_reqs=none&ssl_check_hostname=true", {}, "needs ssl_cert_reqs"),
    ("redis+tls://127.0.0.1:6380/0", {}, "rediss://"),
])
def test_bad_tls_options_are_named(url: str, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rategate.Limiter(url, **kw)


def test_parse_storage_url_tls_defaults() -> None:
    cfg = parse_storage_url("rediss://u:p@redis.example.com:6380/2")
    assert cfg["tls"] is True and cfg["ssl_verify"] is True and cfg["ssl_check_hostname"] is True
    assert (cfg["host"], cfg["port"], cfg["db"], cfg["username"], cfg["password"]) == (
        "redis.example.com", 6380, 2, "u", "p")
    assert parse_storage_url("redis://h/0")["tls"] is False
