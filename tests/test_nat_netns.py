"""
Through a real NAT: the relay and the client on a public link, the node
on a LAN behind a router namespace doing nft masquerade with no port
forwarded (``tests/netns.py`` draws it).  The node registers from the
router's public address, where nothing can reach it; the relay records
it firewalled, and a client on the public side still gets its file, by
a reverse connection and, with ``--no-listen``, through the relay.

The public link also speaks IPv6: a public node with the default
``--port`` registering over IPv6 is reached there (listed direct).

Needs root, ``ip`` and ``nft``; skipped with a one-line reason otherwise.
"""

from __future__ import annotations

import json
import re
import subprocess
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from p2prelay.cli.demo import LISTENING, REGISTERED, script

from .netns import NATTopology, Listener, connect, namespaces, python, skipUnlessNamespaces

NODE_OPEN = re.compile(r"control connection to relay \S+ open")
RELAY_OPEN = re.compile(r"control connection from \S+ at \S+ open")
CONTENT = bytes(range(256)) * 4096 + b"behind the router\n"  # 1 MiB and a bit


class TopologyTests(SynchronousTestCase):
    """The harness's NAT is a NAT: out works and is masqueraded, in does not."""

    def setUp(self) -> None:
        skipUnlessNamespaces("nft")
        self.net = NATTopology()
        self.addCleanup(self.net.close)
        self.net.open()

    def test_nodeConnectsOutAsRouter(self) -> None:
        """The node connects out to the relay's namespace and arrives from the router's public address."""
        listener = Listener(self.net, self.net.relay, NATTopology.RELAY)
        self.addCleanup(listener.stop)
        self.assertEqual(connect(self.net, self.net.node, NATTopology.RELAY, listener.port), "connected")
        self.assertEqual(listener.peer(), NATTopology.ROUTER_PUBLIC)

    def test_nothingConnectsIn(self) -> None:
        """
        From the relay's namespace the node's LAN address is unreachable and
        the router's public address refuses the node's listening port: no
        route in, no port forwarded.
        """
        listener = Listener(self.net, self.net.node, "0.0.0.0", timeout=2)
        self.addCleanup(listener.stop)
        self.assertEqual(
            connect(self.net, self.net.relay, NATTopology.NODE, listener.port),
            "OSError 101",  # ENETUNREACH
        )
        self.assertEqual(
            connect(self.net, self.net.relay, NATTopology.ROUTER_PUBLIC, listener.port),
            "ConnectionRefusedError 111",
        )
        self.assertEqual(listener.peer(), "nobody")

    def test_deletedOnClose(self) -> None:
        """Closing the topology deletes every namespace it made, and a second close is harmless."""
        made = list(self.net.made)
        self.assertEqual(len(made), 5)
        self.assertTrue(set(made) <= set(namespaces()))
        self.net.close()
        self.net.close()
        self.assertEqual(set(made) & set(namespaces()), set())


class NATFetchTests(SynchronousTestCase):
    """A relay and a client in public, a node sharing one file behind the masquerading router."""

    def setUp(self) -> None:
        skipUnlessNamespaces("nft")
        self.root = Path(tempfile.mkdtemp(prefix="p2prelay-nat-")).resolve()
        self.addCleanup(shutil.rmtree, self.root, True)
        self.net = NATTopology()
        self.addCleanup(self.net.close)
        self.net.open()
        relay = self.net.daemon(
            self.net.relay, ["relay", "--port", f"tcp:0:interface={NATTopology.RELAY}"], str(self.root)
        )
        host, port = relay.waitFor(LISTENING).group("host", "port")
        self.relay, self.relayDaemon = f"{host}:{port}", relay
        share = self.root / "share"
        share.mkdir()
        (share / "behind.bin").write_bytes(CONTENT)
        self.node = self.net.daemon(
            self.net.node,
            ["peernode", "--relay", self.relay, "--dir", str(share), "--key", str(self.root / "node.key")],
            str(self.root),
        )
        self.node.waitFor(REGISTERED)
        self.node.waitFor(NODE_OPEN)
        relay.waitFor(RELAY_OPEN)  # each log is read on its own: wait for both

    def fetch(self, *args: str):
        """``p2p-fetch --relay RELAY --json ARGS`` in the client's namespace, to its end."""
        return self.net.runIn(
            self.net.client,
            [*script("p2p-fetch"), "--relay", self.relay, "--json", *args],
            cwd=str(self.root),
            stdin=subprocess.DEVNULL,
        )

    def record(self, result) -> dict:
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout.decode().splitlines()[-1])

    def test_recordedFirewalled(self) -> None:
        """The relay lists the node at the router's public address, reach=firewalled."""
        code = (
            "import sys; from tests.support import relayQuery; from p2prelay import wire; "
            "[print(p.get('host'), p.get('reach')) "
            f"for p in relayQuery({self.relay!r}, wire.request(wire.PEERS))[1:]]"
        )
        result = self.net.runIn(self.net.client, python(code), cwd=str(Path(__file__).parent.parent))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().split(), [NATTopology.ROUTER_PUBLIC, "firewalled"])

    def test_reverse(self) -> None:
        """A client that can accept connections gets the file over a reverse connection."""
        out = self.root / "out-reverse"
        result = self.fetch("-o", str(out), "behind.bin")
        self.assertEqual(self.record(result)["path"], "reverse", result.stderr)
        self.assertTrue((out / "behind.bin").read_bytes() == CONTENT)

    def test_relayed(self) -> None:
        """With --no-listen the client gets the file through a circuit at the relay."""
        out = self.root / "out-relay"
        result = self.fetch("--no-listen", "-o", str(out), "behind.bin")
        self.assertEqual(self.record(result)["path"], "relay", result.stderr)
        self.assertTrue((out / "behind.bin").read_bytes() == CONTENT)


class DualStackTests(SynchronousTestCase):
    """
    The public link over IPv6: a relay listening on fd77:1::1 and a public
    node (in the client's namespace) with the default ``--port`` that
    registers over IPv6, where the relay records the address it came from.
    """

    def setUp(self) -> None:
        skipUnlessNamespaces("nft")
        self.root = Path(tempfile.mkdtemp(prefix="p2prelay-v6-")).resolve()
        self.addCleanup(shutil.rmtree, self.root, True)
        self.net = NATTopology()
        self.addCleanup(self.net.close)
        self.net.open()
        interface = NATTopology.RELAY6.replace(":", "\\:")
        relay = self.net.daemon(
            self.net.relay, ["relay", "--port", f"tcp6:0:interface={interface}"], str(self.root)
        )
        port = relay.waitFor(LISTENING).group("port")
        self.relay = f"[{NATTopology.RELAY6}]:{port}"
        self.relayPlain = f"{NATTopology.RELAY6}:{port}"  # as tests.support.relayQuery splits it
        share = self.root / "share"
        share.mkdir()
        (share / "v6.bin").write_bytes(CONTENT)
        self.node = self.net.daemon(
            self.net.client,
            ["peernode", "--relay", self.relay, "--dir", str(share), "--key", str(self.root / "node.key")],
            str(self.root),
        )
        self.node.waitFor(REGISTERED)

    def test_listedDirect(self) -> None:
        """The default --port serves IPv6 too: the dial-back reaches the node, listed direct at fd77:1::2."""
        code = (
            "from tests.support import relayQuery; from p2prelay import wire; "
            "[print(p.get('host'), p.get('reach')) "
            f"for p in relayQuery({self.relayPlain!r}, wire.request(wire.PEERS))[1:]]"
        )
        result = self.net.runIn(self.net.client, python(code), cwd=str(Path(__file__).parent.parent))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().split(), [NATTopology.CLIENT6, "direct"])

    def test_fetchedDirect(self) -> None:
        """A client on the IPv6 link fetches from it directly."""
        out = self.root / "out-v6"
        result = self.net.runIn(
            self.net.relay,
            [*script("p2p-fetch"), "--relay", self.relay, "--json", "-o", str(out), "v6.bin"],
            cwd=str(self.root),
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        record = json.loads(result.stdout.decode().splitlines()[-1])
        self.assertEqual(record["path"], "direct")
        self.assertTrue(record["peer"].startswith(f"[{NATTopology.CLIENT6}]:"), record["peer"])
        self.assertTrue((out / "v6.bin").read_bytes() == CONTENT)
