"""
A service that listens on a server endpoint description, for every daemon.

Relay and node both bind ports the same way: under twistd a port that
cannot be had ends the process at once (exit 1); a program that starts
the service itself sees ``whenListening`` fail and decides.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger


def describeAddress(port: IListeningPort) -> str:
    address = port.getHost()
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return f"{host}:{address.port}"


class ListeningService(Service):
    """
    Listen on a server endpoint description; ``whenListening`` fires with
    the bound port, so an OS-chosen port (``tcp:0``) can be read back.
    Under twistd a port that cannot be had ends the process (exit 1);
    a program that starts the service itself sees ``whenListening`` fail.
    """

    log = Logger()

    def __init__(self, reactor, description: str, factory, what: str) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.what = what
        self.port: Optional[IListeningPort] = None
        self.whenListening: Deferred[IListeningPort] = Deferred()
        self._started = False

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
        d = serverFromString(self.reactor, self.description).listen(self.factory)
        d.addCallbacks(self._listening, self._failed)
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

    def _failed(self, failure) -> None:
        self.log.critical(
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


