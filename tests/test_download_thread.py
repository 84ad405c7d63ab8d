"""
The threaded Download: writes and hashes off the reactor thread, on two
threads side by side, in batches; pauses its producer while either thread
is behind; truncates its file only when an attempt wrote into it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from p2prelay.client import download
from p2prelay.client.download import Download


class FakeProducer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


def blockWhile(case: TestCase, sink: Download, method: str) -> threading.Event:
    """Hold ``sink``'s ``method`` (one thread's work) until the returned event is set."""
    gate = threading.Event()
    case.addCleanup(gate.set)
    real = getattr(sink, method)

    def held(batch: list[bytes]) -> int:
        gate.wait(10)
        return real(batch)

    setattr(sink, method, held)
    return gate


class ThreadedDownloadTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.sink = Download(self.dir, reactor)
        self.addCleanup(self.sink.discard)

    async def test_storesAndHashesEveryByte(self) -> None:
        """Bytes written in many chunks are stored and hashed in order."""
        chunks = [bytes([i]) * (1000 + i) for i in range(200)]
        whole = b"".join(chunks)
        self.sink.expect(len(whole), hashlib.sha256(whole).hexdigest())
        for chunk in chunks:
            self.sink.write(chunk)
        await self.sink.flushed()
        self.sink.verify()
        self.assertEqual(self.sink.path.read_bytes(), whole)

    async def test_slowWriterPausesProducer(self) -> None:
        """Past HIGH_WATER queued bytes the producer is paused, and resumed once drained."""
        gate = threading.Event()
        self.addCleanup(gate.set)
        store = self.sink._writeBatch

        def slowStore(batch: list[bytes]) -> int:
            gate.wait(10)
            return store(batch)

        self.sink._writeBatch = slowStore
        producer = FakeProducer()
        self.sink.registerProducer(producer, True)
        chunk = b"x" * (1024 * 1024)
        for _ in range(download.HIGH_WATER // len(chunk) + 1):
            self.sink.write(chunk)
        self.assertEqual((producer.paused, producer.resumed), (1, 0))
        gate.set()
        await self.sink.flushed()
        self.assertEqual((producer.paused, producer.resumed), (1, 1))

    async def test_resetAfterFlushStartsOver(self) -> None:
        """A failed attempt's bytes are gone after flushed() and reset()."""
        self.sink.write(b"garbage from a bad peer")
        await self.sink.flushed()
        self.sink.reset()
        self.sink.write(b"good")
        self.sink.expect(4, hashlib.sha256(b"good").hexdigest())
        await self.sink.flushed()
        self.sink.verify()
        self.assertEqual(self.sink.path.read_bytes(), b"good")

    async def test_newProducerPausedWhileBehind(self) -> None:
        """A producer registered while the writer is still behind starts paused."""
        gate = threading.Event()
        self.addCleanup(gate.set)
        store = self.sink._writeBatch
        self.sink._writeBatch = lambda batch: (gate.wait(10), store(batch))[1]
        first = FakeProducer()
        self.sink.registerProducer(first, True)
        for _ in range(download.HIGH_WATER // (1024 * 1024) + 1):
            self.sink.write(b"x" * 1024 * 1024)
        self.sink.unregisterProducer()
        second = FakeProducer()
        self.sink.registerProducer(second, True)
        self.assertEqual(second.paused, 1)
        gate.set()
        await self.sink.flushed()
        self.assertEqual((second.paused, second.resumed), (1, 1))

    async def test_diskFullThenHonestCopy(self) -> None:
        """A disk error on the writer thread fails that attempt only: after reset() the next copy verifies."""
        real = self.sink._file.write
        calls = []

        def fullOnce(data: bytes) -> int:
            calls.append(data)
            if len(calls) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(data)

        self.sink._file.write = fullOnce
        self.sink.expect(3, hashlib.sha256(b"big").hexdigest())
        self.sink.write(b"big")
        await self.sink.flushed()
        self.assertRaises(OSError, self.sink.verify)
        self.sink.reset()
        self.sink.expect(4, hashlib.sha256(b"good").hexdigest())
        self.sink.write(b"good")
        await self.sink.flushed()
        self.sink.verify()
        self.assertEqual(self.sink.path.read_bytes(), b"good")

    async def test_slowHasherPausesProducer(self) -> None:
        """The hashing thread falling behind pauses the producer as a slow disk does."""
        gate = blockWhile(self, self.sink, "_hashBatch")
        producer = FakeProducer()
        self.sink.registerProducer(producer, True)
        for _ in range(download.HIGH_WATER // (1024 * 1024) + 1):
            self.sink.write(b"x" * 1024 * 1024)
        self.assertEqual((producer.paused, producer.resumed), (1, 0))
        gate.set()
        await self.sink.flushed()
        self.assertEqual((producer.paused, producer.resumed), (1, 1))

    async def test_writeAndHashOverlap(self) -> None:
        """While the writer thread is held, the hashing thread still hashes what was handed off."""
        gate = blockWhile(self, self.sink, "_writeBatch")
        hashed = threading.Event()
        real = self.sink._hashBatch

        def hashing(batch: list[bytes]) -> int:
            count = real(batch)
            hashed.set()
            return count

        self.sink._hashBatch = hashing
        self.sink.write(b"y" * download.BATCH)
        self.assertTrue(hashed.wait(10), "hashed while the write was still held")
        gate.set()
        await self.sink.flushed()

    async def test_smallWritesBatched(self) -> None:
        """Small writes reach the threads gathered into batches of about BATCH bytes, not one by one."""
        batches = []
        real = self.sink._writeBatch

        def recording(batch: list[bytes]) -> int:
            batches.append(sum(map(len, batch)))
            return real(batch)

        self.sink._writeBatch = recording
        chunk = b"z" * (64 * 1024)
        count = 3 * download.BATCH // len(chunk) + 1
        for _ in range(count):
            self.sink.write(chunk)
        await self.sink.flushed()
        self.assertEqual(batches, [download.BATCH] * 3 + [len(chunk)])

    async def test_freshFileNotTruncated(self) -> None:
        """A reset with nothing written since the file was made never truncates it (that costs a flush on ext4)."""
        truncated = []
        real = self.sink._file.truncate
        self.sink._file.truncate = lambda *args: (truncated.append(args), real(*args))[1]
        await self.sink.flushed()
        self.sink.reset()
        self.sink.reset()
        self.assertEqual(truncated, [])

    def test_newDownloadNotTruncated(self) -> None:
        """Making a download does not truncate its fresh temporary file."""
        truncated = []
        fdopen = os.fdopen

        def recording(*args, **kwargs):
            f = fdopen(*args, **kwargs)
            real = f.truncate
            f.truncate = lambda *a: (truncated.append(a), real(*a))[1]
            return f

        self.patch(os, "fdopen", recording)
        sink = Download(Path(self.mktemp()))
        self.addCleanup(sink.discard)
        self.assertEqual(truncated, [])
