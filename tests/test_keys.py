"""Key functions: client_ip (trusted proxies, nginx real_ip_recursive), header, bounds.

Pure Python, no core and no Redis needed.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from rategate import keys
from rategate.keys import MAX_KEY_LENGTH, bound_key, client_ip, header, remote_addr


def scope(client: str | None = "203.0.113.9", *headers: tuple[str, str], port: int = 50000) -> dict[str, Any]:
    return {
        "type": "http",
        "client": None if client is None else (client, port),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }


XFF = "x-forwarded-for"


# -- client_ip without proxies -------------------------------------------------
def test_socket_address_is_the_key() -> None:
    assert client_ip()(scope("203.0.113.9")) == "203.0.113.9"
    assert remote_addr(scope("203.0.113.9")) == "203.0.113.9"


def test_forwarding_headers_ignored_without_trusted_proxies() -> None:
    s = scope("203.0.113.9", (XFF, "1.2.3.4"), ("forwarded", "for=1.2.3.4"), ("x-real-ip", "1.2.3.4"))
    assert client_ip()(s) == "203.0.113.9"


def test_no_peer_address_shares_one_key() -> None:
    # A unix-socket server gives no client: never "unlimited", one shared key.
    assert client_ip()(scope(None)) == keys.UNKNOWN_CLIENT
    assert client_ip(["10.0.0.0/8"])(scope(None, (XFF, "1.2.3.4"))) == keys.UNKNOWN_CLIENT
    assert remote_addr(scope(None)) == keys.UNKNOWN_CLIENT


# -- spoofing --------------------------------------------------------------------
def test_untrusted_client_cannot_spoof() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    for value in ["1.2.3.4", "10.0.0.1", "1.2.3.4, 10.0.0.2", "garbage", ""]:
        assert f(scope("203.0.113.9", (XFF, value))) == "203.0.113.9", value


def test_trusted_proxy_gives_the_real_client() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert f(scope("10.1.2.3", (XFF, "198.51.100.7"))) == "198.51.100.7"


def test_client_spoofing_through_a_trusted_proxy_is_ignored() -> None:
    # The client sent "X-Forwarded-For: 1.2.3.4"; the proxy appended the
    # address it saw.  Only the proxy's entry is read.
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert f(scope("10.1.2.3", (XFF, "1.2.3.4, 198.51.100.7"))) == "198.51.100.7"
    # Even a spoofed "trusted" address on the left is never reached.
    assert f(scope("10.1.2.3", (XFF, "10.9.9.9, 198.51.100.7"))) == "198.51.100.7"


def test_recursive_walk_through_trusted_hops() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8", "192.168.0.0/16"])
    # client -> cdn edge (untrusted? no: 192.168) -> lb (10.x) -> us
    s = scope("10.0.0.5", (XFF, "7.7.7.7, 198.51.100.7, 192.168.1.1"))
    assert f(s) == "198.51.100.7"


def test_all_hops_trusted_uses_the_leftmost() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert f(scope("10.0.0.5", (XFF, "10.0.0.9, 10.0.0.8"))) == "10.0.0.9"


def test_trusted_peer_without_header_is_the_key() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert f(scope("10.0.0.5")) == "10.0.0.5"


def test_several_header_lines_are_joined_in_order() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    s = scope("10.0.0.5", (XFF, "1.2.3.4"), (XFF, "198.51.100.7, 10.0.0.6"))
    assert f(s) == "198.51.100.7"


def test_header_name_case_does_not_matter() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    s = {"type": "http", "client": ("10.0.0.5", 1), "headers": [(b"X-Forwarded-For", b"198.51.100.7")]}
    assert f(s) == "198.51.100.7"


@pytest.mark.parametrize(
    "value",
    [
        "not-an-ip",
        "198.51.100.7, garbage",
        "198.51.100.7, 999.1.1.1",
        "[2001:db8::1",
        "1.2.3.4:notaport",
        "unknown",
        "\x00\xff",
        "1.2.3.4 5.6.7.8",
        "1" * 5000,
    ],
)
def test_malformed_hop_falls_back_to_the_socket_address(value: str) -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert f(scope("10.0.0.5", (XFF, value))) == "10.0.0.5"


def test_malformed_hop_behind_a_good_one_is_never_reached() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert f(scope("10.0.0.5", (XFF, "garbage, 198.51.100.7"))) == "198.51.100.7"


def test_empty_items_are_skipped_like_nginx() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert f(scope("10.0.0.5", (XFF, "198.51.100.7, , "))) == "198.51.100.7"
    assert f(scope("10.0.0.5", (XFF, " , "))) == "10.0.0.5"


def test_hops_with_ports_and_brackets() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert f(scope("10.0.0.5", (XFF, "198.51.100.7:4711"))) == "198.51.100.7"
    assert f(scope("10.0.0.5", (XFF, "[2001:db8::7]:4711"))) == "2001:db8::7"
    assert f(scope("10.0.0.5", (XFF, "[2001:db8::7]"))) == "2001:db8::7"
    assert f(scope("10.0.0.5", (XFF, "2001:DB8:0::7"))) == "2001:db8::7"  # canonical form


def test_a_huge_header_from_behind_a_proxy_is_cheap_and_correct() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    spoof = ", ".join(["1.2.3.4"] * 20000)
    assert f(scope("10.0.0.5", (XFF, spoof + ", 198.51.100.7"))) == "198.51.100.7"
    # A chain of more trusted hops than are ever walked ends in a malformed
    # remainder: the proxy's address, not anything the client wrote.
    chain = ", ".join(["1.2.3.4"] + ["10.0.0.1"] * 100)
    assert f(scope("10.0.0.5", (XFF, chain))) == "10.0.0.5"


def test_ipv4_mapped_peers_and_networks() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    assert f(scope("::ffff:10.0.0.5", (XFF, "198.51.100.7"))) == "198.51.100.7"
    g = client_ip(trusted_proxies=["::ffff:10.0.0.0/104"])
    assert g(scope("10.0.0.5", (XFF, "198.51.100.7"))) == "198.51.100.7"
    assert client_ip(trusted_proxies=["10.0.0.0/8"])(scope("::ffff:203.0.113.9")) == "203.0.113.9"


def test_trusted_single_addresses_and_ip_objects() -> None:
    f = client_ip(trusted_proxies=["127.0.0.1", ipaddress.ip_network("192.168.0.0/16"),
                                   ipaddress.ip_address("::1")])
    assert f(scope("127.0.0.1", (XFF, "198.51.100.7"))) == "198.51.100.7"
    assert f(scope("127.0.0.2", (XFF, "198.51.100.7"))) == "127.0.0.2"
    assert f(scope("192.168.3.3", (XFF, "198.51.100.7"))) == "198.51.100.7"
    assert f(scope("::1", (XFF, "198.51.100.7"))) == "198.51.100.7"
    assert client_ip("127.0.0.1")(scope("127.0.0.1", (XFF, "198.51.100.7"))) == "198.51.100.7"


def test_unix_socket_proxy() -> None:
    f = client_ip(trusted_proxies=["unix"])
    assert f(scope(None, (XFF, "198.51.100.7"))) == "198.51.100.7"
    assert f(scope(None)) == keys.UNKNOWN_CLIENT
    # "unix" trusts no TCP peer.
    assert f(scope("10.0.0.5", (XFF, "198.51.100.7"))) == "10.0.0.5"


def test_non_ip_peer_is_one_shared_key() -> None:
    # issue 8 #15: the peer may be text uvicorn copied from a proxy header;
    # one that is not an IP address is refused into one shared key.
    for f in (client_ip(trusted_proxies=["10.0.0.0/8"]), client_ip()):
        assert f(scope("testclient", (XFF, "198.51.100.7"))) == keys.UNKNOWN_CLIENT
        assert f(scope("garbage-1")) == f(scope("garbage-2")) == keys.UNKNOWN_CLIENT
        assert f(scope("")) == keys.UNKNOWN_CLIENT


# -- Forwarded (RFC 7239) and X-Real-IP -------------------------------------------
def test_forwarded_header() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"], proxy_header="forwarded")
    s = scope("10.0.0.5", ("forwarded", 'for=1.2.3.4, for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.9'))
    assert f(s) == "2001:db8:cafe::17"
    s = scope("10.0.0.5", ("forwarded", "proto=https;For=198.51.100.7;by=10.0.0.5"))
    assert f(s) == "198.51.100.7"


@pytest.mark.parametrize("value", ["for=unknown", "for=_hidden", "proto=https", 'for="1.2.3.4', "for=1.2.3.4;;="])
def test_forwarded_unusable_falls_back(value: str) -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"], proxy_header="Forwarded")
    got = f(scope("10.0.0.5", ("forwarded", value)))
    assert got in ("10.0.0.5", "1.2.3.4")
    if "1.2.3.4" not in value or '"' in value:
        assert got == "10.0.0.5"


def test_only_the_configured_header_is_read() -> None:
    # The proxy maintains X-Forwarded-For; a client-supplied Forwarded header
    # passes through it untouched and must not choose the key.
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    s = scope("10.0.0.5", ("forwarded", "for=1.2.3.4"), (XFF, "198.51.100.7"))
    assert f(s) == "198.51.100.7"
    g = client_ip(trusted_proxies=["10.0.0.0/8"], proxy_header="forwarded")
    s = scope("10.0.0.5", (XFF, "1.2.3.4"), ("forwarded", "for=198.51.100.7"))
    assert g(s) == "198.51.100.7"


def test_x_real_ip() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"], proxy_header="x-real-ip")
    assert f(scope("10.0.0.5", ("x-real-ip", "198.51.100.7"))) == "198.51.100.7"
    assert f(scope("10.0.0.5", ("x-real-ip", "nope"))) == "10.0.0.5"
    assert f(scope("203.0.113.9", ("x-real-ip", "198.51.100.7"))) == "203.0.113.9"


# -- IPv6 grouping -----------------------------------------------------------------
def test_ipv6_prefix_groups_clients() -> None:
    f = client_ip(ipv6_prefix=64)
    a = f(scope("2001:db8:1:2:aaaa::1"))
    b = f(scope("2001:db8:1:2:bbbb::2"))
    c = f(scope("2001:db8:1:3::1"))
    assert a == b == "2001:db8:1:2::/64"
    assert c != a
    assert f(scope("203.0.113.9")) == "203.0.113.9"  # IPv4 untouched


def test_ipv6_prefix_applies_to_forwarded_clients_too() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"], ipv6_prefix=48)
    assert f(scope("10.0.0.5", (XFF, "2001:db8:1:2::9"))) == "2001:db8:1::/48"


def test_without_prefix_ipv6_is_per_address() -> None:
    f = client_ip()
    assert f(scope("2001:db8::1")) != f(scope("2001:db8::2"))


# -- configuration errors ----------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"trusted_proxies": ["*"]}, "choose its own key"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "not an IP address or CIDR"),
        ({"trusted_proxies": ["example.com"]}, "'example.com'"),
        ({"trusted_proxies": [42]}, "not an address or network"),
        ({"ipv6_prefix": 0}, "ipv6_prefix"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"ipv6_prefix": True}, "ipv6_prefix"),
        ({"proxy_header": "x-client-ip"}, "proxy_header"),
    ],
)
def test_bad_configuration_raises_with_a_message(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("*", r"\*").replace("(", r"\(")):
        client_ip(**kwargs)


def test_repr_shows_the_configuration() -> None:
    r = repr(client_ip(["10.0.0.0/8", "unix"], ipv6_prefix=64))
    assert "10.0.0.0/8" in r and "unix" in r and "64" in r


# -- caches stay bounded --------------------------------------------------------------------
def test_address_cache_is_bounded() -> None:
    f = client_ip(trusted_proxies=["10.0.0.0/8"])
    for i in range(keys._CACHE_MAX + 500):
        ip = str(ipaddress.ip_address(0x0B000000 + i))
        assert f(scope("10.0.0.5", (XFF, ip))) == ip
    assert len(f._addr_cache) <= keys._CACHE_MAX


# -- header() -----------------------------------------------------------------------------
def test_header_key() -> None:
    f = header("X-API-Key")
    assert f(scope("203.0.113.9", ("x-api-key", "secret-1"))) == b"x-api-key=secret-1"
    assert f(scope("203.0.113.9", ("x-api-key", "  secret-1 "))) == b"x-api-key=secret-1"


def test_header_first_occurrence_counts() -> None:
    f = header("x-api-key")
    assert f(scope("203.0.113.9", ("x-api-key", "a"), ("x-api-key", "b"))) == b"x-api-key=a"


def test_header_missing_or_empty_falls_back_to_the_socket_address() -> None:
    f = header("x-api-key")
    assert f(scope("203.0.113.9")) == "203.0.113.9"
    assert f(scope("203.0.113.9", ("x-api-key", "   "))) == "203.0.113.9"


def test_header_fallback_function_or_none() -> None:
    f = header("x-api-key", fallback=client_ip(["10.0.0.0/8"]))
    assert f(scope("10.0.0.5", (XFF, "198.51.100.7"))) == "198.51.100.7"
    g = header("x-api-key", fallback=None)
    assert g(scope("203.0.113.9")) is None
    h = header("x-api-key", fallback=lambda s: "anonymous")
    assert h(scope("203.0.113.9")) == "anonymous"


def test_header_value_cannot_impersonate_an_address_key() -> None:
    # A client that puts a victim's IP in the header gets its own bucket.
    f = header("x-api-key")
    victim = f(scope("198.51.100.7"))
    attacker = f(scope("203.0.113.9", ("x-api-key", "198.51.100.7")))
    assert victim != attacker


def test_long_header_values_are_hashed_and_bounded() -> None:
    f = header("x-api-key")
    a = f(scope("203.0.113.9", ("x-api-key", "a" * 65536)))
    b = f(scope("203.0.113.9", ("x-api-key", "a" * 65535 + "b")))
    assert isinstance(a, bytes) and len(a) <= MAX_KEY_LENGTH
    assert a.startswith(b"x-api-key~")
    assert a != b
    assert a == f(scope("1.1.1.1", ("x-api-key", "a" * 65536)))  # stable
    # The hashed form cannot be produced by sending a short value.
    short = f(scope("203.0.113.9", ("x-api-key", a[len(b"x-api-key~"):].decode())))
    assert short != a
    # At the bound: kept as it is.
    exact = f(scope("203.0.113.9", ("x-api-key", "k" * MAX_KEY_LENGTH)))
    assert exact == b"x-api-key=" + b"k" * MAX_KEY_LENGTH


@pytest.mark.parametrize("name", ["", "   ", "x api key", "x-api-key:", 5])
def test_header_bad_name(name: Any) -> None:
    with pytest.raises(ValueError, match="header name"):
        header(name)


def test_header_bad_fallback() -> None:
    with pytest.raises(ValueError, match="fallback must be a key function"):
        header("x-api-key", fallback="1.2.3.4")


# -- bound_key --------------------------------------------------------------------------------
def test_bound_key() -> None:
    assert bound_key("short") == "short"
    assert bound_key(b"short") == b"short"
    long_s = bound_key("x" * 10_000)
    long_b = bound_key(b"x" * 10_000)
    assert long_s == long_b and isinstance(long_s, str)
    assert long_s.startswith("#") and len(long_s) == 41
    assert bound_key("x" * 10_001) != long_s
    assert bound_key("\udcff" * 300).startswith("#")  # lone surrogates do not raise
