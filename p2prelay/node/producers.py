"""
The node's body producers: move ``length`` bytes of a file, from an
offset, into a connection without ever reading the file into memory.

On a plain TCP connection :class:`SendfileProducer` moves them from the
file to the socket in the kernel (``os.sendfile``) whenever the socket is
writable; anywhere else (TLS, test transports, no ``sendfile``)
:class:`FileBodyProducer` pushes chunks read in Python.  Either way a slow
client throttles the sender through the transport's flow control.
"""

from __future__ import annotations

import errno
import os
from typing import IO, Callable, Optional

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

CHUNK = 256 * 1024  # measured: 256 KiB writes cost far less CPU than 16 KiB ones
# Bytes handed to sendfile() per writable event at most, so one fast
# transfer never keeps the reactor from its other connections for long.
SENDFILE_BATCH = 4 * 1024 * 1024
# sendfile() errors that mean "not for this file or socket": read instead.
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK, errno.EBADF}
_TRY_LATER = {errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR}
HAVE_SENDFILE = hasattr(os, "sendfile")


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
