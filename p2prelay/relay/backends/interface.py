"""
The one registry interface the relay protocol uses, whatever holds the
entries: this process (:class:`~.memory.MemoryBackend`) or a Redis shared
by several relays (:class:`~.redis.RedisBackend`).

Every method returns a Deferred, also where the in-memory backend knows the
answer at once (it returns an already-fired one).  A shared registry is
across a network: a Redis lookup is a round trip, and the reactor must not
wait for it while other connections have lines to answer.  One signature for
both backends means the protocol has one code path: it pauses the
connection, adds a callback, and answers when the Deferred fires, and the
in-memory backend pays only a fired Deferred for it.

The arguments, results and exceptions are those of
:class:`p2prelay.relay.registry.Registry`: peers come back as its
:class:`~p2prelay.relay.registry.Peer`, their files as a ``FileTable``;
``register`` fails with ``RegistryFull``, ``AddressTaken`` or ``ValueError``
exactly where ``Registry.register`` raises them.  What a backend promises
beyond the in-memory one, and what it does not:

- ``holders`` (and ``holdersOfRoot``, the same per manifest root) returns
  at most ``limit`` live, listed holders, in no promised order (a relay
  orders them itself); a holder's ``files`` may hold only the entry the
  answer is about.
- ``expire`` drops what has expired and returns the peers it dropped; a
  backend with its own expiry (Redis TTLs) returns what it still knew of them
  and needs no sweep for correctness.
- ``epoch`` names the registry's lifetime: a node that sees it change
  registers again.  It changes when the entries were lost (a new in-memory
  registry, a flushed Redis), not when one relay of several restarts.

Every method may fail with :class:`RegistryUnavailable` when the backend
cannot be reached; the relay answers ``503`` with a retry then (and at
start, exits 1 with the message).
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from ...wire import FileEntry
from ..registry import Figures, Peer, SearchHit

RETRY = 5.0  # seconds a 503 for an unreachable registry asks a client to wait


class RegistryUnavailable(Exception):
    """The registry's store cannot be reached (or cannot answer); the message says which and why."""


class IRegistryBackend(Interface):
    ttl = Attribute("Seconds a registration (or heartbeat) keeps an entry alive.")
    maxTotal = Attribute("Live registrations held at most.")
    maxHolders = Attribute("Holders a WHOHAS answer lists at most.")

    def register(
        node: str,
        host: str,
        port: int,
        files: Iterable[FileEntry],
        udp: Optional[int] = None,
        *,
        key: Optional[str] = None,
        reachable: bool = True,
        source: Optional[str] = None,
        tls: Optional[int] = None,
    ) -> "Deferred[Peer]":
        """Record a registration, replacing the node's earlier one in one step."""

    def room(node: str, source: Optional[str]) -> "Deferred[Optional[str]]":
        """Why registering ``node`` from ``source`` would go over a cap, or None."""

    def refresh(node: str) -> "Deferred[Optional[Peer]]":
        """A heartbeat: the live peer with its lifetime extended, or None. One round trip."""

    def unregister(node: str) -> "Deferred[bool]":
        """Remove the node's entry; whether there was one."""

    def get(node: str) -> "Deferred[Optional[Peer]]":
        """The live entry of ``node``, listed or not, or None."""

    def at(host: str, port: int) -> "Deferred[List[Peer]]":
        """Every live entry registered at host:port, listed or not."""

    def holders(name: str, limit: Optional[int] = None) -> "Deferred[List[Tuple[Peer, FileEntry]]]":
        """At most ``limit`` (default ``maxHolders``) live, listed holders of ``name``, each with its entry."""

    def holdersOfRoot(root: str, limit: Optional[int] = None) -> "Deferred[List[Tuple[Peer, FileEntry]]]":
        """
        At most ``limit`` (default ``maxHolders``) live, listed holders of a
        file whose manifest root is ``root`` under any name, each with its
        entry (so its own name): what ``holders`` promises, per root.
        """

    def active() -> "Deferred[List[Peer]]":
        """The live, listed peers."""

    def all() -> "Deferred[List[Peer]]":
        """Every live entry, listed or not."""

    def search(pattern: str, limit: int) -> "Deferred[Tuple[List[SearchHit], bool]]":
        """``Registry.search``: sorted hits, at most ``limit``, and whether more matched."""

    def figures() -> "Deferred[Figures]":
        """``Registry.figures`` over the listed peers."""

    def setReachable(node: str, reachable: bool) -> "Deferred[Optional[Peer]]":
        """
        Record the relay's own check of a live node (its misses forgotten; a
        node found direct again starts a new run: ``directSince``); the peer,
        or None if gone.
        """

    def missed(node: str) -> "Deferred[Optional[Peer]]":
        """One probe of a live, direct node failed and it stays direct for now (``misses`` + 1)."""

    def setControl(node: str, control: bool) -> "Deferred[Optional[Peer]]":
        """
        The node's control connection to this relay opened (True) or closed.
        Every relay sharing the registry lists the node (firewalled) while
        any relay holds its control connection.
        """

    def forward(node: str, order: bytes) -> "Deferred[bool]":
        """
        Hand ``order`` (a ``CONNECT`` line) to the relay holding ``node``'s
        control connection, when another relay holds it; whether one did.
        """

    def listen(onOrder: "Callable[[str, bytes], None]") -> "Deferred[None]":
        """
        Receive the orders other relays forward to this one: ``onOrder(node,
        line)`` for each (a backend of one relay never calls it).
        """

    def take(bucket: str, key: str, rate: float, burst: int) -> "Deferred[float]":
        """
        Spend a token of ``key``'s (a source address) in the allowance named
        ``bucket`` (``rate`` tokens a second, up to ``burst``): 0 when one was
        there, else the seconds until one will be (and nothing is spent).
        Shared by every relay on the registry, so N relays do not give one
        source N allowances.
        """

    def claimRecheck(node: str, interval: float, force: bool = False) -> "Deferred[bool]":
        """
        Claim the re-check of ``node``: True (and the claim recorded, for
        ``interval`` seconds) unless a relay on this registry claimed it less
        than ``interval`` seconds ago; ``force`` records it regardless (a
        confirming probe).  Shared, so a node is re-checked by one relay of
        several per interval.
        """

    def releaseRecheck(node: str) -> "Deferred[None]":
        """Undo a claim just made that led to no check (its dial-back allowance was spent)."""

    def expire() -> "Deferred[List[Peer]]":
        """Drop what has expired; the peers dropped (as far as still known)."""

    def epoch() -> "Deferred[str]":
        """The registry's lifetime: changes exactly when its entries were lost."""

    def close() -> "Deferred[None]":
        """Let go of connections; the backend is not used afterwards."""
