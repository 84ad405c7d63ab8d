"""
Tests for p2prelay.udp.packets: every datagram kind encoded and decoded,
byte for byte as ``docs/udp.rst`` lays them out.
"""

from __future__ import annotations

import struct

from twisted.trial import unittest

from p2prelay import wire
from p2prelay.udp import packets
from p2prelay.udp.packets import HEADER_SIZE, Meta, Request


class HeaderTests(unittest.SynchronousTestCase):
    def test_layout(self) -> None:
        """The header is magic ``PU``, version 1, the type, then the transfer id."""
        self.assertEqual(packets.header(packets.ACK, 0x01020304), b"PU\x01\x05\x01\x02\x03\x04")

    def test_parse(self) -> None:
        """parseHeader gives back the type and transfer id."""
        datagram = packets.header(packets.META, 77) + b"rest"
        self.assertEqual(packets.parseHeader(datagram), (packets.META, 77))

    def test_notOurs(self) -> None:
        """A short datagram, or one with another magic or version, is not ours."""
        good = packets.header(packets.DATA, 1)
        for datagram in [b"", good[:7], b"XX" + good[2:], good[:2] + b"\x02" + good[3:]]:
            self.assertIsNone(packets.parseHeader(datagram), datagram)


class RequestTests(unittest.SynchronousTestCase):
    REQUEST = Request(1000, 5000, 1400, 2995, b"c" * 20, "sub dir/ünï.txt")

    def test_roundTrip(self) -> None:
        """A request decodes to what was encoded."""
        datagram = packets.encodeRequest(9, self.REQUEST)
        self.assertEqual(packets.parseHeader(datagram), (packets.REQUEST, 9))
        self.assertEqual(packets.decodeRequest(datagram), self.REQUEST)

    def test_toTheEnd(self) -> None:
        """No length goes on the wire as 2**64-1 and comes back as None."""
        datagram = packets.encodeRequest(9, Request(0, None, 1400, 16, b"", "a"))
        self.assertEqual(struct.unpack_from("!Q", datagram, 16), (packets.TO_END,))
        self.assertIsNone(packets.decodeRequest(datagram).length)

    def test_layout(self) -> None:
        """Offset, length, block size, window, cookie length, cookie, name length, name."""
        datagram = packets.encodeRequest(9, Request(1, 2, 3, 4, b"ck", "nm"))
        self.assertEqual(
            datagram[HEADER_SIZE : HEADER_SIZE + 31],
            struct.pack("!QQIIB", 1, 2, 3, 4, 2) + b"ck" + struct.pack("!H", 2) + b"nm",
        )

    def test_padded(self) -> None:
        """A request is zero-padded to MIN_REQUEST bytes; a longer one is not padded."""
        short = packets.encodeRequest(9, Request(0, None, 1400, 16, b"", "a"))
        self.assertEqual(len(short), packets.MIN_REQUEST)
        self.assertEqual(short.rstrip(b"\0"), short[: HEADER_SIZE + 25 + 2 + 1])
        long = packets.encodeRequest(9, Request(0, None, 1400, 16, b"", "a" * 2000))
        self.assertEqual(len(long), HEADER_SIZE + 25 + 2 + 2000)

    def test_cookieReadFirst(self) -> None:
        """cookieOf finds the cookie without decoding the rest."""
        datagram = packets.encodeRequest(9, self.REQUEST)
        self.assertEqual(packets.cookieOf(datagram), b"c" * 20)
        self.assertEqual(packets.cookieOf(datagram[:30]), b"")

    def test_truncated(self) -> None:
        """A request whose name runs past its end is a 400."""
        datagram = packets.encodeRequest(9, Request(0, None, 1400, 16, b"", "name"))
        at = HEADER_SIZE + packets.REQUEST_BODY.size
        broken = datagram[:at] + struct.pack("!H", 5000) + datagram[at + 2 :]
        e = self.assertRaises(wire.ProtocolError, packets.decodeRequest, broken)
        self.assertEqual(e.status, wire.BAD_REQUEST)
        e = self.assertRaises(wire.ProtocolError, packets.decodeRequest, datagram[:20])
        self.assertEqual(e.status, wire.BAD_REQUEST)

    def test_badUTF8(self) -> None:
        """A name that is not UTF-8 is a 400."""
        datagram = packets.encodeRequest(9, Request(0, None, 1400, 16, b"", "ab"))
        at = HEADER_SIZE + packets.REQUEST_BODY.size + 2
        broken = datagram[:at] + b"\xff\xfe" + datagram[at + 2 :]
        e = self.assertRaises(wire.ProtocolError, packets.decodeRequest, broken)
        self.assertEqual(e.status, wire.BAD_REQUEST)


class AnswerTests(unittest.SynchronousTestCase):
    """The server's datagrams: RETRY, META, DATA, ERROR."""

    def test_retry(self) -> None:
        """A RETRY is the header and the cookie: 28 bytes with a 20-byte cookie."""
        datagram = packets.encodeRetry(3, b"k" * 20)
        self.assertEqual(len(datagram), 28)
        self.assertEqual(packets.decodeRetry(datagram), b"k" * 20)

    def test_retryUnusable(self) -> None:
        """A RETRY with no cookie, or one too long to echo, has none to offer."""
        self.assertIsNone(packets.decodeRetry(packets.encodeRetry(3, b"")))
        self.assertIsNone(packets.decodeRetry(packets.encodeRetry(3, b"k" * 256)))
        self.assertEqual(packets.decodeRetry(packets.encodeRetry(3, b"k" * 255)), b"k" * 255)

    def test_meta(self) -> None:
        """A META is 72 bytes and decodes to what was encoded."""
        meta = Meta(3000, 0, 3000, 1400, 2995, bytes(range(32)))
        datagram = packets.encodeMeta(7, meta)
        self.assertEqual(len(datagram), 72)
        self.assertEqual(packets.decodeMeta(datagram), meta)

    def test_metaWrongSize(self) -> None:
        """A META of any other length is malformed."""
        datagram = packets.encodeMeta(7, Meta(1, 0, 1, 64, 16, bytes(32)))
        self.assertIsNone(packets.decodeMeta(datagram[:-1]))
        self.assertIsNone(packets.decodeMeta(datagram + b"\0"))

    def test_data(self) -> None:
        """A DATA datagram is the header, the block number, then the payload."""
        datagram = packets.encodeData(7, 513, b"payload")
        self.assertEqual(datagram[:HEADER_SIZE], packets.dataPrefix(7))
        self.assertEqual(packets.BLOCK_NUMBER.unpack_from(datagram, HEADER_SIZE), (513,))
        self.assertEqual(datagram[packets.DATA_HEADER_SIZE :], b"payload")

    def test_error(self) -> None:
        """An ERROR carries a status and its text."""
        datagram = packets.encodeError(7, 404, "no such file")
        self.assertEqual(packets.decodeError(datagram), (404, "no such file"))

    def test_errorTextBounded(self) -> None:
        """An ERROR's text is cut to MAX_TEXT bytes, and undecodable bytes are replaced."""
        datagram = packets.encodeError(7, 503, "x" * 2000)
        self.assertEqual(len(datagram), HEADER_SIZE + 2 + wire.MAX_TEXT)
        broken = packets.header(packets.ERROR, 7) + struct.pack("!H", 500) + b"bad \xff"
        self.assertEqual(packets.decodeError(broken), (500, "bad \N{REPLACEMENT CHARACTER}"))

    def test_errorTooShort(self) -> None:
        """An ERROR without room for a status is malformed."""
        self.assertIsNone(packets.decodeError(packets.header(packets.ERROR, 7) + b"\x01"))


class ClientDatagramTests(unittest.SynchronousTestCase):
    """The client's datagrams besides REQUEST: ACK and CLOSE."""

    def test_ack(self) -> None:
        """An ACK carries the cumulative number and its ranges, flattened on decoding."""
        datagram = packets.encodeAck(5, 10, [(12, 14), (20, 31)])
        self.assertEqual(len(datagram), HEADER_SIZE + 5 + 16)
        self.assertEqual(packets.decodeAck(datagram), (10, [12, 14, 20, 31]))

    def test_ackWithoutRanges(self) -> None:
        """An ACK with no ranges is 13 bytes."""
        datagram = packets.encodeAck(5, 10, ())
        self.assertEqual(len(datagram), 13)
        self.assertEqual(packets.decodeAck(datagram), (10, []))

    def test_ackLargest(self) -> None:
        """An ACK with MAX_SACK ranges is 269 bytes."""
        ranges = [(2 * i, 2 * i + 1) for i in range(packets.MAX_SACK)]
        self.assertEqual(len(packets.encodeAck(5, 0, ranges)), 269)

    def test_ackMalformed(self) -> None:
        """An ACK shorter or longer than its range count says is malformed."""
        datagram = packets.encodeAck(5, 10, [(12, 14)])
        self.assertIsNone(packets.decodeAck(datagram[:-1]))
        self.assertIsNone(packets.decodeAck(datagram + b"\0"))
        self.assertIsNone(packets.decodeAck(datagram[:HEADER_SIZE + 4]))

    def test_close(self) -> None:
        """A CLOSE is the header alone."""
        self.assertEqual(packets.encodeClose(5), packets.header(packets.CLOSE, 5))
