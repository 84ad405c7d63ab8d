"""
The peer node's file server: one request per connection -- ``GET`` (a file
or a range of it) or ``MANIFEST`` (a file's piece digests) -- the body
streamed raw.

It also answers a relay's dial-back, ``PROVE nonce=N``, with the node's
public key and its signature over the nonce (see ``relay/dialback.py``).

The status line announces the size and SHA-256 of the whole file, then
exactly ``length`` bytes follow, moved by a producer from
``node/producers.py`` (``sendfile`` on plain TCP, chunks read in Python
anywhere else).

Two node-wide caps apply to bodies: ``maxUploads`` (GETs sending at once;
one more is answered ``503 retry=``) and ``limiter``, an
:class:`~p2prelay.node.ratelimit.UploadLimiter` every body is written
through.  The limiter paces push producers by pausing them, and sendfile
moves bytes without a write the limiter could count, so with a rate cap
bodies take the read path in chunks of about the limiter's burst.
"""

from __future__ import annotations

import io
from typing import IO, Optional

from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import identity, pieces, wire
from ..human import humanRate, humanSize
from ..limits import (
    NODE_MAX_CONNECTIONS,
    NODE_MAX_GETS_PER_ADDRESS,
    NODE_MAX_PER_ADDRESS,
    AddressCounter,
    ConnectionLimit,
)
from ..negotiation import CLOSE_DEADLINE, IDLE_TIMEOUT, REQUEST_DEADLINE, NegotiationProtocol
from .producers import CHUNK, FileBodyProducer, SendfileProducer, sendfileSocket
from .ratelimit import LimitedConsumer, UploadLimiter
from .share import SharedDirectory

MIN_CHUNK = 16 * 1024  # the smallest read under a rate cap
UPLOAD_RETRY = 2  # seconds (retry=) told to a GET refused over --max-uploads


class FileServerProtocol(NegotiationProtocol):
    """
    Serve one ``GET name=... [offset=...] [length=...]`` or
    ``MANIFEST name=...`` (or a relay's ``PROVE``) and close.
    """

    log = Logger()
    deadline = REQUEST_DEADLINE  # for the request line, however slowly it trickles

    def __init__(self, factory: "FileServerFactory") -> None:
        super().__init__(factory.clock, factory.idleTimeout)
        self.factory = factory
        self.deadline = factory.requestDeadline
        self.closeDeadline = factory.closeDeadline
        self._producer: FileBodyProducer | SendfileProducer | None = None
        self._stopper: object = None  # what connectionLost stops: the producer, or its limited consumer
        self._requested = False
        self._lost = False
        self.sent = 0  # body bytes sent so far
        self._lostWhy: Optional[str] = None  # how the connection was lost, if it was

    def counted(self, count: int) -> None:
        """``count`` more body bytes sent."""
        self.sent += count
        if self.factory.metrics is not None:
            self.factory.metrics.sent(count)

    def _transfer(self, result: str) -> None:
        if self.factory.metrics is not None:
            self.factory.metrics.transfer(result)

    def lineReceived(self, line: bytes) -> None:
        if self._requested or self.finished:
            return
        # One request per connection: anything after it is ignored.
        self._requested = True
        self.requestComplete()
        if not self.takeSlot(self.factory.gets, "too many requests from your address"):
            self._transfer("refused")
            return
        self.transport.pauseProducing()
        ensureDeferred(self._serve(line)).addErrback(self._crashed)

    async def _serve(self, line: bytes) -> None:
        message = None
        try:
            message = wire.parseLine(line)
            if message.word == wire.PROVE and self.factory.key is not None:
                self._prove(message)
                return
            if message.word == wire.MANIFEST:
                await self._manifest(message)
                return
            if message.word != wire.GET:
                raise wire.ProtocolError(
                    wire.BAD_REQUEST, f"a peer node answers GET and MANIFEST, not {message.word}"
                )
            name = message.name()
            if self.factory.uploads is not None and not self.takeSlot(
                self.factory.uploads, "too many uploads at once", retry=UPLOAD_RETRY
            ):
                self._transfer("refused")
                return
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
            if message is not None and message.word == wire.GET:
                self._transfer("not-found" if e.status == wire.NOT_FOUND else "refused")
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
            self._transfer("refused")
            self.refuse(e)
            return
        self.log.info(
            "sending {name} ({size}{part}) to {peer}",
            name=name,
            size=humanSize(length),
            part=f" from byte {offset}" if offset or length != entry.size else "",
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
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.uploadStarted()
        began = self.clock.seconds()
        why = await self._sendBody(name, f, offset, length)
        took = self.clock.seconds() - began
        if metrics is not None:
            metrics.uploadFinished("complete" if why is None else "failed")
        if why is None:
            self.log.info(
                "sent {name}: {size} in {seconds:.1f} s ({rate}) to {peer}",
                name=name,
                size=humanSize(length),
                bytes=length,
                seconds=took,
                rate=humanRate(length / took) if took > 0 else "instantly",
                peer=self.peerName(),
            )
        else:
            self.log.info(
                "sending {name} to {peer} failed after {sent} of {size} ({seconds:.1f} s): {why}",
                name=name,
                sent=humanSize(self.sent),
                size=humanSize(length),
                bytes=self.sent,
                seconds=took,
                peer=self.peerName(),
                why=why,
            )

    async def _manifest(self, message: wire.Message) -> None:
        """
        ``MANIFEST name=``: the file's size, digest, root, piece size and
        count on the status line, then the count's 32-byte piece digests.
        """
        name = message.name()
        self.setTimeout(None)  # hashing a changed file is our wait
        entry, hashes = await self.factory.share.manifest(name)
        if self.finished or self._lost:
            return
        self.setTimeout(self.idleTimeout)
        body = pieces.encodeDigests(hashes.digests)
        count = len(hashes.digests)
        self.log.info(
            "sending the manifest of {name} ({count} pieces) to {peer}",
            name=name,
            count=count,
            peer=self.peerName(),
        )
        self.transport.write(
            wire.status(
                wire.OK,
                f"{count} pieces",
                size=entry.size,
                sha256=entry.sha256,
                root=entry.root,
                piece=entry.pieceSize,
                count=count,
            )
        )
        why = await self._sendBody(name, io.BytesIO(body), 0, len(body))
        if why is not None:
            self.log.info(
                "sending the manifest of {name} to {peer} failed: {why}",
                name=name,
                peer=self.peerName(),
                why=why,
            )

    async def _sendBody(self, name: str, f: IO[bytes], offset: int, length: int) -> Optional[str]:
        """
        ``length`` bytes of ``f`` from ``offset``, by sendfile when it can,
        then close; None when all went, else why not.
        """
        limiter = self.factory.limiter
        if limiter is None and sendfileSocket(self.transport, f) is not None:
            self._producer = SendfileProducer(
                f, offset, length, self.resetTimeout, counted=self.counted
            )
            self._stopper = self._producer
            started = self._producer.start(self.transport)
        else:
            consumer = _ResettingConsumer(self)
            chunk = CHUNK
            if limiter is not None:
                consumer = limiter.wrap(consumer)
                chunk = max(MIN_CHUNK, min(CHUNK, int(limiter.burst)))
            self._producer = FileBodyProducer(f, offset, length, self.factory.cooperator, chunk=chunk)
            self._stopper = consumer if limiter is not None else self._producer
            started = self._producer.start(consumer)
        try:
            await started
        except Exception as e:
            self.transport.abortConnection()
            if self._lostWhy is not None:  # the client went: say how, not "transfer stopped"
                return f"the connection was lost ({self._lostWhy.rstrip('.')})"
            return str(e) or type(e).__name__
        self.finish(b"")  # with a deadline: a client that stops reading now is cut off
        return None

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
        stopper = self._stopper
        if isinstance(stopper, LimitedConsumer) and stopper.bucketPaused and not stopper.transportPaused:
            # Waiting for the upload cap's turn: our wait, not the client's.
            self.resetTimeout()
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
        self._lostWhy = reason.getErrorMessage() if reason is not None else "closed"
        if self._stopper is not None:
            self._stopper.stopProducing()


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
        self._proto.counted(len(data))
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
        maxUploads: Optional[int] = None,
        limiter: Optional[UploadLimiter] = None,
        metrics=None,
    ) -> None:
        self.share = share
        self.metrics = metrics  # a p2prelay.metrics.NodeMetrics, or None (no --metrics)
        self.requestDeadline = requestDeadline  # seconds for the request line
        self.idleTimeout = idleTimeout
        self.closeDeadline = closeDeadline  # seconds a client has to take the end of an answer
        self.clock = clock
        self.cooperator = cooperator
        self.key = key  # answers a relay's PROVE; None: PROVE is refused like any non-GET
        self.connections = ConnectionLimit(clock, maxConnections, maxPerAddress, what="peernode")
        self.gets = AddressCounter(maxGetsPerAddress)
        # GETs sending at once, all addresses together (None: no cap).
        self.uploads = None if maxUploads is None else AddressCounter(maxUploads, maxUploads)
        self.limiter = limiter  # the node's upload cap, shared by every body (None: none)

    def buildProtocol(self, addr: object):
        return self.connections.build(addr, lambda: FileServerProtocol(self))
