"""Where a process listens, and what it tells others to connect to: one ``AdvertisedAddress`` per server or router.

A server binds its command (ROUTER), event (PUB) and ZeroMQ KV sockets on ``--host`` and tells the router, and
through the router its peers, to connect to ``--advertise-host``. The two differ whenever the bind address is
not one that others can dial: ``--host 0.0.0.0`` (every interface: containers, pods) reached at the pod or node
IP, or a private address behind NAT reached at the public one. Every endpoint a peer or the router connects to
is built here, by ``endpoint(port)``: a server's command and event addresses (its ``ServerInfo``), the ZeroMQ KV
transport's endpoint inside its metadata, the router's registry address. NIXL/UCX picks its own interfaces
(``UCX_NET_DEVICES``, see ``engine.envs.apply_ucx_settings``); its metadata is not built here.

``resolve`` validates at start-up, so a wrong address fails before the process serves, not at the first peer:

- advertising a wildcard (``0.0.0.0``) is refused: nobody can dial it;
- advertising a loopback address (``127.0.0.1``, ``localhost``) while bound to a non-loopback one is refused
  unless ``allow_loopback`` (``--allow-loopback-advertise``): peers on other hosts would dial themselves;
- with no ``--advertise-host``, a specific bind address is advertised as is; a wildcard bind advertises this
  host's primary address (the source address of its default route, else its hostname's), and fails when that
  is a loopback address;
- a loopback bind advertised under a non-loopback name only warns: a forwarder (an SSH tunnel, a sidecar) may
  make it reachable.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

logger = logging.getLogger(__name__)

WILDCARD_HOSTS = frozenset({"0.0.0.0", "*", "::", "[::]"})


def is_wildcard(host: str) -> bool:
    return host in WILDCARD_HOSTS


def is_loopback(host: str) -> bool:
    """True for a loopback literal (``127.x``, ``::1``) or a name that resolves only to loopback addresses
    (``localhost``). A name that does not resolve is not known to be loopback: False."""
    literal = _ip(host)
    if literal is not None:
        return literal.is_loopback
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def primary_address() -> str:
    """This host's address as others most likely see it: the source address of the default route (no packet is
    sent), else what the hostname resolves to. May be a loopback address on a host without a network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only used to pick the route
            return s.getsockname()[0]
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class AdvertisedAddress:
    """A bind host and the host that peers are told. Build it with ``resolve`` (which validates)."""

    bind_host: str
    """Interface the sockets bind to (``0.0.0.0``: every interface)."""
    advertise_host: str
    """What peers and the router connect to: an IP or DNS name that reaches ``bind_host`` from other hosts."""

    @classmethod
    def resolve(cls, bind_host: str, advertise_host: str | None = None, *, allow_loopback: bool = False,
                host_flag: str = "--host", advertise_flag: str = "--advertise-host",
                allow_flag: str = "--allow-loopback-advertise") -> "AdvertisedAddress":
        """Validate ``bind_host`` / ``advertise_host`` (module docstring); ``ValueError`` naming the flags."""
        if not bind_host:
            raise ValueError(f"{host_flag} must not be empty")
        bound_loopback = not is_wildcard(bind_host) and is_loopback(bind_host)
        if advertise_host is None:
            if not is_wildcard(bind_host):
                return cls(bind_host, bind_host)
            advertise_host = primary_address()
            if is_loopback(advertise_host) and not allow_loopback:
                raise ValueError(f"{host_flag} {bind_host} accepts connections from other hosts, but this host's "
                                 f"address could not be found (got {advertise_host}): give {advertise_flag} (the "
                                 f"pod or node IP peers dial), or {allow_flag} when every peer runs on this host")
            logger.warning("%s %s and no %s: advertising %s (this host's primary address); give %s to be sure "
                           "peers dial the right one", host_flag, bind_host, advertise_flag, advertise_host,
                           advertise_flag)
            return cls(bind_host, advertise_host)
        if not advertise_host or is_wildcard(advertise_host):
            raise ValueError(f"{advertise_flag} {advertise_host!r} is not an address anyone can connect to: give the "
                             f"IP or DNS name peers dial")
        if is_loopback(advertise_host) and not bound_loopback and not allow_loopback:
            raise ValueError(f"{advertise_flag} {advertise_host} is a loopback address but {host_flag} {bind_host} "
                             f"accepts connections from other hosts, whose peers would dial themselves: advertise "
                             f"this host's address (the pod or node IP), or give {allow_flag} when every peer runs "
                             f"on this host")
        if bound_loopback and not is_loopback(advertise_host):
            logger.warning("%s %s only accepts connections from this host, yet %s %s is advertised: peers on other "
                           "hosts reach it only through a forwarder", host_flag, bind_host, advertise_flag,
                           advertise_host)
        return cls(bind_host, advertise_host)

    def endpoint(self, port: int) -> str:
        """``tcp://ADVERTISE_HOST:PORT``: what a peer connects to for a socket bound on ``port``."""
        return f"tcp://{_bracketed(self.advertise_host)}:{port}"

    def url(self, scheme: str, port: int) -> str:
        """``SCHEME://ADVERTISE_HOST:PORT`` (the router's HTTP base, say)."""
        return f"{scheme}://{_bracketed(self.advertise_host)}:{port}"

    def bind_endpoint(self, port: int | None = None) -> str:
        """``tcp://BIND_HOST[:PORT]``, for ``bind`` (``bind_to_random_port`` without a port)."""
        base = f"tcp://{_bracketed(self.bind_host)}"
        return base if port is None else f"{base}:{port}"


def _bracketed(host: str) -> str:
    ip = _ip(host)
    return f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else host
