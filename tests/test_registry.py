"""
The relay's registry: who is alive, what each peer holds, and search; and
the state store that keeps it across restarts.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

import random

from p2prelay.relay.registry import (
    SEARCH_STEP,
    AddressTaken,
    FileTable,
    Listener,
    Peer,
    Registry,
    RegistryFull,
    SearchHit,
)
from p2prelay.relay.store import SCHEMA_VERSION, NewerSchema, StateStore, StateWriter
from p2prelay.pieces import PIECE_SIZE
from p2prelay.wire import FileEntry

TTL = 90.0


def entry(name: str, size: int = 1, digest: str = "a") -> FileEntry:
    return FileEntry(name, size, digest * 64)


class RegistryTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock.seconds, TTL)

    def nodes(self) -> list[str]:
        """The active peers' ids, sorted (their order is random within a tier)."""
        return sorted(p.node for p in self.registry.active())


class RegisterTests(RegistryTestCase):
    def test_register(self):
        """A registered peer is active with its address and files."""
        peer = self.registry.register("n1", "10.0.0.1", 5000, [entry("a.txt")], udp=5001)
        self.assertEqual(self.registry.active(), [peer])
        self.assertEqual((peer.host, peer.port, peer.udp), ("10.0.0.1", 5000, 5001))
        self.assertEqual(peer.address, ("10.0.0.1", 5000))
        self.assertEqual(list(peer.files), ["a.txt"])
        self.assertEqual(peer.expires, TTL)

    def test_reregisterSameNode(self):
        """A registration that repeats a node id replaces the earlier entry."""
        self.registry.register("n1", "10.0.0.1", 5000, [entry("old.txt")])
        self.registry.register("n1", "10.0.0.2", 6000, [entry("new.txt")])
        [peer] = self.registry.active()
        self.assertEqual((peer.host, peer.port, list(peer.files)), ("10.0.0.2", 6000, ["new.txt"]))
        self.assertEqual(self.registry.holders("old.txt"), [])

    def test_reregisterNewIdSameAddress(self):
        """A node restarted with a fresh id on the same host:port replaces its ghost."""
        self.registry.register("old", "10.0.0.1", 5000, [entry("a.txt")])
        self.registry.register("new", "10.0.0.1", 5000, [entry("a.txt")])
        self.assertEqual(self.nodes(), ["new"])
        self.assertIsNone(self.registry.get("old"))
        self.assertEqual([p.node for p, _ in self.registry.holders("a.txt")], ["new"])

    def test_sameHostOtherPort(self):
        """Two nodes on one host with different ports are both kept."""
        self.registry.register("a", "10.0.0.1", 5000, [])
        self.registry.register("b", "10.0.0.1", 5001, [])
        self.assertEqual(self.nodes(), ["a", "b"])

    def test_comeBackAfterUnregister(self):
        """A peer that unregistered and registers again is listed again, once."""
        self.registry.register("a", "a", 1, [])
        self.registry.register("b", "b", 1, [])
        self.registry.unregister("a")
        self.registry.register("a", "a", 1, [])
        self.assertEqual([p.node for p in self.registry.active()].count("a"), 1)
        self.assertEqual(self.nodes(), ["a", "b"])


class ExpiryTests(RegistryTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.registry.register("n1", "10.0.0.1", 5000, [entry("a.txt")])
        self.clock.advance(TTL / 2)
        self.registry.register("n2", "10.0.0.2", 5000, [entry("a.txt")])

    def test_aliveUntilTtl(self):
        """A peer stays active until its ttl has passed."""
        self.clock.advance(TTL / 2 - 0.001)
        self.assertEqual(self.nodes(), ["n1", "n2"])

    def test_noAnswerNamesExpired(self):
        """Once its ttl passes, no answer names the peer: active, get, holders, search, all."""
        self.clock.advance(TTL / 2)
        self.assertEqual(self.nodes(), ["n2"])
        self.assertIsNone(self.registry.get("n1"))
        self.assertEqual([p.node for p, _ in self.registry.holders("a.txt")], ["n2"])
        hits, _ = self.registry.search("a", 10)
        self.assertEqual([h.holders for h in hits], [1])
        self.assertEqual([p.node for p in self.registry.all()], ["n2"])

    def test_refreshExtends(self):
        """A heartbeat extends the lifetime by a full ttl from now."""
        self.clock.advance(TTL / 2 - 1)
        peer = self.registry.refresh("n1")
        self.assertEqual(peer.expires, self.clock.seconds() + TTL)
        self.clock.advance(TTL - 1)
        self.assertEqual(self.nodes(), ["n1"])  # n2 has expired meanwhile
        self.assertEqual(self.registry.get("n1"), peer)

    def test_refreshUnknown(self):
        """A heartbeat from an unknown node is None (it must register again)."""
        self.assertIsNone(self.registry.refresh("nobody"))

    def test_refreshExpired(self):
        """A heartbeat after expiry does not revive the peer."""
        self.clock.advance(TTL)
        self.assertIsNone(self.registry.refresh("n1"))
        self.assertNotIn("n1", self.nodes())

    def test_expire(self):
        """expire() drops and returns the peers whose ttl passed."""
        self.clock.advance(TTL / 2)
        self.assertEqual([p.node for p in self.registry.expire()], ["n1"])
        self.assertEqual(self.registry.expire(), [])
        self.assertEqual(self.nodes(), ["n2"])

    def test_reregisterAfterExpiry(self):
        """An expired peer that registers again is active again."""
        self.clock.advance(TTL)
        self.registry.register("n1", "10.0.0.1", 5000, [])
        self.assertIn("n1", self.nodes())

    def test_restoreLive(self):
        """A peer restored from saved state is active while it has lifetime left."""
        saved = self.registry.all()
        fresh = Registry(self.clock.seconds, TTL)
        for peer in saved:
            fresh.restore(peer)
        self.assertEqual(sorted(p.node for p in fresh.active()), ["n1", "n2"])

    def test_restoreExpired(self):
        """A saved peer whose lifetime has passed is not restored."""
        saved = self.registry.all()
        self.clock.advance(TTL / 2)
        fresh = Registry(self.clock.seconds, TTL)
        for peer in saved:
            fresh.restore(peer)
        self.assertEqual([p.node for p in fresh.active()], ["n2"])

    def test_restoreIndexesRoots(self):
        """A peer restored from saved state is found by the roots of its files."""
        peer = Peer("n", "h", 1, {"a": FileEntry("a", 1, "a" * 64, root="d" * 64)}, expires=TTL)
        fresh = Registry(self.clock.seconds, TTL)
        fresh.restore(peer)
        self.assertEqual([(p.node, e.name) for p, e in fresh.holdersOfRoot("d" * 64)], [("n", "a")])


class UnregisterTests(RegistryTestCase):
    def test_unregister(self):
        """An unregistered peer disappears at once."""
        self.registry.register("n1", "h", 1, [entry("a")])
        self.assertTrue(self.registry.unregister("n1"))
        self.assertEqual(self.registry.active(), [])
        self.assertEqual(self.registry.holders("a"), [])

    def test_unregisterUnknown(self):
        """Unregistering an unknown node reports False."""
        self.assertFalse(self.registry.unregister("n1"))


class ReachabilityTests(RegistryTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.registry.register("n1", "10.0.0.1", 5000, [entry("a.txt")], key="K1")
        self.registry.register("n2", "10.0.0.2", 5000, [entry("a.txt")], key="K2")

    def test_unreachableHidden(self):
        """A peer the relay could not reach is left out of active, holders and search."""
        self.registry.setReachable("n1", False)
        self.assertEqual(self.nodes(), ["n2"])
        self.assertEqual([p.node for p, _ in self.registry.holders("a.txt")], ["n2"])
        self.assertEqual(self.registry.search("a.txt", 10)[0][0].holders, 1)

    def test_registeredUnreachableNeverListed(self):
        """A registration the dial-back did not verify is kept but never handed out."""
        self.registry.register("n3", "10.0.0.3", 5000, [entry("a.txt")], key="K3", reachable=False)
        self.assertEqual(self.nodes(), ["n1", "n2"])
        self.assertEqual(self.registry.get("n3").reachable, False)

    def test_unreachableKeptForPersistence(self):
        """An unreachable peer is still in all() until it expires."""
        self.registry.setReachable("n1", False)
        self.assertEqual({p.node for p in self.registry.all()}, {"n1", "n2"})

    def test_reachableAgain(self):
        """A peer found reachable again is handed out again."""
        self.registry.setReachable("n1", False)
        self.registry.setReachable("n1", True)
        self.assertEqual(self.nodes(), ["n1", "n2"])

    def test_heartbeatDoesNotUnhide(self):
        """A heartbeat extends an unreachable peer but does not list it: only a check can."""
        self.registry.setReachable("n1", False)
        self.assertIsNotNone(self.registry.refresh("n1"))
        self.assertEqual(self.nodes(), ["n2"])

    def test_at(self):
        """at() finds the live entries on exactly one host:port, listed or not."""
        self.registry.setReachable("n1", False)
        self.assertEqual([p.node for p in self.registry.at("10.0.0.1", 5000)], ["n1"])
        self.assertEqual(self.registry.at("10.0.0.1", 5001), [])


class OwnershipTests(RegistryTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.registry.register("n1", "10.0.0.1", 5000, [entry("a.txt")], key="K1")

    def test_otherKeySameIdRefused(self):
        """A registration under a live node's id with another key is refused; the entry stays."""
        self.assertRaises(ValueError, self.registry.register, "n1", "10.6.6.6", 1, [], key="evil")
        self.assertEqual(self.registry.get("n1").host, "10.0.0.1")

    def test_unverifiedTakeoverRefused(self):
        """An unverified newcomer cannot take the address of a live verified node."""
        self.assertRaises(
            AddressTaken, self.registry.register, "n2", "10.0.0.1", 5000, [], key="K2", reachable=False
        )
        self.assertEqual(self.nodes(), ["n1"])

    def test_verifiedTakeoverReplaces(self):
        """A newcomer the relay reached at that address replaces the old entry there."""
        self.registry.register("n2", "10.0.0.1", 5000, [], key="K2", reachable=True)
        self.assertEqual(self.nodes(), ["n2"])
        self.assertIsNone(self.registry.get("n1"))

    def test_unverifiedBesideUnverified(self):
        """An unverified newcomer beside an unverified entry leaves it alone (neither is listed)."""
        self.registry.setReachable("n1", False)
        self.registry.register("n2", "10.0.0.1", 5000, [], key="K2", reachable=False)
        self.assertEqual({p.node for p in self.registry.all()}, {"n1", "n2"})


class CapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock.seconds, TTL, maxPerSource=2, maxTotal=3)

    def fill(self, source: str, *nodes: str) -> None:
        for node in nodes:
            self.registry.register(node, source, len(self.registry.all()) + 1, [], source=source)

    def test_perSource(self):
        """A source holding maxPerSource live registrations cannot add another."""
        self.fill("10.0.0.1", "a", "b")
        self.assertIn("2 registrations from 10.0.0.1", self.registry.room("c", "10.0.0.1"))
        self.assertRaises(RegistryFull, self.fill, "10.0.0.1", "c")
        self.assertIsNone(self.registry.room("c", "10.0.0.2"))

    def test_reregisterAlwaysFits(self):
        """A live node registering again is never over a cap."""
        self.fill("10.0.0.1", "a", "b")
        self.assertIsNone(self.registry.room("a", "10.0.0.1"))
        self.fill("10.0.0.1", "a")

    def test_total(self):
        """The relay as a whole holds at most maxTotal live registrations."""
        self.fill("10.0.0.1", "a", "b")
        self.fill("10.0.0.2", "c")
        self.assertIn("3 registrations", self.registry.room("d", "10.0.0.3"))

    def test_expiredDoNotCount(self):
        """Expired registrations, swept or not, free their place."""
        self.fill("10.0.0.1", "a", "b")
        self.clock.advance(TTL)
        self.assertIsNone(self.registry.room("c", "10.0.0.1"))

    def test_unregisterFrees(self):
        """An unregistered node frees its source's place at once."""
        self.fill("10.0.0.1", "a", "b")
        self.registry.unregister("a")
        self.assertIsNone(self.registry.room("c", "10.0.0.1"))


class HoldersTests(RegistryTestCase):
    def test_holders(self):
        """holders() lists every active peer with the name, with its entry, oldest first."""
        self.registry.register("n1", "h1", 1, [entry("a.txt", 3, "b")])
        self.registry.register("n2", "h2", 1, [entry("b.txt")])
        self.registry.register("n3", "h3", 1, [entry("a.txt", 4, "c")])
        found = sorted((p.node, e.size) for p, e in self.registry.holders("a.txt"))
        self.assertEqual(found, [("n1", 3), ("n3", 4)])

    def test_holdersExactName(self):
        """holders() matches whole names only, case-sensitively."""
        self.registry.register("n1", "h1", 1, [entry("dir/a.txt"), entry("A.TXT")])
        self.assertEqual(self.registry.holders("a.txt"), [])


class RootTests(RegistryTestCase):
    """Each holder's manifest root, kept in the compact file table."""

    def test_holdersCarryRoot(self):
        """holders() gives each holder's entry with the root and piece size it registered."""
        self.registry.register("n1", "h1", 1, [FileEntry("f", 5, "a" * 64, root="b" * 64)])
        self.registry.register("n2", "h2", 1, [FileEntry("f", 5, "a" * 64, root="c" * 64, pieceSize=16384)])
        self.registry.register("n3", "h3", 1, [FileEntry("f", 5, "a" * 64)])
        found = {p.node: (e.root, e.pieceSize) for p, e in self.registry.holders("f")}
        self.assertEqual(
            found,
            {"n1": ("b" * 64, PIECE_SIZE), "n2": ("c" * 64, 16384), "n3": (None, PIECE_SIZE)},
        )

    def test_mixedTable(self):
        """In one peer's table, files with and without a root keep theirs apart."""
        files = [FileEntry("x", 1, "a" * 64), FileEntry("y", 2, "b" * 64, root="d" * 64)]
        table = FileTable.of(files)
        self.assertEqual(list(table.values()), files)

    def test_noRootsNoBytes(self):
        """A table of files without roots spends nothing on them."""
        table = FileTable.of([FileEntry("x", 1, "a" * 64), FileEntry("y", 2, "b" * 64)])
        self.assertEqual((table.roots, table.pieces), (b"", None))

    def test_searchIgnoresRoot(self):
        """SEARCH counts holders by size and SHA-256, whatever piece size they hashed with."""
        self.registry.register("n1", "h1", 1, [FileEntry("f", 5, "a" * 64, root="b" * 64)])
        self.registry.register("n2", "h2", 1, [FileEntry("f", 5, "a" * 64, root="c" * 64, pieceSize=16384)])
        hits, _ = self.registry.search("f", 10)
        self.assertEqual([h.holders for h in hits], [2])


class HolderOrderTests(SynchronousTestCase):
    """WHOHAS's list: who comes first, and how many."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock.seconds, TTL, maxHolders=3, rng=random.Random(7))

    def holders(self, name: str = "a") -> list[str]:
        return [p.node for p, _ in self.registry.holders(name)]

    def test_reregisterUpdatesHoldersEntry(self):
        """A holder registering again with the name is listed once, with its new entry."""
        for node in ["a", "b"]:
            self.registry.register(node, node, 1, [entry("a")])
        self.registry.register("a", "a", 1, [entry("x"), entry("a", 2)])
        self.assertEqual(sorted(self.holders()), ["a", "b"])
        self.assertEqual({p.node: e.size for p, e in self.registry.holders("a")}["a"], 2)

    def test_capped(self):
        """Never more holders than the cap, all of them distinct live holders."""
        for i in range(10):
            self.registry.register(f"n{i}", f"h{i}", 1, [entry("a")])
        found = self.holders()
        self.assertEqual(len(found), 3)
        self.assertEqual(len(set(found)), 3)
        self.assertLessEqual(set(found), {f"n{i}" for i in range(10)})

    def test_cappedSampleSpreads(self):
        """Over the cap, repeated answers name different holders (a random sample)."""
        for i in range(10):
            self.registry.register(f"n{i:02}", f"h{i}", 1, [entry("a")])
        answers = [self.holders() for _ in range(20)]
        self.assertGreater(len({n for a in answers for n in a}), 3)

    def test_cappedSkipsHidden(self):
        """Hidden or expired holders never fill the cap while listed ones are left out."""
        for i in range(6):
            self.registry.register(f"n{i}", f"h{i}", 1, [entry("a")], reachable=i >= 4)
        for _ in range(10):
            self.assertEqual(sorted(self.holders()), ["n4", "n5"])

    def test_explicitLimit(self):
        """holders() takes a smaller limit."""
        for node in ["a", "b"]:
            self.registry.register(node, node, 1, [entry("a")])
        self.assertEqual(len(self.registry.holders("a", 1)), 1)


class TierTests(SynchronousTestCase):
    """
    Listings in tiers: direct peers, then direct ones with a missed probe,
    then firewalled ones holding a control connection; random within a tier.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock.seconds, TTL, rng=random.Random(3))

    def add(self, node: str, tier: int) -> None:
        self.registry.register(node, node, 1, [entry("a")], reachable=tier < 2)
        if tier == 1:
            self.registry.missed(node)
        if tier == 2:
            self.registry.setControl(node, True)

    def test_listedNeedsReachOrControl(self):
        """A peer is listed if the relay reached it, or while it holds a control connection."""
        peer = self.registry.register("n", "h", 1, [], reachable=False)
        self.assertFalse(peer.listed)
        self.registry.setControl("n", True)
        self.assertTrue(peer.listed)
        self.registry.setControl("n", False)
        self.assertFalse(peer.listed)
        self.registry.setReachable("n", True)
        self.assertTrue(peer.listed)

    def test_reach(self):
        """Peer.reach is direct for a reachable peer, firewalled otherwise."""
        self.assertEqual(self.registry.register("d", "d", 1, []).reach, "direct")
        self.assertEqual(self.registry.register("f", "f", 1, [], reachable=False).reach, "firewalled")

    def test_firewalledWithControlListed(self):
        """A firewalled peer with a control connection is handed out: PEERS, WHOHAS, SEARCH, figures."""
        self.add("f", 2)
        self.assertEqual([p.node for p in self.registry.active()], ["f"])
        self.assertEqual([p.node for p, _ in self.registry.holders("a")], ["f"])
        self.assertEqual(self.registry.search("a", 10)[0][0].holders, 1)
        self.assertEqual(self.registry.figures().peers, 1)

    def test_firewalledWithoutControlHidden(self):
        """A firewalled peer whose control connection closed is not handed out, but kept."""
        self.add("f", 2)
        self.registry.setControl("f", False)
        self.assertEqual(self.registry.active(), [])
        self.assertEqual(self.registry.holders("a"), [])
        self.assertEqual(self.registry.search("a", 10), ([], False))
        self.assertEqual([p.node for p in self.registry.all()], ["f"])

    def test_tiersInOrder(self):
        """Direct peers come first, suspect ones next, firewalled ones last, whatever the registration order."""
        for node, tier in [("f1", 2), ("s1", 1), ("d1", 0), ("f2", 2), ("d2", 0), ("s2", 1)]:
            self.add(node, tier)
        for found in ([p.node for p in self.registry.active()], [p.node for p, _ in self.registry.holders("a")]):
            self.assertEqual([n[0] for n in found], ["d", "d", "s", "s", "f", "f"])

    def test_rootTiersInOrder(self):
        """Holders found by root come in the same tiers, whatever name each holds the bytes under."""
        root = "d" * 64
        for node, tier in [("f1", 2), ("s1", 1), ("d1", 0), ("f2", 2), ("d2", 0), ("s2", 1)]:
            self.registry.register(node, node, 1, [FileEntry(f"{node}.bin", 1, "a" * 64, root=root)], reachable=tier < 2)
            if tier == 1:
                self.registry.missed(node)
            if tier == 2:
                self.registry.setControl(node, True)
        found = self.registry.holdersOfRoot(root)
        self.assertEqual([p.node[0] for p, _ in found], ["d", "d", "s", "s", "f", "f"])
        self.assertEqual({e.name for _, e in found}, {f"{p.node}.bin" for p, _ in found})

    def test_rootCappedSample(self):
        """Over the holder cap, holders of a root are a random sample that varies between answers."""
        registry = Registry(self.clock.seconds, TTL, maxHolders=3, rng=random.Random(5))
        for i in range(12):
            registry.register(f"d{i}", f"d{i}", 1, [FileEntry(f"n{i}", 1, "a" * 64, root="d" * 64)])
        answers = {frozenset(p.node for p, _ in registry.holdersOfRoot("d" * 64)) for _ in range(10)}
        self.assertTrue(all(len(a) == 3 for a in answers))
        self.assertGreater(len(answers), 1)

    def test_randomWithinTier(self):
        """Within a tier the order varies between answers, so clients do not all pick the same peer."""
        for i in range(6):
            self.add(f"d{i}", 0)
        orders = {tuple(p.node for p, _ in self.registry.holders("a")) for _ in range(10)}
        self.assertGreater(len(orders), 1)

    def test_seededOrderRepeats(self):
        """The order comes from the registry's rng: the same seed gives the same answers."""
        answers = []
        for _ in range(2):
            registry = Registry(self.clock.seconds, TTL, rng=random.Random(11))
            for i in range(6):
                registry.register(f"d{i}", f"d{i}", 1, [entry("a")])
            answers.append([[p.node for p in registry.active()] for _ in range(3)])
        self.assertEqual(answers[0], answers[1])

    def test_cappedThenOrdered(self):
        """Over the holder cap the sample is taken first, then put in tiers."""
        registry = Registry(self.clock.seconds, TTL, maxHolders=4, rng=random.Random(5))
        for i in range(8):
            registry.register(f"f{i}", f"f{i}", 1, [entry("a")], reachable=False)
            registry.setControl(f"f{i}", True)
        registry.register("d", "d", 1, [entry("a")])
        for _ in range(10):
            found = [p.node for p, _ in registry.holders("a")]
            self.assertEqual(len(found), 4)
            if "d" in found:
                self.assertEqual(found[0], "d")

    def test_successClearsMisses(self):
        """A successful check forgets the missed probe: back in the first tier."""
        self.add("s", 1)
        self.assertEqual(self.registry.get("s").tier, 1)
        self.registry.setReachable("s", True)
        self.assertEqual((self.registry.get("s").misses, self.registry.get("s").tier), (0, 0))

    def test_directSince(self):
        """directSince is when the peer was verified direct, reset when it turns firewalled."""
        self.clock.advance(5)
        self.assertEqual(self.registry.register("n", "h", 1, []).directSince, 5)
        self.clock.advance(5)
        self.registry.setReachable("n", False)
        self.assertIsNone(self.registry.get("n").directSince)
        self.clock.advance(5)
        self.registry.setReachable("n", True)
        self.assertEqual(self.registry.get("n").directSince, 15)

    def test_reregisterKeepsDirectSinceAndControl(self):
        """Re-registering at the same address keeps the run of successes and the control flag."""
        self.registry.register("n", "h", 1, [])
        self.registry.setControl("n", True)
        self.clock.advance(80)
        peer = self.registry.register("n", "h", 1, [entry("x")])
        self.assertEqual((peer.directSince, peer.control), (0, True))

    def test_restoreHasNoControl(self):
        """A peer restored from saved state holds no control connection."""
        peer = Peer("n", "h", 1, {}, expires=TTL, reachable=False, control=True)
        self.registry.restore(peer)
        self.assertFalse(self.registry.get("n").control)
        self.assertEqual(self.registry.active(), [])


class IndexTests(RegistryTestCase):
    """The indexes stay exact as entries come and go."""

    def test_namesForgotten(self):
        """A name nobody holds any more leaves the index."""
        self.registry.register("n1", "h", 1, [entry("a"), entry("b")])
        self.registry.register("n1", "h", 1, [entry("b")])
        self.assertEqual(self.registry.names, 1)
        self.registry.unregister("n1")
        self.assertEqual(self.registry.names, 0)

    def test_namesShared(self):
        """A name held by many peers is one string object."""
        self.registry.register("n1", "h1", 1, [FileEntry("".join(["sha", "red"]), 1, "a" * 64)])
        self.registry.register("n2", "h2", 1, [FileEntry("".join(["sh", "ared"]), 1, "a" * 64)])
        [first] = self.registry.get("n1").files.names
        [second] = self.registry.get("n2").files.names
        self.assertIs(first, second)

    def test_digestsAsBytes(self):
        """A peer's digests are kept as raw bytes, and read back as hex."""
        peer = self.registry.register("n1", "h", 1, [entry("a", 1, "b"), entry("c", 2, "d")])
        self.assertEqual(peer.files.digests, bytes.fromhex("b" * 64 + "d" * 64))
        self.assertEqual(peer.files["c"], entry("c", 2, "d"))

    def test_duplicateNameKeepsLast(self):
        """A name announced twice in one registration holds its last entry."""
        peer = self.registry.register("n1", "h", 1, [entry("a", 1), entry("a", 2)])
        self.assertEqual(dict(peer.files), {"a": entry("a", 2)})

    def test_hugeSize(self):
        """A size beyond 64 bits still fits (sizes fall back to a tuple)."""
        peer = self.registry.register("n1", "h", 1, [entry("a", 2**64)])
        self.assertEqual(peer.files["a"].size, 2**64)

    def test_missingFile(self):
        """Looking up a name a peer does not hold is a KeyError."""
        peer = self.registry.register("n1", "h", 1, [entry("a")])
        self.assertRaises(KeyError, peer.files.__getitem__, "b")
        self.assertNotIn("b", peer.files)

    def test_tableEqualsMapping(self):
        """A FileTable equals the dict of the same entries."""
        table = FileTable.of([entry("a"), entry("b", 2)])
        self.assertEqual(table, {"a": entry("a"), "b": entry("b", 2)})

    def test_expiryHeapSkipsRefreshed(self):
        """A sweep drops only peers whose latest lifetime passed, however often they beat."""
        self.registry.register("n1", "h1", 1, [])
        self.registry.register("n2", "h2", 1, [])
        for _ in range(5):
            self.clock.advance(TTL / 2)
            self.registry.refresh("n1")
        self.assertEqual([p.node for p in self.registry.expire()], ["n2"])
        self.assertLessEqual(len(self.registry._expiry), 3)
        self.assertEqual(self.nodes(), ["n1"])

    def test_addressIndexFollowsMoves(self):
        """A node that re-registers elsewhere is no longer found at its old address."""
        self.registry.register("n1", "h1", 1, [])
        self.registry.register("n1", "h2", 1, [])
        self.assertEqual(self.registry.at("h1", 1), [])
        self.assertEqual([p.node for p in self.registry.at("h2", 1)], ["n1"])

    def test_totalCapSweepsExpired(self):
        """At the total cap, expired entries not yet swept make room."""
        registry = Registry(self.clock.seconds, TTL, maxTotal=1)
        registry.register("n1", "h1", 1, [])
        self.clock.advance(TTL)
        registry.register("n2", "h2", 1, [])
        self.assertEqual([p.node for p in registry.active()], ["n2"])


class RecordingListener(Listener):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def upserted(self, peer: Peer) -> None:
        self.events.append(("upserted", peer.node))

    def refreshed(self, peer: Peer) -> None:
        self.events.append(("refreshed", peer.node))

    def removed(self, node: str) -> None:
        self.events.append(("removed", node))


class ListenerTests(RegistryTestCase):
    """What persistence hears: one event per change, none for a read."""

    def setUp(self) -> None:
        super().setUp()
        self.heard = RecordingListener()
        self.registry.listener = self.heard

    def test_register(self):
        """A registration is an upsert."""
        self.registry.register("n1", "h", 1, [])
        self.assertEqual(self.heard.events, [("upserted", "n1")])

    def test_heartbeat(self):
        """A heartbeat is a refresh, nothing more."""
        self.registry.register("n1", "h", 1, [])
        self.registry.refresh("n1")
        self.assertEqual(self.heard.events[1:], [("refreshed", "n1")])

    def test_unregisterAndExpiry(self):
        """Unregistering and expiry are removals."""
        self.registry.register("n1", "h", 1, [])
        self.registry.register("n2", "h2", 1, [])
        self.registry.unregister("n1")
        self.clock.advance(TTL)
        self.registry.expire()
        self.assertEqual(self.heard.events[2:], [("removed", "n1"), ("removed", "n2")])

    def test_takeover(self):
        """A verified takeover removes the old entry and upserts the new."""
        self.registry.register("n1", "h", 1, [])
        self.registry.register("n2", "h", 1, [])
        self.assertEqual(self.heard.events[1:], [("removed", "n1"), ("upserted", "n2")])

    def test_reachability(self):
        """A change of reachability is an upsert; no change is nothing."""
        self.registry.register("n1", "h", 1, [])
        self.registry.setReachable("n1", True)
        self.registry.setReachable("n1", False)
        self.assertEqual(self.heard.events[1:], [("upserted", "n1")])

    def test_reads(self):
        """Lookups and searches change nothing."""
        self.registry.register("n1", "h", 1, [entry("a")])
        self.registry.holders("a")
        self.registry.search("a", 10)
        self.registry.active()
        self.assertEqual(len(self.heard.events), 1)


class SearchTests(RegistryTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.registry.register(
            "n1", "h1", 1, [entry("music/Song One.mp3"), entry("notes.txt"), entry("pics/cat.jpg")]
        )
        self.registry.register("n2", "h2", 1, [entry("notes.txt"), entry("other.TXT", 9, "d")])

    def names(self, pattern: str, limit: int = 100) -> list[str]:
        return [h.name for h in self.registry.search(pattern, limit)[0]]

    def test_substring(self):
        """A plain pattern matches anywhere in the name, ignoring case."""
        self.assertEqual(self.names("song"), ["music/Song One.mp3"])
        self.assertEqual(self.names("TXT"), ["notes.txt", "other.TXT"])

    def test_emptyMatchesAll(self):
        """An empty pattern lists every file."""
        self.assertEqual(len(self.names("")), 4)

    def test_globBasename(self):
        """A glob matches the base name of nested files."""
        self.assertEqual(self.names("*.jpg"), ["pics/cat.jpg"])

    def test_globFullPath(self):
        """A glob also matches the whole path."""
        self.assertEqual(self.names("music/*"), ["music/Song One.mp3"])

    def test_globIsAnchored(self):
        """A glob matches whole names, unlike a substring."""
        self.assertEqual(self.names("note?"), [])
        self.assertEqual(self.names("note?.txt"), ["notes.txt"])

    def test_holdersCounted(self):
        """One hit per version, with how many peers hold it."""
        [hit] = self.registry.search("notes", 10)[0]
        self.assertEqual(hit, SearchHit("notes.txt", 1, "a" * 64, 2))

    def test_versionsSeparate(self):
        """The same name with different contents is two hits."""
        self.registry.register("n3", "h3", 1, [entry("notes.txt", 2, "e")])
        hits = self.registry.search("notes", 10)[0]
        self.assertEqual([(h.size, h.holders) for h in hits], [(1, 2), (2, 1)])

    def test_cap(self):
        """Results are capped at limit and flagged truncated."""
        hits, truncated = self.registry.search("", 2)
        self.assertEqual([h.name for h in hits], ["music/Song One.mp3", "notes.txt"])
        self.assertTrue(truncated)

    def test_exactlyLimitNotTruncated(self):
        """Exactly limit results is not truncated."""
        hits, truncated = self.registry.search("", 4)
        self.assertEqual((len(hits), truncated), (4, False))

    def test_noMatch(self):
        """No match is an empty, untruncated answer."""
        self.assertEqual(self.registry.search("zzz", 10), ([], False))

    def test_globSlashInPattern(self):
        """A glob with a slash is matched against the whole path, not a later part of it."""
        self.registry.register("n3", "h3", 1, [entry("a/b/c")])
        self.assertEqual(self.names("b/*"), [])
        self.assertEqual(self.names("a/*/c"), ["a/b/c"])


class SearchStepTests(RegistryTestCase):
    """A search over many names runs in steps the relay can interleave."""

    def setUp(self) -> None:
        super().setUp()
        self.count = SEARCH_STEP * 3
        self.registry.register("n1", "h1", 1, [entry(f"f{i:05}") for i in range(self.count)])

    def drive(self, steps):
        taken = 0
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return taken, done.value
            taken += 1

    def test_yields(self):
        """Matching many names takes several steps, one more per SEARCH_STEP names."""
        taken, (hits, truncated) = self.drive(self.registry.searchSteps("f", 10))
        self.assertEqual(taken, 2)
        self.assertEqual(([h.name for h in hits][:2], truncated), (["f00000", "f00001"], True))

    def test_sortedAcrossSteps(self):
        """Hits are sorted by name across every step's share of the names."""
        self.registry.register("n2", "h2", 1, [entry("e-first"), entry("g-last")])
        hits, _ = self.registry.search("", 3)
        self.assertEqual([h.name for h in hits], ["e-first", "f00000", "f00001"])

    def test_fewNamesOneStep(self):
        """A search over at most SEARCH_STEP names is done without yielding."""
        registry = Registry(self.clock.seconds, TTL)
        registry.register("n1", "h1", 1, [entry(f"g{i}") for i in range(SEARCH_STEP)])
        taken, (hits, _) = self.drive(registry.searchSteps("g", 10))
        self.assertEqual((taken, len(hits)), (0, 10))

    def test_changesBetweenSteps(self):
        """A peer gone between two steps is not counted; the search still ends."""
        self.registry.register("n2", "h2", 1, [entry("f00001")])
        steps = self.registry.searchSteps("f0000", 5)
        next(steps)
        self.registry.unregister("n2")
        _, (hits, _) = self.drive(steps)
        self.assertEqual([h.holders for h in hits], [1] * 5)


class StateStoreTests(SynchronousTestCase):
    """The registry on disk: what a restarted relay loads back."""

    def setUp(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        self.path = directory / "state.sqlite"
        self.store = StateStore(self.path)

    def peer(self, node: str = "n1", udp: int | None = None) -> Peer:
        files = {e.name: e for e in [entry("a b.txt", 3), entry("dir/c", 7, "b")]}
        return Peer(
            node, "10.0.0.1", 5000, files, expires=1234.5, udp=udp,
            key="K" + node, reachable=node != "n2", source="10.0.0.9",
        )

    def asides(self) -> list[str]:
        return sorted(p.name for p in self.path.parent.iterdir() if p != self.path)

    def test_roundTrip(self):
        """Saved peers load back equal: files, UDP port, key, reachability and source included."""
        peers = [self.peer("n1"), self.peer("n2", udp=5001)]
        self.store.save(peers)
        self.assertEqual(sorted(StateStore(self.path).load(), key=lambda p: p.node), peers)

    def test_controlNotPersisted(self):
        """A control connection is never saved: the peer loads back without one."""
        peer = self.peer("n2")
        peer.control = True
        self.store.save([peer])
        [loaded] = StateStore(self.path).load()
        self.assertFalse(loaded.control)

    def test_saveReplaces(self):
        """Each save is the whole snapshot: peers not saved again are gone."""
        self.store.save([self.peer("n1")])
        self.store.save([self.peer("n2")])
        self.assertEqual([p.node for p in self.store.load()], ["n2"])

    def test_missing(self):
        """No file yet is an empty registry, and nothing is created by loading."""
        self.assertEqual(self.store.load(), [])
        self.assertFalse(self.path.exists())

    def test_savedVersion(self):
        """A saved file is marked with this code's schema version."""
        self.store.save([])
        with closing(sqlite3.connect(self.path)) as db:
            [(version,)] = db.execute("PRAGMA user_version").fetchall()
        self.assertEqual(version, SCHEMA_VERSION)

    def test_corrupt(self):
        """A file that is not SQLite is moved aside with a warning; the relay starts empty."""
        self.path.write_bytes(b"this is not sqlite" * 100)
        with capturedLogs() as events:
            self.assertEqual(self.store.load(), [])
        [aside] = self.asides()
        self.assertTrue(aside.startswith("state.sqlite.corrupt-"), aside)
        self.assertFalse(self.path.exists())
        self.assertIn("moved to", formatEvent(events[-1]))

    def test_newerSchema(self):
        """
        A file a newer relay wrote is moved aside untouched, not read under
        an older schema (nor re-marked as this version).
        """
        self.store.save([self.peer("n1")])
        with closing(sqlite3.connect(self.path)) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        with capturedLogs() as events:
            self.assertEqual(self.store.load(), [])
        [aside] = self.asides()
        self.assertTrue(aside.startswith("state.sqlite.newer-"), aside)
        with closing(sqlite3.connect(self.path.parent / aside)) as db:
            [(version,)] = db.execute("PRAGMA user_version").fetchall()
        self.assertEqual(version, SCHEMA_VERSION + 1)
        self.assertIn("newer", formatEvent(events[-1]))

    def test_neverSavesOverNewerSchema(self):
        """Saving refuses to overwrite a file a newer relay wrote."""
        with closing(sqlite3.connect(self.path)) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        self.assertRaises(NewerSchema, self.store.save, [self.peer()])

    def test_olderSchemaDropped(self):
        """
        A schema-1 file (keyless entries nobody could prove again) loads as
        empty with a warning, and is usable afterwards.
        """
        with closing(sqlite3.connect(self.path)) as db:
            db.execute(
                "CREATE TABLE peers (node TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL,"
                " udp INTEGER, expires REAL NOT NULL, files TEXT NOT NULL)"
            )
            db.execute("INSERT INTO peers VALUES ('old', 'h', 1, NULL, 9e9, '[]')")
            db.execute("PRAGMA user_version = 1")
            db.commit()
        with capturedLogs() as events:
            self.assertEqual(self.store.load(), [])
        self.assertIn("older relay", formatEvent(events[-1]))
        self.store.save([self.peer("n1")])
        self.assertEqual([p.node for p in self.store.load()], ["n1"])


    def test_rootsRoundTrip(self):
        """Roots and piece sizes load back as saved; files without a root stay without."""
        files = [
            FileEntry("plain", 3, "a" * 64),
            FileEntry("pieces", 5, "b" * 64, root="c" * 64),
            FileEntry("small", 9, "d" * 64, root="e" * 64, pieceSize=16384),
        ]
        peer = Peer("n1", "10.0.0.1", 5000, {e.name: e for e in files}, expires=1.0, key="K")
        self.store.save([peer])
        [loaded] = StateStore(self.path).load()
        self.assertEqual(sorted(loaded.files.values(), key=lambda e: e.name), sorted(files, key=lambda e: e.name))

    def test_schema3Migrated(self):
        """
        A schema-3 file (files without roots) loads as it is and is marked
        schema 4 from then on.
        """
        with closing(sqlite3.connect(self.path)) as db:
            db.execute(
                "CREATE TABLE peers (node TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL,"
                " udp INTEGER, expires REAL NOT NULL, files TEXT NOT NULL,"
                " key TEXT, reachable INTEGER NOT NULL, source TEXT, tls INTEGER)"
            )
            db.execute(
                "INSERT INTO peers VALUES ('old', 'h', 1, NULL, 9e9, ?, 'K', 1, NULL, NULL)",
                ('[["a.txt", 3, "' + "a" * 64 + '"]]',),
            )
            db.execute("PRAGMA user_version = 3")
            db.commit()
        [peer] = self.store.load()
        self.assertEqual(dict(peer.files), {"a.txt": FileEntry("a.txt", 3, "a" * 64)})
        with closing(sqlite3.connect(self.path)) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 4)


class StateWriterTests(SynchronousTestCase):
    """Changes written one by one, on the writer's own thread."""

    def setUp(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        self.path = directory / "state.sqlite"
        self.store = StateStore(self.path)
        self.writer = StateWriter(self.store)
        self.addCleanup(self.writer.close)

    def peer(self, node: str = "n1", expires: float = 100.0) -> Peer:
        return Peer(node, "10.0.0.1", 5000, {"a": entry("a", 3)}, expires=expires, key="K" + node)

    def written(self) -> list[Peer]:
        self.writer.close()
        return StateStore(self.path).load()

    def test_upsert(self):
        """A registration is written as one row, equal when loaded."""
        peer = self.peer()
        self.writer.start()
        self.writer.upserted(peer)
        self.assertEqual(self.written(), [peer])

    def test_refreshWritesLifetimeOnly(self):
        """A heartbeat updates the row's lifetime and leaves its file list alone."""
        peer = self.peer()
        self.store.save([peer])
        with closing(sqlite3.connect(self.path)) as db, db:
            db.execute("UPDATE peers SET files = '[]'")
        peer.expires = 200.0
        self.writer.start()
        self.writer.refreshed(peer)
        [loaded] = self.written()
        self.assertEqual((loaded.expires, dict(loaded.files)), (200.0, {}))

    def test_delete(self):
        """A removal deletes the row and nothing else."""
        self.store.save([self.peer("n1"), self.peer("n2")])
        self.writer.start()
        self.writer.removed("n1")
        self.assertEqual([p.node for p in self.written()], ["n2"])

    def test_lastChangeWins(self):
        """Several changes of one node in a batch leave its last state."""
        first, second = self.peer(), self.peer()
        second.host = "10.0.0.2"
        self.writer.upserted(first)
        self.writer.removed("n1")
        self.writer.upserted(second)
        self.writer.refreshed(second)
        self.writer.start()
        self.assertEqual(self.written(), [second])

    def test_batched(self):
        """Changes queued together are committed in one transaction."""
        for i in range(100):
            self.writer.upserted(self.peer(f"n{i}"))
        self.writer.start()
        self.assertEqual(len(self.written()), 100)
        self.assertEqual(self.writer.commits, 1)

    def test_orderKept(self):
        """Rows load in the order they were first written, replaced ones in place."""
        self.writer.start()
        for node in ["c", "a", "b"]:
            self.writer.upserted(self.peer(node))
        self.writer.close()
        self.writer = StateWriter(self.store)
        self.writer.start()
        self.writer.upserted(self.peer("c", expires=300.0))
        self.assertEqual([p.node for p in self.written()], ["c", "a", "b"])

    def test_neverWritesOverNewerSchema(self):
        """A file a newer relay wrote is left untouched, with a warning."""
        with closing(sqlite3.connect(self.path)) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        with capturedLogs() as events:
            self.writer.start()
            self.writer.upserted(self.peer())
            self.writer.close()
        self.assertIn("not saved", formatEvent(events[-1]))
        with closing(sqlite3.connect(self.path)) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION + 1)
            self.assertEqual(db.execute("SELECT name FROM sqlite_master").fetchall(), [])

    def test_closeWithoutStart(self):
        """Closing a writer that never started does nothing."""
        self.writer.close()


class RelayServiceStateTests(SynchronousTestCase):
    """The relay service with --state: loaded at start, written as it changes."""

    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        self.path = directory / "state.sqlite"
        self.reactor = MemoryReactorClock()

    def service(self):
        from p2prelay.relay.service import RelayService

        service = RelayService(self.reactor, "tcp:0:interface=127.0.0.1", TTL, str(self.path))
        service.startService()
        return service

    def test_changesWritten(self):
        """Registrations and unregistrations reach the file as they happen."""
        service = self.service()
        service.registry.register("n1", "10.0.0.1", 5000, [entry("a")], key="K1")
        service.registry.register("n2", "10.0.0.2", 5000, [entry("b")], key="K2")
        service.registry.unregister("n1")
        service.stopService()
        self.assertEqual([p.node for p in StateStore(self.path).load()], ["n2"])

    def test_restartAnswersAtOnce(self):
        """A restarted relay holds the saved live peers as soon as it has started."""
        service = self.service()
        service.registry.register("n1", "10.0.0.1", 5000, [entry("a")], key="K1")
        service.stopService()
        again = self.service()
        self.addCleanup(again.stopService)
        self.assertEqual([p.node for p, _ in again.registry.holders("a")], ["n1"])

    def test_expiredRowsDropped(self):
        """Rows whose lifetime passed while the relay was down are deleted at start."""
        service = self.service()
        service.registry.register("n1", "10.0.0.1", 5000, [], key="K1")
        service.stopService()
        self.reactor.advance(TTL)
        again = self.service()
        again.stopService()
        self.assertEqual(StateStore(self.path).load(), [])

    def test_heartbeatIsNoRewrite(self):
        """A heartbeat rewrites no row's file list (only its lifetime)."""
        service = self.service()
        service.registry.register("n1", "10.0.0.1", 5000, [entry("a")], key="K1")
        service.writer.close()
        with closing(sqlite3.connect(self.path)) as db, db:
            db.execute("UPDATE peers SET files = '[]'")
        service.writer.start()
        self.reactor.advance(10)
        service.registry.refresh("n1")
        service.stopService()
        [peer] = StateStore(self.path).load()
        self.assertEqual((peer.expires, len(peer.files)), (10 + TTL, 0))
