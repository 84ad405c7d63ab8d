"""
The vocabulary of a fetch: a peer as the relay lists it (:class:`PeerAddress`),
one failed :class:`Attempt`, a :class:`Fetched` file, the errors a fetch
ends in, and :func:`describe`, which tells a failure to the user.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import attrs
from twisted.internet import error

from .. import wire
from ..addresses import hostPort
from ..negotiation import IncompleteAnswer
from ..pieces import PIECE_SIZE
from .download import VerificationError
from .get import TooSlow
from .relay import ProofNeeded


class NoUDP(Exception):
    """The peer did not register a UDP port, or does not answer on it."""


class RelayUnreachable(Exception):
    """The relay could not be asked at all (refused, timed out, no route)."""


class RelayNotFound(RelayUnreachable):
    """The relay's host name does not exist: ``NAME:PORT: no such host``."""


class NoRelayReachable(RelayUnreachable):
    """
    No relay of a ``--relay`` list could be asked; the message names each
    and why: ``no relay could be reached (a:8000: connection refused; ...)``.
    """


class PathRefused(wire.ProtocolError):
    """
    The relay refused a reverse or relayed path to a firewalled peer: its
    status, its text, and a 503's ``retry`` hint.
    """


class NotFetched(Exception):
    """Every candidate peer was tried and none delivered the file."""

    def __init__(
        self, name: str, attempts: Sequence["Attempt"], why: str = "", notIndexed: bool = False
    ) -> None:
        super().__init__(name)
        self.name = name
        self.attempts = list(attempts)
        # The index lists no holder, and the peers walked had nothing: ``why`` says it all.
        self.notIndexed = notIndexed
        notFound = [a for a in attempts if a.error.startswith(f"{wire.NOT_FOUND} ")]
        if why:
            self.why = why
        elif not attempts:
            self.why = "no active peer holds it"
        elif len(notFound) == len(attempts):
            self.why = f"not found on any of the {len(attempts)} active peers"
        else:
            self.why = f"all {len(attempts)} peers that might have it failed"


@attrs.frozen
class PeerAddress:
    """
    A peer as the relay lists it; ``size`` and ``sha256`` are what its
    index says this peer holds under the name asked for (WHOHAS only);
    ``tls`` and ``key`` its TLS port and the key to pin it to, if it has one.
    """

    host: str
    port: int
    node: str = ""
    udp: Optional[int] = None
    size: Optional[int] = attrs.field(default=None, eq=False)
    sha256: Optional[str] = attrs.field(default=None, eq=False)
    tls: Optional[int] = attrs.field(default=None, eq=False)
    key: Optional[str] = attrs.field(default=None, eq=False)
    # The root of the pieces it holds, and their size (WHOHAS, when listed).
    root: Optional[str] = attrs.field(default=None, eq=False)
    piece: int = attrs.field(default=PIECE_SIZE, eq=False)
    # wire.DIRECT: connect to it; wire.FIREWALLED: only through the relay
    # (see p2prelay.client.paths).
    reach: str = attrs.field(default=wire.DIRECT, eq=False)
    # The endpoint of the relay that listed it (None: the client's relay):
    # a DEAD report about it, a REVERSE or RELAY to it, go there.
    relay: Optional[object] = attrs.field(default=None, eq=False, repr=False)

    def __str__(self) -> str:
        return hostPort(self.host, self.port)

    @classmethod
    def fromMessage(cls, message: wire.Message) -> "PeerAddress":
        udp = message.get("udp")
        listed = message.get("sha256") is not None
        size = message.integer("size") if listed else None
        root, piece = wire.pieceLayout(message, size) if listed else (None, PIECE_SIZE)
        return cls(
            host=message.require("host"),
            port=message.port(),
            node=message.get("node", "") or "",
            udp=message.port("udp") if udp else None,
            size=size,
            sha256=message.sha256() if listed else None,
            tls=message.port("tls") if message.get("tls") else None,
            key=message.publicKey() if message.get("tls") else None,
            root=root,
            piece=piece,
            # Anything but "firewalled" (a newer relay's word, say) is dialled as before.
            reach=wire.FIREWALLED if message.get("reach") == wire.FIREWALLED else wire.DIRECT,
        )

    @property
    def firewalled(self) -> bool:
        """The relay lists it as taking no incoming connections."""
        return self.reach == wire.FIREWALLED

    @property
    def listed(self) -> Optional[Tuple[int, str]]:
        """(size, sha256) the relay's index lists for this peer, if any."""
        if self.sha256 is None or self.size is None:
            return None
        return (self.size, self.sha256)


@attrs.frozen
class Attempt:
    peer: str
    error: str


@attrs.frozen
class Fetched:
    name: str
    size: int
    sha256: str
    peer: str
    attempts: List[Attempt]
    seconds: float
    # Every peer that sent pieces (a multi-source download), else just ``peer``.
    peers: List[str] = attrs.field(factory=list)
    resumed: int = 0  # bytes already on disk from an earlier run
    # How the bytes came (the main peer's, in a multi-source download):
    # "direct", "reverse" or "relay" (see p2prelay.client.paths); None for
    # a file that was already there.
    path: Optional[str] = wire.DIRECT


def directFirst(peers: Sequence[PeerAddress]) -> List[PeerAddress]:
    """The direct peers, then the firewalled ones, each group in the given order."""
    return [p for p in peers if not p.firewalled] + [p for p in peers if p.firewalled]


def describe(e: BaseException) -> str:
    """A short, user-facing reason for a failed attempt."""
    if isinstance(e, PathRefused):
        return f"relay answered {e.status} {e.message}"
    if isinstance(e, wire.ProtocolError):
        return f"{e.status} {e.message}"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TimeoutError, error.TCPTimedOutError)):
        return "timed out"
    if isinstance(e, error.DNSLookupError):
        return "unknown host"
    if isinstance(e, (IncompleteAnswer, VerificationError, NoUDP, TooSlow, ProofNeeded)):
        return str(e)
    if isinstance(e, error.ConnectError):
        return (e.osError and str(e.osError)) or e.__class__.__name__
    return str(e) or e.__class__.__name__


def unreachable(e: BaseException) -> bool:
    """Errors meaning nothing listens there (as opposed to a bad answer)."""
    return isinstance(
        e,
        (
            error.ConnectionRefusedError,
            error.TimeoutError,
            error.TCPTimedOutError,
            error.NoRouteError,
            error.DNSLookupError,
        ),
    )


def notIndexed(name: str) -> str:
    return f"{name} is not in the relay's index; verified only against the sending peer's own hash"
