"""
The relay's dial-back: before it lists a node, the relay connects to the
address the node registered and asks whoever answers there to prove the
node's key.

One exchange per connection, relay to node::

    R> P2P/1 PROVE nonce=N2
    N< P2P/1 200 key=PUB sig=SIG

where ``SIG`` is the node's signature over
``transcript(DIALBACK_PROOF, N2, b"")``.  The nonce is fresh for every
dial-back, so an answer recorded elsewhere proves nothing here; a key that
differs from the registering one means another node answers there.

Connections go through an injected connector, ``(host, port) ->
IStreamClientEndpoint`` (by default a ``HostnameEndpoint`` on the reactor),
so tests dial in memory.  Who may make the relay dial, and how often, is
rate-limited with :class:`TokenBucket` so the relay cannot be used as a
port scanner (the registry backend's buckets: shared by every relay on one
Redis).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import attrs
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from .. import identity, wire
from ..negotiation import OneShotClient, negotiate

DIALBACK_TIMEOUT = 5.0  # seconds for the whole dial-back: connect and answer
DIALBACK_RATE = 10 / 60.0  # dial-backs per second one source address may cause...
DIALBACK_BURST = 10  # ...with this many at once
RECHECK_INTERVAL = 30.0  # a node is re-checked on a DEAD report at most this often
REPORT_RATE = 10 / 60.0  # DEAD reports per second accepted from one reporter...
REPORT_BURST = 10  # ...with this many at once
MAX_BUCKETS = 10_000  # addresses remembered by one bucket before full ones are pruned

Connector = Callable[[str, int], IStreamClientEndpoint]


class TokenBucket:
    """
    One token bucket per key (a source address): ``rate`` tokens a second
    up to ``burst``.  :meth:`take` spends one if it can.

    ``now`` is a callable returning seconds (``clock.seconds``).  Buckets
    that have refilled completely are forgotten when too many accumulate,
    so an attacker's many addresses cost bounded memory.
    """

    def __init__(self, now: Callable[[], float], rate: float, burst: int) -> None:
        self._now = now
        self.rate = rate
        self.burst = burst
        self._buckets: Dict[str, tuple[float, float]] = {}  # key -> (tokens, as of)

    def _level(self, key: str, now: float) -> float:
        tokens, since = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - since) * self.rate)

    def take(self, key: str) -> float:
        """
        Spend a token of ``key``'s: 0 when one was there, else the seconds
        until one will be (and nothing is spent).
        """
        now = self._now()
        tokens = self._level(key, now)
        if tokens < 1:
            return (1 - tokens) / self.rate
        if len(self._buckets) >= MAX_BUCKETS and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - 1, now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._level(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= MAX_BUCKETS:  # all busy: forget the oldest
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for k in oldest[: len(oldest) // 2]:
                del self._buckets[k]


@attrs.frozen
class Allowance:
    """
    An allowance's figures (``rate`` tokens a second up to ``burst``) where
    its buckets are a shared backend's, not this process's (see
    ``IRegistryBackend.take``).
    """

    name: str
    rate: float
    burst: int


@attrs.frozen
class Outcome:
    """What a dial-back found: ``ok`` if the expected key answered."""

    ok: bool
    reason: str = ""


class ProveClient(OneShotClient[tuple[str, str]]):
    """Send ``PROVE nonce=``, collect the ``200 key= sig=`` answer."""

    role = "node"

    def __init__(self, clock: IReactorTime, nonce: str, timeout: float) -> None:
        super().__init__(clock, timeout)
        self.nonce = nonce

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(wire.request(wire.PROVE, nonce=self.nonce))

    def messageReceived(self, message: wire.Message) -> None:
        code = message.status
        if code is None:
            raise wire.ProtocolError(wire.BAD_REQUEST, "expected a status line")
        if code != wire.OK:
            self.fail(wire.ProtocolError(code, message.text or "error"))
            return
        self.succeed((message.publicKey(), message.signature()))


def defaultConnector(reactor, timeout: float = DIALBACK_TIMEOUT) -> Connector:
    # An address is dialled at once (no resolver thread, no happy-eyeballs
    # machinery per dial-back); a name is resolved on the thread pool.
    from ..addresses import tcpEndpoint

    return lambda host, port: tcpEndpoint(reactor, host, port, timeout=timeout)


class DialBack:
    """
    Checks that the holder of a key answers at an address.

    ``check`` never raises: every failure is an :class:`Outcome` whose
    ``reason`` says what happened, in words fit for the node's operator.
    """

    def __init__(
        self,
        clock: IReactorTime,
        connector: Optional[Connector] = None,
        timeout: float = DIALBACK_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.timeout = timeout
        self.connector = connector if connector is not None else defaultConnector(clock, timeout)

    def check(self, host: str, port: int, key: Optional[str]) -> Deferred[Outcome]:
        """Dial host:port and see whether ``key`` proves itself there."""
        if key is None:
            # An entry without a key (never made by REGISTER) cannot be proved.
            return Deferred.fromCoroutine(_constant(Outcome(False, "no key to check")))
        nonce = identity.newNonce()
        try:
            endpoint = self.connector(host, port)
        except Exception as e:
            return Deferred.fromCoroutine(_constant(Outcome(False, f"cannot dial: {e}")))
        d = Deferred.fromCoroutine(
            negotiate(endpoint, ProveClient(self.clock, nonce, self.timeout))
        )
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(
            lambda answer: self._judge(answer, nonce, key),
            lambda failure: Outcome(False, _why(failure.value, self.timeout)),
        )
        return d

    @staticmethod
    def _judge(answer: tuple[str, str], nonce: str, key: str) -> Outcome:
        public, sig = answer
        if not identity.verify(public, sig, identity.transcript(identity.DIALBACK_PROOF, nonce, b"")):
            return Outcome(False, "the answer there is not a valid proof")
        if public != key:
            return Outcome(False, f"another node ({identity.nodeIdOf(public)}) answers there")
        return Outcome(True)


async def _constant(value: Outcome) -> Outcome:
    return value


def _why(error: BaseException, timeout: float) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (TimeoutError, defer.TimeoutError, CancelledError)):
        return f"no answer within {timeout:g} s"
    if isinstance(error, DNSLookupError):
        return "unknown host"
    if isinstance(error, wire.ProtocolError):
        return f"no node answered there ({error})"
    if isinstance(error, ConnectError):
        return error.__class__.__name__
    return str(error) or error.__class__.__name__
