"""
Turning what users type into Twisted endpoints.

Users type ``localhost:8000`` and ``8000``; Twisted speaks endpoint
descriptions (``tcp:8000:interface=127.0.0.1``, ``tls:host:443``).  Both
are accepted everywhere an address is asked for, and this module is the one
place that tells them apart.

The relay, wherever a command asks for it (:func:`relayAddress`), may be
given as a bare port (``8001``: ``localhost:8001``), a bare host
(``relay.example.org``: port 8000), ``HOST:PORT``, ``[::1]:PORT``, or a
client endpoint description; and several relays as a comma list
(``a.example:8000,b.example:8000``), tried in order with failover by a
:class:`FailoverEndpoint` that remembers which one last answered.
"""

from __future__ import annotations

import re
import socket
import weakref
from typing import Callable, Optional, Sequence

import attrs

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
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer

# twisted.internet.endpoints imports OpenSSL (about 230 ms) whenever it is
# installed: it is imported only where a description that needs it is
# parsed, and plain HOST:PORT goes through TCPClient instead.

CONNECT_TIMEOUT = 10.0

_HOST_PORT = re.compile(r"\A(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\s]+)):(?P<port>\d{1,5})\Z")
# Endpoint types whose descriptions could look like HOST:PORT.
_ENDPOINT_TYPES = {"tcp", "tcp6", "ssl", "tls", "unix", "tor", "onion", "systemd"}
# A host name or IPv4 address typed alone: no port, no description syntax.
_BARE_HOST = re.compile(r"\A[^\s:/\\\[\]=@]+\Z")
_BRACKETED = re.compile(r"\A\[(?P<v6>[^\]]+)\]\Z")

DEFAULT_RELAY_HOST = "localhost"  # what a bare --relay port is a port of
DEFAULT_RELAY_PORT = 8000  # what a bare --relay host listens on (the relay's default)
MAX_RELAYS = 8  # relays in one --relay comma list, at most


class AddressError(ValueError):
    """An address the user typed that we cannot use; the message says why."""


class NoSuchHost(error.DNSLookupError):
    """
    A name the resolver says does not exist (or has no addresses):
    ``NAME:PORT: no such host``.  Distinct from other lookup failures (a
    resolver that cannot be reached, a temporary failure: the plain
    ``DNSLookupError``), so a command can say exactly this and exit for it.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"{host}:{port}")  # one argument: OSError reads two as errno, strerror
        self.host = host
        self.port = port

    def __str__(self) -> str:
        return f"{describePeer(self)}: no such host"


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
    the TCP ones users already write: an IPv6 interface has its colons
    escaped (``interface=fd77\\:4\\:\\:1``, as in ``tcp6:`` descriptions) or
    is written in brackets (``interface=[fd77:4::1]``).
    """
    value = value.strip()
    usage = f"{value!r} is not a UDP port or udp:PORT[:interface=ADDR]"
    parts = _descriptionFields(value)
    if parts is None:
        raise AddressError(usage)
    if parts and parts[0] == "udp":
        parts = parts[1:]
    if not parts or not (parts[0].isascii() and parts[0].isdigit()) or int(parts[0]) > 65535:
        raise AddressError(usage)
    interface = defaultInterface
    for extra in parts[1:]:
        key, eq, val = extra.partition("=")
        if key != "interface" or not eq:
            raise AddressError(f"{value!r}: only interface= is understood after the port")
        bracketed = _BRACKETED.match(val)
        if bracketed is not None:
            val = bracketed.group("v6")
        if ":" in val and not isIPv6Address(val):
            raise AddressError(f"{value!r}: {val!r} is not an IPv6 address")
        interface = val
    return int(parts[0]), interface


def _descriptionFields(value: str) -> Optional[list[str]]:
    """
    The ``:``-separated fields of a description, with ``\\:`` unescaped and
    a ``[...]`` kept whole; None for an unclosed bracket.
    """
    fields, field, i = [], [], 0
    while i < len(value):
        char = value[i]
        if char == "\\" and value[i + 1 : i + 2] == ":":
            field.append(":")
            i += 2
            continue
        if char == "[":
            end = value.find("]", i)
            if end < 0:
                return None
            field.append(value[i : end + 1])
            i = end + 1
            continue
        if char == ":":
            fields.append("".join(field))
            field = []
        else:
            field.append(char)
        i += 1
    fields.append("".join(field))
    return fields


def udpInterfaceFor(description: str) -> str:
    """
    Where UDP is served by default beside the TCP server ``description``:
    its ``interface=``, or for a ``tcp6:`` description without one ``::``
    (every IPv6 address and, dual-stack, every IPv4 one, as ``tcp6:`` has);
    otherwise '' (every IPv4 address, as ``tcp:`` has).
    """
    interface = interfaceOf(description)
    if not interface and description.strip().split(":", 1)[0] == "tcp6":
        return "::"
    return interface


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


def plainHost(host: str) -> str:
    """
    A host as users write it: an IPv4-mapped IPv6 address (what a dual-stack
    socket reports for an IPv4 peer, ``::ffff:10.77.4.1``) as plain IPv4.
    """
    if host[:7].lower() == "::ffff:" and isIPAddress(host[7:]):
        return host[7:]
    return host


def hostPort(host: str, port: int) -> str:
    """``host:port`` as users write it: ``[v6]:port`` for an IPv6 host."""
    host = plainHost(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    return hostPort(host, port)


def relayAddress(
    value: str, defaultHost: str = DEFAULT_RELAY_HOST, defaultPort: int = DEFAULT_RELAY_PORT
) -> tuple[str, int] | str:
    """
    What a user typed for the relay, as ``(host, port)`` or, for anything
    else, the text as a client endpoint description (checked only when it is
    parsed, by :func:`clientEndpoint`).

    ``8001`` is ``(defaultHost, 8001)``; ``relay.example.org`` and
    ``[::1]`` are that host on ``defaultPort``; ``HOST:PORT`` and
    ``[V6]:PORT`` are themselves.  An IPv6 address without brackets
    (``::1:8000``) is ambiguous, so it is refused with the form to type.
    """
    text = value.strip()
    if not text:
        raise AddressError("no address given")
    if text.isascii() and text.isdigit():  # '²' is a digit int() refuses
        port = int(text)
        if not 0 < port <= 65535:
            raise AddressError(f"port {text} is out of range 1-65535")
        return defaultHost, port
    pair = parseHostPort(text)
    if pair is not None:
        return pair
    bracketed = _BRACKETED.match(text)
    if bracketed is not None:
        if not isIPv6Address(bracketed.group("v6")):
            raise AddressError(f"{value!r}: {bracketed.group('v6')!r} is not an IPv6 address")
        return bracketed.group("v6"), defaultPort
    if ":" not in text:
        if _BARE_HOST.match(text) is None or text.lower() in _ENDPOINT_TYPES:
            raise AddressError(
                f"{value!r} is not a port, a host, HOST:PORT or a client endpoint description"
            )
        return text, defaultPort
    unbracketed = _unbracketedIPv6(text, defaultPort)
    if unbracketed is not None:
        raise AddressError(f"IPv6 addresses need brackets: {unbracketed}")
    return text


def _unbracketedIPv6(text: str, defaultPort: int) -> Optional[str]:
    """For an IPv6 address typed without brackets, the bracketed form meant; else None."""
    if text.count(":") < 2:
        return None
    head, _, last = text.rpartition(":")
    if last.isascii() and last.isdigit() and isIPv6Address(head):
        return f"[{head}]:{last}"  # '::1:8000' is read as [::1]:8000
    if isIPv6Address(text):
        return f"[{text}]:{defaultPort}"
    return None


def splitRelays(value: str) -> list[str]:
    """
    The relays of a ``--relay`` value, each as typed (spaces around commas
    dropped): one relay without a comma, exactly as given.  A comma list
    may name at most :data:`MAX_RELAYS` relays, each once, none empty.
    Each element is checked only by :func:`relayAddress` and the callers.
    """
    if "," not in value:
        return [value]
    names = [part.strip() for part in value.split(",")]
    if any(not name for name in names):
        raise AddressError(f"{value!r}: an empty relay in the list (two commas, or one at an end)")
    if len(names) > MAX_RELAYS:
        raise AddressError(f"{len(names)} relays listed; at most {MAX_RELAYS}")
    seen: dict[object, str] = {}
    for name in names:
        try:
            address = relayAddress(name)
        except AddressError as e:
            raise AddressError(f"{name}: {e}") from None
        key = address if isinstance(address, str) else (address[0].lower(), address[1])
        if key in seen:
            raise AddressError(f"{name!r} is listed twice" + (f" (as {seen[key]!r})" if seen[key] != name else ""))
        seen[key] = name
    return names


def checkClientAddress(value: str) -> None:
    """
    Raise AddressError unless value names the relay (see :func:`relayAddress`),
    or several as a comma list (see :func:`splitRelays`); connects nowhere.
    """
    names = splitRelays(value)
    for name in names:
        try:
            if isinstance(relayAddress(name), str):
                clientEndpoint(None, name)
        except AddressError as e:
            if len(names) == 1:
                raise
            raise AddressError(f"{name}: {e}") from None


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
    cancelling fails the attempt with ``ConnectingCancelledError``.  A
    name the resolver says does not exist, or that has no addresses, is
    :class:`NoSuchHost` (a ``DNSLookupError``).
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
        except socket.gaierror as e:
            if e.errno not in _NO_SUCH_NAME:
                # EAI_AGAIN and the like: the name may well exist.
                raise error.DNSLookupError(
                    f"{describePeer(self)}: name lookup failed ({e.strerror or e})"
                ) from None
            addresses = []
        except OSError:
            addresses = []
        except CancelledError:
            raise error.ConnectingCancelledError(describePeer(self)) from None
        if not addresses:
            raise NoSuchHost(self.host, self.port)
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


# getaddrinfo's answers meaning the name has no address at all.
_NO_SUCH_NAME = frozenset(
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
)


def tcpEndpoint(reactor, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> IStreamClientEndpoint:
    """A TCP client endpoint to ``host:port`` (a name, or an IPv4 or IPv6 address)."""
    return TCPClient(reactor, host, port, timeout=timeout)


def clientEndpoint(reactor, value: str, timeout: float = CONNECT_TIMEOUT) -> IStreamClientEndpoint:
    """
    A client endpoint from what a user typed for the relay (see
    :func:`relayAddress`): a port, a host, ``host:port``, or a client
    endpoint description; for a comma list of those, a
    :class:`FailoverEndpoint` over them (see :func:`failoverEndpoint`).
    """
    if "," in value:
        return failoverEndpoint(value, lambda name: clientEndpoint(reactor, name, timeout=timeout))
    address = relayAddress(value)
    if not isinstance(address, str):
        return tcpEndpoint(reactor, address[0], address[1], timeout=timeout)
    from twisted.internet.endpoints import clientFromString

    try:
        return clientFromString(reactor, value)
    except (ValueError, TypeError, KeyError, NameError) as e:
        raise AddressError(
            f"{value!r} is not HOST:PORT or a client endpoint description ({e})"
        ) from None


# Several relays, one endpoint.


@attrs.frozen
class Relay:
    """One relay of a ``--relay`` list: its name as typed, and its endpoint."""

    name: str
    endpoint: IStreamClientEndpoint = attrs.field(eq=False)

    def __str__(self) -> str:
        return self.name


def _reason(e: BaseException) -> str:
    """Why one relay could not be reached, in a few words."""
    if isinstance(e, NoSuchHost):
        return "no such host"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TimeoutError, error.TCPTimedOutError)):
        return "timed out"
    if isinstance(e, error.DNSLookupError):
        return str(e) or "name lookup failed"
    if isinstance(e, error.ConnectError) and e.osError:
        return str(e.osError)
    return str(e) or e.__class__.__name__


class AllRelaysFailed(error.ConnectError):
    """
    No relay of a list could be reached: ``failures`` says, relay by relay
    in the order tried, why.  A ``ConnectError``: nothing was sent.
    """

    def __init__(self, failures: Sequence[tuple[Relay, BaseException]]) -> None:
        super().__init__()
        self.failures = list(failures)

    @property
    def reasons(self) -> str:
        """``a:8000: connection refused; b:8001: timed out``"""
        return "; ".join(f"{relay.name}: {_reason(e)}" for relay, e in self.failures)

    def __str__(self) -> str:
        return f"no relay could be reached ({self.reasons})"


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """
    Several relays as one client endpoint: :meth:`connect` tries them one
    after another (each with its own endpoint's connect timeout) until one
    connects, and fails with :class:`AllRelaysFailed` when none does.

    The order is sticky: the relay that last connected is tried first next
    time, and one that failed goes to the back, behind the others.
    :meth:`relayOf` tells which relay a connection made here reached (for
    what must go back to the same relay: a circuit for the relay that
    ordered it, a DEAD report to the relay that listed the peer).
    Cancelling stops at the relay being tried; the rest are not tried.
    """

    log = Logger()

    def __init__(self, relays: Sequence[Relay]) -> None:
        if not relays:
            raise ValueError("a FailoverEndpoint needs at least one relay")
        self.relays = list(relays)
        self._order = list(relays)
        self._reached: "weakref.WeakKeyDictionary[object, Relay]" = weakref.WeakKeyDictionary()
        # Told each failover as a sentence too (p2p-fetch -v shows it).
        self.narrate: Callable[[str], None] = lambda line: None

    def __repr__(self) -> str:
        return f"<FailoverEndpoint {', '.join(r.name for r in self._order)}>"

    @property
    def preferred(self) -> Relay:
        """The relay the next connection tries first."""
        return self._order[0]

    @property
    def names(self) -> str:
        """The relays as a list for people: ``a:8000, b:8001``."""
        return ", ".join(relay.name for relay in self.relays)

    def relayOf(self, protocol: object) -> Optional[Relay]:
        """
        The relay a protocol connected here reached (None: not one of
        ours).  Known by the protocol ``connect()`` fired with and by its
        transport, so a protocol that a wrapper stood in for (as
        ``ClientService``'s proxy does) is known too.
        """
        for key in (protocol, getattr(protocol, "transport", None)):
            try:
                relay = self._reached.get(key)
            except TypeError:  # unhashable, or not weakly referable: never recorded
                relay = None
            if relay is not None:
                return relay
        return None

    def connect(self, protocolFactory) -> Deferred:
        return _Failover(self, protocolFactory).start()

    def demote(self, relay: Relay) -> None:
        """
        ``relay`` connected but did not answer as it should (silent, cut
        short, busy): the next connection tries the others first.
        """
        if relay in self._order:
            self._failedAt(relay)

    def _answered(self, relay: Relay, protocol: object) -> None:
        for key in (protocol, getattr(protocol, "transport", None)):
            if key is not None:
                try:
                    self._reached[key] = relay
                except TypeError:
                    pass
        self._order.remove(relay)
        self._order.insert(0, relay)

    def _failedAt(self, relay: Relay) -> None:
        self._order.remove(relay)
        self._order.append(relay)


class _Failover:
    """One :meth:`FailoverEndpoint.connect`: relay after relay."""

    def __init__(self, endpoint: FailoverEndpoint, factory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.left = list(endpoint._order)
        self.failures: list[tuple[Relay, BaseException]] = []
        self.deferred: Deferred = Deferred(self._cancel)
        self.trying: Optional[Deferred] = None
        self.cancelled = False

    def start(self) -> Deferred:
        self._next()
        return self.deferred

    def _next(self) -> None:
        if not self.left:
            self.deferred.errback(Failure(AllRelaysFailed(self.failures)))
            return
        relay = self.left.pop(0)
        try:
            d = relay.endpoint.connect(self.factory)
        except Exception as e:
            self._failed(Failure(e), relay)
            return
        self.trying = d
        d.addCallbacks(self._connected, self._failed, callbackArgs=(relay,), errbackArgs=(relay,))

    def _connected(self, protocol: object, relay: Relay) -> None:
        self.trying = None
        if self.deferred.called:  # cancelled, yet it connected: nobody wants it now
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
            return
        self.endpoint._answered(relay, protocol)
        self.deferred.callback(protocol)

    def _failed(self, failure: Failure, relay: Relay) -> None:
        self.trying = None
        if self.cancelled:
            if not self.deferred.called:
                self.deferred.errback(failure)
            return
        self.endpoint._failedAt(relay)
        if len(self.endpoint.relays) == 1:
            self.deferred.errback(failure)  # one relay: its own failure, as ever
            return
        self.failures.append((relay, failure.value))
        if self.left:
            why = _reason(failure.value)
            self.endpoint.log.warn(
                "relay {relay} unreachable ({why}); trying {next}", relay=relay.name, why=why, next=self.left[0].name
            )
            self.endpoint.narrate(f"relay {relay.name} unreachable ({why}); trying {self.left[0].name}")
        self._next()

    def _cancel(self, d: Deferred) -> None:
        self.cancelled = True
        trying, self.trying = self.trying, None
        if trying is not None:
            trying.cancel()


def failoverEndpoint(value: str, make: Callable[[str], IStreamClientEndpoint]) -> FailoverEndpoint:
    """A :class:`FailoverEndpoint` over the relays of ``value`` (see :func:`splitRelays`), each ``make(name)``."""
    return FailoverEndpoint([Relay(name, make(name)) for name in splitRelays(value)])


def relayReached(endpoint: IStreamClientEndpoint, protocol: object) -> Optional[Relay]:
    """
    Which relay of ``endpoint`` a protocol connected through it reached:
    for a :class:`FailoverEndpoint`, the relay it recorded; otherwise None
    (a single relay: ``endpoint`` itself is the one).
    """
    relayOf = getattr(endpoint, "relayOf", None)
    return relayOf(protocol) if relayOf is not None else None


def endpointReached(endpoint: IStreamClientEndpoint, protocol: object) -> IStreamClientEndpoint:
    """The endpoint of the one relay ``protocol`` reached through ``endpoint`` (else ``endpoint``)."""
    relay = relayReached(endpoint, protocol)
    return relay.endpoint if relay is not None else endpoint
