"""
The threaded Download: writes and hashes off the reactor thread, and pauses
its producer while the writer thread is behind.
"""

from __future__ import annotations

import errno
import hashlib
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
        store = self.sink._store

        def slowStore(data: bytes) -> None:
            gate.wait(10)
            store(data)

        self.sink._store = slowStore
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
        store = self.sink._store
        self.sink._store = lambda data: (gate.wait(10), store(data))
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
