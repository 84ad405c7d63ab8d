"""
The connection race (RFC 8305 style): connect to the next holders in turn,
a new attempt every ``STAGGER`` seconds and at most ``ATTEMPTS_AT_ONCE`` in
flight, each given the fetcher's ``connectTimeout`` (a firewalled peer, reached
through the relay, :func:`~.paths.setupBudget`); the first to connect wins
(its GET not yet sent, the path it took recorded), and the others are
cancelled and requeued.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from ..negotiation import _OneShotFactory
from .get import GetProtocol
from .outcomes import PeerAddress
from .paths import DIRECT, setupBudget

if TYPE_CHECKING:
    from .fetcher import _FetchAttempt

STAGGER = 0.25  # seconds between the starts of two connection attempts (RFC 8305)
ATTEMPTS_AT_ONCE = 3  # connection attempts in flight at once


class Race:
    """Staggered, concurrent connection attempts; the first to connect wins."""

    def __init__(self, attempt: "_FetchAttempt", queue: List[PeerAddress]) -> None:
        self.attempt = attempt
        self.fetcher = attempt.fetcher
        self.clock = attempt.clock
        self.queue = queue
        self.inFlight: Dict[PeerAddress, Deferred] = {}
        self.endpoints: Dict[PeerAddress, object] = {}
        self.started: List[PeerAddress] = []
        self.timer = None
        self.won = False
        self.result: Deferred = Deferred()
        self.startNext()

    @property
    def over(self) -> bool:
        return self.result.called

    def startNext(self) -> None:
        """Start one more attempt, if there is room; schedule the one after."""
        self.timer = None
        if self.over:
            return
        if self.queue and len(self.inFlight) < self.fetcher.attemptsAtOnce:
            peer = self.queue.pop(0)
            self.start(peer)
        if self.over:
            return
        if not self.inFlight and not self.queue:
            self.result.callback(None)
            return
        if self.queue and len(self.inFlight) < self.fetcher.attemptsAtOnce and self.timer is None:
            self.timer = self.clock.callLater(self.fetcher.stagger, self.startNext)

    def start(self, peer: PeerAddress) -> None:
        f = self.fetcher
        self.attempt.contacted.add((peer.host, peer.port))
        self.started.append(peer)
        proto = GetProtocol(
            self.clock,
            self.attempt.name,
            self.attempt.sink,
            f.timeout,
            accept=self.attempt.accepted(peer),
            answerTimeout=f.connectTimeout,
            speedLimit=f.speedLimit,
            speedTime=f.speedTime,
            start=False,
        )
        try:
            endpoint = f.peerEndpoint(peer)
            d = endpoint.connect(_OneShotFactory(proto))
        except Exception as e:  # a malformed address, say
            self.attempt.failed(peer, e)
            return
        self.endpoints[peer] = endpoint
        budget = setupBudget(f.connectTimeout) if peer.firewalled else f.connectTimeout
        d.addTimeout(budget, self.clock, self.timedOut)
        self.inFlight[peer] = d
        d.addCallbacks(self.connected, self.lost, callbackArgs=(peer, proto), errbackArgs=(peer,))

    def timedOut(self, result: object, timeout: float) -> object:
        """addTimeout's verdict: whatever the cancelled attempt failed with, it timed out."""
        if isinstance(result, Failure):
            raise error.TimeoutError(f"no connection within {timeout:g} seconds")
        return result

    def connected(self, _: object, peer: PeerAddress, proto: GetProtocol) -> None:
        self.inFlight.pop(peer, None)
        if self.over:
            proto.deferred.addErrback(lambda failure: None)  # nobody waits for a loser
            if proto.transport is not None:
                proto.transport.abortConnection()
            return
        self.finish()
        path = getattr(self.endpoints.get(peer), "path", None) or DIRECT
        self.attempt.paths[(peer.host, peer.port)] = path
        self.result.callback((peer, proto))

    def lost(self, reason: Failure, peer: PeerAddress) -> None:
        self.inFlight.pop(peer, None)
        if self.over or self.won or reason.check(CancelledError, error.ConnectingCancelledError):
            return  # we gave up on it: no failed attempt, nothing to report
        self.attempt.failed(peer, reason.value)
        # RFC 8305: a failed attempt makes room for the next one at once.
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.startNext()

    def finish(self) -> None:
        """A winner: stop the clock, cancel the others, requeue them."""
        self.won = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        losers = [p for p in self.started if p in self.inFlight]
        pending = list(self.inFlight.values())
        self.inFlight.clear()
        for p in reversed(losers):
            self.queue.insert(0, p)
        for d in pending:
            d.cancel()
