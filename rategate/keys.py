"""Key functions: who a request counts against.

A key function takes the ASGI ``scope`` and returns ``str`` or ``bytes`` (the
client's identity under one rule) or ``None`` ("do not limit this request").
The middleware and the FastAPI dependency accept any such callable; this module
has the usual ones:

- :func:`client_ip` - the socket address, or the real client behind proxies you
  trust (``X-Forwarded-For``, ``Forwarded`` or ``X-Real-IP`` walked right to
  left, the way nginx's ``real_ip_recursive on`` does), IPv6 optionally grouped
  by prefix.
- :func:`header` - a request header such as ``x-api-key``, with a fallback.

Security rules kept here, because a key function is where a limiter is
bypassed:

- A forwarding header is read only when the *socket* peer is a trusted proxy,
  and then only as far left as the hops are themselves trusted: the address
  the last trusted proxy saw is the client.  Whatever an untrusted client
  writes to the left of that is never read.
- A malformed hop never crashes and never lets a request through unlimited:
  the key falls back to the socket address (the proxy), which over-limits
  rather than under-limits.
- Keys are bounded in length (:data:`MAX_KEY_LENGTH`): a longer key is replaced
  by a BLAKE2b digest, so a 64 KiB header cannot become a 64 KiB Redis key.

Everything that can be worked out once (parsed networks, header names) is done
when the key function is built; per-address results are kept in small bounded
caches, so the per-request cost is a few dict look-ups.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import Scope
else:
    Scope = Any

__all__ = [
    "KeyFunc",
    "MAX_KEY_LENGTH",
    "bound_key",
    "key_digest",
    "client_ip",
    "header",
    "remote_addr",
]

KeyFunc = Callable[[Scope], Union[str, bytes, None]]

#: Keys longer than this many characters (or bytes) are hashed.
MAX_KEY_LENGTH = 200

# Per-address caches are cleared when they reach this many entries: an
# attacker cycling through addresses costs recomputation, never memory.
_CACHE_MAX = 8192

# The key used when the server gives no peer address at all (a unix socket,
# an in-process test client) and no trusted proxy says who the client is.
# Every such request shares it: over-limiting, never a bypass.
UNKNOWN_CLIENT = "unknown"

# At most this many proxies between the client and us are walked.
_MAX_HOPS = 32

_IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def key_digest(key: str | bytes) -> str:
    """The 40-hex-digit digest that stands for a key too long to use as it is."""
    data = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def bound_key(key: str | bytes, max_length: int = MAX_KEY_LENGTH) -> str | bytes:
    """``key`` itself if it is at most ``max_length`` long, else ``"#"`` + a digest.

    The digest form starts with ``#`` and is 41 characters long; callers that
    need the two forms to be disjoint give their plain keys a prefix that
    never starts with ``#`` (as :func:`header` and the middleware do).
    """
    if len(key) <= max_length:
        return key
    return "#" + key_digest(key)


def remote_addr(scope: Scope) -> str:
    """The socket peer address (``scope["client"][0]``) as the server gave it, or ``"unknown"``.

    Not normalised: for a key, use :func:`client_ip`, which is.
    """
    client = scope.get("client")
    if client and client[0]:
        return str(client[0])
    return UNKNOWN_CLIENT


def _parse_ip(text: str) -> _IPAddress | None:
    """An address from a header hop or a peer; ``None`` if it is not one.

    Accepts ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]``
    and ``[2001:db8::1]:443``; IPv4-mapped IPv6 becomes IPv4.
    """
    text = text.strip()
    if not text or len(text) > 64:
        return None
    if text[0] == "[":
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1 :]
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
        text = host
    if "%" in text:  # a zone id ("fe80::1%eth0") is not part of the client
        text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _forwarded_for_values(value: str) -> list[str]:
    """The ``for=`` of each element of a ``Forwarded`` header, left to right.

    An element without ``for=``, or a ``for=`` that is not an address
    (``unknown``, an obfuscated ``_name``) yields ``""``: the walk stops there.
    """
    out = []
    for element in value.rsplit(",", _MAX_HOPS):
        found = ""
        for pair in element.split(";"):
            name, eq, val = pair.partition("=")
            if eq and name.strip().lower() == "for":
                val = val.strip()
                if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
                    val = val[1:-1]
                found = val
                break
        out.append(found)
    return out


_PROXY_HEADERS = {
    "x-forwarded-for": b"x-forwarded-for",
    "forwarded": b"forwarded",
    "x-real-ip": b"x-real-ip",
}


class client_ip:  # noqa: N801 - used like a function: key=client_ip(...)
    """Key by client address, honouring forwarding headers from trusted proxies.

    ``client_ip()`` keys by the socket address.  With ``trusted_proxies``
    (addresses or CIDR networks, for example ``["10.0.0.0/8", "127.0.0.1"]``,
    and the word ``"unix"`` for connections with no peer address, as behind
    nginx on a unix socket) the ``proxy_header`` is read when the socket peer
    is one of them, walking its hops from the right while each is trusted;
    the first untrusted hop is the client.  If every hop is trusted, the
    leftmost is.

    ``proxy_header`` is the one header your proxy maintains:
    ``"x-forwarded-for"`` (default), ``"forwarded"`` (RFC 7239) or
    ``"x-real-ip"`` (one address, not walked).  Only one is read, on purpose:
    a client can send the header your proxy does not touch, and trusting both
    would let it choose its own key.

    ``ipv6_prefix=64`` keys IPv6 clients by their /64 (one home or one cloud
    VM usually holds a whole /64; per-address limits would be a bypass).

    A malformed hop falls back to the socket address.  Several header lines
    are joined in order, as HTTP says.  Note that uvicorn rewrites
    ``scope["client"]`` itself from ``X-Forwarded-For`` when the peer is in
    its ``--forwarded-allow-ips`` (default ``127.0.0.1``); that rewritten
    address, text from the network, is what this function then sees as the
    socket address.  So the socket address is parsed and normalised too
    (``FE80:0::2`` and ``fe80::2`` are one client; IPv4-mapped IPv6 is
    IPv4; a zone id is dropped), and one that is not an IP address at all
    (empty, a test client's name, a unix socket path, garbage from a
    header) is keyed as ``"unknown"``: one shared bucket, never a bypass.
    """

    __slots__ = (
        "trusted_proxies",
        "ipv6_prefix",
        "proxy_header",
        "_nets",
        "_trust_unix",
        "_hdr",
        "_plain",
        "_addr_cache",
    )

    def __init__(
        self,
        trusted_proxies: Iterable[str | _IPNetwork | _IPAddress] | str | None = None,
        *,
        ipv6_prefix: int | None = None,
        proxy_header: str = "x-forwarded-for",
    ) -> None:
        if isinstance(trusted_proxies, str):
            trusted_proxies = [trusted_proxies]
        nets: list[_IPNetwork] = []
        trust_unix = False
        for item in trusted_proxies or ():
            if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                nets.append(item)
                continue
            if isinstance(item, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                nets.append(ipaddress.ip_network(item))
                continue
            if not isinstance(item, str):
                raise ValueError(
                    f"trusted_proxies: {item!r} is not an address or network; "
                    'write it like "10.0.0.0/8" or "127.0.0.1"'
                )
            text = item.strip()
            if text == "unix":
                trust_unix = True
                continue
            if text == "*":
                raise ValueError(
                    'trusted_proxies: "*" would let any client choose its own key by sending '
                    "X-Forwarded-For; list your proxies' networks instead, "
                    'like ["10.0.0.0/8", "172.16.0.0/12"]'
                )
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {item!r} is not an IP address or CIDR network; "
                    'write it like "10.0.0.0/8", "192.168.1.7" or "2001:db8::/32"'
                ) from None
        if ipv6_prefix is not None:
            if isinstance(ipv6_prefix, bool) or not isinstance(ipv6_prefix, int) or not 1 <= ipv6_prefix <= 128:
                raise ValueError(f"ipv6_prefix must be an int from 1 to 128 (64 is usual), got {ipv6_prefix!r}")
        if not isinstance(proxy_header, str) or proxy_header.lower() not in _PROXY_HEADERS:
            raise ValueError(
                f"proxy_header must be one of {', '.join(map(repr, _PROXY_HEADERS))}, got {proxy_header!r}"
            )
        # IPv4-mapped IPv6 networks are matched as IPv4, like the addresses.
        norm: list[_IPNetwork] = []
        for n in nets:
            if (isinstance(n, ipaddress.IPv6Network) and n.network_address.ipv4_mapped is not None
                    and n.prefixlen >= 96):
                n = ipaddress.ip_network(f"{n.network_address.ipv4_mapped}/{n.prefixlen - 96}")
            norm.append(n)
        self.trusted_proxies: tuple[_IPNetwork, ...] = tuple(norm)
        self.ipv6_prefix = ipv6_prefix
        self.proxy_header = proxy_header.lower()
        self._nets = self.trusted_proxies
        self._trust_unix = trust_unix
        self._hdr = _PROXY_HEADERS[self.proxy_header]
        # No proxies and no grouping: the socket address is the key (normalised).
        self._plain = not norm and not trust_unix and ipv6_prefix is None
        # peer/hop text -> (key for that address or None if malformed, trusted?)
        self._addr_cache: dict[str, tuple[str | None, bool]] = {}

    def __repr__(self) -> str:
        nets = [str(n) for n in self.trusted_proxies] + (["unix"] if self._trust_unix else [])
        return (
            f"client_ip(trusted_proxies={nets!r}, ipv6_prefix={self.ipv6_prefix!r}, "
            f"proxy_header={self.proxy_header!r})"
        )

    # -- per address ---------------------------------------------------------
    def _lookup(self, text: str) -> tuple[str | None, bool]:
        """(key, trusted) for one address text, cached; key None if malformed."""
        cache = self._addr_cache
        hit = cache.get(text)
        if hit is not None:
            return hit
        ip = _parse_ip(text)
        if ip is None:
            res: tuple[str | None, bool] = (None, False)
        else:
            trusted = False
            for net in self._nets:
                if ip.version == net.version and ip in net:
                    trusted = True
                    break
            if ip.version == 6 and self.ipv6_prefix is not None:
                key = str(ipaddress.ip_network(f"{ip}/{self.ipv6_prefix}", strict=False))
            else:
                key = str(ip)
            res = (key, trusted)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[text] = res
        return res

    # -- per request -----------------------------------------------------------
    def __call__(self, scope: Scope) -> str:
        client = scope.get("client")
        if client:
            key, trusted = self._lookup(str(client[0]))
            if key is None:
                # Not an IP: a test client's "testclient", a unix path, or
                # whatever uvicorn copied from a proxy header.  One shared
                # key (over-limits, never a bypass); trust nothing.
                return UNKNOWN_CLIENT
            if self._plain or not trusted:
                return key
        else:
            if not self._trust_unix:
                return UNKNOWN_CLIENT
            key = UNKNOWN_CLIENT
        return self._walk(scope, key)

    def _walk(self, scope: Scope, fallback: str) -> str:
        """The client behind trusted proxies; ``fallback`` is the peer's key."""
        name = self._hdr
        values: list[bytes] = []
        for k, v in scope.get("headers", ()):
            if k == name or (len(k) == len(name) and k.lower() == name):
                values.append(v)
        if not values:
            return fallback
        try:
            text = b",".join(values).decode("latin-1")
        except Exception:  # pragma: no cover - bytes always decode as latin-1
            return fallback
        if name == b"x-real-ip":
            key, _ = self._lookup(text)
            return fallback if key is None else key
        # Only the right end is ever read: a client behind the proxy can send
        # thousands of hops, so split off at most _MAX_HOPS (the rest, if
        # reached, is one malformed item).
        hops = _forwarded_for_values(text) if name == b"forwarded" else text.rsplit(",", _MAX_HOPS)
        result = fallback
        for hop in reversed(hops):
            hop = hop.strip()
            if not hop and name == b"x-forwarded-for":
                # "a, , b": an empty item. nginx skips separators; so do we.
                continue
            key, trusted = self._lookup(hop)
            if key is None:
                return fallback  # malformed: never crash, never bypass
            result = key
            if not trusted:
                return key
        return result


class header:  # noqa: N801 - used like a function: key=header("x-api-key")
    """Key by a request header, for example an API key.

    ``header("x-api-key")`` returns ``b"x-api-key=" + value``; the header name
    is part of the key, so a client cannot put another client's IP address in
    the header to spend that client's budget.  A value longer than
    :data:`MAX_KEY_LENGTH` is replaced by ``b"x-api-key~"`` + a BLAKE2b digest.

    A missing or empty header uses ``fallback``: a key function (default
    :func:`client_ip` with no trusted proxies, i.e. the socket address), or
    ``None`` to leave such requests unlimited.  If a header appears several
    times, the first one counts.

    ``secret`` (default True): the header's values are secrets (API keys),
    so the denial log and ``Limiter.stats()`` show them as a hash
    (``x-api-key=#<16 hex digits>``, see :meth:`redact` and
    :mod:`rategate.denials`); ``secret=False`` shows them as they are (a
    tenant name).
    """

    __slots__ = ("name", "fallback", "secret", "_name", "_eq", "_hashed")

    _DEFAULT = object()

    def __init__(self, name: str, fallback: Any = _DEFAULT, *, secret: bool = True) -> None:
        if not isinstance(secret, bool):
            raise ValueError(f"header({name!r}): secret must be True or False, got {secret!r}")
        self.secret = secret
        if not isinstance(name, str) or not name.strip() or any(c in name for c in " \t\r\n:"):
            raise ValueError(f'header name must be a non-empty HTTP header name like "x-api-key", got {name!r}')
        if fallback is header._DEFAULT:
            fallback = client_ip()
        if fallback is not None and not callable(fallback):
            raise ValueError(
                f"header({name!r}): fallback must be a key function (like rategate.client_ip()) "
                f"or None, got {fallback!r}"
            )
        self.name = name.strip().lower()
        self.fallback = fallback
        self._name = self.name.encode("latin-1")
        self._eq = self._name + b"="
        self._hashed = self._name + b"~"

    def __repr__(self) -> str:
        return f"header({self.name!r}, fallback={self.fallback!r}, secret={self.secret!r})"

    def redact(self, key: str | bytes) -> str:
        """How a key of this function is shown in logs and ``stats()``: a
        value of the header as ``<name>=#<hash>`` when ``secret`` (as it is
        otherwise), a hashed long value as it is (a digest already), a
        fallback's key as the fallback shows it."""
        from .denials import hashed

        b = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else bytes(key)
        if b.startswith(self._eq):
            value = b[len(self._eq):]
            shown = hashed(value) if self.secret else value.decode("latin-1")
            return self.name + "=" + shown
        if b.startswith(self._hashed):
            return b.decode("latin-1")
        fb = getattr(self.fallback, "redact", None)
        if fb is not None:
            return str(fb(key))
        return b.decode("latin-1") if isinstance(key, bytes) else key

    def __call__(self, scope: Scope) -> str | bytes | None:
        name = self._name
        for k, v in scope.get("headers", ()):
            if k == name or (len(k) == len(name) and k.lower() == name):
                v = v.strip()
                if v:
                    if len(v) > MAX_KEY_LENGTH:
                        return self._hashed + key_digest(v).encode()
                    return bytes(self._eq + v)
                break
        fb = self.fallback
        return None if fb is None else fb(scope)
