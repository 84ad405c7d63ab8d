"""
The piece layout, the root and the MANIFEST body (p2prelay.pieces):
examples at the edges and hypothesis properties over any size.
"""

from __future__ import annotations

import hashlib
import os

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import pieces
from p2prelay.pieces import (
    MAX_PIECES,
    PIECE_SIZE,
    checkLayout,
    decodeDigests,
    encodeDigests,
    pieceCount,
    pieceDigest,
    pieceRange,
    rootOf,
)

SCALE = max(1, int(os.environ.get("P2PRELAY_PROPERTY_SCALE", "1")))


def fast(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, database=None)


def digestsOf(data: bytes, pieceSize: int) -> list[bytes]:
    return [pieceDigest(data[i : i + pieceSize]) for i in range(0, len(data), pieceSize)]


sizes = st.one_of(
    st.integers(0, 10 * PIECE_SIZE),
    st.sampled_from([0, 1, PIECE_SIZE - 1, PIECE_SIZE, PIECE_SIZE + 1, 2 * PIECE_SIZE]),
    st.integers(0, 2**50),
)
pieceSizes = st.one_of(st.integers(1, 64), st.sampled_from([PIECE_SIZE, 16 * 1024, 1]))


class LayoutTests(SynchronousTestCase):
    def test_defaults(self):
        """The default piece is 4 MiB; at most 1,048,576 pieces (4 TiB at 4 MiB)."""
        self.assertEqual(PIECE_SIZE, 4 * 1024 * 1024)
        self.assertEqual(MAX_PIECES, 1_048_576)
        self.assertEqual(MAX_PIECES * PIECE_SIZE, 4 * 1024**4)

    def test_empty(self):
        """An empty file has no pieces, and asking for piece 0 is an IndexError."""
        self.assertEqual(pieceCount(0), 0)
        self.assertRaises(IndexError, pieceRange, 0, 0)

    def test_oneByte(self):
        """A one-byte file is one piece of one byte."""
        self.assertEqual(pieceCount(1), 1)
        self.assertEqual(pieceRange(0, 1), (0, 1))

    def test_exactlyOnePiece(self):
        """A file of exactly one piece size is one full piece, not two."""
        self.assertEqual(pieceCount(PIECE_SIZE), 1)
        self.assertEqual(pieceRange(0, PIECE_SIZE), (0, PIECE_SIZE))

    def test_onePiecePlusOne(self):
        """One byte over a piece makes a second piece of one byte."""
        self.assertEqual(pieceCount(PIECE_SIZE + 1), 2)
        self.assertEqual(pieceRange(1, PIECE_SIZE + 1), (PIECE_SIZE, 1))

    def test_indexOutOfRange(self):
        """Negative indexes and indexes past the last piece are refused."""
        self.assertRaises(IndexError, pieceRange, -1, 10, 4)
        self.assertRaises(IndexError, pieceRange, 3, 10, 4)

    def test_badArguments(self):
        """A negative size or a piece size under one byte is a ValueError."""
        self.assertRaises(ValueError, pieceCount, -1, 4)
        self.assertRaises(ValueError, pieceCount, 10, 0)
        self.assertRaises(ValueError, pieceRange, 0, 10, -4)

    def test_checkLayout(self):
        """An announced layout is accepted only with a sane piece size and count."""
        self.assertEqual(checkLayout(PIECE_SIZE + 1, PIECE_SIZE), 2)
        self.assertRaises(ValueError, checkLayout, 10, pieces.MIN_PIECE_SIZE - 1)
        self.assertRaises(ValueError, checkLayout, 10, pieces.MAX_PIECE_SIZE + 1)
        self.assertEqual(checkLayout(MAX_PIECES * PIECE_SIZE, PIECE_SIZE), MAX_PIECES)
        self.assertRaises(ValueError, checkLayout, MAX_PIECES * PIECE_SIZE + 1, PIECE_SIZE)

    @fast(200)
    @given(sizes, pieceSizes)
    @example(0, 1)
    @example(PIECE_SIZE, PIECE_SIZE)
    @example(PIECE_SIZE + 1, PIECE_SIZE)
    def test_piecesTileTheFile(self, size, pieceSize):
        """
        The pieces cover the file exactly, in order, without gaps or
        overlap; every one is a full piece except perhaps the last, which is
        never empty.
        """
        count = pieceCount(size, pieceSize)
        if size == 0:
            self.assertEqual(count, 0)
        else:
            self.assertTrue((count - 1) * pieceSize < size <= count * pieceSize)
        # Checking every piece of a 2**50-byte file is too slow; the first,
        # the last and a few around them say the same.
        indexes = sorted({i for i in (0, 1, count // 2, count - 2, count - 1) if 0 <= i < count})
        for i in indexes:
            offset, length = pieceRange(i, size, pieceSize)
            self.assertEqual(offset, i * pieceSize)
            self.assertGreater(length, 0)
            self.assertEqual(length, pieceSize if i < count - 1 else size - offset)
        if count:
            offset, length = pieceRange(count - 1, size, pieceSize)
            self.assertEqual(offset + length, size)

    @fast(100)
    @given(st.binary(max_size=300), st.integers(1, 40))
    def test_rangesReassemble(self, data, pieceSize):
        """Slicing a file by every piece range and joining the slices gives the file."""
        count = pieceCount(len(data), pieceSize)
        parts = []
        for i in range(count):
            offset, length = pieceRange(i, len(data), pieceSize)
            parts.append(data[offset : offset + length])
        self.assertEqual(b"".join(parts), data)


class RootTests(SynchronousTestCase):
    def test_definition(self):
        """The root is SHA-256 of the prefix, piece size, size and digests, in hex."""
        data = b"x" * 10
        digests = digestsOf(data, 4)
        expected = hashlib.sha256(
            b"p2prelay-pieces/1\n" + (4).to_bytes(8, "big") + (10).to_bytes(8, "big") + b"".join(digests)
        ).hexdigest()
        self.assertEqual(rootOf(10, 4, digests), expected)
        self.assertEqual(len(expected), 64)

    def test_emptyFile(self):
        """An empty file has a root too, over no digests."""
        self.assertEqual(
            rootOf(0, PIECE_SIZE, []),
            hashlib.sha256(
                b"p2prelay-pieces/1\n" + PIECE_SIZE.to_bytes(8, "big") + bytes(8)
            ).hexdigest(),
        )

    def test_wrongCount(self):
        """Digests that do not match the layout's piece count are refused."""
        digests = digestsOf(b"x" * 10, 4)
        self.assertRaises(ValueError, rootOf, 10, 4, digests[:-1])
        self.assertRaises(ValueError, rootOf, 10, 4, digests + [digests[0]])
        self.assertRaises(ValueError, rootOf, 13, 4, digests)

    def test_wrongDigestLength(self):
        """A digest that is not 32 bytes is refused, even if the total length fits."""
        self.assertRaises(ValueError, rootOf, 8, 4, [b"a" * 31, b"b" * 33])

    @fast(100)
    @given(st.binary(min_size=1, max_size=200), st.integers(1, 50), st.data())
    def test_anyChangeChangesTheRoot(self, data, pieceSize, draw):
        """
        Changing one byte of the file, its piece size or its length changes
        the root.
        """
        root = rootOf(len(data), pieceSize, digestsOf(data, pieceSize))
        i = draw.draw(st.integers(0, len(data) - 1))
        changed = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        self.assertNotEqual(rootOf(len(data), pieceSize, digestsOf(changed, pieceSize)), root)
        self.assertNotEqual(rootOf(len(data), pieceSize + 1, digestsOf(data, pieceSize + 1)), root)
        longer = data + b"\0"
        self.assertNotEqual(rootOf(len(longer), pieceSize, digestsOf(longer, pieceSize)), root)

    def test_sizeWithinLastPieceCounts(self):
        """
        Two files whose last pieces hash alike but whose sizes differ cannot
        share a root: the size is part of it.
        """
        digests = digestsOf(b"abcd" * 2, 4)
        self.assertNotEqual(rootOf(8, 4, digests), rootOf(7, 4, digests))


class ManifestBodyTests(SynchronousTestCase):
    @fast(100)
    @given(st.lists(st.binary(min_size=32, max_size=32), max_size=50))
    def test_roundTrip(self, digests):
        """Digests encoded as a MANIFEST body decode to the same list."""
        body = encodeDigests(digests)
        self.assertEqual(len(body), 32 * len(digests))
        self.assertEqual(decodeDigests(body, len(digests)), digests)

    def test_encodeRefusesBadDigest(self):
        """A digest of the wrong length cannot be encoded."""
        self.assertRaises(ValueError, encodeDigests, [b"a" * 32, b"b" * 31])

    @fast(100)
    @given(st.binary(max_size=200), st.integers(0, 10))
    def test_decodeRefusesWrongLength(self, body, count):
        """A body that is not exactly count * 32 bytes is refused."""
        if len(body) == count * 32:
            self.assertEqual(len(decodeDigests(body, count)), count)
        else:
            self.assertRaises(ValueError, decodeDigests, body, count)

    def test_decodeRefusesTooMany(self):
        """A count over MAX_PIECES is refused before the body is looked at."""
        self.assertRaises(ValueError, decodeDigests, b"", MAX_PIECES + 1)
        self.assertRaises(ValueError, decodeDigests, b"", -1)
