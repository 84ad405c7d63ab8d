"""
One request to a relay and its reply, for nodes and clients alike.

A reply is a status line, optionally followed by ``count`` items and an
``END`` line; a list that ends early or miscounts is an error, never a
silently short answer.

A relay may first answer ``100 nonce=N [secret=1]``: a challenge.  A query
given a *prover* answers it with the ``PROOF`` line the prover builds from
the nonce, the secret flag and the exact bytes sent so far, and goes on
reading the answer; without one, a challenge fails the query with a clear
message.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import attrs
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from .. import wire
from ..negotiation import IncompleteAnswer, OneShotClient, negotiate

QUERY_TIMEOUT = 15.0

log = Logger()


class IncompleteReply(IncompleteAnswer):
    """The relay closed the connection before its answer was complete."""


class ProofNeeded(Exception):
    """The relay challenged a query that has nothing to prove with."""


# (nonce, whether the relay wants the shared secret, every byte sent so far)
# -> the PROOF line to send.  May raise to give up, e.g. ProofNeeded when
# the relay wants a secret we do not have.
Prover = Callable[[str, bool, bytes], bytes]


@attrs.frozen
class Reply:
    status: wire.Message
    items: List[wire.Message]
    end: wire.Message | None = None


class QueryProtocol(OneShotClient[Reply]):
    """Send one request, collect one reply, close."""

    role = "relay"

    def __init__(
        self,
        clock: IReactorTime,
        payload: bytes,
        timeout: float,
        prover: Optional[Prover] = None,
    ) -> None:
        super().__init__(clock, timeout)
        self.payload = payload
        self.prover = prover
        self._challenged = False
        self._status: wire.Message | None = None
        self._items: List[wire.Message] = []
        self._count = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.payload)

    def messageReceived(self, message: wire.Message) -> None:
        if self._status is None:
            code = message.status
            if code is None:
                raise wire.ProtocolError(wire.BAD_REQUEST, "expected a status line")
            if code == wire.CONTINUE:
                self._answerChallenge(message)
                return
            if not 200 <= code < 300:
                self.fail(wire.ProtocolError(code, message.text or "error", retry=message.retry()))
                return
            self._status = message
            if message.get("count") is None:
                self.succeed(Reply(message, []))
            else:
                self._count = message.integer("count", high=wire.MAX_LIST)
            return
        if message.word == wire.END:
            if message.integer("count") != self._count or len(self._items) != self._count:
                raise wire.ProtocolError(wire.BAD_REQUEST, "list count mismatch")
            self.succeed(Reply(self._status, self._items, message))
            return
        if len(self._items) >= self._count:
            raise wire.ProtocolError(wire.BAD_REQUEST, "more items than announced")
        self._items.append(message)

    def _answerChallenge(self, message: wire.Message) -> None:
        if self._challenged:
            raise wire.ProtocolError(wire.BAD_REQUEST, "a second challenge")
        self._challenged = True
        try:
            line = proofFor(self.prover, message, self.payload)
        except wire.ProtocolError:
            raise
        except Exception as e:
            self.fail(e)
            return
        self.transport.write(line)

    def incomplete(self, reason: object) -> IncompleteReply:
        return IncompleteReply("relay closed the connection mid-answer")


def proofFor(prover: Optional[Prover], challenge: wire.Message, sent: bytes) -> bytes:
    """
    The ``PROOF`` line answering a relay's ``100 nonce= [secret=1]``
    ``challenge`` of the request ``sent``; without a ``prover``,
    :class:`ProofNeeded` (a malformed nonce is a :class:`wire.ProtocolError`).
    """
    nonce = challenge.nonce()
    secret = challenge.flag("secret")
    if prover is None:
        raise ProofNeeded(
            "the relay asks for a proof" + (" of its shared secret (--secret-file)" if secret else "")
        )
    return prover(nonce, secret, sent)


async def query(
    endpoint: IStreamClientEndpoint,
    payload: bytes,
    clock: IReactorTime,
    timeout: float = QUERY_TIMEOUT,
    prover: Optional[Prover] = None,
) -> Reply:
    """
    Connect, send ``payload``, and return the reply.

    Error statuses raise :class:`wire.ProtocolError` (a 503's ``retry``
    hint on it); a challenge without a ``prover`` raises
    :class:`ProofNeeded`; connection problems raise Twisted's ConnectError
    family or TimeoutError.
    """
    return await negotiate(endpoint, QueryProtocol(clock, payload, timeout, prover))


def answeredBadly(error: BaseException) -> bool:
    """
    Whether a query that failed with ``error`` reached a relay that took
    the connection but did not answer it: silent past the timeout, cut
    short, or ``503`` busy (a relay whose registry is unreachable, say).
    """
    from twisted.internet.error import TimeoutError

    if isinstance(error, wire.ProtocolError):
        return error.status == wire.BUSY
    return isinstance(error, (TimeoutError, IncompleteReply))


async def queryReached(
    endpoint: IStreamClientEndpoint,
    payload: bytes,
    clock: IReactorTime,
    timeout: float = QUERY_TIMEOUT,
    prover: Optional[Prover] = None,
) -> tuple[Reply, IStreamClientEndpoint]:
    """
    :func:`query`, and the endpoint of the one relay that answered: of a
    :class:`~p2prelay.addresses.FailoverEndpoint`, the relay it reached,
    else ``endpoint`` itself.  What must go to the same relay (a DEAD
    report about a peer it listed, a REVERSE or RELAY for one) goes there.

    Of a list, a relay that took the connection but did not answer it
    (:func:`answeredBadly`) is set back and the query asked again, at most
    once per relay: a hung relay still accepts connections.
    """
    from ..addresses import relayReached

    tries = len(getattr(endpoint, "relays", ())) or 1
    while True:
        protocol = QueryProtocol(clock, payload, timeout, prover)
        try:
            reply = await negotiate(endpoint, protocol)
        except Exception as e:
            relay = relayReached(endpoint, protocol)
            tries -= 1
            if relay is None or tries <= 0 or not answeredBadly(e):
                raise
            endpoint.demote(relay)
            log.info("relay {relay} did not answer ({why}); asking the next", relay=relay.name, why=str(e))
            continue
        relay = relayReached(endpoint, protocol)
        return reply, (endpoint if relay is None else relay.endpoint)


def secretProver(secret: bytes) -> Prover:
    """
    A client's prover for a private relay: ``PROOF mac=`` over the query,
    with the shared secret.
    """
    from .. import identity

    def prove(nonce: str, wanted: bool, sent: bytes) -> bytes:
        text = identity.transcript(identity.CLIENT_PROOF, nonce, sent)
        return wire.request(wire.PROOF, mac=identity.secretProof(secret, text))

    return prove


def keyProver(key, purpose: bytes, secret: Optional[bytes] = None) -> Prover:
    """
    A node's prover: ``PROOF sig=`` with its key for ``purpose``, and
    ``mac=`` with the shared secret when the relay asks for it.
    """
    from .. import identity

    def prove(nonce: str, wanted: bool, sent: bytes) -> bytes:
        mac = None
        if wanted:
            if secret is None:
                raise ProofNeeded("the relay needs the shared secret (--secret-file)")
            mac = identity.secretProof(secret, identity.transcript(purpose, nonce, sent))
        return wire.request(wire.PROOF, sig=key.prove(purpose, nonce, sent), mac=mac)

    return prove
