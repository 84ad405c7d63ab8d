"""
The peer node's file server: one GET per connection, the body streamed raw.

It also answers a relay's dial-back, ``PROVE nonce=N``, with the node's
public key and its signature over the nonce (see ``relay/dialback.py``).

The status line announces the size and SHA-256 of the whole file, then
exactly ``length`` bytes follow, pushed by :class:`FileBodyProducer` so the
file is never read into memory and a slow client throttles the reader
through the transport's flow control.
"""

from __future__ import annotations

from typing import IO

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import identity, wire
from ..limits import (
    NODE_MAX_CONNECTIONS,
    NODE_MAX_GETS_PER_ADDRESS,
    NODE_MAX_PER_ADDRESS,
    AddressCounter,
    ConnectionLimit,
)
from ..negotiation import CLOSE_DEADLINE, IDLE_TIMEOUT, REQUEST_DEADLINE, NegotiationProtocol
from .share import SharedDirectory

CHUNK = 256 * 1024  # measured: 256 KiB writes cost far less CPU than 16 KiB ones


@implementer(IPushProducer)
class FileBodyProducer:
    """
    Push ``length`` bytes of a file into a consumer, a chunk per step.

    Steps run under a :class:`task.Cooperator` so a fast transfer never
    starves the reactor; the consumer's ``pauseProducing`` pauses the task
    until its buffer drains.  ``deferred`` fires when every byte is written,
    or fails if the file shrinks underneath us.
    """

    def __init__(
        self,
        f: IO[bytes],
        offset: int,
        length: int,
        cooperator: task.Cooperator | None = None,
        chunk: int = CHUNK,
    ) -> None:
        self._file = f
        self._offset = offset
        self._remaining = length
        self._chunk = chunk
        self._cooperate = (cooperator or task).cooperate
        self.deferred: Deferred[None] = Deferred()
        self._task: task.CooperativeTask | None = None

    def start(self, consumer) -> Deferred[None]:
        self._consumer = consumer
        self._file.seek(self._offset)
        consumer.registerProducer(self, True)
        self._task = self._cooperate(self._steps())
        self._task.whenDone().addCallbacks(self._done, self._failed)
        return self.deferred

    def _steps(self):
        while self._remaining > 0:
            data = self._file.read(min(self._chunk, self._remaining))
            if not data:
                raise OSError("file shrank while it was being sent")
            self._remaining -= len(data)
            self._consumer.write(data)
            yield None

    def _done(self, _: object) -> None:
        self._cleanup()
        self.deferred.callback(None)

    def _failed(self, failure: Failure) -> None:
        self._cleanup()
        if not failure.check(task.TaskStopped):
            self.deferred.errback(failure)
        else:
            self.deferred.errback(Failure(ConnectionError("transfer stopped")))

    def _cleanup(self) -> None:
        self._file.close()
        self._consumer.unregisterProducer()

    def _control(self, action: str) -> None:
        if self._task is not None:
            try:
                getattr(self._task, action)()
            except task.TaskFinished:  # done, stopped or failed already
                pass

    def pauseProducing(self) -> None:
        self._control("pause")

    def resumeProducing(self) -> None:
        self._control("resume")

    def stopProducing(self) -> None:
        self._control("stop")


class FileServerProtocol(NegotiationProtocol):
    """
    Serve one ``GET name=... [offset=...] [length=...]`` and close.
    """

    log = Logger()
    deadline = REQUEST_DEADLINE  # for the request line, however slowly it trickles

    def __init__(self, factory: "FileServerFactory") -> None:
        super().__init__(factory.clock, factory.idleTimeout)
        self.factory = factory
        self.deadline = factory.requestDeadline
        self.closeDeadline = factory.closeDeadline
        self._producer: FileBodyProducer | None = None
        self._requested = False
        self._lost = False

    def lineReceived(self, line: bytes) -> None:
        if self._requested or self.finished:
            return
        # One request per connection: anything after it is ignored.
        self._requested = True
        self.requestComplete()
        if not self.takeSlot(self.factory.gets, "too many requests from your address"):
            return
        self.transport.pauseProducing()
        ensureDeferred(self._serve(line)).addErrback(self._crashed)

    async def _serve(self, line: bytes) -> None:
        try:
            message = wire.parseLine(line)
            if message.word == wire.PROVE and self.factory.key is not None:
                self._prove(message)
                return
            if message.word != wire.GET:
                raise wire.ProtocolError(wire.BAD_REQUEST, f"a peer node answers GET, not {message.word}")
            name = message.name()
            # Hashing a changed file is the server's wait, not client idleness.
            self.setTimeout(None)
            f, entry = await self.factory.share.open(name)
            if self.finished or self._lost:  # refused or gone meanwhile
                f.close()
                return
            self.setTimeout(self.idleTimeout)
        except wire.ProtocolError as e:
            self.log.info(
                "refused {peer}: {error}", peer=self.peerName(), error=str(e)
            )
            self.refuse(e)
            return
        try:
            offset = message.integer("offset", 0)
            length = message.integer("length", max(entry.size - offset, 0))
            if offset > entry.size or offset + length > entry.size:
                raise wire.ProtocolError(
                    wire.BAD_RANGE, f"range {offset}+{length} is outside {entry.size} bytes"
                )
        except wire.ProtocolError as e:
            f.close()
            self.refuse(e)
            return
        self.log.info(
            "sending {name} ({length} bytes from {offset}) to {peer}",
            name=name,
            length=length,
            offset=offset,
            peer=self.peerName(),
        )
        # The body's pace is set by the client; the idle timeout still
        # guards a client that stops reading altogether.
        self.transport.write(
            wire.status(
                wire.OK,
                f"sending {length} bytes",
                size=entry.size,
                sha256=entry.sha256,
                offset=offset,
                length=length,
            )
        )
        self._producer = FileBodyProducer(f, offset, length, self.factory.cooperator)
        try:
            await self._producer.start(_ResettingConsumer(self))
        except Exception as e:
            self.log.info("transfer of {name} ended early: {error}", name=name, error=e)
            self.transport.abortConnection()
            return
        self.finish(b"")  # with a deadline: a client that stops reading now is cut off

    def _prove(self, message: wire.Message) -> None:
        """
        A relay's dial-back: sign its nonce, so it knows this key answers
        on this address.
        """
        key = self.factory.key
        nonce = message.nonce()
        self.log.info("proving our key to {peer}", peer=self.peerName())
        self.finish(
            wire.status(
                wire.OK,
                f"node {key.node}",
                key=key.public,
                sig=key.prove(identity.DIALBACK_PROOF, nonce, b""),
            )
        )

    def timeoutConnection(self) -> None:
        if self._producer is None:
            super().timeoutConnection()
            return
        # The status line is out: a 408 now would land inside the body, and a
        # graceful close would wait forever on a client that stopped reading.
        self.log.info("dropping stalled transfer to {peer}", peer=self.peerName())
        self.finished = True
        self.transport.abortConnection()

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("bug while serving a request", failure)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        super().connectionLost(reason)
        self._lost = True
        if self._producer is not None:
            self._producer.stopProducing()


class _ResettingConsumer:
    """
    The transport, seen by the producer, with each write counting as
    activity so a large body never trips the idle timeout.
    """

    def __init__(self, proto: FileServerProtocol) -> None:
        self._proto = proto
        self._transport = proto.transport

    def write(self, data: bytes) -> None:
        self._proto.resetTimeout()
        self._transport.write(data)

    def registerProducer(self, producer, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()


class FileServerFactory(Factory):
    noisy = False  # no "Starting factory <...>": the listening service logs the port

    def __init__(
        self,
        share: SharedDirectory,
        clock: IReactorTime,
        cooperator: task.Cooperator | None = None,
        maxConnections: int = NODE_MAX_CONNECTIONS,
        maxPerAddress: int = NODE_MAX_PER_ADDRESS,
        maxGetsPerAddress: int = NODE_MAX_GETS_PER_ADDRESS,
        key: identity.NodeKey | None = None,
        requestDeadline: float = REQUEST_DEADLINE,
        idleTimeout: float = IDLE_TIMEOUT,
        closeDeadline: float = CLOSE_DEADLINE,
    ) -> None:
        self.share = share
        self.requestDeadline = requestDeadline  # seconds for the request line
        self.idleTimeout = idleTimeout
        self.closeDeadline = closeDeadline  # seconds a client has to take the end of an answer
        self.clock = clock
        self.cooperator = cooperator
        self.key = key  # answers a relay's PROVE; None: PROVE is refused like any non-GET
        self.connections = ConnectionLimit(clock, maxConnections, maxPerAddress, what="peernode")
        self.gets = AddressCounter(maxGetsPerAddress)

    def buildProtocol(self, addr: object):
        return self.connections.build(addr, lambda: FileServerProtocol(self))
