"""
The wire format: every line the roles exchange, and every limit on it.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from p2prelay import wire

SHA = "ab" * 32


class RoundTripTests(SynchronousTestCase):
    """
    What ``formatLine`` writes, ``parseLine`` reads back unchanged.
    """

    def roundTrip(self, word, fields=(), text=""):
        line = wire.formatLine(word, fields, text)
        self.assertTrue(line.endswith(b"\r\n"))
        self.assertEqual(line.count(b"\n"), 1)
        return wire.parseLine(line[:-1])

    def test_wordAndFields(self):
        """A word and its fields survive a round trip, in any order given."""
        message = self.roundTrip("FILE", {"name": "a.txt", "size": 12, "sha256": SHA})
        self.assertEqual(message.word, "FILE")
        self.assertEqual(dict(message.fields), {"name": "a.txt", "size": "12", "sha256": SHA})

    def test_nameWithSpaces(self):
        """A file name with spaces is one token on the wire and one value back."""
        line = wire.formatLine("FILE", {"name": "my holiday photo.jpg"})
        self.assertEqual(line.count(b" "), 2)
        self.assertEqual(wire.parseLine(line[:-2]).get("name"), "my holiday photo.jpg")

    def test_nameWithEqualsAndPercent(self):
        """'=', '%', '+', ':' and '&' in a value are preserved exactly."""
        name = "a=b %41 +c :d&e.txt"
        self.assertEqual(self.roundTrip("FILE", {"name": name}).get("name"), name)

    def test_nonAsciiName(self):
        """Non-ASCII names (accents, CJK, emoji) survive a round trip."""
        name = "r\u00e9sum\u00e9/\u65e5\u672c\u8a9e \U0001f600.txt"
        self.assertEqual(self.roundTrip("FILE", {"name": name}).get("name"), name)

    def test_noneFieldsLeftOut(self):
        """A field whose value is None is not written at all."""
        line = wire.formatLine("GET", {"name": "a", "offset": None})
        self.assertNotIn(b"offset", line)
        self.assertEqual(dict(wire.parseLine(line[:-2]).fields), {"name": "a"})

    def test_fieldPairsKeepOrder(self):
        """Fields given as pairs are written in the order given."""
        line = wire.formatLine("PEER", [("node", "n"), ("host", "h"), ("port", 1)])
        self.assertEqual(line, b"P2P/1 PEER node=n host=h port=1\r\n")

    def test_humanText(self):
        """Free text after ' :' is returned as the message text, spaces and all."""
        message = self.roundTrip("200", {"count": 2}, "two things: here")
        self.assertEqual(message.text, "two things: here")
        self.assertEqual(message.status, 200)
        self.assertEqual(message.get("count"), "2")

    def test_textCannotInjectALine(self):
        """Control characters in human text are replaced, so it stays one line."""
        line = wire.formatLine("404", text="gone\r\nP2P/1 DEAD host=x port=1")
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(wire.parseLine(line[:-2]).word, "404")

    def test_textIsCapped(self):
        """Human text longer than MAX_TEXT is cut to MAX_TEXT characters."""
        message = self.roundTrip("200", text="x" * (wire.MAX_TEXT * 3))
        self.assertEqual(len(message.text), wire.MAX_TEXT)

    def test_statusUsesReason(self):
        """A status line without text carries the standard reason."""
        self.assertEqual(wire.status(404), b"P2P/1 404 :not found\r\n")

    def test_statusFields(self):
        """A status line carries its fields before the text."""
        message = wire.parseLine(wire.status(200, "alive", ttl=90, boot="b1")[:-2])
        self.assertEqual((message.status, message.get("ttl"), message.get("boot")), (200, "90", "b1"))

    def test_end(self):
        """END carries the count and any extra fields."""
        message = wire.parseLine(wire.end(3, truncated=1)[:-2])
        self.assertEqual((message.word, message.integer("count")), ("END", 3))
        self.assertEqual(message.get("truncated"), "1")

    def test_request(self):
        """request() writes a known verb with its fields."""
        self.assertEqual(wire.request(wire.HEARTBEAT, node="n1"), b"P2P/1 HEARTBEAT node=n1\r\n")

    def test_carriageReturnStripped(self):
        """A line still ending in CR (CRLF framing) parses like one without."""
        self.assertEqual(wire.parseLine(b"P2P/1 PEERS\r").word, "PEERS")

    def test_itemIsNotAStatus(self):
        """Message.status is None for verbs and tags."""
        self.assertIsNone(wire.parseLine(b"P2P/1 PEERS").status)


class ParseErrorTests(SynchronousTestCase):
    """
    A malformed line is a ProtocolError carrying the status to answer with.
    """

    def assertRefused(self, line: bytes, code: int = wire.BAD_REQUEST):
        e = self.assertRaises(wire.ProtocolError, wire.parseLine, line)
        self.assertEqual(e.status, code, e)
        return e

    def test_otherVersion(self):
        """Another protocol version is answered 426."""
        e = self.assertRefused(b"P2P/2 PEERS", wire.UPGRADE_REQUIRED)
        self.assertIn("P2P/2", e.message)

    def test_notOurProtocol(self):
        """A line of another protocol altogether is a bad request."""
        self.assertRefused(b"GET / HTTP/1.1")

    def test_emptyLine(self):
        """An empty line is a bad request."""
        self.assertRefused(b"")

    def test_missingVerb(self):
        """The protocol tag alone is a bad request."""
        self.assertRefused(b"P2P/1")

    def test_lowercaseVerb(self):
        """Verbs are upper case."""
        self.assertRefused(b"P2P/1 peers")

    def test_badStatusNumber(self):
        """A three-digit word outside 1xx-5xx is refused."""
        self.assertRefused(b"P2P/1 999")

    def test_fieldWithoutEquals(self):
        """A field token without '=' is refused."""
        self.assertRefused(b"P2P/1 GET name")

    def test_fieldKeyUppercase(self):
        """Field keys are lower case identifiers."""
        self.assertRefused(b"P2P/1 GET Name=a")

    def test_repeatedField(self):
        """A field given twice is refused rather than one silently winning."""
        self.assertRefused(b"P2P/1 GET name=a name=b")

    def test_tooManyFields(self):
        """More than MAX_FIELDS fields on a line is refused."""
        fields = " ".join(f"k{i}=v" for i in range(wire.MAX_FIELDS + 1))
        self.assertRefused(f"P2P/1 GET {fields}".encode())

    def test_maxFieldsAccepted(self):
        """Exactly MAX_FIELDS fields is fine."""
        fields = " ".join(f"k{i}=v" for i in range(wire.MAX_FIELDS))
        self.assertEqual(len(wire.parseLine(f"P2P/1 GET {fields}".encode()).fields), wire.MAX_FIELDS)

    def test_doubleSpace(self):
        """An empty token (two spaces) is a malformed field."""
        self.assertRefused(b"P2P/1 GET  name=a")

    def test_notUtf8(self):
        """Raw bytes that are not UTF-8 are refused."""
        self.assertRefused(b"P2P/1 GET name=\xff\xfe")

    def test_percentEncodedNotUtf8(self):
        """A percent-encoded value that does not decode as UTF-8 is refused."""
        self.assertRefused(b"P2P/1 GET name=%ff")

    def test_overLongLine(self):
        """A line over MAX_LINE bytes is answered 414."""
        self.assertRefused(b"P2P/1 GET name=" + b"a" * wire.MAX_LINE, wire.LINE_TOO_LONG)

    def test_longestLineAccepted(self):
        """A line of exactly MAX_LINE bytes is accepted."""
        prefix = b"P2P/1 GET name="
        line = prefix + b"a" * (wire.MAX_LINE - len(prefix))
        self.assertEqual(len(wire.parseLine(line).get("name")), wire.MAX_LINE - len(prefix))

    def test_errorString(self):
        """A ProtocolError reads as its status and message."""
        self.assertEqual(str(wire.ProtocolError(404, "gone")), "404 gone")


class FieldAccessTests(SynchronousTestCase):
    """
    Typed access to fields refuses values of the wrong shape with 400.
    """

    def message(self, line: bytes) -> wire.Message:
        return wire.parseLine(line)

    def assertBad(self, f, *args, **kwargs):
        e = self.assertRaises(wire.ProtocolError, f, *args, **kwargs)
        self.assertEqual(e.status, wire.BAD_REQUEST)

    def test_require(self):
        """A required field that is missing is refused."""
        self.assertBad(self.message(b"P2P/1 HEARTBEAT").require, "node")

    def test_integer(self):
        """A whole number is returned as an int."""
        self.assertEqual(self.message(b"P2P/1 GET offset=42").integer("offset"), 42)

    def test_integerDefault(self):
        """A missing integer field gives the default."""
        self.assertEqual(self.message(b"P2P/1 GET").integer("offset", 7), 7)

    def test_integerMissingWithoutDefault(self):
        """A missing integer field without default is refused."""
        self.assertBad(self.message(b"P2P/1 GET").integer, "offset")

    def test_integerNegative(self):
        """Negative numbers are refused."""
        self.assertBad(self.message(b"P2P/1 GET offset=-1").integer, "offset")

    def test_integerNotDigits(self):
        """Non-digits, including signs, spaces and non-ASCII digits, are refused."""
        for raw in [b"12a", b"%2B1", b"1%20", b"%C2%B2", b"", b"1.5"]:
            self.assertBad(self.message(b"P2P/1 GET offset=" + raw).integer, "offset")

    def test_integerHuge(self):
        """Numbers longer than 19 digits are refused."""
        self.assertBad(self.message(b"P2P/1 GET offset=" + b"9" * 20).integer, "offset")

    def test_integerRange(self):
        """A number outside the allowed range is refused."""
        self.assertBad(self.message(b"P2P/1 SEARCH limit=0").integer, "limit", 1, low=1, high=5)
        self.assertBad(self.message(b"P2P/1 SEARCH limit=6").integer, "limit", 1, low=1, high=5)

    def test_port(self):
        """Ports run from 1 to 65535."""
        self.assertEqual(self.message(b"P2P/1 DEAD port=65535").port(), 65535)
        self.assertBad(self.message(b"P2P/1 DEAD port=0").port)
        self.assertBad(self.message(b"P2P/1 DEAD port=65536").port)

    def test_sha256(self):
        """A digest is 64 lowercase hex digits."""
        self.assertEqual(self.message(f"P2P/1 FILE sha256={SHA}".encode()).sha256(), SHA)
        self.assertBad(self.message(f"P2P/1 FILE sha256={SHA.upper()}".encode()).sha256)
        self.assertBad(self.message(f"P2P/1 FILE sha256={SHA[:-1]}".encode()).sha256)

    def test_nameValidated(self):
        """Message.name() applies checkName."""
        self.assertBad(self.message(b"P2P/1 GET name=..%2Fx").name)


class CheckNameTests(SynchronousTestCase):
    """
    Only relative POSIX paths that stay inside the share are file names.
    """

    def assertRefused(self, name):
        e = self.assertRaises(wire.ProtocolError, wire.checkName, name)
        self.assertEqual(e.status, wire.BAD_REQUEST, name)

    def test_plainAndNested(self):
        """Plain, nested, spaced and non-ASCII names are accepted unchanged."""
        for name in ["a.txt", "dir/sub/b.bin", "with space.txt", "\u00e9t\u00e9/\u65e5.txt", ".hidden"]:
            self.assertEqual(wire.checkName(name), name)

    def test_parent(self):
        """'..' anywhere is refused."""
        for name in ["../x", "a/../../x", "a/..", ".."]:
            self.assertRefused(name)

    def test_absolute(self):
        """Absolute paths are refused."""
        self.assertRefused("/etc/passwd")

    def test_emptyComponent(self):
        """Empty components (double or trailing slash) are refused."""
        self.assertRefused("a//b")
        self.assertRefused("a/")

    def test_dot(self):
        """'.' as a name or a component is refused."""
        self.assertRefused(".")
        self.assertRefused("a/./b")

    def test_empty(self):
        """The empty name is refused."""
        self.assertRefused("")

    def test_controlCharacters(self):
        """NUL, newline, tab, DEL and Unicode separators are refused."""
        for name in ["a\x00b", "a\nb", "a\tb", "a\x7fb", "a\u2028b"]:
            self.assertRefused(name)

    def test_backslash(self):
        """Backslashes are refused (no Windows-style escapes)."""
        self.assertRefused("..\\x")
        self.assertRefused("a\\b")

    def test_tooLong(self):
        """Names over MAX_NAME UTF-8 bytes are refused, counting bytes not characters."""
        self.assertEqual(wire.checkName("a" * wire.MAX_NAME), "a" * wire.MAX_NAME)
        self.assertRefused("a" * (wire.MAX_NAME + 1))
        self.assertRefused("\u00e9" * (wire.MAX_NAME // 2 + 1))

    def test_tooDeep(self):
        """More than MAX_NAME_DEPTH components is refused."""
        self.assertEqual(len(wire.checkName("/".join(["d"] * wire.MAX_NAME_DEPTH)).split("/")), wire.MAX_NAME_DEPTH)
        self.assertRefused("/".join(["d"] * (wire.MAX_NAME_DEPTH + 1)))


class IdentityFieldTests(SynchronousTestCase):
    """The fields of the challenge exchange: key=, sig=, nonce=, mac=, secret=, retry=."""

    def message(self, **fields) -> wire.Message:
        return wire.parseLine(wire.formatLine("PROOF", fields).rstrip(b"\r\n"))

    def test_tokensAccepted(self):
        """Well-formed key, signature, nonce and mac values are returned as sent."""
        from p2prelay import identity

        key = identity.NodeKey.generate()
        nonce = identity.newNonce()
        sig = key.prove(identity.DIALBACK_PROOF, nonce, b"")
        m = self.message(key=key.public, sig=sig, nonce=nonce, mac="0" * 64)
        self.assertEqual((m.publicKey(), m.signature(), m.nonce(), m.mac()), (key.public, sig, nonce, "0" * 64))

    def test_malformedTokensRefused(self):
        """A token of the wrong length or alphabet is a 400, never another exception."""
        for field, method in [("key", "publicKey"), ("sig", "signature"), ("nonce", "nonce"), ("mac", "mac")]:
            for value in ["", "short", "!" * 43, "A" * 200]:
                m = self.message(**{field: value})
                e = self.assertRaises(wire.ProtocolError, getattr(m, method))
                self.assertEqual(e.status, wire.BAD_REQUEST)

    def test_flag(self):
        """secret= is 0 or 1, absent meaning 0; anything else is a 400."""
        self.assertTrue(self.message(secret=1).flag("secret"))
        self.assertFalse(self.message().flag("secret"))
        self.assertRaises(wire.ProtocolError, self.message(secret="yes").flag, "secret")

    def test_retry(self):
        """retry= is whole seconds; absent or malformed is None (a hint, never an error)."""
        self.assertEqual(self.message(retry=5).retry(), 5.0)
        self.assertIsNone(self.message().retry())
        self.assertIsNone(self.message(retry="soon").retry())

    def test_newStatusesHaveReasons(self):
        """100, 401 and 409 have reason texts, so a bare status line says something."""
        for code in (wire.CONTINUE, wire.UNAUTHORIZED, wire.CONFLICT):
            self.assertTrue(wire.parseLine(wire.status(code).rstrip(b"\r\n")).text)

    def test_proofVerbs(self):
        """PROOF and PROVE are request verbs."""
        self.assertEqual(wire.parseLine(wire.request(wire.PROVE, nonce="x").rstrip(b"\r\n")).word, "PROVE")
        self.assertEqual(wire.parseLine(wire.request(wire.PROOF, sig="x").rstrip(b"\r\n")).word, "PROOF")


class RefusalTests(SynchronousTestCase):
    """Message.refusal reads the first line of a peer's answer."""

    def test_okIsNoRefusal(self) -> None:
        """A 200 is no refusal."""
        self.assertIsNone(wire.parseLine(wire.status(wire.OK, size=1)[:-2]).refusal())

    def test_errorStatusWithRetry(self) -> None:
        """Another status is the peer's error, with its text and retry hint."""
        error = wire.parseLine(wire.status(wire.BUSY, "busy", retry=5)[:-2]).refusal()
        self.assertEqual((error.status, error.message, error.retry), (wire.BUSY, "busy", 5.0))

    def test_notAStatus(self) -> None:
        """A line that is no status at all raises a 400."""
        e = self.assertRaises(wire.ProtocolError, wire.parseLine(b"P2P/1 GET name=a").refusal)
        self.assertEqual(e.status, wire.BAD_REQUEST)
