"""
Firewalled nodes at the relay: the control connection (CONTROL, its
heartbeats, its caps), REVERSE orders sent over it, and the hysteresis of
re-checks (one missed probe of a long-reachable node does not flip it).
"""

from __future__ import annotations

import random

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import capturedLogs

from p2prelay import identity, wire
from p2prelay.negotiation import NEGOTIATION_DEADLINE
from p2prelay.relay.protocol import CONFIRM_DELAY, LONG_REACHABLE
from p2prelay.relay.dialback import RECHECK_INTERVAL
from p2prelay.relay.circuits import PATH_BURST

from .test_relay import CLIENT, KEY, OTHER, TTL, RelayTestCase, parse, registration
from .test_relay_security import SECRET

NODE_AT = ("10.1.2.3", 5000)
TOKEN = identity.newNonce()
ASKER = IPv4Address("TCP", "10.4.4.4", 41000)


class ControlTestCase(RelayTestCase):
    def firewalled(self, key=KEY, port=5000) -> None:
        """Register ``key``'s node where the dial-back is refused: firewalled, not listed."""
        self.nodes.at.pop(("10.1.2.3", port), None)
        [reply] = self.answer(registration(key, port, ["a.txt"]), key=key)
        assert reply.get("reachable") == "0", reply

    def control(self, key=KEY, peer=CLIENT):
        """Open a CONTROL connection as ``key``'s node: (protocol, transport), the challenge answered."""
        proto, transport = self.connect(peer)
        data = wire.request(wire.CONTROL, node=key.node)
        proto.dataReceived(data)
        self.prove(proto, transport, data, key)
        return proto, transport

    def opened(self, key=KEY, peer=CLIENT):
        proto, transport = self.control(key, peer)
        [reply] = parse(transport.value())
        self.assertEqual(reply.status, wire.OK, reply)
        transport.clear()
        return proto, transport


class ControlTests(ControlTestCase):
    def test_opens(self):
        """A proved CONTROL is answered 200 ttl= boot= interval= reachable=0 and stays open."""
        self.firewalled()
        proto, transport = self.control()
        [reply] = parse(transport.value())
        self.assertEqual(
            (reply.status, reply.get("ttl"), reply.get("interval"), reply.get("reachable"), reply.get("boot")),
            (200, "90", "30", "0", self.factory.boot),
        )
        self.assertEqual(reply.text, "control connection open")
        self.assertFalse(transport.disconnecting)

    def test_listedWhileOpen(self):
        """While its control connection is open, a firewalled node is listed with reach=firewalled."""
        self.firewalled()
        self.assertEqual(self.registry.active(), [])
        self.opened()
        self.assertTrue(self.registry.get(KEY.node).control)
        status, item, end = self.answer(wire.request(wire.WHOHAS, name="a.txt"), peer=ASKER)
        self.assertEqual((item.get("node"), item.get("reach")), (KEY.node, "firewalled"))

    def test_closeUnlists(self):
        """When the control connection closes the node is no longer listed; its entry stays."""
        self.firewalled()
        proto, transport = self.opened()
        proto.connectionLost(None)
        self.assertFalse(self.registry.get(KEY.node).control)
        self.assertEqual(self.registry.active(), [])
        self.assertEqual(len(self.factory.controls), 0)

    def test_unknownNode(self):
        """CONTROL for a node with no live entry is 404 (register first)."""
        proto, transport = self.control()
        [reply] = parse(transport.value())
        self.assertEqual((reply.status, reply.text), (404, "unknown node; register again"))
        self.assertTrue(transport.disconnecting)

    def test_wrongKey(self):
        """CONTROL proved with another key is 401, and no control connection opens."""
        self.firewalled()
        proto, transport = self.control(key=KEY)
        transport.clear()
        proto2, transport2 = self.connect()
        data = wire.request(wire.CONTROL, node=KEY.node)
        proto2.dataReceived(data)
        self.prove(proto2, transport2, data, OTHER)
        [reply] = parse(transport2.value())
        self.assertEqual(reply.status, wire.UNAUTHORIZED)
        self.assertIs(self.factory.controls._open[KEY.node], proto)

    def test_replaces(self):
        """A second CONTROL from the node replaces the first, which is closed."""
        self.firewalled()
        first, firstTransport = self.opened()
        second, secondTransport = self.opened(peer=ASKER)
        self.assertTrue(firstTransport.disconnecting)
        self.assertFalse(secondTransport.disconnecting)
        first.connectionLost(None)  # the old one's close does not clear the new one
        self.assertTrue(self.registry.get(KEY.node).control)
        self.assertIs(self.factory.controls._open[KEY.node], second)

    def test_noNegotiationDeadline(self):
        """An open control connection outlives the negotiation deadline."""
        self.firewalled()
        proto, transport = self.opened()
        self.clock.advance(NEGOTIATION_DEADLINE * 4)
        self.assertFalse(transport.disconnecting)

    def test_idleClosed(self):
        """A control connection silent for the TTL is closed, and the node unlisted."""
        self.firewalled()
        proto, transport = self.opened()
        self.clock.advance(TTL - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(self.registry.active(), [])

    def test_heartbeat(self):
        """HEARTBEAT on the control connection (no proof) is 200 ttl= boot= reachable= and refreshes the entry."""
        self.firewalled()
        proto, transport = self.opened()
        self.clock.advance(60)
        proto.dataReceived(wire.request(wire.HEARTBEAT))
        [reply] = parse(transport.value())
        self.assertEqual(
            (reply.status, reply.get("ttl"), reply.get("boot"), reply.get("reachable"), reply.text),
            (200, "90", self.factory.boot, "0", "alive"),
        )
        self.assertEqual(self.registry.get(KEY.node).expires, 60 + TTL)
        self.assertFalse(transport.disconnecting)

    def test_heartbeatsKeepItOpen(self):
        """Heartbeats reset the idle timeout: beating every interval, it stays open past the TTL."""
        self.firewalled()
        proto, transport = self.opened()
        for _ in range(10):
            self.clock.advance(30)
            proto.dataReceived(wire.request(wire.HEARTBEAT))
        self.assertFalse(transport.disconnecting)
        self.assertIsNotNone(self.registry.get(KEY.node))

    def test_heartbeatRechecks(self):
        """A heartbeat makes the relay re-check the firewalled node; reached, the answer says reachable=1."""
        self.firewalled()
        proto, transport = self.opened()
        self.nodes.at[NODE_AT] = KEY
        self.nodes.dialled.clear()
        self.clock.advance(RECHECK_INTERVAL)
        proto.dataReceived(wire.request(wire.HEARTBEAT))
        self.assertEqual(self.nodes.dialled, [NODE_AT])
        transport.clear()
        proto.dataReceived(wire.request(wire.HEARTBEAT))
        [reply] = parse(transport.value())
        self.assertEqual(reply.get("reachable"), "1")
        self.assertEqual(self.registry.get(KEY.node).reach, "direct")

    def test_heartbeatAfterExpiry(self):
        """A heartbeat for an entry that has expired meanwhile is 404 and closes the connection."""
        self.firewalled()
        proto, transport = self.opened()
        self.clock.advance(TTL - 1)
        self.registry.unregister(KEY.node)  # gone meanwhile
        proto.dataReceived(wire.request(wire.HEARTBEAT))
        [reply] = parse(transport.value())
        self.assertEqual((reply.status, reply.text), (404, "unknown node; register again"))
        self.assertTrue(transport.disconnecting)

    def test_otherRequestRefused(self):
        """Anything but HEARTBEAT on a control connection is 400 and closes it."""
        self.firewalled()
        proto, transport = self.opened()
        proto.dataReceived(wire.request(wire.PEERS))
        [reply] = parse(transport.value())
        self.assertEqual(reply.status, wire.BAD_REQUEST)
        self.assertTrue(transport.disconnecting)

    def test_connectionCapsNotHeld(self):
        """A control connection leaves the per-address connection cap to other connections."""
        self.factory.connections.counter.perAddress = 1
        self.firewalled()
        self.opened(peer=ASKER)
        status, *items, end = self.answer(wire.request(wire.PEERS), peer=ASKER)
        self.assertEqual(status.status, wire.OK)


class ControlCapTests(ControlTestCase):
    options = {"maxControl": 1}

    def test_cap(self):
        """Over --max-control, CONTROL is 503 retry=60 naming how many the relay holds."""
        self.firewalled()
        self.opened()
        self.nodes.at.pop(("10.1.2.3", 5001), None)
        self.firewalled(OTHER, 5001)
        proto, transport = self.connect(ASKER)
        proto.dataReceived(wire.request(wire.CONTROL, node=OTHER.node))
        [reply] = parse(transport.value())
        self.assertEqual(
            (reply.status, reply.get("retry"), reply.text),
            (503, "60", "the relay holds 1 control connection"),
        )

    def test_replacementFits(self):
        """At the cap, the node already holding one may still replace it."""
        self.firewalled()
        self.opened()
        self.opened(peer=ASKER)
        self.assertEqual(len(self.factory.controls), 1)


class PrivateControlTests(ControlTestCase):
    secret = SECRET
    private = True

    def test_provedByKeyAndSecretOnly(self):
        """On a private relay CONTROL is challenged once, for the node's key and the secret."""
        self.firewalled()
        proto, transport = self.control()
        [reply] = parse(transport.value())
        self.assertEqual(reply.status, wire.OK)


class ReverseTests(ControlTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.firewalled()
        self.node, self.orders = self.opened()

    def reverse(self, peer=ASKER, **fields) -> wire.Message:
        fields = {"node": KEY.node, "port": 7000, "token": TOKEN, **fields}
        [reply] = self.answer(wire.request(wire.REVERSE, **fields), peer=peer)
        return reply

    def test_ordered(self):
        """REVERSE sends CONNECT token= host= port= to the node and answers 200 at once."""
        reply = self.reverse()
        self.assertEqual((reply.status, reply.text), (200, f"asked {KEY.node} to connect to you"))
        [order] = parse(self.orders.value())
        self.assertEqual(order.word, wire.CONNECT)
        self.assertEqual(
            (order.nonce("token"), order.get("host"), order.port()), (TOKEN, "10.4.4.4", 7000)
        )

    def test_hostIsTheSource(self):
        """The node is sent to the client's source address, never to a host the client names."""
        self.reverse(host="192.0.2.99")
        [order] = parse(self.orders.value())
        self.assertEqual(order.get("host"), "10.4.4.4")

    def test_mappedSourceIsPlain(self):
        """A client seen over a dual-stack socket as ::ffff:10.4.4.4 is ordered as 10.4.4.4."""
        self.reverse(peer=IPv6Address("TCP", "::ffff:10.4.4.4", 41000))
        [order] = parse(self.orders.value())
        self.assertEqual(order.get("host"), "10.4.4.4")

    def test_noControl(self):
        """REVERSE to a node without a control connection is 404 and orders nothing."""
        self.node.connectionLost(None)
        reply = self.reverse()
        self.assertEqual((reply.status, reply.text), (404, f"{KEY.node} holds no control connection here"))
        self.assertEqual(self.orders.value(), b"")

    def test_badToken(self):
        """A token that is not a nonce is 400."""
        self.assertEqual(self.reverse(token="short").status, wire.BAD_REQUEST)

    def test_allowanceFitsAFileOfPieces(self):
        """Five 256 MiB files' 320 pieces (one request each) from a firewalled node fit one source's burst."""
        for _ in range(320):
            proto, transport = self.connect(ASKER)
            proto.dataReceived(wire.request(wire.REVERSE, node=KEY.node, port=7000, token=TOKEN))
            [reply] = parse(transport.value())
            self.assertEqual(reply.status, wire.OK, reply.text)
            proto.connectionLost(None)

    def test_perSourceAllowance(self):
        """One source gets PATH_BURST reverse requests at once, then 503 retry=; others still get theirs."""
        for _ in range(PATH_BURST):  # each closed, so the per-address connection cap stays out of it
            proto, transport = self.connect(ASKER)
            proto.dataReceived(wire.request(wire.REVERSE, node=KEY.node, port=7000, token=TOKEN))
            [reply] = parse(transport.value())
            self.assertEqual(reply.status, wire.OK)
            proto.connectionLost(None)
        refused = self.reverse()
        self.assertEqual(refused.status, wire.BUSY)
        self.assertEqual(refused.get("retry"), "1")
        self.assertEqual(self.reverse(peer=IPv4Address("TCP", "10.5.5.5", 1)).status, wire.OK)
        self.clock.advance(1)
        self.assertEqual(self.reverse().status, wire.OK)


class PrivateReverseTests(ControlTestCase):
    secret = SECRET
    private = True

    def test_challenged(self):
        """A private relay challenges REVERSE for the secret like any query."""
        self.firewalled()
        self.opened()
        proto, transport = self.connect(ASKER)
        proto.dataReceived(wire.request(wire.REVERSE, node=KEY.node, port=7000, token=TOKEN))
        [challenge] = parse(transport.value())
        self.assertEqual((challenge.status, challenge.get("secret")), (100, "1"))


class HysteresisTests(RelayTestCase):
    """Re-checks of a direct node: one miss of a long-reachable node is only suspicion."""

    def setUp(self) -> None:
        super().setUp()
        self.registry._random = random.Random(1)
        self.answer(registration(files=["a"]))
        self.nodes.dialled.clear()

    def probeFails(self) -> None:
        self.nodes.at.pop(NODE_AT, None)
        self.factory.recheck(self.registry.get(KEY.node))

    def test_shortLivedFlipsAtOnce(self):
        """A node direct for less than LONG_REACHABLE is firewalled at its first failed probe."""
        self.clock.advance(60)
        self.answer(wire.request(wire.HEARTBEAT, node=KEY.node))
        self.probeFails()
        self.assertEqual(self.registry.get(KEY.node).reach, "firewalled")

    def test_oneMissStaysDirect(self):
        """A long-reachable node's first failed probe counts a miss; it stays direct (second tier)."""
        self.longReachable()
        self.probeFails()
        peer = self.registry.get(KEY.node)
        self.assertEqual((peer.reach, peer.misses, peer.tier), ("direct", 1, 1))

    def longReachable(self) -> None:
        for _ in range(4):
            self.clock.advance(LONG_REACHABLE / 4)
            self.answer(wire.request(wire.HEARTBEAT, node=KEY.node))

    def test_confirmingProbe(self):
        """After a miss the relay probes again CONFIRM_DELAY later, whatever the recheck interval."""
        self.longReachable()
        self.probeFails()
        self.assertEqual(len(self.nodes.dialled), 1)
        self.clock.advance(CONFIRM_DELAY - 0.5)
        self.assertEqual(len(self.nodes.dialled), 1)
        self.clock.advance(0.5)
        self.assertEqual(len(self.nodes.dialled), 2)
        self.assertLess(CONFIRM_DELAY, RECHECK_INTERVAL)

    def test_secondMissFlips(self):
        """A second failure in a row makes the node firewalled."""
        self.longReachable()
        self.probeFails()
        self.clock.advance(CONFIRM_DELAY)
        self.assertEqual(self.registry.get(KEY.node).reach, "firewalled")
        self.assertEqual(self.registry.active(), [])

    def test_successClears(self):
        """A successful confirming probe forgets the miss: first tier again."""
        self.longReachable()
        self.probeFails()
        self.nodes.at[NODE_AT] = KEY
        self.clock.advance(CONFIRM_DELAY)
        peer = self.registry.get(KEY.node)
        self.assertEqual((peer.reach, peer.misses), ("direct", 0))

    def test_missLogged(self):
        """The miss is logged with the probe's reason and the confirmation to come."""
        self.longReachable()
        with capturedLogs() as events:
            self.probeFails()
        [event] = [e for e in events if "missed a probe" in e["log_format"]]
        self.assertEqual((event["why"], event["delay"]), ("connection refused", CONFIRM_DELAY))
