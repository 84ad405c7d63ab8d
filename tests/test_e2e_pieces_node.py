"""
End-to-end, node and relay side of pieces: real ``twistd relay`` and
``twistd peernode`` processes on loopback.  WHOHAS lists each holder's
root, a node answers MANIFEST for a multi-piece file (small pieces, via
the advanced ``--piece-size``) and piece-sized ranges, a restarted node
reads nothing again, and ``--max-rate`` / ``--max-uploads`` hold.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

from p2prelay import wire
from p2prelay.pieces import MIN_PIECE_SIZE, PIECE_SIZE, decodeDigests, rootOf

from .support import NetworkTestCase

PIECE = MIN_PIECE_SIZE
BIG = os.urandom(10 * PIECE + 1234)  # 11 pieces of 16 KiB
RATE = 2 * 1024 * 1024  # --max-rate of the capped node
CAPPED = os.urandom(3 * RATE)


def ask(address: tuple[str, int], request: bytes, timeout: float = 20.0) -> tuple[wire.Message, bytes]:
    """One request to a node; its status line and everything after it, to the close."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(request)
        data = bytearray()
        while chunk := s.recv(1 << 20):
            data += chunk
    head, _, body = bytes(data).partition(b"\n")
    return wire.parseLine(head), body


def digests(data: bytes, piece: int) -> list[bytes]:
    return [hashlib.sha256(data[i : i + piece]).digest() for i in range(0, len(data), piece)]


class PiecesNodeTests(NetworkTestCase):
    """
    Two nodes share big.bin in 16 KiB pieces, a third in the default
    pieces; a fourth shares a file with an upload cap and one upload at a
    time.
    """

    @classmethod
    def startNodes(cls, net) -> None:
        cls.folderA = net.folder("a", {"big.bin": BIG})
        cls.a, cls.b, cls.c, cls.capped = net.nodesInParallel(
            (cls.folderA, "--piece-size", "16K"),
            (net.folder("b", {"big.bin": BIG}), "--piece-size", "16K"),
            (net.folder("c", {"big.bin": BIG}),),
            (net.folder("capped", {"capped.bin": CAPPED}), "--max-rate", "2M", "--max-uploads", "1"),
        )

    def whohas(self, name: str) -> dict[int, wire.Message]:
        """WHOHAS items by the holder's port."""
        return {m.port(): m for m in self.net.query(wire.request(wire.WHOHAS, name=name))[1:]}

    def test_whohasRoot(self):
        """WHOHAS gives each holder's root and piece size: equal for equal layouts, different for another piece size."""
        items = self.whohas("big.bin")
        a, b, c = (items[self.net.listening(node)[1]] for node in (self.a, self.b, self.c))
        expected = rootOf(len(BIG), PIECE, digests(BIG, PIECE))
        self.assertEqual((a.get("root"), a.get("piece")), (expected, str(PIECE)))
        self.assertEqual(b.get("root"), expected)
        self.assertEqual(c.get("root"), rootOf(len(BIG), PIECE_SIZE, digests(BIG, PIECE_SIZE)))
        self.assertEqual(c.get("piece"), str(PIECE_SIZE))
        self.assertEqual({m.sha256() for m in (a, b, c)}, {hashlib.sha256(BIG).hexdigest()})

    def test_manifest(self):
        """MANIFEST answers the layout and exactly count*32 digest bytes, whose root is the one the relay lists."""
        address = self.net.listening(self.a)
        message, body = ask(address, wire.request(wire.MANIFEST, name="big.bin"))
        self.assertEqual(message.status, wire.OK)
        count = message.integer("count")
        self.assertEqual(count, 11)
        listed = self.whohas("big.bin")[address[1]].get("root")
        got = decodeDigests(body, count)
        self.assertEqual(rootOf(message.integer("size"), message.integer("piece"), got), listed)
        self.assertEqual(got, digests(BIG, PIECE))

    def test_manifestUnknown(self):
        """MANIFEST of a name the node does not share is 404."""
        message, body = ask(self.net.listening(self.a), wire.request(wire.MANIFEST, name="nope"))
        self.assertEqual((message.status, body), (wire.NOT_FOUND, b""))

    def test_pieceRange(self):
        """A range GET of one piece returns that piece, which matches its manifest digest."""
        message, body = ask(self.net.listening(self.b), wire.request(wire.GET, name="big.bin", offset=3 * PIECE, length=PIECE))
        self.assertEqual(message.status, wire.OK)
        self.assertEqual(hashlib.sha256(body).digest(), digests(BIG, PIECE)[3])

    def test_rateCapHolds(self):
        """
        A download from a node capped at 2 MiB/s never beats the cap by more
        than 10 %.  How close it comes depends on the load of a shared
        machine, so only a loose floor is checked here; the bucket's accuracy
        is specified on a fake clock in test_ratelimit.py.
        """
        address = self.net.listening(self.capped)
        for attempt in range(50):  # an earlier test's upload may still hold the one slot
            started = time.monotonic()
            message, body = ask(address, wire.request(wire.GET, name="capped.bin"))
            if message.status != wire.BUSY:
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        self.assertEqual(body, CAPPED)
        rate = len(body) / elapsed
        self.assertLessEqual(rate, RATE * 1.1, f"{rate / 2**20:.2f} MiB/s: over the cap")
        self.assertGreater(rate, RATE * 0.25, f"{rate / 2**20:.2f} MiB/s: strangled")

    def test_maxUploads(self):
        """While its one upload is sending, the capped node answers another GET 503 with retry=."""
        address = self.net.listening(self.capped)
        with socket.create_connection(address, timeout=20) as first:
            first.sendall(wire.request(wire.GET, name="capped.bin"))
            first.recv(1024)  # the upload is under way
            message, body = ask(address, wire.request(wire.GET, name="capped.bin"))
        self.assertEqual(message.status, wire.BUSY)
        self.assertIsNotNone(message.retry())

    def test_restartReadsNothing(self):
        """A node restarted over an unchanged folder registers the same root without hashing again."""
        self.assertTrue(any("hashed 1 file (" in line for line in self.a.log), "".join(self.a.log))
        port = self.net.listening(self.a)[1]
        self.a.stop()
        again = self.net.node(self.folderA, "--piece-size", "16K", "--port", f"tcp:{port}:interface=127.0.0.1")
        self.__class__.a = again
        self.assertFalse(any("hashed" in line for line in again.log), "".join(again.log))
        self.assertEqual(
            self.whohas("big.bin")[port].get("root"), rootOf(len(BIG), PIECE, digests(BIG, PIECE))
        )
