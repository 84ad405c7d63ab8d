"""
The peer node's file server: one request per connection -- ``GET`` (a file
or a range of it) or ``MANIFEST`` (a file's piece digests) -- the body
streamed raw.

It also answers a relay's dial-back, ``PROVE nonce=N``, with the node's
public key and its signature over the nonce (see ``relay/dialback.py``).

The status line announces the size and SHA-256 of the whole file, then
exactly ``length`` bytes follow.  On a plain TCP connection
:class:`SendfileProducer` moves them from the file to the socket in the
kernel (``os.sendfile``) whenever the socket is writable; anywhere else (TLS,
test transports, no ``sendfile``) :class:`FileBodyProducer` pushes chunks
read in Python.  Either way the file is never read into memory and a slow
client throttles the sender through the transport's flow control.

Two node-wide caps apply to bodies: ``maxUploads`` (GETs sending at once;
one more is answered ``503 retry=``) and ``limiter``, an
:class:`~p2prelay.node.ratelimit.UploadLimiter` every body is written
through.  The limiter paces push producers by pausing them, and sendfile
moves bytes without a write the limiter could count, so with a rate cap
bodies take the read path in chunks of about the limiter's burst.
"""

from __future__ import annotations

import errno
import io
import os
from typing import IO, Callable, Optional

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IPullProducer, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

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
from .ratelimit import LimitedConsumer, UploadLimiter
from .share import SharedDirectory

CHUNK = 256 * 1024  # measured: 256 KiB writes cost far less CPU than 16 KiB ones
# Bytes handed to sendfile() per writable event at most, so one fast
# transfer never keeps the reactor from its other connections for long.
SENDFILE_BATCH = 4 * 1024 * 1024
# sendfile() errors that mean "not for this file or socket": read instead.
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK, errno.EBADF}
_TRY_LATER = {errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR}
HAVE_SENDFILE = hasattr(os, "sendfile")
MIN_CHUNK = 16 * 1024  # the smallest read under a rate cap
UPLOAD_RETRY = 2  # seconds (retry=) told to a GET refused over --max-uploads


def sendfileSocket(transport: object, f: IO[bytes]) -> Optional[int]:
    """
    The socket's file descriptor when ``transport`` is a plain TCP
    connection that ``os.sendfile`` can feed from ``f``; otherwise None.

    Only Twisted's own TCP connection qualifies: there the bytes
    ``write()`` buffered and the socket's writability are known.  A TLS
    connection (wrapped, or ``startTLS`` on the connection itself) must
    see every byte to encrypt it.
    """
    if not HAVE_SENDFILE:
        return None
    from twisted.internet import tcp

    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    try:
        f.fileno()
        return transport.getHandle().fileno()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        return None


def _unsent(transport: object) -> int:
    """Bytes ``transport`` (a Twisted TCP connection) holds that the kernel has not taken yet."""
    return (
        len(transport.dataBuffer) - transport.offset  # type: ignore[attr-defined]
        + transport._tempDataLen  # type: ignore[attr-defined]
    )


@implementer(IPullProducer)
class SendfileProducer:
    """
    Send ``length`` bytes of a file into a Twisted TCP connection with
    ``os.sendfile``, registered as a pull producer.

    The connection calls :meth:`resumeProducing` whenever its own buffer
    is empty (first, so the status line written before us goes out before
    any of the body); each call sends until the socket would block (or
    ``SENDFILE_BATCH`` bytes), then asks the connection to watch for
    writability, which brings the next call.  A client that stops reading
    thus costs nothing until the idle timeout drops it; losing the
    connection stops us.  If the kernel refuses ``sendfile`` for this file
    the rest is read and written in chunks instead, one per call.

    ``progress`` is called after every batch that moved bytes (the idle
    timeout's reset), ``counted`` with every count of bytes moved.  ``deferred`` fires when every byte is sent, or
    fails if the file shrinks or the connection is lost.
    """

    def __init__(
        self,
        f: IO[bytes],
        offset: int,
        length: int,
        progress: Callable[[], None] = lambda: None,
        batch: int = SENDFILE_BATCH,
        chunk: int = CHUNK,
        counted: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._counted = counted
        self._file = f
        self._offset = offset
        self._remaining = length
        self._progress = progress
        self._batch = batch
        self._chunk = chunk
        self._sendfile = True
        self._done = False
        self.deferred: Deferred[None] = Deferred()

    def start(self, transport) -> Deferred[None]:
        self._transport = transport
        self._socket = sendfileSocket(transport, self._file)
        if self._socket is None:
            raise ValueError("SendfileProducer needs a plain TCP connection")
        self._in = self._file.fileno()
        transport.registerProducer(self, False)  # which calls resumeProducing
        return self.deferred

    def resumeProducing(self) -> None:
        if self._done:
            return
        if _unsent(self._transport):
            # The status line (or a chunk we wrote) is still going out: the
            # connection calls us again once it has all left.
            return
        try:
            if self._sendfile:
                self._sendSome()
            else:
                self._readSome()
        except OSError as e:
            self._finish(Failure(e))
            return
        if self._remaining == 0:
            self._finish(None)

    def _sendSome(self) -> None:
        budget = min(self._batch, self._remaining)
        sent = 0
        while sent < budget:
            try:
                n = os.sendfile(self._socket, self._in, self._offset, budget - sent)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if e.errno in _TRY_LATER:
                    break
                if e.errno in _NO_SENDFILE:
                    # Not for this file system or socket after all: read
                    # the rest (nothing of this call was sent).
                    self._sendfile = False
                    if sent:
                        self._progress()
                    self._readSome()
                    return
                raise
            if n == 0:
                raise OSError("file shrank while it was being sent")
            sent += n
            self._offset += n
            self._remaining -= n
            self._counted(n)
        if sent:
            self._progress()
        if self._remaining:
            # Full socket, or our share of this reactor turn used: wait for
            # writability.  (The connection's doWrite finds its own buffer
            # empty, stops watching and calls us again.)
            self._transport.startWriting()

    def _readSome(self) -> None:
        """The fallback: one chunk read and written; the connection asks for the next."""
        data = os.pread(self._in, min(self._chunk, self._remaining), self._offset)
        if not data:
            raise OSError("file shrank while it was being sent")
        self._offset += len(data)
        self._remaining -= len(data)
        self._progress()
        self._counted(len(data))
        self._transport.write(data)

    def _finish(self, failure: Optional[Failure]) -> None:
        self._done = True
        self._file.close()
        self._transport.unregisterProducer()
        if failure is None:
            self.deferred.callback(None)
        else:
            self.deferred.errback(failure)

    def stopProducing(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.close()
        self.deferred.errback(Failure(ConnectionError("transfer stopped")))

    # The connection calls these only on push producers; harmless here.

    def pauseProducing(self) -> None:
        pass


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
        # The task first, so a consumer that pauses us on registration (an
        # upload cap in debt) holds it before its first step.
        self._task = self._cooperate(self._steps())
        consumer.registerProducer(self, True)
        self._task.whenDone().addCallbacks(self._done, self._failed)
        return self.deferred

    def _steps(self):
        while self._remaining > 0:
            data = self._file.read(min(self._chunk, self._remaining))
            if not data:
                raise OSError("file shrank while it was being sent")
            self._remaining -= len(data)
            self._consumer.write(data)
            if self._remaining > 0:  # else done now, even if that write paused us
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
