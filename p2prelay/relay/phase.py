"""
Where a relay connection is in its one negotiation: the phases that
:class:`~p2prelay.relay.protocol.RelayProtocol` and its request handlers
move it through.  A control connection (CONTROL) and the two sides of a
circuit (RELAY, CIRCUIT) outlive the negotiation in phases of their own.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """Where a relay connection is in its one negotiation."""

    REQUEST = "request"  # waiting for the request line
    FILES = "files"  # REGISTER: FILE lines up to END
    PROOF = "proof"  # challenged with 100: waiting for PROOF
    WORKING = "working"  # checking, dialling back: nothing more is read
    CONTROL = "control"  # a firewalled node's control connection: HEARTBEAT lines, CONNECT orders
    WAITING = "waiting"  # RELAY: raw mode, waiting for the node's CIRCUIT (early bytes held)
    SPLICED = "spliced"  # one side of a circuit: bytes pass verbatim to the other side
