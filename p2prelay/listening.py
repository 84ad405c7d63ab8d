"""
Services that bind a daemon's ports: TCP (any server endpoint description)
and UDP, the same way for relay and node.

Under twistd a port is bound in ``privilegedStartService``, before the
reactor runs, and one that cannot be had ends the process at once (exit 1)
after one critical log line; a program that starts the service itself sees
``whenListening`` fail and decides (and reports: the service logs it only
at info level then, so the user reads it once).
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from .addresses import describePeer

# The node's default --port (see tap.NodeOptions): an OS-chosen port on both
# families (Linux's dual-stack socket: IPv4 clients arrive as ::ffff:a.b.c.d),
# so a node that registers over IPv6 is reachable where the relay records
# it.  Where IPv6 is unavailable the default falls back to IPv4 alone.
NODE_DEFAULT_PORT = "tcp6:0:interface=\\:\\:"
NODE_IPV4_PORT = "tcp:0"
DUAL_STACK_UDP = "::"  # the UDP interface beside NODE_DEFAULT_PORT (falls back to '')


def describeAddress(port: IListeningPort) -> str:
    """A bound port as ``host:port``."""
    return describePeer(port.getHost())


class ListenFailed(Exception):
    """A port a daemon could not have: which one, and why."""

    def __init__(self, description: str, reason: str) -> None:
        super().__init__(description, reason)
        self.description = description
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot listen on {self.description}: {self.reason}"


class _Listening(Service):
    """
    Bind once, in whichever of the two start methods runs first;
    ``whenListening`` fires with the bound port or fails.
    """

    log = Logger()
    description: str
    what: str

    def __init__(self) -> None:
        self.port: Optional[IListeningPort] = None
        self.whenListening: Deferred[IListeningPort] = Deferred()
        self._started = False

    def _bind(self) -> Deferred[IListeningPort]:
        raise NotImplementedError

    def privilegedStartService(self) -> None:
        # twistd binds here, before the reactor runs (and before dropping
        # privileges): a port that cannot be had ends the daemon at once.
        super().privilegedStartService()
        self._listen(exitOnFailure=True)

    def startService(self) -> None:
        super().startService()
        if not self._started:
            self._listen(exitOnFailure=False)

    def _listen(self, exitOnFailure: bool) -> None:
        self._started = True
        d = maybeDeferred(self._bind)
        # Under twistd nobody else will report it; a program reports it itself.
        d.addCallbacks(
            self._listening,
            self._failed,
            errbackArgs=(LogLevel.critical if exitOnFailure else LogLevel.info,),
        )
        if exitOnFailure and self.port is None and self.whenListening.called:
            # Failed at once under twistd: logged above, and nobody else
            # will use the failure, so end the process quietly.
            self.whenListening.addErrback(lambda _: None)
            raise SystemExit(1)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info(
            "{what} listening on {address}", what=self.what, address=describeAddress(port)
        )
        self.whenListening.callback(port)
        return port

    def _failed(self, failure: Failure, level: LogLevel) -> None:
        self.log.emit(
            level,
            "{what} cannot listen on {desc}: {error}",
            what=self.what,
            desc=self.description,
            error=failure.getErrorMessage(),
        )
        self.whenListening.errback(failure)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class ListeningService(_Listening):
    """
    Listen on a server endpoint description; ``whenListening`` fires with
    the bound port, so an OS-chosen port (``tcp:0``) can be read back.
    With ``backlog``, a ``tcp:``/``tcp6:``/``ssl:`` description that names
    none gets ``backlog=`` that many (Twisted's default is 50).
    """

    def __init__(
        self,
        reactor,
        description: str,
        factory,
        what: str,
        *,
        backlog: Optional[int] = None,
        fallback: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.what = what
        self.backlog = backlog
        # Listened on instead when ``description`` cannot be had (the
        # dual-stack default on a host without IPv6); None: no second try.
        self.fallback = fallback

    def _bind(self) -> Deferred[IListeningPort]:
        d = self._listenOn(self.description)
        if self.fallback is not None:
            d.addErrback(self._fallBack)
        return d

    def _listenOn(self, description: str) -> Deferred[IListeningPort]:
        return maybeDeferred(
            lambda: serverFromString(self.reactor, withBacklog(description, self.backlog)).listen(self.factory)
        )

    def _fallBack(self, failure: Failure) -> Deferred[IListeningPort]:
        self.log.info(
            "{what} cannot listen on {desc} ({error}); listening on {fallback} instead",
            what=self.what,
            desc=self.description,
            error=failure.getErrorMessage(),
            fallback=self.fallback,
        )
        self.description = self.fallback
        return self._listenOn(self.fallback)


def withBacklog(description: str, backlog: Optional[int]) -> str:
    """``description`` with ``backlog=`` added if it is TCP and has none."""
    kind = description.split(":", 1)[0]
    if backlog is None or kind not in ("tcp", "tcp6", "ssl") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


class DatagramListeningService(_Listening):
    """
    Listen for datagrams on ``port`` (0: OS-chosen) at ``interface``
    ('': every interface).  Twisted has no UDP endpoint descriptions, so
    ``description`` is written ``udp:PORT[:interface=ADDR]``, as users type it.
    """

    def __init__(
        self,
        reactor,
        port: int,
        interface: str,
        protocol,
        what: str,
        *,
        maxPacketSize: int = 8192,
        fallback: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.number = port
        self.interface = interface
        self.protocol = protocol
        self.what = what
        self.maxPacketSize = maxPacketSize
        # The interface bound instead when ``interface`` cannot be had ('' for
        # IPv4 beside the dual-stack default on a host without IPv6).
        self.fallback = fallback

    @property
    def description(self) -> str:
        return f"udp:{self.number}" + (f":interface={self.interface}" if self.interface else "")

    def _bind(self) -> IListeningPort:
        try:
            return self._listenAt(self.interface)
        except Exception as e:
            if self.fallback is None:
                raise
            self.log.info(
                "{what} cannot listen on {desc} ({error}); listening on {fallback} instead",
                what=self.what,
                desc=self.description,
                error=str(e),
                fallback=self.fallback or "every IPv4 address",
            )
            self.interface = self.fallback
            return self._listenAt(self.interface)

    def _listenAt(self, interface: str) -> IListeningPort:
        return self.reactor.listenUDP(
            self.number, self.protocol, interface=interface, maxPacketSize=self.maxPacketSize
        )
