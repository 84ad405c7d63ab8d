"""
Turning what users type into Twisted endpoints.

Users type ``localhost:8000`` and ``8000``; Twisted speaks endpoint
descriptions (``tcp:8000:interface=127.0.0.1``, ``tls:host:443``).  Both
are accepted everywhere an address is asked for, and this module is the one
place that tells them apart.
"""

from __future__ import annotations

import re

from twisted.internet.interfaces import IStreamClientEndpoint

# twisted.internet.endpoints imports OpenSSL (about 230 ms) whenever it is
# installed: it is imported where an endpoint is made, not with this module.

CONNECT_TIMEOUT = 10.0

_HOST_PORT = re.compile(r"\A(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\s]+)):(?P<port>\d{1,5})\Z")
# Endpoint types whose descriptions could look like HOST:PORT.
_ENDPOINT_TYPES = {"tcp", "tcp6", "ssl", "tls", "unix", "tor", "onion", "systemd"}


class AddressError(ValueError):
    """An address the user typed that we cannot use; the message says why."""


def serverDescription(value: str) -> str:
    """
    A server endpoint description from ``8000`` or a full description.
    """
    value = value.strip()
    if value.isascii() and value.isdigit():  # '²' is a digit int() refuses
        if int(value) > 65535:
            raise AddressError(f"port {value} is out of range 0-65535")
        return f"tcp:{value}"
    if ":" not in value:
        raise AddressError(f"{value!r} is neither a port number nor an endpoint description")
    return value


def udpPort(value: str, defaultInterface: str = "") -> tuple[int, str]:
    """
    A UDP port and interface from ``5555`` or ``udp:5555:interface=ADDR``.

    Twisted has no UDP endpoint descriptions, so this small parser mirrors
    the TCP ones users already write.
    """
    value = value.strip()
    parts = value.split(":")
    if parts and parts[0] == "udp":
        parts = parts[1:]
    if not parts or not (parts[0].isascii() and parts[0].isdigit()) or int(parts[0]) > 65535:
        raise AddressError(f"{value!r} is not a UDP port or udp:PORT[:interface=ADDR]")
    interface = defaultInterface
    for extra in parts[1:]:
        key, eq, val = extra.partition("=")
        if key != "interface" or not eq:
            raise AddressError(f"{value!r}: only interface= is understood after the port")
        interface = val
    return int(parts[0]), interface


def interfaceOf(description: str) -> str:
    """The ``interface=`` of a TCP server description, or '' for all."""
    match = re.search(r"(?:^|:)interface=((?:\\:|[^:])*)", description)
    return match.group(1).replace("\\:", ":") if match else ""


def parseHostPort(value: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` as a pair, or None for anything else."""
    match = _HOST_PORT.match(value.strip())
    if match is None:
        return None
    host = match.group("v6") or match.group("host")
    if host.lower() in _ENDPOINT_TYPES and match.group("v6") is None:
        return None
    port = int(match.group("port"))
    if not 0 < port <= 65535:
        raise AddressError(f"port {port} is out of range 1-65535")
    return host, port


def describePeer(address: object) -> str:
    """
    A connection's address as users write it: ``host:port``, ``[v6]:port``,
    rather than a ``IPv4Address(type='TCP', ...)`` repr.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        name = getattr(address, "name", None)  # UNIX sockets
        return str(name if name is not None else address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def checkClientAddress(value: str) -> None:
    """Raise AddressError unless value names a client endpoint; connects nowhere."""
    if parseHostPort(value) is None:
        clientEndpoint(None, value)


def tcpEndpoint(reactor, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> IStreamClientEndpoint:
    """A TCP client endpoint to ``host:port`` (a name, or an IPv4 or IPv6 address)."""
    from twisted.internet.endpoints import HostnameEndpoint

    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def clientEndpoint(reactor, value: str, timeout: float = CONNECT_TIMEOUT) -> IStreamClientEndpoint:
    """
    A client endpoint from ``host:port`` or a client endpoint description.
    """
    from twisted.internet.endpoints import clientFromString

    pair = parseHostPort(value)
    if pair is not None:
        return tcpEndpoint(reactor, pair[0], pair[1], timeout=timeout)
    try:
        return clientFromString(reactor, value)
    except (ValueError, TypeError, KeyError, NameError) as e:
        raise AddressError(
            f"{value!r} is not HOST:PORT or a client endpoint description ({e})"
        ) from None
