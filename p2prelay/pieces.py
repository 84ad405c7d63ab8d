"""
Pieces: a file cut into fixed-size parts, each with its own SHA-256.

A file of ``size`` bytes in pieces of ``pieceSize`` has
``ceil(size / pieceSize)`` pieces (none for an empty file); every piece is
``pieceSize`` bytes long except perhaps the last.  The *root* names the
whole layout -- piece size, file size and every piece digest -- in one
hash, so a client that knows the root (the relay lists it) can check a
manifest from any holder before trusting a single digest in it, and two
holders with the same root hold the same bytes.

Shared by node and client: plain functions, no I/O, no Twisted.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

PIECE_SIZE = 4 * 1024 * 1024  # the default; a manifest records its own
MIN_PIECE_SIZE = 16 * 1024  # smaller: the manifest outgrows its worth
MAX_PIECE_SIZE = 64 * 1024 * 1024  # larger: a client's window of pieces gets too big
MAX_PIECES = 1 << 20  # 1,048,576: 4 TiB at the default piece size, a 32 MiB manifest
DIGEST_BYTES = 32  # SHA-256
ROOT_PREFIX = b"p2prelay-pieces/1\n"  # domain separation for the root hash


def _check(size: int, pieceSize: int) -> None:
    if size < 0:
        raise ValueError(f"a file size cannot be negative ({size})")
    if pieceSize < 1:
        raise ValueError(f"a piece size must be at least one byte ({pieceSize})")


def pieceCount(size: int, pieceSize: int = PIECE_SIZE) -> int:
    """How many pieces a file of ``size`` bytes has: 0 for an empty file."""
    _check(size, pieceSize)
    return -(-size // pieceSize)


def pieceRange(index: int, size: int, pieceSize: int = PIECE_SIZE) -> Tuple[int, int]:
    """
    Where piece ``index`` lies in the file: ``(offset, length)``.  Raises
    IndexError for an index the file does not have.
    """
    count = pieceCount(size, pieceSize)
    if not 0 <= index < count:
        raise IndexError(f"piece {index} of a file with {count} pieces")
    offset = index * pieceSize
    return offset, min(pieceSize, size - offset)


def pieceDigest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of one piece's bytes (32 raw bytes)."""
    return hashlib.sha256(data).digest()


def checkLayout(size: int, pieceSize: int) -> int:
    """
    The piece count of a layout a peer announced, or ValueError when we
    would not work with it: a piece size outside
    [``MIN_PIECE_SIZE``, ``MAX_PIECE_SIZE``] or more than ``MAX_PIECES``.
    """
    if not MIN_PIECE_SIZE <= pieceSize <= MAX_PIECE_SIZE:
        raise ValueError(
            f"piece size {pieceSize} is outside {MIN_PIECE_SIZE}..{MAX_PIECE_SIZE} bytes"
        )
    count = pieceCount(size, pieceSize)
    if count > MAX_PIECES:
        raise ValueError(f"{count} pieces is more than {MAX_PIECES}")
    return count


def rootOf(size: int, pieceSize: int, digests: Sequence[bytes]) -> str:
    """
    The root of a manifest, as 64 hex digits:
    SHA-256(ROOT_PREFIX + pieceSize and size as 8-byte big-endian + the
    piece digests in order).  Raises ValueError when the digests do not
    fit the layout (wrong count, or one not 32 bytes long).
    """
    count = pieceCount(size, pieceSize)
    if len(digests) != count:
        raise ValueError(f"{len(digests)} digests for a file of {count} pieces")
    root = hashlib.sha256(ROOT_PREFIX)
    root.update(pieceSize.to_bytes(8, "big"))
    root.update(size.to_bytes(8, "big"))
    for digest in digests:
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"a piece digest is {DIGEST_BYTES} bytes, not {len(digest)}")
        root.update(digest)
    return root.hexdigest()


def encodeDigests(digests: Sequence[bytes]) -> bytes:
    """The body of a MANIFEST answer: the raw digests, back to back."""
    for digest in digests:
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"a piece digest is {DIGEST_BYTES} bytes, not {len(digest)}")
    return b"".join(digests)


def decodeDigests(body: bytes, count: int) -> List[bytes]:
    """
    The ``count`` digests in a MANIFEST body, or ValueError when the body
    is not exactly ``count`` * 32 bytes or ``count`` is over MAX_PIECES.
    """
    if not 0 <= count <= MAX_PIECES:
        raise ValueError(f"a manifest of {count} pieces (at most {MAX_PIECES})")
    if len(body) != count * DIGEST_BYTES:
        raise ValueError(f"a manifest of {count} pieces is {count * DIGEST_BYTES} bytes, not {len(body)}")
    body = bytes(body)
    return [body[i : i + DIGEST_BYTES] for i in range(0, len(body), DIGEST_BYTES)]
