"""
Sizes, rates and counts as people read them: ``2.0 GiB``, ``1.5 MiB/s``,
``1 file``.  For tables and messages meant for people only; ``--json``
and the wire keep exact bytes.
"""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB")
_STEP = 1024


def humanSize(size: float) -> str:
    """
    ``512 B`` below 1 KiB (exact bytes), then one decimal in the largest
    binary unit that keeps the figure under 1024 once rounded
    (``1023.99 KiB`` is ``1.0 MiB``, never ``1024.0 KiB``); TiB is the last.
    """
    if size < 0:
        return "-" + humanSize(-size)
    if size < _STEP:
        return f"{int(size)} B"
    value = float(size)
    for unit in _UNITS:
        value /= _STEP
        if round(value, 1) < _STEP or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def humanRate(bytesPerSecond: float) -> str:
    """A transfer rate: ``humanSize`` per second, ``1.5 MiB/s``."""
    return humanSize(bytesPerSecond) + "/s"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 file``, ``0 files``, ``2 files``; ``nouns`` for an irregular plural."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"
