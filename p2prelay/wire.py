"""
The p2prelay wire format: the one place that knows what a line looks like.

Every role (relay, peer node, client) imports this module and nothing else
defines message syntax, so the protocol described in ``docs/protocol.rst``
lives in exactly one file.  It does no I/O: it turns bytes into values and
values into bytes, and enforces every limit, so a malformed or hostile line
becomes a :class:`ProtocolError` carrying the status to answer with.

A line is UTF-8 text ending in CRLF (a bare LF is accepted)::

    P2P/1 <WORD> [key=value ...] [:<free text>]

``WORD`` is a request verb (``REGISTER``), a three-digit status (``200``) or
an item tag inside a list (``FILE``, ``PEER``, ``END``).  Values are
percent-encoded so any file name (spaces, ``=``, non-ASCII) fits in one
token; the free text after `` :`` is for humans and never parsed.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping
from urllib.parse import quote, unquote

import attrs

from .pieces import MAX_PIECE_SIZE, MIN_PIECE_SIZE, PIECE_SIZE, checkLayout

PROTOCOL = "P2P/1"

# Limits.  A peer that exceeds one is answered with the 4xx status named
# next to it and disconnected; none of them is reachable by honest use.
MAX_LINE = 16 * 1024  # bytes in one line (414)
MAX_NAME = 1024  # UTF-8 bytes in one file name (400)
MAX_NAME_DEPTH = 32  # path components in one file name (400)
MAX_FIELDS = 16  # key=value pairs on one line (400)
MAX_FILES = 20_000  # FILE lines in one registration (413)
MAX_LIST = 100_000  # items a client accepts in any list response
MAX_TEXT = 512  # characters of human text we emit

# Status codes: 1xx go on, 2xx success, 4xx the requester's fault, 5xx the server's.
CONTINUE = 100  # a challenge: answer it with PROOF, then the answer follows
OK = 200
BAD_REQUEST = 400
UNAUTHORIZED = 401
NOT_FOUND = 404
TIMEOUT = 408
CONFLICT = 409
TOO_LARGE = 413
LINE_TOO_LONG = 414
BAD_RANGE = 416
UPGRADE_REQUIRED = 426
SERVER_ERROR = 500
BUSY = 503
GATEWAY_TIMEOUT = 504  # relay: the firewalled node did not open the circuit in time

REASONS = {
    CONTINUE: "prove it",
    OK: "ok",
    BAD_REQUEST: "bad request",
    UNAUTHORIZED: "bad proof",
    NOT_FOUND: "not found",
    TIMEOUT: "timed out",
    CONFLICT: "address held by another node",
    TOO_LARGE: "too large",
    LINE_TOO_LONG: "line too long",
    BAD_RANGE: "range not satisfiable",
    UPGRADE_REQUIRED: "protocol version not supported",
    SERVER_ERROR: "server error",
    BUSY: "busy",
    GATEWAY_TIMEOUT: "the node did not answer in time",
}

# Request verbs.
REGISTER = "REGISTER"
UNREGISTER = "UNREGISTER"
HEARTBEAT = "HEARTBEAT"
PEERS = "PEERS"
WHOHAS = "WHOHAS"
SEARCH = "SEARCH"
DEAD = "DEAD"
GET = "GET"
MANIFEST = "MANIFEST"  # node: a file's piece digests
PROOF = "PROOF"  # the answer to a 100 challenge
PROVE = "PROVE"  # relay to node: the dial-back challenge
STATS = "STATS"  # relay: its headline figures on one status line
# Paths to firewalled nodes (docs/protocol.rst, "Firewalled nodes").
CONTROL = "CONTROL"  # node to relay: open the persistent control connection
REVERSE = "REVERSE"  # client to relay: ask a node to connect to me; node to client: its intro
RELAY = "RELAY"  # client to relay: splice me with a node's data connection
CIRCUIT = "CIRCUIT"  # node to relay: the data connection for a RELAY
CONNECT = "CONNECT"  # relay to node, over the control connection: orders (reverse or circuit)
VERBS = frozenset(
    {
        REGISTER, UNREGISTER, HEARTBEAT, PEERS, WHOHAS, SEARCH, DEAD, GET, MANIFEST, PROOF, PROVE,
        STATS, CONTROL, REVERSE, RELAY, CIRCUIT, CONNECT,
    }
)
# A node's reachability as the relay lists it (reach= on PEER items).
DIRECT = "direct"  # the relay's dial-back reached it: connect to it
FIREWALLED = "firewalled"  # it holds a control connection: reach it via reverse or relayed paths
REACH = (DIRECT, FIREWALLED)
# The fields of a STATS answer, each a whole number.
STATS_FIELDS = ("peers", "files", "entries", "bytes", "lookups", "uptime")

# Item tags inside lists.
FILE = "FILE"
PEER = "PEER"
END = "END"

_WORD = re.compile(r"\A(?:[A-Z]{2,16}|[1-5][0-9][0-9])\Z")
_KEY = re.compile(r"\A[a-z][a-z0-9_]{0,31}\Z")
_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
# Identity tokens (see p2prelay.identity): unpadded base64url of an Ed25519
# public key (32 bytes), a signature (64 bytes) and a nonce (24 bytes).
_PUBLIC_KEY = re.compile(r"\A[A-Za-z0-9_-]{43}\Z")
_SIGNATURE = re.compile(r"\A[A-Za-z0-9_-]{86}\Z")
_NONCE = re.compile(r"\A[A-Za-z0-9_-]{32}\Z")


class ProtocolError(Exception):
    """
    Input that breaks the protocol; ``status`` is what to answer with.

    Raised by the parsers here and caught by the protocols: a server answers
    it as a status line and closes; a client fails its request with it.
    """

    def __init__(self, status: int, message: str, retry: float | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        # Seconds to wait before trying again (a 503's retry=), when known.
        self.retry = retry

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


@attrs.frozen
class FileEntry:
    """
    One shared file as announced to the relay (and listed by it).

    ``root`` is its piece manifest's root (64 hex digits, see
    ``p2prelay/pieces.py``) for pieces of ``pieceSize`` bytes, or None when
    the announcer did not give one (an older node).
    """

    name: str
    size: int
    sha256: str
    mtime_ns: int = 0
    root: str | None = None
    pieceSize: int = PIECE_SIZE


def pieceFields(entry: FileEntry) -> dict[str, object]:
    """
    The ``root=`` and ``piece=`` fields describing ``entry``'s pieces on a
    FILE or PEER line: none without a root, ``piece=`` only when it is not
    the default.
    """
    if entry.root is None:
        return {}
    return {"root": entry.root, "piece": entry.pieceSize if entry.pieceSize != PIECE_SIZE else None}


def pieceLayout(message: "Message", size: int) -> tuple[str | None, int]:
    """
    The ``(root, pieceSize)`` a FILE or PEER line gives for a file of
    ``size`` bytes: ``(None, PIECE_SIZE)`` without ``root=`` (``piece=``
    alone is ignored), the default piece size without ``piece=``.  A
    malformed value, a piece size outside MIN_PIECE_SIZE..MAX_PIECE_SIZE
    or a layout of too many pieces is a 400.
    """
    if message.get("root") is None:
        return None, PIECE_SIZE
    root = message.sha256("root")
    pieceSize = message.integer("piece", PIECE_SIZE, low=MIN_PIECE_SIZE, high=MAX_PIECE_SIZE)
    try:
        checkLayout(size, pieceSize)
    except ValueError as e:
        raise ProtocolError(BAD_REQUEST, str(e)) from None
    return root, pieceSize


def fileEntry(message: "Message") -> FileEntry:
    """The FileEntry a FILE line describes (``name``, ``size``, ``sha256``, ``root``, ``piece``)."""
    size = message.integer("size")
    root, pieceSize = pieceLayout(message, size)
    return FileEntry(message.name(), size, message.sha256(), root=root, pieceSize=pieceSize)


@attrs.frozen
class Message:
    """
    One parsed line: its word (verb, status or tag), fields and free text.
    """

    word: str
    fields: Mapping[str, str] = attrs.field(factory=dict)
    text: str = ""

    @property
    def status(self) -> int | None:
        """The numeric status, or None when this line is not a response."""
        return int(self.word) if self.word.isdigit() else None

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(key, default)

    def require(self, key: str) -> str:
        try:
            return self.fields[key]
        except KeyError:
            raise ProtocolError(BAD_REQUEST, f"{self.word} needs {key}=") from None

    def integer(
        self, key: str, default: int | None = None, *, low: int = 0, high: int = 2**63
    ) -> int:
        """A non-negative integer field, range-checked."""
        raw = self.fields.get(key)
        if raw is None:
            if default is None:
                raise ProtocolError(BAD_REQUEST, f"{self.word} needs {key}=")
            return default
        if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
            raise ProtocolError(BAD_REQUEST, f"{key}= must be a whole number")
        value = int(raw)
        if not low <= value <= high:
            raise ProtocolError(BAD_REQUEST, f"{key}= out of range {low}..{high}")
        return value

    def name(self, key: str = "name") -> str:
        """A file name field, validated with :func:`checkName`."""
        return checkName(self.require(key))

    def sha256(self, key: str = "sha256") -> str:
        value = self.require(key)
        if not _HEX.match(value):
            raise ProtocolError(BAD_REQUEST, f"{key}= must be 64 lowercase hex digits")
        return value

    def port(self, key: str = "port", default: int | None = None) -> int:
        return self.integer(key, default, low=1, high=65535)

    def publicKey(self, key: str = "key") -> str:
        """A node's public key: 43 characters of unpadded base64url."""
        return self._token(key, _PUBLIC_KEY, "a 43-character base64url public key")

    def signature(self, key: str = "sig") -> str:
        return self._token(key, _SIGNATURE, "an 86-character base64url signature")

    def nonce(self, key: str = "nonce") -> str:
        return self._token(key, _NONCE, "a 32-character base64url nonce")

    def mac(self, key: str = "mac") -> str:
        return self._token(key, _HEX, "64 lowercase hex digits")

    def flag(self, key: str) -> bool:
        """A 0/1 field; absent is 0."""
        value = self.fields.get(key, "0")
        if value not in ("0", "1"):
            raise ProtocolError(BAD_REQUEST, f"{key}= must be 0 or 1")
        return value == "1"

    def retry(self) -> float | None:
        """A 503's retry= hint in seconds, or None when absent or malformed."""
        raw = self.fields.get("retry")
        if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 9:
            return None
        return float(raw)

    def refusal(self) -> "ProtocolError | None":
        """
        For the first line of a peer's answer: None when it is a 200, the
        peer's error (status, text, retry hint) for any other status, and a
        400 raised when the line is no status at all.
        """
        code = self.status
        if code is None:
            raise ProtocolError(BAD_REQUEST, "peer sent no status line")
        if code == OK:
            return None
        return ProtocolError(code, self.text or REASONS.get(code, ""), retry=self.retry())

    def _token(self, key: str, pattern: re.Pattern, what: str) -> str:
        value = self.require(key)
        if not pattern.match(value):
            raise ProtocolError(BAD_REQUEST, f"{key}= must be {what}")
        return value


def encodeValue(value: object) -> str:
    return quote(str(value), safe="")


def formatLine(
    word: str, fields: Mapping[str, object] | Iterable[tuple[str, object]] = (), text: str = ""
) -> bytes:
    """
    Build one wire line (with its CRLF) from a word, fields and human text.

    Fields whose value is None are left out, so optional ones need no
    special casing at the call site.
    """
    items = fields.items() if isinstance(fields, Mapping) else fields
    parts = [PROTOCOL, word]
    for key, value in items:
        if value is None:
            continue
        assert _KEY.match(key), key
        parts.append(f"{key}={encodeValue(value)}")
    if text:
        clean = "".join(c if c.isprintable() else "?" for c in text)[:MAX_TEXT]
        parts.append(":" + clean)
    line = " ".join(parts).encode("utf-8") + b"\r\n"
    assert len(line) <= MAX_LINE, "we never emit a line we would refuse"
    return line


def status(code: int, text: str | None = None, **fields: object) -> bytes:
    """A response status line: ``P2P/1 404 :not found``."""
    return formatLine(str(code), fields, text if text is not None else REASONS.get(code, ""))


def request(verb: str, **fields: object) -> bytes:
    assert verb in VERBS, verb
    return formatLine(verb, fields)


def item(tag: str, **fields: object) -> bytes:
    return formatLine(tag, fields)


def end(count: int, **fields: object) -> bytes:
    """The explicit end of a list, so a truncated answer is detectable."""
    return formatLine(END, {"count": count, **fields})


def parseLine(line: bytes) -> Message:
    """
    Parse one line (without its line ending) into a :class:`Message`.

    Raises :class:`ProtocolError` with the status to answer with.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > MAX_LINE:
        raise ProtocolError(LINE_TOO_LONG, f"lines are limited to {MAX_LINE} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(BAD_REQUEST, "line is not UTF-8") from None
    head, sep, human = text.partition(" :")
    tokens = head.split(" ")
    if not tokens or not tokens[0].startswith("P2P/"):
        raise ProtocolError(BAD_REQUEST, f"lines start with {PROTOCOL}")
    if tokens[0] != PROTOCOL:
        raise ProtocolError(
            UPGRADE_REQUIRED, f"this server speaks {PROTOCOL}, not {tokens[0][:16]}"
        )
    if len(tokens) < 2 or not _WORD.match(tokens[1]):
        raise ProtocolError(BAD_REQUEST, "missing or malformed verb")
    if len(tokens) - 2 > MAX_FIELDS:
        raise ProtocolError(BAD_REQUEST, f"at most {MAX_FIELDS} fields per line")
    fields: dict[str, str] = {}
    for token in tokens[2:]:
        key, eq, raw = token.partition("=")
        if not eq or not _KEY.match(key):
            raise ProtocolError(BAD_REQUEST, f"malformed field {token[:40]!r}")
        if key in fields:
            raise ProtocolError(BAD_REQUEST, f"field {key}= repeated")
        try:
            fields[key] = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise ProtocolError(BAD_REQUEST, f"field {key}= is not UTF-8") from None
    return Message(tokens[1], fields, human)


def checkName(name: str) -> str:
    """
    Validate a shared file name: a relative POSIX path inside the share.

    This is the first of two guards (the second resolves the path on disk
    and checks it stays inside the shared folder), so a name that escapes is
    refused before it is ever joined to a directory.
    """
    if not name:
        raise ProtocolError(BAD_REQUEST, "empty file name")
    # surrogatepass: a name that is not UTF-8 (os.walk's lone surrogates) is
    # refused below as unprintable, not with a UnicodeEncodeError here.
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise ProtocolError(BAD_REQUEST, f"file names are limited to {MAX_NAME} bytes")
    if any(not c.isprintable() for c in name) or "\\" in name:
        raise ProtocolError(BAD_REQUEST, "file name has control characters or backslashes")
    if name.startswith("/"):
        raise ProtocolError(BAD_REQUEST, "file names are relative to the shared folder")
    parts = name.split("/")
    if len(parts) > MAX_NAME_DEPTH:
        raise ProtocolError(BAD_REQUEST, "file name is nested too deeply")
    if any(part in ("", ".", "..") for part in parts):
        raise ProtocolError(BAD_REQUEST, "file name has an empty, '.' or '..' component")
    return name
