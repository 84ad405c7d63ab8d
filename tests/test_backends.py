"""
The registry's backends: one suite of behaviours run against every backend
(in memory, and a real ``redis-server``), then what only Redis has (TTLs,
the shared epoch, lost and recovered connections) and ``--registry`` URLs.

Time is a ``task.Clock`` for both: the Redis tests move Redis's own clock
forward by shortening every key's TTL (and the expiry index's times) by the
same amount, so expiry is tested without waiting.  One test waits for a
real TTL, briefly, to show Redis expires entries by itself.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any, List, Optional

import attrs
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2prelay.relay.backends import redis as redisbackend
from p2prelay.relay.backends.interface import IRegistryBackend, RegistryUnavailable
from p2prelay.relay.backends.memory import MemoryBackend
from p2prelay.relay.backends.url import RedisAddress, RegistryURLError, parse
from p2prelay.relay.registry import AddressTaken, Figures, Peer, Registry, RegistryFull, SearchHit
from p2prelay.wire import FileEntry
from tests import redisserver

TTL = 90.0
ROOT = "d" * 64
OTHER = "e" * 63 + "f"
SHORT = 0.5  # seconds of every Redis deadline in these tests (no answer, or not reachable)


def entry(name: str, size: int = 1, digest: str = "a", root: Optional[str] = None) -> FileEntry:
    return FileEntry(name, size, digest * 64, root=root)


def nodes(peers) -> List[str]:
    return sorted(p.node for p in peers)


class BackendTests:
    """
    What every backend does.  A subclass makes the backend (``make``) and
    moves its time forward (``elapse``).
    """

    clock: Clock

    async def make(self, **options: Any) -> Any:
        raise NotImplementedError

    async def elapse(self, seconds: float) -> None:
        raise NotImplementedError

    async def another(self) -> Any:
        """A second backend on the same registry (another relay's view of it)."""
        raise NotImplementedError

    async def asyncSetUp(self) -> None:
        self.backend = await self.make()

    def setUp(self) -> defer.Deferred:
        self.clock = Clock()
        return defer.ensureDeferred(self.asyncSetUp())

    async def holding(self, name: str, limit: Optional[int] = None) -> List[tuple]:
        return sorted((p.node, e.size) for p, e in await self.backend.holders(name, limit))

    # Register and look up.

    def test_provides(self):
        """The backend provides the registry interface."""
        self.assertTrue(IRegistryBackend.providedBy(self.backend))

    async def test_register(self):
        """A registered peer comes back by id with its address, ports, key, source and files."""
        files = [entry("a.txt", 3, "b"), entry("dir/b.bin", 2**40, "c", root="d" * 64)]
        await self.backend.register("n1", "10.0.0.1", 5000, files, udp=5001, tls=5002, key="K", source="10.9.9.9")
        peer = await self.backend.get("n1")
        self.assertIsInstance(peer, Peer)
        self.assertEqual(
            (peer.node, peer.host, peer.port, peer.udp, peer.tls, peer.key, peer.source, peer.reachable),
            ("n1", "10.0.0.1", 5000, 5001, 5002, "K", "10.9.9.9", True),
        )
        self.assertEqual(dict(peer.files), {e.name: e for e in files})
        self.assertLessEqual(abs(peer.expires - (self.clock.seconds() + TTL)), 1)  # trial's assertAlmostEqual ignores delta

    async def test_registerReturnsPeer(self):
        """register() fires with the peer it recorded."""
        peer = await self.backend.register("n1", "h", 1, [entry("a")])
        self.assertEqual((peer.node, list(peer.files)), ("n1", ["a"]))

    async def test_getUnknown(self):
        """get() of an id never registered is None."""
        self.assertIsNone(await self.backend.get("nobody"))

    async def test_holders(self):
        """holders() lists every listed peer with the name, each with its own entry."""
        await self.backend.register("n1", "h1", 1, [entry("a.txt", 3, "b")])
        await self.backend.register("n2", "h2", 1, [entry("b.txt")])
        await self.backend.register("n3", "h3", 1, [entry("a.txt", 4, "c")])
        found = await self.backend.holders("a.txt")
        self.assertEqual(sorted((p.node, e.size, e.sha256) for p, e in found), [("n1", 3, "b" * 64), ("n3", 4, "c" * 64)])
        self.assertTrue(all(isinstance(p, Peer) and p.files["a.txt"] == e for p, e in found))

    async def test_holdersCarryLayout(self):
        """A holder's entry keeps its manifest root and piece size."""
        await self.backend.register("n1", "h1", 1, [FileEntry("a", 5, "b" * 64, root="c" * 64, pieceSize=1 << 20)])
        [(_, found)] = await self.backend.holders("a")
        self.assertEqual((found.root, found.pieceSize), ("c" * 64, 1 << 20))

    async def test_holdersExactName(self):
        """holders() matches whole names only, case-sensitively."""
        await self.backend.register("n1", "h1", 1, [entry("a.txt")])
        self.assertEqual(await self.holding("A.txt"), [])
        self.assertEqual(await self.holding("a"), [])

    async def test_holdersLimit(self):
        """holders() lists at most ``limit`` holders, every one of them a holder."""
        for i in range(10):
            await self.backend.register(f"n{i}", f"h{i}", 1, [entry("a")])
        found = await self.holding("a", 4)
        self.assertEqual(len(found), 4)
        self.assertTrue({n for n, _ in found} <= {f"n{i}" for i in range(10)})
        self.assertEqual(len(await self.holding("a", 10)), 10)

    async def test_holdersDefaultLimit(self):
        """Without a limit, holders() lists at most maxHolders."""
        self.backend = await self.make(maxHolders=3)
        for i in range(5):
            await self.backend.register(f"n{i}", f"h{i}", 1, [entry("a")])
        self.assertEqual(len(await self.holding("a")), 3)

    # The index per manifest root: one content under any name.

    async def rooted(self, root: str, limit: Optional[int] = None) -> List[tuple]:
        return sorted((p.node, e.name, e.size) for p, e in await self.backend.holdersOfRoot(root, limit))

    async def test_rootUnderTwoNames(self):
        """Holders of one root under two names are both found by the root, each with its own name and entry."""
        await self.backend.register("n1", "h1", 1, [entry("a.iso", 9, "b", root=ROOT)])
        await self.backend.register("n2", "h2", 1, [entry("copy/b.iso", 9, "b", root=ROOT), entry("x", root=OTHER)])
        await self.backend.register("n3", "h3", 1, [entry("a.iso", 9, "b")])  # no root announced
        self.assertEqual(await self.rooted(ROOT), [("n1", "a.iso", 9), ("n2", "copy/b.iso", 9)])
        [(peer, found)] = [h for h in await self.backend.holdersOfRoot(ROOT) if h[0].node == "n2"]
        self.assertEqual((found.sha256, found.root, peer.files[found.name]), ("b" * 64, ROOT, found))
        self.assertEqual(await self.rooted(OTHER), [("n2", "x", 1)])
        self.assertEqual(await self.rooted("e" * 64), [])

    async def test_rootTwiceInOneNode(self):
        """A node holding one root under two names is listed once for it."""
        await self.backend.register("n1", "h1", 1, [entry("a", root=ROOT), entry("b", root=ROOT)])
        found = await self.rooted(ROOT)
        self.assertEqual(len(found), 1)
        self.assertIn(found[0][1], ("a", "b"))

    async def test_rootNotAHexRoot(self):
        """A root that is not 64 lowercase hex digits finds nothing."""
        await self.backend.register("n1", "h1", 1, [entry("a", root=ROOT)])
        self.assertEqual(await self.rooted(ROOT.upper()), [])
        self.assertEqual(await self.rooted("a.txt"), [])

    async def test_rootReplaced(self):
        """A re-registration without the file drops the node from its root; one with it keeps it."""
        await self.backend.register("n1", "h1", 1, [entry("a", root=ROOT), entry("b", root=OTHER)])
        await self.backend.register("n1", "h1", 1, [entry("b", root=OTHER)])
        self.assertEqual(await self.rooted(ROOT), [])
        self.assertEqual(await self.rooted(OTHER), [("n1", "b", 1)])

    async def test_rootOfANameChanges(self):
        """A name whose root changes (the file was rewritten) is found by its new root only."""
        await self.backend.register("n1", "h1", 1, [entry("a", 1, "b", root=ROOT)])
        await self.backend.register("n1", "h1", 1, [entry("a", 2, "c", root=OTHER)])
        self.assertEqual(await self.rooted(ROOT), [])
        self.assertEqual(await self.rooted(OTHER), [("n1", "a", 2)])

    async def test_rootRenamed(self):
        """The same bytes re-registered under another name are found by the root under the new name."""
        await self.backend.register("n1", "h1", 1, [entry("old", root=ROOT)])
        await self.backend.register("n1", "h1", 1, [entry("new", root=ROOT)])
        self.assertEqual(await self.rooted(ROOT), [("n1", "new", 1)])

    async def test_rootExpires(self):
        """An expired holder is not found by its root, swept or not; an unregistered one neither."""
        await self.backend.register("n1", "h1", 1, [entry("a", root=ROOT)])
        await self.backend.register("n2", "h2", 1, [entry("b", root=ROOT)])
        await self.elapse(TTL / 2)
        await self.backend.refresh("n2")
        await self.elapse(TTL / 2 + 1)
        self.assertEqual(await self.rooted(ROOT), [("n2", "b", 1)])
        await self.backend.expire()
        self.assertEqual(await self.rooted(ROOT), [("n2", "b", 1)])
        await self.backend.unregister("n2")
        self.assertEqual(await self.rooted(ROOT), [])

    async def test_rootListsOnlyListed(self):
        """A holder not listed (unreachable, no control connection) is not found by its root."""
        await self.backend.register("n1", "h1", 1, [entry("a", root=ROOT)], reachable=False)
        self.assertEqual(await self.rooted(ROOT), [])
        await self.backend.setControl("n1", True)
        self.assertEqual(await self.rooted(ROOT), [("n1", "a", 1)])

    async def test_rootLimit(self):
        """holdersOfRoot() lists at most ``limit`` holders (default maxHolders)."""
        self.backend = await self.make(maxHolders=3)
        for i in range(6):
            await self.backend.register(f"n{i}", f"h{i}", 1, [entry(f"f{i}", root=ROOT)])
        self.assertEqual(len(await self.rooted(ROOT)), 3)
        self.assertEqual(len(await self.rooted(ROOT, 2)), 2)
        self.assertEqual(len(await self.rooted(ROOT, 10)), 6)

    async def test_at(self):
        """at() lists every live entry registered at host:port, listed or not."""
        await self.backend.register("n1", "h", 1, [], reachable=False)
        await self.backend.register("n2", "h", 1, [], reachable=False)
        await self.backend.register("n3", "h", 2, [])
        self.assertEqual(nodes(await self.backend.at("h", 1)), ["n1", "n2"])
        self.assertEqual(nodes(await self.backend.at("h", 2)), ["n3"])
        self.assertEqual(await self.backend.at("h", 3), [])

    async def test_atFollowsMoves(self):
        """A node that re-registers elsewhere is no longer found at its old address."""
        await self.backend.register("n1", "h1", 1, [])
        await self.backend.register("n1", "h2", 1, [])
        self.assertEqual(await self.backend.at("h1", 1), [])
        self.assertEqual(nodes(await self.backend.at("h2", 1)), ["n1"])

    # Heartbeats and expiry.

    async def test_aliveUntilTtl(self):
        """A registration is alive for its TTL and gone after it."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        await self.elapse(TTL - 1)
        self.assertIsNotNone(await self.backend.get("n1"))
        await self.elapse(2)
        self.assertIsNone(await self.backend.get("n1"))

    async def test_expiredAnswersNothing(self):
        """An expired peer is in no answer: get, holders, at, active, all, search, figures."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        await self.elapse(TTL + 1)
        self.assertIsNone(await self.backend.get("n1"))
        self.assertEqual(await self.backend.holders("a"), [])
        self.assertEqual(await self.backend.at("h", 1), [])
        self.assertEqual(await self.backend.active(), [])
        self.assertEqual(await self.backend.all(), [])
        self.assertEqual(await self.backend.search("", 10), ([], False))
        self.assertEqual(await self.backend.figures(), Figures(0, 0, 0, 0))

    async def test_refreshExtends(self):
        """A heartbeat gives a live peer another TTL and fires with the peer."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        await self.elapse(TTL * 0.75)
        peer = await self.backend.refresh("n1")
        self.assertEqual((peer.node, list(peer.files)), ("n1", ["a"]))
        self.assertLessEqual(abs(peer.expires - (self.clock.seconds() + TTL)), 1)  # trial's assertAlmostEqual ignores delta
        await self.elapse(TTL * 0.75)
        self.assertEqual(nodes(await self.backend.active()), ["n1"])

    async def test_refreshUnknown(self):
        """A heartbeat for an unknown node fires with None."""
        self.assertIsNone(await self.backend.refresh("nobody"))

    async def test_refreshExpired(self):
        """A heartbeat after the TTL fires with None: the node must register again."""
        await self.backend.register("n1", "h", 1, [])
        await self.elapse(TTL + 1)
        self.assertIsNone(await self.backend.refresh("n1"))

    async def test_expire(self):
        """expire() drops the peers whose lifetime passed and fires with them, and only those."""
        await self.backend.register("n1", "h1", 1, [entry("a")])
        await self.backend.register("n2", "h2", 1, [entry("a")])
        for _ in range(3):
            await self.elapse(TTL / 2)
            await self.backend.refresh("n1")
        self.assertEqual(nodes(await self.backend.expire()), ["n2"])
        self.assertEqual(await self.backend.expire(), [])
        self.assertEqual(await self.holding("a"), [("n1", 1)])

    async def test_reregisterAfterExpiry(self):
        """A node whose entry expired registers again as new."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        await self.elapse(TTL + 1)
        await self.backend.register("n1", "h", 1, [entry("b")])
        self.assertEqual(await self.holding("a"), [])
        self.assertEqual(await self.holding("b"), [("n1", 1)])

    # Unregister and replace.

    async def test_unregister(self):
        """An unregistered peer is gone at once from every answer; unregister() fires True."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        self.assertTrue(await self.backend.unregister("n1"))
        self.assertIsNone(await self.backend.get("n1"))
        self.assertEqual(await self.backend.holders("a"), [])
        self.assertEqual(await self.backend.at("h", 1), [])
        self.assertEqual(await self.backend.search("a", 10), ([], False))

    async def test_unregisterUnknown(self):
        """Unregistering an unknown node fires False."""
        self.assertFalse(await self.backend.unregister("nobody"))

    async def test_reregisterReplaces(self):
        """A registration that repeats a node id replaces the earlier entry: its files, its address."""
        await self.backend.register("n1", "h1", 1, [entry("a"), entry("b")])
        await self.backend.register("n1", "h2", 2, [entry("b", 7), entry("c")])
        self.assertEqual(await self.holding("a"), [])
        self.assertEqual(await self.holding("b"), [("n1", 7)])
        self.assertEqual(await self.holding("c"), [("n1", 1)])
        self.assertEqual(nodes(await self.backend.all()), ["n1"])
        self.assertEqual((await self.backend.get("n1")).address, ("h2", 2))

    async def test_replaceIsAtomic(self):
        """
        Lookups made while a node re-registers over and over (from a second
        connection, where the backend has one) see one registration whole:
        never the names or sizes of two.
        """
        reader = await self.another()
        await self.backend.register("n1", "h", 1, [entry(f"f{i}", 0) for i in range(50)])
        writes, reads = [], []
        for version in range(1, 30):
            files = [entry(f"f{i}", version) for i in range(version % 2, 50 + version % 2)]
            writes.append(self.backend.register("n1", "h", 1, files))
            reads.append(reader.get("n1"))
            reads.append(reader.holders("f0"))
        await defer.gatherResults(writes)
        for result in await defer.gatherResults(reads):
            if isinstance(result, Peer):
                sizes = {e.size for e in result.files.values()}
                self.assertEqual(len(sizes), 1, sizes)
                (version,) = sizes
                self.assertEqual(set(result.files), {f"f{i}" for i in range(version % 2, 50 + version % 2)})
            else:
                for _, found in result:
                    self.assertEqual(found.size % 2, 0)  # f0 is held by even versions only

    # Ownership.

    async def test_otherKeySameIdRefused(self):
        """A live id is bound to its key: another key under it is a ValueError."""
        await self.backend.register("n1", "h", 1, [], key="K1")
        with self.assertRaises(ValueError):
            await self.backend.register("n1", "h", 1, [], key="K2")
        self.assertEqual((await self.backend.get("n1")).key, "K1")

    async def test_unverifiedTakeoverRefused(self):
        """An unverified newcomer cannot take a live verified node's address."""
        await self.backend.register("n1", "h", 1, [entry("a")], key="K1")
        with self.assertRaises(AddressTaken):
            await self.backend.register("n2", "h", 1, [], key="K2", reachable=False)
        self.assertEqual(await self.holding("a"), [("n1", 1)])

    async def test_verifiedTakeoverReplaces(self):
        """A verified newcomer at a live node's address replaces it."""
        await self.backend.register("n1", "h", 1, [entry("a")], key="K1")
        await self.backend.register("n2", "h", 1, [entry("b")], key="K2")
        self.assertIsNone(await self.backend.get("n1"))
        self.assertEqual(await self.holding("a"), [])
        self.assertEqual(nodes(await self.backend.at("h", 1)), ["n2"])

    async def test_unverifiedBesideUnverified(self):
        """Unverified entries at one address coexist (none of them is listed)."""
        await self.backend.register("n1", "h", 1, [], reachable=False)
        await self.backend.register("n2", "h", 1, [], reachable=False)
        self.assertEqual(nodes(await self.backend.all()), ["n1", "n2"])

    # Reachability.

    async def test_unreachableHidden(self):
        """A peer marked unreachable is in no client answer but still known."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        peer = await self.backend.setReachable("n1", False)
        self.assertFalse(peer.reachable)
        self.assertEqual(await self.backend.active(), [])
        self.assertEqual(await self.backend.holders("a"), [])
        self.assertEqual(await self.backend.search("a", 10), ([], False))
        self.assertEqual(nodes(await self.backend.all()), ["n1"])
        self.assertFalse((await self.backend.get("n1")).reachable)

    async def test_reachableAgain(self):
        """A peer marked reachable again is listed again, with its lifetime unchanged."""
        await self.backend.register("n1", "h", 1, [entry("a")], reachable=False)
        await self.elapse(TTL / 2)
        peer = await self.backend.setReachable("n1", True)
        self.assertTrue(peer.reachable)
        self.assertEqual(await self.holding("a"), [("n1", 1)])
        await self.elapse(TTL / 2 + 1)
        self.assertIsNone(await self.backend.get("n1"))

    async def test_setReachableUnknown(self):
        """setReachable() of an unknown node fires None."""
        self.assertIsNone(await self.backend.setReachable("nobody", True))

    async def test_heartbeatKeepsHidden(self):
        """A heartbeat does not list an unreachable peer."""
        await self.backend.register("n1", "h", 1, [], reachable=False)
        self.assertFalse((await self.backend.refresh("n1")).reachable)
        self.assertEqual(await self.backend.active(), [])

    # The relay's own checks: misses and runs of successes; control connections.

    async def test_directSinceOnRegistration(self):
        """A node registered reachable starts a run of successes then; one not reachable has none."""
        await self.elapse(3)
        peer = await self.backend.register("n1", "h", 1, [])
        self.assertAlmostEqual(peer.directSince, self.clock.seconds(), delta=0.01)
        self.assertIsNone((await self.backend.register("n2", "h2", 1, [], reachable=False)).directSince)

    async def test_missedCounted(self):
        """A missed probe of a direct node is counted and read back by another view of the registry."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        self.assertEqual((await self.backend.missed("n1")).misses, 1)
        other = await self.another()
        self.assertEqual((await other.get("n1")).misses, 1)
        self.assertEqual(len(await other.holders("a")), 1, "still listed")

    async def test_missesSurviveReregistration(self):
        """Registering again at the same address, still direct, keeps the misses and the run's start."""
        first = await self.backend.register("n1", "h", 1, [])
        await self.backend.missed("n1")
        await self.elapse(5)
        again = await self.backend.register("n1", "h", 1, [entry("b")])
        self.assertEqual(again.misses, 1)
        self.assertAlmostEqual(again.directSince, first.directSince, delta=0.01)
        stored = await self.backend.get("n1")
        self.assertEqual((stored.misses, round(stored.directSince, 2)), (1, round(first.directSince, 2)))

    async def test_reachableClearsMisses(self):
        """Found reachable, a node's misses are forgotten; found unreachable, its run of successes ends."""
        await self.backend.register("n1", "h", 1, [])
        await self.backend.missed("n1")
        self.assertEqual((await self.backend.setReachable("n1", True)).misses, 0)
        self.assertEqual((await self.backend.get("n1")).misses, 0)
        hidden = await self.backend.setReachable("n1", False)
        self.assertIsNone(hidden.directSince)
        self.assertIsNone((await self.backend.get("n1")).directSince)

    async def test_controlLists(self):
        """An unreachable node is listed (everywhere) while its control connection is open, and hidden after."""
        await self.backend.register("n1", "h", 1, [entry("a")], reachable=False)
        self.assertTrue((await self.backend.setControl("n1", True)).control)
        other = await self.another()
        self.assertEqual([p.node for p, _ in await other.holders("a")], ["n1"])
        self.assertEqual([(p.node, p.reach) for p in await other.active()], [("n1", "firewalled")])
        self.assertTrue((await other.get("n1")).control)
        self.assertEqual((await other.figures()).peers, 1)
        await self.backend.setControl("n1", False)
        self.assertEqual(await other.holders("a"), [])
        self.assertEqual(await other.active(), [])

    async def test_controlOfUnknown(self):
        """A control connection of a node with no entry records nothing."""
        self.assertIsNone(await self.backend.setControl("n1", True))
        await self.backend.register("n1", "h", 1, [entry("a")], reachable=False)
        self.assertEqual(await self.backend.holders("a"), [])

    async def test_forwardWithoutHolder(self):
        """An order for a node no other relay holds the control connection of is not forwarded."""
        await self.backend.register("n1", "h", 1, [], reachable=False)
        self.assertFalse(await self.backend.forward("n1", b"CONNECT token=x\r\n"))

    # Caps.

    async def fill(self, source: str, *names: str) -> None:
        for name in names:
            await self.backend.register(name, f"h-{name}", 1, [], source=source)

    async def test_perSource(self):
        """One source address holds at most maxPerSource live registrations."""
        self.backend = await self.make(maxPerSource=2, maxTotal=3)
        await self.fill("10.0.0.1", "a", "b")
        self.assertIn("2 registrations from 10.0.0.1", await self.backend.room("c", "10.0.0.1"))
        with self.assertRaises(RegistryFull):
            await self.fill("10.0.0.1", "c")
        self.assertIsNone(await self.backend.room("c", "10.0.0.2"))

    async def test_total(self):
        """The registry holds at most maxTotal live registrations."""
        self.backend = await self.make(maxPerSource=2, maxTotal=3)
        await self.fill("10.0.0.1", "a", "b")
        await self.fill("10.0.0.2", "c")
        self.assertIn("3 registrations", await self.backend.room("d", "10.0.0.3"))
        with self.assertRaises(RegistryFull):
            await self.fill("10.0.0.3", "d")

    async def test_reregisterAlwaysFits(self):
        """A live node registering again is never over a cap."""
        self.backend = await self.make(maxPerSource=2, maxTotal=2)
        await self.fill("10.0.0.1", "a", "b")
        self.assertIsNone(await self.backend.room("a", "10.0.0.1"))
        await self.fill("10.0.0.1", "a")

    async def test_expiredDoNotCount(self):
        """Expired registrations, swept or not, free their place."""
        self.backend = await self.make(maxPerSource=2, maxTotal=2)
        await self.fill("10.0.0.1", "a", "b")
        await self.elapse(TTL + 1)
        self.assertIsNone(await self.backend.room("c", "10.0.0.1"))
        await self.fill("10.0.0.1", "c", "d")

    async def test_unregisterFrees(self):
        """An unregistered node frees its place at once."""
        self.backend = await self.make(maxPerSource=2, maxTotal=3)
        await self.fill("10.0.0.1", "a", "b")
        await self.backend.unregister("a")
        self.assertIsNone(await self.backend.room("c", "10.0.0.1"))

    # Search and figures.

    async def searchSetUp(self) -> None:
        await self.backend.register("n1", "h1", 1, [entry("music/Song.mp3", 5), entry("notes.txt", 2)])
        await self.backend.register("n2", "h2", 1, [entry("music/Song.mp3", 5), entry("other.mp3", 9, "b")])
        await self.backend.register("n3", "h3", 1, [entry("music/Song.mp3", 6, "c")])

    async def test_searchSubstring(self):
        """A plain pattern is a case-blind substring; each version is one hit with its holders."""
        await self.searchSetUp()
        hits, more = await self.backend.search("song", 10)
        self.assertEqual(
            hits,
            [SearchHit("music/Song.mp3", 5, "a" * 64, 2), SearchHit("music/Song.mp3", 6, "c" * 64, 1)],
        )
        self.assertFalse(more)

    async def test_searchGlob(self):
        """A glob matches the whole path or its last component."""
        await self.searchSetUp()
        hits, _ = await self.backend.search("*.mp3", 10)
        self.assertEqual([h.name for h in hits], ["music/Song.mp3", "music/Song.mp3", "other.mp3"])
        self.assertEqual((await self.backend.search("music/*", 10))[0][0].name, "music/Song.mp3")

    async def test_searchLimit(self):
        """A search returns at most limit hits, sorted, and says when more matched."""
        await self.searchSetUp()
        hits, more = await self.backend.search("", 2)
        self.assertEqual([h.name for h in hits], ["music/Song.mp3", "music/Song.mp3"])
        self.assertTrue(more)
        self.assertEqual(len((await self.backend.search("", 4))[0]), 4)
        self.assertFalse((await self.backend.search("", 4))[1])

    async def test_figures(self):
        """figures() counts the listed peers, their distinct names, entries and bytes."""
        await self.searchSetUp()
        await self.backend.register("n4", "h4", 1, [entry("hidden", 100)], reachable=False)
        self.assertEqual(await self.backend.figures(), Figures(3, 3, 5, 5 + 2 + 5 + 9 + 6))

    async def test_activeAndAll(self):
        """active() lists the listed peers; all() every live entry."""
        await self.backend.register("n1", "h1", 1, [])
        await self.backend.register("n2", "h2", 1, [], reachable=False)
        self.assertEqual(nodes(await self.backend.active()), ["n1"])
        self.assertEqual(nodes(await self.backend.all()), ["n1", "n2"])

    # Allowances and re-check claims.

    async def test_takeBurstThenWait(self):
        """take() spends a burst of tokens at once, then says the seconds until the next."""
        waits = [await self.backend.take("report", "10.0.0.1", 1 / 6.0, 3) for _ in range(4)]
        self.assertEqual(waits[:3], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(waits[3], 6.0)

    async def test_takeRefills(self):
        """A spent bucket gives a token again once 1 / rate seconds have passed, not before."""
        for _ in range(2):
            await self.backend.take("report", "10.0.0.1", 0.5, 2)
        await self.elapse(1.5)
        self.assertAlmostEqual(await self.backend.take("report", "10.0.0.1", 0.5, 2), 0.5)
        await self.elapse(0.5)
        self.assertEqual(await self.backend.take("report", "10.0.0.1", 0.5, 2), 0.0)

    async def test_takeApart(self):
        """Each source, and each allowance, has a bucket of its own."""
        await self.backend.take("report", "10.0.0.1", 0.1, 1)
        self.assertGreater(await self.backend.take("report", "10.0.0.1", 0.1, 1), 0)
        self.assertEqual(await self.backend.take("report", "10.0.0.2", 0.1, 1), 0.0)
        self.assertEqual(await self.backend.take("dialback", "10.0.0.1", 0.1, 1), 0.0)

    async def test_claimRecheck(self):
        """A node's re-check is claimed once per interval."""
        self.assertTrue(await self.backend.claimRecheck("n1", 30.0))
        self.assertFalse(await self.backend.claimRecheck("n1", 30.0))
        self.assertTrue(await self.backend.claimRecheck("n2", 30.0))
        await self.elapse(29)
        self.assertFalse(await self.backend.claimRecheck("n1", 30.0))
        await self.elapse(1.5)
        self.assertTrue(await self.backend.claimRecheck("n1", 30.0))

    async def test_claimRecheckForced(self):
        """A forced claim is recorded within the interval, and the interval counts from it."""
        await self.backend.claimRecheck("n1", 30.0)
        await self.elapse(10)
        self.assertTrue(await self.backend.claimRecheck("n1", 30.0, force=True))
        await self.elapse(25)
        self.assertFalse(await self.backend.claimRecheck("n1", 30.0))

    async def test_releaseRecheck(self):
        """A claim released leaves the node free to be claimed again at once."""
        await self.backend.claimRecheck("n1", 30.0)
        await self.backend.releaseRecheck("n1")
        self.assertTrue(await self.backend.claimRecheck("n1", 30.0))

    # Epoch.

    async def test_epochStable(self):
        """The epoch is the same from one call to the next."""
        first = await self.backend.epoch()
        self.assertTrue(first)
        self.assertEqual(await self.backend.epoch(), first)


class MemoryBackendTests(BackendTests, TestCase):
    async def make(self, **options: Any) -> MemoryBackend:
        return MemoryBackend(Registry(self.clock.seconds, TTL, **options))

    async def elapse(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def another(self) -> MemoryBackend:
        return MemoryBackend(self.backend.registry)

    def test_fired(self):
        """The in-memory backend answers with Deferreds that have already fired."""
        d = self.backend.register("n1", "h", 1, [])
        self.assertTrue(d.called)
        self.assertTrue(self.backend.holders("a").called)
        failed = self.backend.register("n1", "h", 1, [], key="other")
        self.assertTrue(failed.called)
        self.failureResultOf(failed, ValueError)

    def test_newEpochPerRegistry(self):
        """Two in-memory registries (two relay runs) have different epochs."""
        first = self.successResultOf(self.backend.epoch())
        other = MemoryBackend(Registry(self.clock.seconds, TTL))
        self.assertNotEqual(self.successResultOf(other.epoch()), first)

    async def test_longSearchCooperates(self):
        """A search of more than one step finishes on the cooperator, with the one answer."""
        clock = Clock()
        cooperator = task.Cooperator(scheduler=lambda f: clock.callLater(0, f), started=True)
        registry = Registry(self.clock.seconds, TTL)
        backend = MemoryBackend(registry, cooperator=cooperator)
        registry.register("n1", "h", 1, [entry(f"f{i:05}") for i in range(3000)])
        d = backend.search("f", 5)
        self.assertFalse(d.called)
        while not d.called:
            clock.advance(0)
        hits, more = self.successResultOf(d)
        self.assertEqual(([h.name for h in hits], more), ([f"f{i:05}" for i in range(5)], True))


# One redis-server for this module's tests, each test under its own key prefix.
_server: Optional[redisserver.RedisServer] = None
_prefixes = itertools.count()

_ELAPSE = """
local P, ms = ARGV[1], tonumber(ARGV[2])
local cursor = '0'
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', P .. '*', 'COUNT', 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    local left = redis.call('PTTL', k)
    if left > 0 then
      if left <= ms then redis.call('DEL', k) else redis.call('PEXPIRE', k, left - ms) end
    end
  end
until cursor == '0'
local z = redis.call('ZRANGE', P .. 'expiry', 0, -1, 'WITHSCORES')
for i = 1, #z, 2 do redis.call('ZADD', P .. 'expiry', tonumber(z[i + 1]) - ms, z[i]) end
return 1
"""


def server() -> redisserver.RedisServer:
    global _server
    redisserver.need()
    if _server is None or _server.process is None:
        _server = redisserver.RedisServer().start()
        atexit.register(_server.cleanup)
    return _server


class RedisTestCase(TestCase):
    """Backends on the module's redis-server, closed at cleanup."""

    def setUp(self) -> defer.Deferred:
        self.clock = Clock()
        self.server = server()
        self.prefix = f"t{next(_prefixes)}:"
        return super().setUp()

    async def connect(self, url: Optional[str] = None, passwordFile: Optional[str] = None, **options: Any):
        options.setdefault("prefix", self.prefix)
        options.setdefault("now", self.clock.seconds)
        options.setdefault("timeout", SHORT)
        backend = await redisbackend.connect(parse(url or self.server.url, passwordFile), reactor, **options)
        self.addCleanup(backend.close)
        return backend

    async def elapse(self, seconds: float) -> None:
        """Redis's clock (every key's TTL, the expiry index) and ours, ``seconds`` on."""
        await self.backend.client.eval(_ELAPSE, [], [self.prefix, int(seconds * 1000)])
        self.clock.advance(seconds)


class RedisBackendTests(BackendTests, RedisTestCase):
    elapse = RedisTestCase.elapse

    async def make(self, **options: Any) -> redisbackend.RedisBackend:
        return await self.connect(ttl=TTL, **options)

    async def another(self) -> redisbackend.RedisBackend:
        return await self.make()

    def setUp(self) -> defer.Deferred:
        RedisTestCase.setUp(self)
        return BackendTests.setUp(self)

    async def test_epochShared(self):
        """Two backends on one Redis (two relays) have one epoch, stored in Redis."""
        other = await self.make()
        epoch = await self.backend.epoch()
        self.assertEqual(await other.epoch(), epoch)
        self.assertEqual(await self.backend.client.get(self.prefix + "epoch"), epoch)

    async def test_epochAfterFlush(self):
        """A flushed Redis (the entries lost) has a new epoch, the same for every backend."""
        other = await self.make()
        before = await self.backend.epoch()
        await self.backend.client.execute_command("FLUSHDB")
        after = await other.epoch()
        self.assertNotEqual(after, before)
        self.assertEqual(await self.backend.epoch(), after)

    async def test_takeShared(self):
        """Two backends on one Redis (two relays) spend one source's one bucket."""
        other = await self.make()
        self.assertEqual(await self.backend.take("report", "10.0.0.1", 0.1, 2), 0.0)
        self.assertEqual(await other.take("report", "10.0.0.1", 0.1, 2), 0.0)
        self.assertGreater(await self.backend.take("report", "10.0.0.1", 0.1, 2), 0)
        self.assertGreater(await other.take("report", "10.0.0.1", 0.1, 2), 0)

    async def test_bucketExpires(self):
        """A bucket's key lives only until it would be full again (bounded memory for many sources)."""
        await self.backend.take("report", "10.0.0.1", 0.5, 4)
        left = await self.backend.client.execute_command("PTTL", self.prefix + "bucket:report:10.0.0.1")
        self.assertTrue(0 < left <= 2000, left)

    async def test_claimRecheckShared(self):
        """A re-check claimed by one backend on a Redis is not claimed again by another within the interval."""
        other = await self.make()
        self.assertTrue(await self.backend.claimRecheck("n1", 30.0))
        self.assertFalse(await other.claimRecheck("n1", 30.0))

    async def test_keyTtlIsTheLifetime(self):
        """A registration's record carries the TTL in Redis itself; a heartbeat renews it."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        await self.elapse(10)
        left = await self.backend.client.execute_command("PTTL", self.prefix + "node:n1")
        self.assertTrue((TTL - 11) * 1000 < left <= (TTL - 10) * 1000, left)
        await self.backend.refresh("n1")
        left = await self.backend.client.execute_command("PTTL", self.prefix + "node:n1")
        self.assertTrue((TTL - 1) * 1000 < left <= TTL * 1000, left)

    async def test_expiresWithoutSweeper(self):
        """Redis drops a registration at its TTL by itself: nothing sweeps, nothing answers it."""
        backend = await self.connect(ttl=0.2, now=reactor.seconds)
        await backend.register("n1", "h", 1, [entry("a")])
        self.assertEqual(len(await backend.holders("a")), 1)
        await task.deferLater(reactor, 0.35, lambda: None)
        self.assertFalse(await backend.client.exists(self.prefix + "node:n1"))
        self.assertEqual(await backend.holders("a"), [])
        self.assertIsNone(await backend.get("n1"))

    async def test_leftoversCleanedOnRead(self):
        """An expired node's entry in a name's set is filtered out, and deleted, by the lookup that meets it."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        await self.elapse(3 * TTL)  # past the file table's grace too: no sweep could unlink it
        self.assertTrue(await self.backend.client.hexists(self.prefix + "name:a", "n1"))
        self.assertEqual(await self.backend.holders("a"), [])
        self.assertFalse(await self.backend.client.hexists(self.prefix + "name:a", "n1"))
        self.assertFalse(await self.backend.client.sismember(self.prefix + "names", "a"))

    async def test_staleEntryOfNewRegistration(self):
        """A node back after its table was forgotten is not listed for a name it no longer has."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        await self.elapse(3 * TTL)
        await self.backend.register("n1", "h", 1, [entry("b")])
        self.assertEqual(await self.backend.holders("a"), [])
        self.assertEqual(await self.backend.search("", 10), ([SearchHit("b", 1, "a" * 64, 1)], False))

    async def test_rootLeftoversCleanedOnRead(self):
        """An expired node's entry in a root's hash is filtered out, and deleted, by the lookup that meets it."""
        await self.backend.register("n1", "h", 1, [entry("a", root=ROOT)])
        await self.elapse(3 * TTL)
        self.assertTrue(await self.backend.client.hexists(self.prefix + "root:" + ROOT, "n1"))
        self.assertEqual(await self.backend.holdersOfRoot(ROOT), [])
        self.assertFalse(await self.backend.client.exists(self.prefix + "root:" + ROOT))

    async def test_rootSweptAndUnregistered(self):
        """expire() and unregister() unlink a node from its roots' hashes at once."""
        await self.backend.register("n1", "h", 1, [entry("a", root=ROOT)])
        await self.backend.register("n2", "h2", 1, [entry("b", root=OTHER)])
        await self.elapse(TTL / 2)
        await self.backend.refresh("n2")
        await self.elapse(TTL / 2 + 1)
        await self.backend.expire()
        self.assertFalse(await self.backend.client.exists(self.prefix + "root:" + ROOT))
        await self.backend.unregister("n2")
        self.assertFalse(await self.backend.client.exists(self.prefix + "root:" + OTHER))

    async def test_sweepUnlinks(self):
        """expire() unlinks expired nodes from the name sets at once."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        await self.elapse(TTL + 1)
        await self.backend.expire()
        self.assertFalse(await self.backend.client.exists(self.prefix + "name:a"))
        self.assertFalse(await self.backend.client.exists(self.prefix + "files:n1"))

    async def test_sharedFieldsRoundTrip(self):
        """Every field of Peer but the per-relay ones is stored, and comes back as it was."""
        await self.backend.register("n1", "h", 1, [entry("a")], udp=2, tls=3, key="K", source="s")
        record = json.loads(await self.backend.client.get(self.prefix + "node:n1"))
        shared = {f.name for f in attrs.fields(Peer)} - {"files", "expires", "control"}
        self.assertEqual(set(record) - {"gen"}, shared)
        self.assertNotIn("control", record)
        changes = {}
        for field in attrs.fields(Peer):
            if field.name in ("misses", "directSince"):
                changes[field.name] = 2 if field.name == "misses" else 1234.5
        peer = await self.backend._update("n1", **changes)
        for name, value in changes.items():
            self.assertEqual(getattr(peer, name), value)
            self.assertEqual(getattr(await self.backend.get("n1"), name), value)

    async def test_controlNeverShared(self):
        """The per-relay control flag cannot be written to the shared record."""
        await self.backend.register("n1", "h", 1, [])
        with self.assertRaises(TypeError):
            await self.backend._update("n1", control=True)

    async def test_unknownFieldsIgnored(self):
        """A record written by a newer relay, with fields this one lacks, still reads."""
        await self.backend.register("n1", "h", 1, [entry("a")])
        key = self.prefix + "node:n1"
        record = json.loads(await self.backend.client.get(key))
        record["fromTheFuture"] = 1
        await self.backend.client.execute_command("SET", key, json.dumps(record), "KEEPTTL")
        self.assertEqual((await self.backend.get("n1")).node, "n1")
        self.assertEqual(len(await self.backend.holders("a")), 1)

    async def test_twoBackendsOneRegistry(self):
        """What one backend registers, another on the same Redis answers (two relays)."""
        other = await self.make()
        await self.backend.register("n1", "h", 1, [entry("a")])
        self.assertEqual([p.node for p, _ in await other.holders("a")], ["n1"])
        self.assertIsNotNone(await other.refresh("n1"))
        self.assertTrue(await other.unregister("n1"))
        self.assertIsNone(await self.backend.get("n1"))

    async def test_unixSocketAndPassword(self):
        """A Redis on a unix socket with a password read from a file serves the registry."""
        guarded = redisserver.started(self, unix=True, password="s3cret")
        secret = Path(self.mktemp())
        secret.write_text("s3cret\n")
        backend = await self.connect(guarded.url, str(secret))
        await backend.register("n1", "h", 1, [entry("a")])
        self.assertEqual(len(await backend.holders("a")), 1)


class RedisConnectionTests(RedisTestCase):
    """Redis not there at start, lost while running, back again."""

    async def test_unreachableAtStart(self):
        """Connecting to no Redis fails, after the timeout, with RegistryUnavailable naming the address."""
        port = redisserver.freePort()
        with self.assertRaises(RegistryUnavailable) as caught:
            await redisbackend.connect(parse(f"redis://127.0.0.1:{port}/0"), reactor, timeout=SHORT)
        self.assertIn(f"127.0.0.1:{port}", str(caught.exception))
        self.assertIn("did not answer", str(caught.exception))

    async def test_wrongPassword(self):
        """A wrong password fails the start at once with RegistryUnavailable saying so, without the password."""
        guarded = redisserver.started(self, password="right")
        secret = Path(self.mktemp())
        secret.write_text("wrong-one\n")
        started = reactor.seconds()
        with self.assertRaises(RegistryUnavailable) as caught:
            await redisbackend.connect(parse(guarded.url, secret), reactor, timeout=30)
        self.assertLess(reactor.seconds() - started, 10)
        self.assertIn("WRONGPASS", str(caught.exception))
        self.assertNotIn("wrong-one", str(caught.exception))

    async def test_passwordMissing(self):
        """A Redis that wants a password, given none, fails the start with RegistryUnavailable saying so."""
        guarded = redisserver.started(self, password="right")
        with self.assertRaises(RegistryUnavailable) as caught:
            await redisbackend.connect(parse(guarded.url), reactor, timeout=30)
        self.assertIn("NOAUTH", str(caught.exception))

    async def waitFor(self, call, seconds: float = 15.0):
        """``call()``'s result once it stops failing with RegistryUnavailable."""
        deadline = reactor.seconds() + seconds
        while True:
            try:
                return await call()
            except RegistryUnavailable:
                if reactor.seconds() > deadline:
                    raise
                await task.deferLater(reactor, 0.1, lambda: None)

    async def test_lostAndBack(self):
        """
        While Redis is down every call fails with RegistryUnavailable (a 503
        for the relay); once it is back the backend reconnects by itself,
        with a new epoch, so nodes register again.
        """
        own = redisserver.started(self)
        backend = await self.connect(own.url)
        await backend.register("n1", "h", 1, [entry("a")])
        before = await backend.epoch()
        own.stop()
        with self.assertRaises(RegistryUnavailable):
            await backend.holders("a")
        with self.assertRaises(RegistryUnavailable):
            await backend.register("n2", "h2", 1, [])
        own.start()
        after = await self.waitFor(backend.epoch)
        self.assertNotEqual(after, before)
        self.assertIsNone(await backend.get("n1"))
        await backend.register("n1", "h", 1, [entry("a")])
        self.assertEqual(len(await backend.holders("a")), 1)


    async def test_hungServer(self):
        """
        A Redis that stops answering on an open connection fails calls with
        RegistryUnavailable after the timeout; the connection is dropped and
        made again once it answers.
        """
        own = redisserver.started(self)
        backend = await self.connect(own.url)
        await backend.register("n1", "h", 1, [entry("a")])
        before = await backend.client.execute_command("CLIENT", "ID")
        os.kill(own.process.pid, signal.SIGSTOP)
        try:
            with self.assertRaises(RegistryUnavailable):
                await backend.holders("a")
        finally:
            os.kill(own.process.pid, signal.SIGCONT)
        found = await self.waitFor(lambda: backend.holders("a"))
        self.assertEqual([p.node for p, _ in found], ["n1"])
        self.assertNotEqual(await backend.client.execute_command("CLIENT", "ID"), before)


class URLTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.secret = Path(self.mktemp())
        self.secret.write_text("pw\nignored\n")

    def test_tcp(self):
        """redis://HOST:PORT/DB names a host, a port and a database."""
        self.assertEqual(parse("redis://10.0.0.5:6380/3"), RedisAddress(host="10.0.0.5", port=6380, db=3))

    def test_defaults(self):
        """Without port and database: 6379 and 0."""
        self.assertEqual(parse("redis://redis.example"), RedisAddress(host="redis.example", port=6379, db=0))

    def test_ipv6(self):
        """A bracketed IPv6 host."""
        self.assertEqual(parse("redis://[::1]:7000/1").host, "::1")

    def test_unix(self):
        """unix:///path?db=N names a socket and a database."""
        self.assertEqual(parse("unix:///run/redis/redis.sock?db=2"), RedisAddress(path="/run/redis/redis.sock", db=2))

    def test_passwordFromFile(self):
        """The password is the first line of the file named separately; never shown."""
        address = parse("redis://h/0", self.secret)
        self.assertEqual(address.password, "pw")
        self.assertNotIn("pw", repr(address) + address.describe())

    def test_passwordInURLRefused(self):
        """A password (or user) in the URL itself is refused, pointing at the file option."""
        for url in ("redis://:pw@h/0", "redis://user:pw@h/0", "redis://user@h/0"):
            with self.assertRaises(RegistryURLError) as caught:
                parse(url)
            self.assertIn("--registry-password-file", str(caught.exception))
            self.assertNotIn("pw", str(caught.exception))

    def test_bad(self):
        """Other schemes, bad ports, databases and relative sockets are refused with the reason."""
        for url, reason in (
            ("http://h/0", "not a registry address"),
            ("redis://h:99999/0", "port"),
            ("redis://h/x", "database"),
            ("redis://h/16", "database"),
            ("redis:///0", "no host"),
            ("unix://relative.sock", "absolute path"),
            ("unix:///s.sock?db=x", "database"),
            ("unix:///s.sock?pass=x", "unknown parameter"),
        ):
            with self.assertRaises(RegistryURLError) as caught:
                parse(url)
            self.assertIn(reason, str(caught.exception), url)

    def test_missingPasswordFile(self):
        """An unreadable or empty password file is refused with its name."""
        empty = Path(self.mktemp())
        empty.write_text("\n")
        for path in (Path(self.mktemp()), empty):
            with self.assertRaises(RegistryURLError) as caught:
                parse("redis://h/0", path)
            self.assertIn(str(path), str(caught.exception))
