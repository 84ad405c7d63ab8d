"""Helpers for tests that connect real protocols in memory (iosim)."""

from __future__ import annotations

from typing import Iterable

from twisted.test import iosim


def flushPumps(pumps: Iterable[iosim.IOPump]) -> None:
    """Pump every in-memory connection until no bytes move on any of them."""
    moved = True
    while moved:
        moved = False
        for pump in list(pumps):
            moved = pump.flush() or moved
