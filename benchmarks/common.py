"""
What the benchmarks share: making the file they move.

Each benchmark is one command (``python benchmarks/NAME.py``) and puts the
checkout on ``sys.path``, so this module is imported as ``benchmarks.common``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MiB = 1024 * 1024


def makeFile(path: Path, size: int) -> str:
    """Write ``size`` bytes of random data (one 4 MiB block repeated) to path; its SHA-256."""
    block = os.urandom(min(size, 4 * MiB) or 1)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()
