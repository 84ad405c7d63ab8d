"""
The relay's knowledge: which peers are alive and what each one holds.

A plain object with no Twisted in it, so every rule (replacement, expiry,
reachability, caps, search) is tested exhaustively without a network; the
relay protocol only translates lines into calls on it.  Time is a callable
returning seconds, so tests drive it with ``task.Clock().seconds``.

Entries are keyed by node id and carry the node's public key; proving the
key is the protocol's job, the registry only refuses what no proof can
allow: another key under a known id, or a verified address taken by an
unverified newcomer.  Only entries clients can get to are ever handed to
them (``listed``): those the relay could reach itself (``reachable``:
"direct") and firewalled ones holding a control connection to this relay
(``control``), which clients reach by the reverse or relayed paths.
Listings come in tiers -- direct, direct but a probe missed, firewalled --
in random order within a tier, so clients do not all try the same node
first.

Sized for a million files (10,000 peers of 100 files): every lookup goes
through an index, so a registration, a heartbeat and a ``WHOHAS`` cost the
same at ten peers and at ten thousand.

- node -> :class:`Peer` (a dict in first-registration order),
- file name -> {node: position of the name in that peer's :class:`FileTable`},
  in the order the nodes began to hold the name,
- manifest root -> {node: position of a file with that root in its table}
  (the first such file, when a node holds the same bytes under several
  names): identical content under any name is one swarm,
- (host, port) -> nodes, source address -> nodes,
- a heap of (expiry, node), so a sweep touches only what has expired.

A peer's files are one :class:`FileTable`: the names (interned, so a name
held by a thousand peers is one string), the sizes in an array and the
digests as 32 raw bytes each in one ``bytes``.  ``search`` is a generator
(:meth:`Registry.searchSteps`) that yields every few thousand names, so the
relay answers other requests between its steps.
"""

from __future__ import annotations

import fnmatch
import heapq
import random
import sys
from array import array
from collections.abc import Mapping
from typing import (
    Callable,
    Dict,
    Generator,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
)

import attrs

from ..pieces import PIECE_SIZE
from ..wire import DIRECT, FIREWALLED, FileEntry

DEFAULT_TTL = 90.0
MAX_PER_SOURCE = 64  # live registrations made from one source address
MAX_TOTAL = 100_000  # live registrations in all
MAX_HOLDERS = 64  # holders one WHOHAS answer lists at most
SEARCH_STEP = 1000  # names matched (or holders counted) between two steps of a search
DIGEST = 32  # bytes of one SHA-256 digest
_NO_ROOT = bytes(DIGEST)  # in FileTable.roots: a file announced without a root


class RegistryFull(Exception):
    """A new registration would go over a cap; the message says which."""


class AddressTaken(Exception):
    """The address is held by a live, verified node with another key."""


class FileTable(Mapping):
    """
    One peer's files, compactly: a Mapping of name to :class:`FileEntry`
    whose entries are made on demand from flat sequences.

    ``names`` are the registry's shared string objects; ``sizes`` an
    ``array('q')`` (a tuple if a size does not fit); ``digests`` every
    SHA-256 as 32 raw bytes, end to end; ``roots`` every manifest root
    the same way (32 zero bytes for a file announced without one, and
    empty when no file has one); ``pieces`` the piece sizes, or None when
    every file has the default.
    """

    __slots__ = ("names", "sizes", "digests", "roots", "pieces")

    def __init__(
        self,
        names: Tuple[str, ...],
        sizes: Sequence[int],
        digests: bytes,
        roots: bytes = b"",
        pieces: Optional[Sequence[int]] = None,
    ) -> None:
        self.names = names
        self.sizes = sizes
        self.digests = digests
        self.roots = roots
        self.pieces = pieces

    @classmethod
    def of(cls, entries: Iterable[FileEntry], intern: Callable[[str], str] = sys.intern) -> "FileTable":
        """A table of ``entries``; a name given twice keeps its last entry."""
        unique: Dict[str, FileEntry] = {}
        for entry in entries:
            unique[entry.name] = entry
        values = unique.values()
        sizes = [e.size for e in values]
        try:
            packed: Sequence[int] = array("q", sizes)
        except OverflowError:
            packed = tuple(sizes)
        roots = b""
        if any(e.root is not None for e in values):
            roots = b"".join(_NO_ROOT if e.root is None else bytes.fromhex(e.root) for e in values)
        pieces = None
        if any(e.pieceSize != PIECE_SIZE for e in values):
            pieces = array("q", [e.pieceSize for e in values])
        return cls(
            tuple(intern(name) for name in unique),
            packed,
            b"".join(bytes.fromhex(e.sha256) for e in values),
            roots,
            pieces,
        )

    def digest(self, index: int) -> bytes:
        return self.digests[index * DIGEST : (index + 1) * DIGEST]

    def root(self, index: int) -> Optional[str]:
        """The manifest root of file ``index`` (hex), or None if it was announced without."""
        raw = self.roots[index * DIGEST : (index + 1) * DIGEST]
        return None if not raw or raw == _NO_ROOT else raw.hex()

    def pieceSize(self, index: int) -> int:
        return PIECE_SIZE if self.pieces is None else self.pieces[index]

    def entry(self, index: int) -> FileEntry:
        return FileEntry(
            self.names[index],
            self.sizes[index],
            self.digest(index).hex(),
            root=self.root(index),
            pieceSize=self.pieceSize(index),
        )

    def __getitem__(self, name: str) -> FileEntry:
        try:
            return self.entry(self.names.index(name))
        except ValueError:
            raise KeyError(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"FileTable({len(self.names)} files)"


def _table(files: Mapping[str, FileEntry] | FileTable) -> FileTable:
    return files if isinstance(files, FileTable) else FileTable.of(files.values())


@attrs.define(slots=True, eq=True)
class Peer:
    """
    One registered peer node and the files it announced.

    Only the registry changes a peer (``expires`` on a heartbeat,
    ``reachable``, ``misses`` and ``directSince`` after a check,
    ``control`` as its control connection opens and closes); a new
    registration is a new Peer.  ``control``, ``misses`` and
    ``directSince`` are never persisted.
    """

    node: str
    host: str
    port: int
    files: FileTable = attrs.field(converter=_table)
    expires: float
    udp: int | None = None
    key: str | None = None  # the node's public key (base64url)
    reachable: bool = True  # the relay's own dial-back reached the node there
    source: str | None = None  # the address the registration came from
    tls: int | None = None  # the node's TLS port (pinned to key), if it has one
    control: bool = False  # it holds a live control connection to this relay
    misses: int = 0  # consecutive failed probes while still direct
    directSince: float | None = None  # first verified direct, in its current run of successes

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    @property
    def listed(self) -> bool:
        """Handed to clients: reachable directly, or through its control connection."""
        return self.reachable or self.control

    @property
    def reach(self) -> str:
        """What PEER items say of it: ``direct`` or ``firewalled``."""
        return DIRECT if self.reachable else FIREWALLED

    @property
    def tier(self) -> int:
        """Its place in listings: 0 direct, 1 direct with a missed probe, 2 firewalled."""
        if self.reachable:
            return 0 if self.misses == 0 else 1
        return 2


class Figures(NamedTuple):
    """:meth:`Registry.figures`: peers, distinct files, index entries, bytes in them."""

    peers: int
    files: int
    entries: int
    bytes: int


@attrs.frozen
class SearchHit:
    name: str
    size: int
    sha256: str
    holders: int


class Listener:
    """
    What a registry tells about its changes (persistence listens): an
    entry added or replaced, its lifetime extended, an entry gone.
    """

    def upserted(self, peer: Peer) -> None:
        pass

    def refreshed(self, peer: Peer) -> None:
        pass

    def removed(self, node: str) -> None:
        pass


def matcher(pattern: str) -> Optional[Callable[[str], bool]]:
    """
    SEARCH's test of one name (None: every name matches): a glob (when the
    pattern has ``*?[``) against the whole path or its last component, else
    a substring, both ignoring case.
    """
    lowered = pattern.lower()
    if not any(c in pattern for c in "*?["):
        if not lowered:
            return None
        return lambda name: lowered in name.lower()
    import re

    match = re.compile(fnmatch.translate(lowered)).match

    def glob(name: str) -> bool:
        low = name.lower()
        if match(low) is not None:
            return True
        slash = low.rfind("/")
        return slash >= 0 and match(low, slash + 1) is not None

    return glob


class Registry:
    """
    Live peers keyed by node id; every answer leaves out expired peers,
    and the lists handed to clients leave out those not ``listed``.

    A peer is also found by the address it serves on: a node that restarts
    with a fresh key on the same address replaces its old entry (once the
    relay has reached the new key there) instead of leaving a ghost behind.
    """

    def __init__(
        self,
        now: Callable[[], float],
        ttl: float = DEFAULT_TTL,
        *,
        maxPerSource: int = MAX_PER_SOURCE,
        maxTotal: int = MAX_TOTAL,
        maxHolders: int = MAX_HOLDERS,
        rng: Optional[random.Random] = None,
    ) -> None:
        self._now = now
        self.ttl = ttl
        self.maxPerSource = maxPerSource
        self.maxTotal = maxTotal
        self.maxHolders = maxHolders
        self.listener: Listener = Listener()
        self._random = rng if rng is not None else random.Random()
        self._peers: Dict[str, Peer] = {}  # in first-registration order
        self._names: Dict[str, Dict[str, int]] = {}  # name -> {node: index in its FileTable}
        self._roots: Dict[bytes, Dict[str, int]] = {}  # raw root -> {node: index of a file with it}
        self._byAddress: Dict[Tuple[str, int], set[str]] = {}
        self._bySource: Dict[str, set[str]] = {}
        self._expiry: List[Tuple[float, str]] = []  # a heap; stale items are skipped

    def __len__(self) -> int:
        """Entries held, expired ones not yet swept included."""
        return len(self._peers)

    @property
    def names(self) -> int:
        """Distinct file names held."""
        return len(self._names)

    def room(self, node: str, source: str | None) -> str | None:
        """
        Why a registration of ``node`` from ``source`` would go over a cap,
        or None if it fits.  Re-registering a live node always fits.
        """
        if self.get(node) is not None:
            return None
        if len(self._peers) >= self.maxTotal:
            self.expire()  # expired entries free their place, swept or not
            if len(self._peers) >= self.maxTotal:
                return f"the relay holds {self.maxTotal} registrations"
        if source is not None:
            mine = self._bySource.get(source, ())
            if len(mine) >= self.maxPerSource and self._live(mine) >= self.maxPerSource:
                return f"{self.maxPerSource} registrations from {source} already"
        return None

    def _live(self, nodes: Iterable[str]) -> int:
        now = self._now()
        peers = self._peers
        return sum(1 for n in nodes if n in peers and peers[n].expires > now)

    def register(
        self,
        node: str,
        host: str,
        port: int,
        files: Iterable[FileEntry],
        udp: int | None = None,
        *,
        key: str | None = None,
        reachable: bool = True,
        source: str | None = None,
        tls: int | None = None,
    ) -> Peer:
        """
        Record a registration, replacing the node's earlier one.

        Raises :class:`RegistryFull` over a cap, :class:`AddressTaken` when
        an unverified newcomer claims a live verified node's address, and
        ValueError when ``key`` differs from the one the id was bound to.
        """
        existing = self.get(node)
        if existing is not None and existing.key != key:
            raise ValueError(f"node {node} is bound to another key")
        reason = self.room(node, source)
        if reason is not None:
            raise RegistryFull(reason)
        others = [p for p in self.at(host, port) if p.node != node]
        if not reachable and any(p.reachable for p in others):
            raise AddressTaken(f"{host}:{port} is held by another node")
        for other in others if reachable else ():
            self._remove(other.node)
        now = self._now()
        control, misses, since = False, 0, now if reachable else None
        if existing is not None:
            control = existing.control  # its control connection is still open
            if reachable and existing.reachable and existing.address == (host, port):
                misses, since = existing.misses, existing.directSince
        peer = Peer(
            node=sys.intern(node),
            host=host,
            port=port,
            files=FileTable.of(files),
            expires=now + self.ttl,
            udp=udp,
            key=key,
            reachable=reachable,
            source=source,
            tls=tls,
            control=control,
            misses=misses,
            directSince=since,
        )
        self._add(peer)
        self.listener.upserted(peer)
        return peer

    def _add(self, peer: Peer) -> None:
        node = peer.node
        old = self._peers.get(node)
        if old is not None:
            self._unlink(old, keep=peer.files)
        self._peers[node] = peer  # a node already there keeps its place
        _hold(self._names, ((name, index) for index, name in enumerate(peer.files.names)), node)
        _hold(self._roots, _rootsOf(peer.files).items(), node)
        self._byAddress.setdefault(peer.address, set()).add(node)
        if peer.source is not None:
            self._bySource.setdefault(peer.source, set()).add(node)
        heapq.heappush(self._expiry, (peer.expires, node))

    def _unlink(self, peer: Peer, keep: FileTable | None = None) -> None:
        """Take ``peer`` out of every index (but names also in ``keep``)."""
        node = peer.node
        kept = frozenset(keep.names) if keep is not None and len(keep) else frozenset()
        _unhold(self._names, peer.files.names, node, kept)
        keptRoots = _rootsOf(keep) if keep is not None else {}
        _unhold(self._roots, _rootsOf(peer.files), node, keptRoots)
        _discard(self._byAddress, peer.address, node)
        if peer.source is not None:
            _discard(self._bySource, peer.source, node)

    def restore(self, peer: Peer) -> bool:
        """Put back a peer loaded from persistent state, if still alive."""
        if peer.expires > self._now():
            peer.node = sys.intern(peer.node)
            peer.control = False  # no control connection survives a restart
            if peer.reachable and peer.directSince is None:
                peer.directSince = self._now()  # a new run of successes
            self._add(peer)
            return True
        return False

    def refresh(self, node: str) -> Peer | None:
        """A heartbeat: extend a live peer's lifetime; None if unknown."""
        peer = self.get(node)
        if peer is None:
            return None
        peer.expires = self._now() + self.ttl
        heapq.heappush(self._expiry, (peer.expires, peer.node))
        self.listener.refreshed(peer)
        return peer

    def unregister(self, node: str) -> bool:
        return self._remove(node)

    def _remove(self, node: str) -> bool:
        peer = self._peers.pop(node, None)
        if peer is None:
            return False
        self._unlink(peer)
        self.listener.removed(peer.node)
        return True

    def at(self, host: str, port: int) -> List[Peer]:
        """Every live entry registered at host:port, listed or not."""
        now = self._now()
        nodes = self._byAddress.get((host, port), ())
        return [p for p in map(self._peers.get, nodes) if p is not None and p.expires > now]

    def setReachable(self, node: str, reachable: bool) -> Peer | None:
        """
        Record the outcome of the relay's own check of a live node: either
        way its missed probes are forgotten; a node found direct again
        starts a new run of successes.
        """
        peer = self.get(node)
        if peer is None:
            return None
        peer.misses = 0
        if peer.reachable == reachable:
            return peer
        peer.reachable = reachable
        peer.directSince = self._now() if reachable else None
        self.listener.upserted(peer)
        return peer

    def missed(self, node: str) -> Peer | None:
        """One probe of a live, direct node failed and it stays direct (for now)."""
        peer = self.get(node)
        if peer is not None and peer.reachable:
            peer.misses += 1
        return peer

    def setControl(self, node: str, control: bool) -> Peer | None:
        """The node's control connection to this relay opened (True) or closed."""
        peer = self.get(node)
        if peer is not None:
            peer.control = control
        return peer

    def ordered(self, peers: Iterable[Peer]) -> List[Peer]:
        """``peers`` by :attr:`Peer.tier`, in random order within each tier."""
        tiers: Dict[int, List[Peer]] = {}
        for peer in peers:
            tiers.setdefault(peer.tier, []).append(peer)
        result: List[Peer] = []
        for tier in sorted(tiers):
            group = tiers[tier]
            self._random.shuffle(group)
            result.extend(group)
        return result

    def expire(self) -> List[Peer]:
        """Drop every peer whose lifetime has passed; returns them."""
        now = self._now()
        heap = self._expiry
        gone = []
        while heap and heap[0][0] <= now:
            _, node = heapq.heappop(heap)
            peer = self._peers.get(node)
            if peer is not None and peer.expires <= now:
                self._remove(node)
                gone.append(peer)
        return gone

    def all(self) -> List[Peer]:
        """Every live entry, including unreachable ones (for persistence)."""
        now = self._now()
        return [p for p in self._peers.values() if p.expires > now]

    def active(self) -> List[Peer]:
        """Live, listed peers, by tier (see :meth:`ordered`)."""
        return self.ordered(self._listed())

    def _listed(self) -> List[Peer]:
        now = self._now()
        return [p for p in self._peers.values() if p.expires > now and p.listed]

    def figures(self) -> "Figures":
        """
        The headline figures over the peers clients are sent to: how many,
        the distinct names they hold, their entries (one per file a peer
        holds) and the bytes in those.
        """
        peers = self._listed()
        names: set[str] = set()
        entries = size = 0
        for peer in peers:
            table = _table(peer.files)
            names.update(table.names)
            entries += len(table.names)
            size += sum(table.sizes)
        return Figures(len(peers), len(names), entries, size)

    def get(self, node: str) -> Peer | None:
        peer = self._peers.get(node)
        return peer if peer is not None and peer.expires > self._now() else None

    def holders(self, name: str, limit: int | None = None) -> List[Tuple[Peer, FileEntry]]:
        """
        Live, listed peers holding ``name``, with the entry each holds:
        at most ``limit`` (default ``maxHolders``) of them.

        When more hold it than fit, a random sample of them, so the load of
        a popular file spreads over all its holders; then by tier, in
        random order within a tier (see :meth:`ordered`).
        """
        return self._sample(self._names.get(name), limit)

    def holdersOfRoot(self, root: str, limit: int | None = None) -> List[Tuple[Peer, FileEntry]]:
        """
        Live, listed peers holding a file whose manifest root is ``root``
        (64 hex digits) under any name, each with its entry (the name it
        holds the bytes under): the rules and order of :meth:`holders`.
        """
        if len(root) != 2 * DIGEST or root != root.lower():
            return []  # not a root as the wire writes one
        try:
            raw = bytes.fromhex(root)
        except ValueError:
            return []
        return self._sample(self._roots.get(raw), limit)

    def _sample(self, holders: Optional[Dict[str, int]], limit: int | None) -> List[Tuple[Peer, FileEntry]]:
        """At most ``limit`` live, listed peers of an index's ``{node: index}``, sampled and in tiers."""
        if not holders:
            return []
        limit = self.maxHolders if limit is None else limit
        now = self._now()
        peers = self._peers
        found: List[Tuple[Peer, FileEntry]] = []

        def take(node: str) -> bool:
            peer = peers[node]
            if peer.listed and peer.expires > now:
                found.append((peer, peer.files.entry(holders[node])))
            return len(found) >= limit

        if len(holders) <= limit:
            for node in holders:
                if take(node):
                    break
            return self._inTiers(found)
        nodes = list(holders)
        picked = sorted(self._random.sample(range(len(nodes)), limit))
        for i in picked:
            take(nodes[i])
        if len(found) < limit:  # some picks were hidden or expired: fill in order
            chosen = {nodes[i] for i in picked}
            for node in nodes:
                if node not in chosen and take(node):
                    break
        return self._inTiers(found)

    def _inTiers(self, found: List[Tuple[Peer, FileEntry]]) -> List[Tuple[Peer, FileEntry]]:
        entries = {id(peer): entry for peer, entry in found}
        return [(peer, entries[id(peer)]) for peer in self.ordered(p for p, _ in found)]

    def search(self, pattern: str, limit: int) -> Tuple[List[SearchHit], bool]:
        """
        Files whose name matches a glob (when it has ``*?[``) or contains a
        substring, one hit per (name, size, sha256) version, sorted, capped
        at limit; and whether more matched.
        """
        steps = self.searchSteps(pattern, limit)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def searchSteps(
        self, pattern: str, limit: int
    ) -> Generator[None, None, Tuple[List[SearchHit], bool]]:
        """
        :meth:`search` in steps: yields after every ``SEARCH_STEP`` names
        matched or holders counted (the registry may change in between);
        returns what ``search`` returns.
        """
        matches = matcher(pattern)
        names = list(self._names)  # this search's snapshot of the names
        runs: List[List[str]] = []
        for start in range(0, len(names), SEARCH_STEP):
            chunk = names[start : start + SEARCH_STEP]
            if matches is not None:
                chunk = [n for n in chunk if matches(n)]
            if chunk:
                chunk.sort()
                runs.append(chunk)
            if start + SEARCH_STEP < len(names):
                yield  # a search of a few names is done in one step
        del names
        hits: List[SearchHit] = []
        work = 0
        now = self._now()
        for name in heapq.merge(*runs):
            holders = self._names.get(name)
            if not holders:
                continue  # gone meanwhile
            versions: Dict[Tuple[int, bytes], int] = {}
            for node, index in holders.items():
                peer = self._peers[node]
                if peer.listed and peer.expires > now:
                    version = (peer.files.sizes[index], peer.files.digest(index))
                    versions[version] = versions.get(version, 0) + 1
            for (size, digest), count in sorted(versions.items()):
                hits.append(SearchHit(name, size, digest.hex(), count))
            if len(hits) > limit:
                break
            work += len(holders)
            if work >= SEARCH_STEP:
                work = 0
                yield
                now = self._now()
        return hits[:limit], len(hits) > limit


def _rootsOf(table: FileTable) -> Dict[bytes, int]:
    """The raw roots of ``table``'s files, each with the index of its first file."""
    raw = table.roots
    if not raw:
        return {}
    found: Dict[bytes, int] = {}
    for index in range(len(raw) // DIGEST):
        root = raw[index * DIGEST : (index + 1) * DIGEST]
        if root != _NO_ROOT and root not in found:
            found[root] = index
    return found


def _hold(index: Dict, entries: Iterable, node: str) -> None:
    """``node`` holds each ``(key, i)`` of ``entries`` in a ``{key: {node: i}}`` index."""
    for key, i in entries:
        holders = index.get(key)
        if holders is None:
            index[key] = {node: i}
        else:
            holders[node] = i  # a holder already there keeps its place


def _unhold(index: Dict, keys: Iterable, node: str, kept) -> None:
    """``node`` no longer holds ``keys`` (but those in ``kept``) in a ``{key: {node: i}}`` index."""
    for key in keys:
        if key in kept:
            continue
        holders = index.get(key)
        if holders is not None:
            holders.pop(node, None)
            if not holders:
                del index[key]


def _discard(index: Dict, key: object, node: str) -> None:
    nodes = index.get(key)
    if nodes is not None:
        nodes.discard(node)
        if not nodes:
            del index[key]
