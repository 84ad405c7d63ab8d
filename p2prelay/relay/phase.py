"""
Where a relay connection is in its one negotiation: the phases that
:class:`~p2prelay.relay.protocol.RelayProtocol` and its request handlers
move it through.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """Where a relay connection is in its one negotiation."""

    REQUEST = "request"  # waiting for the request line
    FILES = "files"  # REGISTER: FILE lines up to END
    PROOF = "proof"  # challenged with 100: waiting for PROOF
    WORKING = "working"  # checking, dialling back: nothing more is read
