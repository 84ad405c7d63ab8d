"""
Turning what users type into Twisted endpoints.

Users type ``localhost:8000`` and ``8000``; Twisted speaks endpoint
descriptions (``tcp:8000:interface=127.0.0.1``, ``tls:host:443``).  Both
are accepted everywhere an address is asked for, and this module is the one
place that tells them apart.
"""

from __future__ import annotations

import re
import socket
from typing import Callable, Optional

from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.threads import deferToThreadPool
from zope.interface import directlyProvides, implementer

# twisted.internet.endpoints imports OpenSSL (about 230 ms) whenever it is
# installed: it is imported only where a description that needs it is
# parsed, and plain HOST:PORT goes through TCPClient instead.

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


class _Connected(Protocol):
    """
    Stands in for the protocol being connected until its transport is made:
    then fires ``connected`` with it and passes every event on, as
    twisted.internet.endpoints' wrapper does.
    """

    def __init__(self, connected: Deferred, wrapped) -> None:
        self._connected = connected
        self._wrapped = wrapped
        for iface in (IHalfCloseableProtocol, IHandshakeListener):
            if iface.providedBy(wrapped):
                directlyProvides(self, iface)

    def logPrefix(self) -> str:
        prefix = getattr(self._wrapped, "logPrefix", None)
        return prefix() if prefix is not None else self._wrapped.__class__.__name__

    def connectionMade(self) -> None:
        self._wrapped.makeConnection(self.transport)
        if not self._connected.called:
            self._connected.callback(self._wrapped)

    def dataReceived(self, data: bytes) -> None:
        self._wrapped.dataReceived(data)

    def connectionLost(self, reason) -> None:
        self._wrapped.connectionLost(reason)

    def readConnectionLost(self) -> None:
        self._wrapped.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self._wrapped.writeConnectionLost()

    def handshakeCompleted(self) -> None:
        self._wrapped.handshakeCompleted()


class _Attempt(ClientFactory):
    """One connectTCP to one address, reported to a Deferred."""

    noisy = False

    def __init__(self, factory, connected: Deferred) -> None:
        self.factory = factory
        self.connected = connected
        self.connector = None

    def startedConnecting(self, connector) -> None:
        self.connector = connector

    def buildProtocol(self, addr):
        try:
            wrapped = self.factory.buildProtocol(addr)
        except BaseException:
            self.connected.errback()
            return None
        if wrapped is None:
            self.connected.errback(error.NoProtocol())
            return None
        return _Connected(self.connected, wrapped)

    def clientConnectionFailed(self, connector, reason) -> None:
        if not self.connected.called:
            self.connected.errback(reason)

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()


@implementer(IStreamClientEndpoint)
class TCPClient:
    """
    A plain TCP client endpoint to ``host:port`` that needs nothing from
    twisted.internet.endpoints (whose import costs the TLS stack's).

    An IPv4 or IPv6 address is dialled at once.  A name is looked up with
    ``getaddrinfo`` on the reactor's thread pool, and its addresses tried
    in the order it gives them, the next as soon as one fails, all within
    ``timeout`` seconds.  A failure is Twisted's ConnectError family
    (``DNSLookupError`` for a name that does not resolve, ``TimeoutError``);
    cancelling fails the attempt with ``ConnectingCancelledError``.
    """

    def __init__(
        self,
        reactor,
        host: str,
        port: int,
        timeout: float = CONNECT_TIMEOUT,
        resolve: Optional[Callable[[str, int], Deferred]] = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        # (host, port) -> a Deferred list of addresses; by default getaddrinfo
        # on the reactor's thread pool.
        self.resolve = resolve or self._getaddrinfo

    def __repr__(self) -> str:
        return f"<TCPClient {describePeer(self)}>"

    def connect(self, protocolFactory) -> Deferred:
        if isIPAddress(self.host) or isIPv6Address(self.host):
            return self._dial(self.host, protocolFactory, self.timeout)
        return Deferred.fromCoroutine(self._resolveAndDial(protocolFactory))

    def _dial(self, address: str, protocolFactory, timeout: float) -> Deferred:
        attempt: _Attempt

        def cancel(d: Deferred) -> None:
            d.errback(error.ConnectingCancelledError(describePeer(self)))
            if attempt.connector is not None:
                attempt.connector.stopConnecting()

        connected = Deferred(cancel)
        attempt = _Attempt(protocolFactory, connected)
        self.reactor.connectTCP(address, self.port, attempt, timeout=timeout)
        return connected

    def _getaddrinfo(self, host: str, port: int) -> Deferred:
        def lookUp() -> list:
            found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            return [info[4][0] for info in found]

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), lookUp)

    async def _resolveAndDial(self, protocolFactory):
        deadline = self.reactor.seconds() + self.timeout
        resolving = self.resolve(self.host, self.port)

        def slow(result: object, timeout: float) -> object:
            raise error.TimeoutError(f"{self.host}: not resolved within {timeout:g} seconds")

        resolving.addTimeout(self.timeout, self.reactor, slow)
        try:
            addresses = list(dict.fromkeys(await resolving))
        except OSError:  # socket.gaierror
            addresses = []
        except CancelledError:
            raise error.ConnectingCancelledError(describePeer(self)) from None
        if not addresses:
            # HostnameEndpoint's words for it.
            raise error.DNSLookupError(f"no results for hostname lookup: {self.host}")
        first: Optional[BaseException] = None
        for address in addresses:
            left = deadline - self.reactor.seconds()
            if left <= 0:
                break
            try:
                return await self._dial(address, protocolFactory, left)
            except error.ConnectingCancelledError:
                raise
            except error.ConnectError as e:
                first = first or e
        raise first or error.TimeoutError()


def tcpEndpoint(reactor, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> IStreamClientEndpoint:
    """A TCP client endpoint to ``host:port`` (a name, or an IPv4 or IPv6 address)."""
    return TCPClient(reactor, host, port, timeout=timeout)


def clientEndpoint(reactor, value: str, timeout: float = CONNECT_TIMEOUT) -> IStreamClientEndpoint:
    """
    A client endpoint from ``host:port`` or a client endpoint description.
    """
    pair = parseHostPort(value)
    if pair is not None:
        return tcpEndpoint(reactor, pair[0], pair[1], timeout=timeout)
    from twisted.internet.endpoints import clientFromString

    try:
        return clientFromString(reactor, value)
    except (ValueError, TypeError, KeyError, NameError) as e:
        raise AddressError(
            f"{value!r} is not HOST:PORT or a client endpoint description ({e})"
        ) from None
