"""
Properties of the pure parsers, checked on generated input (hypothesis):
the wire syntax, file names, and what users type as addresses and names.

Whatever arrives, a parser gives a value or its own error type
(:class:`wire.ProtocolError`, :class:`addresses.AddressError`), never
another exception; whatever we write, we read back unchanged.

Each property runs a bounded number of examples so the file takes a few
seconds; set ``P2PRELAY_PROPERTY_SCALE=20`` (say) to search harder.
"""

from __future__ import annotations

import os
import unicodedata

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import addresses, wire
from p2prelay.cli.console import splitNames

SCALE = max(1, int(os.environ.get("P2PRELAY_PROPERTY_SCALE", "1")))


def fast(examples: int) -> settings:
    """A bounded number of examples, no deadline (the machine is shared)."""
    # Half of ``examples`` in the suite (fresh random ones every run, so
    # coverage adds up over runs); P2PRELAY_PROPERTY_SCALE=2 and up go deeper.
    return settings(max_examples=max(10, examples * SCALE // 2), deadline=None, database=None)


# Strategies.

# Any code point, surrogates included: os.walk and os.listdir hand out lone
# surrogates for file names that are not UTF-8 (surrogateescape).
anyChar = st.characters(exclude_categories=[])
anyText = st.text(anyChar, max_size=40)
encodable = st.text(st.characters(codec="utf-8"), max_size=40)  # no surrogates

keys = st.builds(
    "".join,
    st.tuples(
        st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
        st.text("abcdefghijklmnopqrstuvwxyz0123456789_", max_size=31),
    ),
)
words = st.one_of(
    st.from_regex(r"\A[A-Z]{2,16}\Z"),
    st.integers(100, 599).map(str),
    st.sampled_from(sorted(wire.VERBS | {wire.FILE, wire.PEER, wire.END})),
)
# Values that need escaping on the wire, and plain ones.
tricky = st.sampled_from([" ", "=", "%", "%41", "+", ":", " :", "&", "/", "\\", "\r", "\n", "\x00", "\u00e9", "\u65e5", "\U0001f600"])
values = st.one_of(
    encodable,
    st.lists(st.one_of(tricky, encodable), max_size=8).map("".join),
    st.integers(0, 2**63).map(str),
)
fieldMaps = st.dictionaries(keys, values, max_size=wire.MAX_FIELDS)

# Names built from components, so that many of them are valid.
nameChar = st.characters(codec="utf-8", exclude_characters="/\\").filter(str.isprintable)
components = st.one_of(
    st.text(nameChar, min_size=1, max_size=12).filter(lambda c: c not in (".", "..")),
    st.sampled_from(["a", "my file.txt", "x=y", "100%", "r\u00e9sum\u00e9", "\u65e5\u672c", "..x", ".hidden"]),
)
validNames = st.lists(components, min_size=1, max_size=wire.MAX_NAME_DEPTH).map("/".join).filter(
    lambda n: len(n.encode("utf-8")) <= wire.MAX_NAME
)
nearNames = st.one_of(
    validNames,
    st.lists(
        st.one_of(components, st.sampled_from(["", ".", "..", "a\\b", "\x00", "\t", "\u2028", "\u00a0", "\udcff", " "])),
        min_size=1,
        max_size=wire.MAX_NAME_DEPTH + 2,
    ).map("/".join),
    validNames.map(lambda n: "/" + n),
    anyText,
)

SHA = "0123456789abcdef" * 4


def validLines():
    """Lines every role writes, as bytes with their CRLF."""
    return st.one_of(
        st.builds(lambda k, f: wire.formatLine(k, f), words, fieldMaps),
        st.builds(lambda n: wire.request(wire.GET, name=n, offset=3, length=4), validNames),
        st.builds(lambda n: wire.item(wire.FILE, name=n, size=1, sha256=SHA), validNames),
        st.builds(lambda c, t: wire.status(c, t, count=2), st.integers(100, 599), encodable),
        st.integers(0, 10).map(wire.end),
    )


@st.composite
def mutated(draw, lines):
    """A valid line with a few bytes inserted, deleted or replaced."""
    data = bytearray(draw(lines))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.one_of(st.integers(0, 255), st.sampled_from(b" =%:\r\n\x80\xff")))
        if kind == "insert":
            data.insert(where, byte)
        elif where < len(data):
            if kind == "delete":
                del data[where]
            else:
                data[where] = byte
    return bytes(data)


def documentedName(name: str) -> bool:
    """
    docs/protocol.rst's rule, written out independently of ``checkName``: a
    relative POSIX path of at most MAX_NAME UTF-8 bytes and MAX_NAME_DEPTH
    components, no empty, '.' or '..' component, no leading '/', no
    backslash and no control characters (Unicode's C* and line/paragraph
    separators, and spaces other than ' ': what str.isprintable() refuses).
    """
    if not name or name.startswith("/") or "\\" in name:
        return False
    for c in name:
        category = unicodedata.category(c)
        if category[0] == "C" or category in ("Zl", "Zp") or (category == "Zs" and c != " "):
            return False
    if len(name.encode("utf-8")) > wire.MAX_NAME:
        return False
    parts = name.split("/")
    return len(parts) <= wire.MAX_NAME_DEPTH and all(p not in ("", ".", "..") for p in parts)


class ParseLineTests(SynchronousTestCase):
    """
    ``parseLine`` on anything: a Message, or a ProtocolError with a status.
    """

    def assertParsesOrRefuses(self, line: bytes) -> wire.Message | None:
        try:
            message = wire.parseLine(line)
        except wire.ProtocolError as e:
            self.assertIn(e.status, wire.REASONS)
            self.assertGreaterEqual(e.status, 400)
            return None
        self.assertIsInstance(message, wire.Message)
        return message

    @fast(300)
    @given(st.binary(max_size=200))
    def test_arbitraryBytes(self, line):
        """Arbitrary bytes parse into a Message or raise ProtocolError, nothing else."""
        self.assertParsesOrRefuses(line)

    @fast(300)
    @given(st.lists(st.one_of(st.binary(max_size=12), st.sampled_from(
        [b"P2P/1", b"P2P/2", b" ", b"=", b" :", b"%", b"%zz", b"%ff", b"%C3%A9", b"\r", b"GET", b"200", b"name", b"a_1"]
    )), max_size=12).map(b"".join))
    def test_protocolShapedBytes(self, line):
        """Byte strings assembled from the protocol's own tokens parse or raise ProtocolError."""
        self.assertParsesOrRefuses(line)

    @fast(300)
    @given(mutated(validLines()))
    def test_mutatedLines(self, data):
        """Valid lines with bytes inserted, deleted or replaced parse or raise ProtocolError."""
        for line in data.split(b"\n"):
            self.assertParsesOrRefuses(line)

    @fast(50)
    @given(st.integers(wire.MAX_LINE - 2, wire.MAX_LINE + 2), st.booleans())
    @example(wire.MAX_LINE, True)
    @example(wire.MAX_LINE + 1, False)
    def test_lineLengthBoundary(self, length, cr):
        """A line of MAX_LINE bytes (a CR not counted) parses; one byte more is 414."""
        head = b"P2P/1 FILE name="
        line = head + b"a" * (length - len(head)) + (b"\r" if cr else b"")
        if length <= wire.MAX_LINE:
            self.assertEqual(len(wire.parseLine(line).get("name")), length - len(head))
        else:
            error = self.assertRaises(wire.ProtocolError, wire.parseLine, line)
            self.assertEqual(error.status, wire.LINE_TOO_LONG)

    @fast(300)
    @given(st.one_of(st.binary(max_size=200), mutated(validLines())))
    def test_accessorsOfParsedMessages(self, line):
        """On any parsed message, the typed accessors return a value or raise ProtocolError."""
        message = self.assertParsesOrRefuses(line.split(b"\n")[0])
        if message is None:
            return
        self.assertIn(message.status, (None, int(message.word) if message.word.isdigit() else None))
        for key in list(message.fields) + ["name", "size", "port", "sha256"]:
            for accessor in (message.integer, message.name, message.sha256, message.port, message.require):
                try:
                    accessor(key)
                except wire.ProtocolError as e:
                    self.assertEqual(e.status, wire.BAD_REQUEST)

    @fast(200)
    @given(st.binary(max_size=200))
    def test_parsedFieldsReformat(self, line):
        """A parsed message's word and fields, written again, parse back the same."""
        message = self.assertParsesOrRefuses(line)
        if message is None:
            return
        again = wire.formatLine(message.word, message.fields)
        self.assertEqual(wire.parseLine(again[:-2]).fields, message.fields)


class RoundTripTests(SynchronousTestCase):
    """
    ``formatLine`` then ``parseLine`` gives back what was written.
    """

    @fast(300)
    @given(words, fieldMaps, encodable)
    @example("FILE", {"name": "a b=c%20d :e"}, "")
    @example("200", {}, "text with \r\n and \x1b[2J")
    def test_anyFields(self, word, fields, text):
        """Any word, at most MAX_FIELDS fields with any values, and text survive a round trip."""
        line = wire.formatLine(word, fields, text)
        self.assertTrue(line.endswith(b"\r\n"))
        self.assertEqual(line.count(b"\n"), 1)
        message = wire.parseLine(line[:-2])
        self.assertEqual(message.word, word)
        self.assertEqual(dict(message.fields), fields)
        clean = "".join(c if c.isprintable() else "?" for c in text)[: wire.MAX_TEXT]
        self.assertEqual(message.text, clean)

    @fast(200)
    @given(validNames)
    @example("my holiday photo.jpg")
    @example("a=b/100%/%41/r\u00e9sum\u00e9 \U0001f600")
    @example("x" * wire.MAX_NAME)
    @example("\u00e9" * (wire.MAX_NAME // 2))
    @example("/".join(["d"] * wire.MAX_NAME_DEPTH))
    def test_names(self, name):
        """Every valid name, to the MAX_NAME and MAX_NAME_DEPTH limits, round-trips through GET, WHOHAS and FILE."""
        for line in (
            wire.request(wire.GET, name=name, offset=1, length=2),
            wire.request(wire.WHOHAS, name=name),
            wire.item(wire.FILE, name=name, size=3, sha256=SHA),
        ):
            self.assertEqual(wire.parseLine(line[:-2]).name(), name)

    @fast(100)
    @given(st.sampled_from(sorted(wire.REASONS)), st.one_of(st.none(), encodable), st.dictionaries(keys, values, max_size=4))
    def test_status(self, code, text, fields):
        """A status line gives back its code, fields and (defaulted) text."""
        message = wire.parseLine(wire.status(code, text, **fields).rstrip(b"\r\n"))
        self.assertEqual(message.status, code)
        self.assertEqual(dict(message.fields), fields)
        expected = wire.REASONS[code] if text is None else text
        self.assertEqual(message.text, "".join(c if c.isprintable() else "?" for c in expected)[: wire.MAX_TEXT])

    @fast(100)
    @given(st.sampled_from(sorted(wire.VERBS)), st.dictionaries(keys, values, max_size=wire.MAX_FIELDS))
    def test_request(self, verb, fields):
        """A request gives back its verb and fields, and is not a status."""
        message = wire.parseLine(wire.request(verb, **fields)[:-2])
        self.assertEqual((message.word, dict(message.fields), message.status), (verb, fields, None))

    @fast(100)
    @given(st.sampled_from([wire.FILE, wire.PEER]), st.dictionaries(keys, values, max_size=wire.MAX_FIELDS))
    def test_item(self, tag, fields):
        """An item gives back its tag and fields."""
        message = wire.parseLine(wire.item(tag, **fields)[:-2])
        self.assertEqual((message.word, dict(message.fields)), (tag, fields))

    @fast(100)
    @given(st.integers(0, wire.MAX_LIST), st.dictionaries(keys.filter(lambda k: k != "count"), values, max_size=4))
    def test_end(self, count, fields):
        """END gives back its count and extra fields."""
        message = wire.parseLine(wire.end(count, **fields)[:-2])
        self.assertEqual((message.word, message.integer("count")), (wire.END, count))
        self.assertEqual(dict(message.fields), {"count": str(count), **fields})


class CheckNameTests(SynchronousTestCase):
    """
    ``checkName`` accepts exactly the names docs/protocol.rst allows, and
    refuses every other string with a 400.
    """

    @fast(300)
    @given(nearNames)
    @example("a\udcff.txt")  # a file name that is not UTF-8, as os.walk returns it
    @example("x" * wire.MAX_NAME)
    @example("x" * (wire.MAX_NAME + 1))
    @example("\u00e9" * (wire.MAX_NAME // 2) + "x")
    @example("/".join(["d"] * wire.MAX_NAME_DEPTH))
    @example("/".join(["d"] * (wire.MAX_NAME_DEPTH + 1)))
    @example("a\u00a0b")
    @example("a/./b")
    @example("a/")
    def test_exactlyTheDocumentedNames(self, name):
        """checkName returns the name when the documented rule allows it, else raises ProtocolError 400."""
        if documentedName(name):
            self.assertEqual(wire.checkName(name), name)
        else:
            error = self.assertRaises(wire.ProtocolError, wire.checkName, name)
            self.assertEqual(error.status, wire.BAD_REQUEST)


class AddressTests(SynchronousTestCase):
    """
    What users type as addresses: a value or AddressError, never another
    exception.
    """

    addressText = st.one_of(
        anyText,
        st.lists(
            st.one_of(
                st.sampled_from(["tcp", "udp", "tls", "unix", ":", "[", "]", "::1", "interface=", "=", " ", "localhost", "0", "65535", "65536", "99999", "\u00b2", "\u0661\u0662", "\uff11"]),
                st.integers(0, 70000).map(str),
                encodable,
            ),
            max_size=6,
        ).map("".join),
    )

    @fast(300)
    @given(addressText)
    @example("\u00b2")  # SUPERSCRIPT TWO: str.isdigit() but not int()-able
    @example("udp:\u00b2")
    def test_serverDescription(self, value):
        """serverDescription gives a description or AddressError; a bare port gives tcp:PORT."""
        try:
            description = addresses.serverDescription(value)
        except addresses.AddressError:
            return
        self.assertIsInstance(description, str)
        if value.strip().isascii() and value.strip().isdigit():
            self.assertEqual(description, f"tcp:{value.strip()}")

    @fast(300)
    @given(addressText)
    @example("\u00b2")
    @example("udp:\u00b2:interface=::1")
    def test_udpPort(self, value):
        """udpPort gives a port in 0-65535 and an interface, or AddressError."""
        try:
            port, interface = addresses.udpPort(value, "default")
        except addresses.AddressError:
            return
        self.assertTrue(0 <= port <= 65535)
        self.assertIsInstance(interface, str)

    @fast(300)
    @given(addressText)
    @example("host:\u0661\u0662")  # Arabic-Indic digits
    @example("[::1]:0")
    def test_parseHostPort(self, value):
        """parseHostPort gives (host, port 1-65535), None, or AddressError."""
        try:
            pair = addresses.parseHostPort(value)
        except addresses.AddressError:
            return
        if pair is not None:
            host, port = pair
            self.assertTrue(host)
            self.assertTrue(1 <= port <= 65535)

    @fast(200)
    @given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":[]"), min_size=1, max_size=20), st.integers(1, 65535))
    def test_hostPortRoundTrip(self, host, port):
        """HOST:PORT that users type is read back as that host and port, unless HOST names an endpoint type."""
        pair = addresses.parseHostPort(f"{host}:{port}")
        if host.lower() in ("tcp", "tcp6", "ssl", "tls", "unix", "tor", "onion", "systemd"):
            self.assertIsNone(pair)
        else:
            self.assertEqual(pair, (host, port))


class SplitNamesTests(SynchronousTestCase):
    """
    ``splitNames`` on any input: a list of distinct, non-empty names.
    """

    pieces = st.lists(
        st.one_of(anyText, st.sampled_from(["Send", "get", "GET a", ",", ", ", " ", "a.txt", "b c.txt"])),
        max_size=6,
    )

    @fast(300)
    @given(pieces, st.booleans())
    def test_anyWords(self, words, allowVerb):
        """Any words give distinct, stripped, non-empty names without commas."""
        names = splitNames(words, allowVerb=allowVerb)
        self.assertEqual(len(names), len(set(names)))
        for name in names:
            self.assertTrue(name)
            self.assertEqual(name, name.strip())
            self.assertNotIn(",", name)

    @fast(200)
    @given(st.lists(st.lists(components, min_size=1, max_size=3).map("/".join).map(lambda n: n.replace(",", "_").strip()).filter(bool), min_size=1, max_size=5))
    def test_namesRoundTrip(self, names):
        """Names without commas, given as words or as one comma list, come back in order, once each."""
        distinct = list(dict.fromkeys(names))
        self.assertEqual(splitNames(names), distinct)
        self.assertEqual(splitNames([", ".join(names)]), distinct)
