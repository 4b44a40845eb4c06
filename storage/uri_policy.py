"""Which URIs salient may read, decided before any connection is made or any file is opened.

Image URIs come from people and programs salient does not control (messages on the queue, manifests, the
HTTP API), so by default:

- ``http(s)://`` reaches public addresses only. A name is resolved once, every address it resolves to is
  checked, and the reader connects to a checked address (never a second lookup that could answer
  differently). Loopback, private, shared (CGNAT), reserved and link-local addresses are closed; IPv4
  hidden inside IPv6 (``::ffff:127.0.0.1``, 6to4, NAT64) counts as the IPv4 address. Unspecified
  (``0.0.0.0``, ``::``) and multicast addresses are never a server. ``SALIENT_ALLOW_PRIVATE_NETWORKS``
  opens the non-public ranges except link-local (``169.254.0.0/16``, ``fe80::/10``: cloud metadata
  endpoints); ``SALIENT_ALLOWED_NETWORKS`` opens exactly the CIDRs it lists, link-local included.
- ``file://`` (and paths) reach only files whose real path, after ``..`` and symlinks, lies under
  ``SALIENT_FILE_ROOTS``; none by default. The in-process commands (``salient run``, ``sanity``) add
  the paths on their own command line (see ``sources.with_command_line_roots``).
- ``s3://`` reaches only the buckets of ``SALIENT_S3_BUCKETS`` when it is set.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from .settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: Python calls it neither private nor global
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # connect() to 0.x reaches this host on Linux
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = (ipaddress.ip_address("fd00:ec2::254"),)  # AWS's IPv6 metadata endpoint sits in fc00::/7


class Refused(Exception):
    """A URI this process may not read; the message says why and which setting would open it."""


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), where a connection really goes."""
    if ip.version == 4:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_kind(ip: IPAddress) -> str | None:
    """None for a public unicast address; else what it is: "loopback", "link-local", "private", ...
    An IPv6 address carrying an IPv4 one is judged by the IPv4 address."""
    ip = _embedded_ipv4(ip) or ip
    if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local or ip in _METADATA:
        return "link-local"
    if ip.version == 4 and ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global:
        return "private"
    return None


def refusal(ip: IPAddress, settings: Settings) -> str | None:
    """Why ``settings`` do not let this process connect to ``ip`` ("a loopback address; ..."), or None."""
    kind = address_kind(ip)
    if kind is None:
        return None
    inner = _embedded_ipv4(ip)
    what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address" + (f" (IPv4 {inner} inside IPv6)" if inner else "")
    if kind in ("unspecified", "multicast"):
        return f"{what}, never an image server"
    if any(ip in net or (inner is not None and inner in net) for net in settings.allowed_networks):
        return None
    if kind == "link-local":
        return f"{what}, where cloud metadata endpoints live; only SALIENT_ALLOWED_NETWORKS opens it"
    if settings.allow_private_networks:
        return None
    return f"{what}; SALIENT_ALLOW_PRIVATE_NETWORKS=true or SALIENT_ALLOWED_NETWORKS would open it"


def vetted_addresses(host: str, port: int, settings: Settings) -> list[str]:
    """Resolve ``host`` once; the addresses this process may connect to, in the resolver's order.

    Raises Refused when there is none (naming the first refused address), OSError (socket.gaierror)
    when the name does not resolve.
    """
    allowed: list[str] = []
    first_refused: str | None = None
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])  # without an IPv6 zone ("fe80::1%eth0")
        reason = refusal(ip, settings)
        if reason is None:
            if str(ip) not in allowed:
                allowed.append(str(ip))
        elif first_refused is None:
            first_refused = f"{ip} is {reason}" if _is_literal(host) else f"{host} resolves to {ip}, {reason}"
    if not allowed:
        raise Refused(first_refused or f"{host} resolves to no address")
    return allowed


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_file(path: Path, settings: Settings) -> Path:
    """The real path of ``path`` (``..`` and symlinks resolved) if it lies under one of the file roots."""
    if not settings.file_roots:
        raise Refused("local files are closed here: SALIENT_FILE_ROOTS names the folders this process may read")
    real = Path(os.path.realpath(path))
    for root in settings.file_roots:
        if real.is_relative_to(os.path.realpath(root)):
            return real
    raise Refused("the file is outside the folders of SALIENT_FILE_ROOTS (after resolving .. and symlinks)")


def check_bucket(bucket: str, settings: Settings) -> None:
    if settings.s3_buckets and bucket not in settings.s3_buckets:
        raise Refused(f"bucket {bucket!r} is not one of SALIENT_S3_BUCKETS")
