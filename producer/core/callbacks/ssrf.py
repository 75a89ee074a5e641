"""Where a callback may point: never at loopback, private, link-local, multicast, reserved, unspecified or cloud
metadata addresses, unless the deployment allow-lists the host, address or network (``GENQ_WEBHOOK__ALLOW_HOSTS``).

A callback URL is a request genq makes on a caller's behalf from inside its own network; without this check any
caller could make workers POST to Redis, an internal admin page or the cloud metadata service (SSRF). It runs twice:
when a job is submitted (refused before anything is enqueued) and before every delivery attempt, because DNS
answers change: a name that was public at submit time can point inside the network an hour later.

Every address a host resolves to must pass: the HTTP client may connect to any of them. The worker then connects
to the addresses it vetted (:func:`vetted_addresses`) instead of resolving the name a second time, so a DNS server
cannot answer one way to the check and another way to the connection (DNS rebinding).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from producer.errors import CallbackHostUnresolved, CallbackUrlRefused

_REDACTED = "\u2026"  # what stands for everything after a URL's host in log lines
_MAX_LOGGED_URL_CHARS = 200

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], list[str]]

# Instance metadata services hand out credentials; each is also caught by a broader rule (link-local, unique local,
# shared address space), but they get a name of their own, and a network allow-listed around one never opens it.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OCI, OpenStack
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)
# IPv6 prefixes that carry an IPv4 address a packet ends up at: NAT64 (RFC 6052) and 6to4 (RFC 3056, via
# ``IPv6Address.sixtofour``). IPv4-mapped addresses (::ffff:a.b.c.d) are unwrapped through ``ipv4_mapped``.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def resolve_host(host: str) -> list[str]:
    """Every address ``host`` resolves to for TCP (``getaddrinfo``), as text, in the system's order of preference.

    Raises:
        OSError: the name does not resolve (``socket.gaierror``).
        UnicodeError: the name cannot be encoded for DNS (a label over 63 characters).
    """
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_refusal(address: IPAddress) -> str | None:
    """Why genq will not call ``address`` (``"loopback"``, ``"cloud metadata"``, ...), or None for a public one.

    An IPv6 address that carries an IPv4 one (IPv4-mapped ``::ffff:127.0.0.1``, NAT64 ``64:ff9b::a9fe:a9fe``, 6to4
    ``2002:7f00:1::``) is judged by the IPv4 address it reaches.
    """
    inner = _embedded_ipv4(address)
    if inner is not None:
        reason = address_refusal(inner)
        return None if reason is None else f"{reason} ({inner} inside an IPv6 address)"
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:  # before the global test: 224.0.0.0/4 counts as global in the ipaddress module
        return "multicast"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:  # shared address space (100.64.0.0/10) and other special-purpose blocks
        return "not globally routable"
    return None


@dataclass(frozen=True)
class AllowList:
    """Hosts (by name) and networks (single addresses are /32 or /128) that callbacks may reach after all."""

    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Read ``GENQ_WEBHOOK__ALLOW_HOSTS`` entries: ``hooks.internal``, ``127.0.0.1``, ``[::1]``, ``10.0.0.0/8``.

        Raises:
            ValueError: an entry is empty or is neither an address, a network nor a host name.
        """
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().removeprefix("[").replace("]", "", 1).rstrip(".")
            if not entry:
                raise ValueError(f"empty allow-list entry {raw!r}")
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or ":" in entry or " " in entry:
                raise ValueError(f"allow-list entry {raw!r} is neither an IP address, a network (CIDR) nor a host name")
            hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks))

    def permits_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def permits(self, address: IPAddress) -> bool:
        if address in METADATA_ADDRESSES:  # only an entry naming exactly this address opens it
            return any(net.num_addresses == 1 and address in net for net in self.networks)
        return any(address in net for net in self.networks)


def check_callback_url(url: str, allow: Sequence[str] = (), *, resolve: Resolver | None = None) -> None:
    """Refuse a callback URL whose host is, or resolves to, an address genq must not call; return quietly if fine.

    A host named in ``allow`` is trusted whatever it resolves to; an address is fine when it is public or falls in
    an allow-listed network. Arguments and errors as :func:`vetted_addresses`.
    """
    vetted_addresses(url, allow, resolve=resolve)


def vetted_addresses(url: str, allow: Sequence[str] = (), *, resolve: Resolver | None = None) -> list[str]:
    """The addresses a callback to ``url`` may connect to, after the checks of :func:`check_callback_url`.

    Connect to these rather than resolving the host again: a second lookup could answer differently (DNS
    rebinding). Empty when the host is allow-listed by name: connect by name, whatever it resolves to.

    Args:
        url: the callback URL.
        allow: ``GENQ_WEBHOOK__ALLOW_HOSTS``: host names, addresses and networks (CIDR).
        resolve: host -> addresses; default :func:`resolve_host` (``getaddrinfo``). Literal addresses are never
            looked up.

    Returns:
        The addresses as text, in the resolver's order.

    Raises:
        CallbackUrlRefused: no host, or an address it resolves to is loopback, private, link-local, multicast,
            reserved, unspecified or cloud metadata and not allow-listed. Retrying will not help.
        CallbackHostUnresolved: the host does not resolve (a typo, or DNS is down: may pass later).
        ValueError: an ``allow`` entry is malformed (a configuration error).
    """
    allowed = _allow_list(tuple(allow))
    try:
        host = urlsplit(url).hostname
    except ValueError as exc:  # e.g. an unbalanced '[' in the netloc
        raise CallbackUrlRefused(f"callback URL {redact_url(url)!r} is malformed: {exc}") from None
    if not host:
        raise CallbackUrlRefused(f"callback URL {redact_url(url)!r} has no host")
    if allowed.permits_host(host):
        return []
    addresses = _addresses(host, resolve or resolve_host)
    for text in addresses:
        address = ipaddress.ip_address(text)
        if allowed.permits(address):
            continue
        reason = address_refusal(address)
        if reason is not None:
            where = f"is {text}" if text == host else f"resolves to {text}"
            raise CallbackUrlRefused(
                f"callback host {host!r} {where} ({reason}): genq does not call loopback, private, link-local, "
                "multicast, reserved or metadata addresses; use a public URL, or allow-list the host in "
                "GENQ_WEBHOOK__ALLOW_HOSTS"
            )
    return addresses


@functools.lru_cache(maxsize=16)
def _allow_list(entries: tuple[str, ...]) -> AllowList:
    # Parsed once per setting, not per attempt: a worker vets every attempt against the same few lists.
    return AllowList.parse(entries)


def _addresses(host: str, resolve: Resolver) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]  # a literal address: nothing to look up
    except ValueError:
        pass
    try:
        found = resolve(host)
    except (OSError, UnicodeError) as exc:
        raise CallbackHostUnresolved(f"callback host {host!r} does not resolve ({exc}); check the URL") from None
    if not found:
        raise CallbackHostUnresolved(f"callback host {host!r} resolves to no address; check the URL")
    return found


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def redact_url(url: str) -> str:
    """``url`` as a log line may show it: ``scheme://host[:port]``, and ``/…`` for whatever followed.

    Receivers put their secret anywhere after the host: in the path (Slack's ``/services/T…/B…/<secret>``,
    ``/hook/<token>``, or a first segment that is itself the token), the query, the fragment, or the userinfo.
    No part of them is kept, only the receiver's origin: ``https://user:pw@hooks.example:8443/services/T1/B2/x?t=y``
    gives ``https://hooks.example:8443/…``. The log line's job id leads to the whole URL, in the job's spec.
    Works on text, not a parsed URL, so it never raises on a malformed one; at most 200 characters come back.
    """
    scheme, sep, tail = url.partition("//")
    if not sep:  # no authority to keep: nothing of it is safe to print
        return _REDACTED if url else ""
    end = min((i for i in map(tail.find, "/?#\\") if i >= 0), default=len(tail))
    authority, rest = tail[:end], tail[end:]
    host = authority.rpartition("@")[2]  # userinfo (user:password@) dropped
    shown = scheme + sep + host + ("/" + _REDACTED if rest not in ("", "/") else rest)
    if len(shown) > _MAX_LOGGED_URL_CHARS:
        shown = shown[: _MAX_LOGGED_URL_CHARS - 1] + _REDACTED
    return shown
