"""
twistd's options for both daemons (``twistd relay``, ``twistd peernode``)
and the services ``makeService`` assembles from them.  The option names
are a contract: scripts and unit files use them.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import tap_node, tap_relay
from p2prelay.node.service import NodeService
from p2prelay.node.upkeep import DEFAULT_RESCAN
from p2prelay.relay.registry import DEFAULT_TTL
from p2prelay.relay.service import RelayService
from p2prelay.tap import NodeOptions, RelayOptions, makeNodeService, makeRelayService

from .test_service import UDPReactor, syncThread


def names(options: usage.Options) -> set[str]:
    """Every option as typed: long names, and short ones with one dash."""
    short = {f"-{s}" for s in options.synonyms if len(s) == 1}
    return {f"--{o.rstrip('=')}" for o in options.longOpt} | short


class TapModuleTests(SynchronousTestCase):
    def test_relayTap(self) -> None:
        """twistd relay's tap module offers RelayOptions and makeRelayService."""
        self.assertIs(tap_relay.Options, RelayOptions)
        self.assertIs(tap_relay.makeService, makeRelayService)

    def test_nodeTap(self) -> None:
        """twistd peernode's tap module offers NodeOptions and makeNodeService."""
        self.assertIs(tap_node.Options, NodeOptions)
        self.assertIs(tap_node.makeService, makeNodeService)


class RelayOptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> RelayOptions:
        options = RelayOptions()
        options.parseOptions(list(argv))
        return options

    def test_contract(self) -> None:
        """twistd relay keeps every option it has had."""
        self.assertLessEqual({"--port", "-p", "--ttl", "--state"}, names(RelayOptions()))

    def test_defaults(self) -> None:
        """By default the relay listens on TCP 8000, with the standard ttl, in memory only."""
        options = self.parse()
        self.assertEqual(
            (options["port"], options["ttl"], options["state"]), ("tcp:8000", DEFAULT_TTL, None)
        )

    def test_portNumber(self) -> None:
        """A bare port number means TCP on every interface."""
        self.assertEqual(self.parse("--port", "9000")["port"], "tcp:9000")

    def test_portDescription(self) -> None:
        """An endpoint description is kept as written."""
        self.assertEqual(self.parse("-p", "tcp:0:interface=127.0.0.1")["port"], "tcp:0:interface=127.0.0.1")

    def test_ttl(self) -> None:
        """--ttl takes fractional seconds."""
        self.assertEqual(self.parse("--ttl", "4.5")["ttl"], 4.5)

    def test_badTtl(self) -> None:
        """A ttl that is zero, negative, not a number or not finite is a usage error."""
        for value in ("0", "-1", "abc", "nan", "inf"):
            with self.subTest(value=value):
                with self.assertRaises(usage.UsageError) as caught:
                    self.parse("--ttl", value)
                self.assertIn(f"--ttl {value}: not a positive number of seconds", str(caught.exception))

    def test_badPort(self) -> None:
        """A port that is neither a number in range nor a parseable description is a usage error."""
        for value in ("nonsense", "70000", "nosuch:8000", "tcp:abc"):
            with self.subTest(value=value):
                self.assertRaises(usage.UsageError, self.parse, "--port", value)

    def test_makeService(self) -> None:
        """makeService assembles a relay listening where --port says, with the --ttl."""
        reactor = UDPReactor()
        service = makeRelayService(self.parse("--port", "tcp:0:interface=127.0.0.1", "--ttl", "7"), reactor)
        self.assertIsInstance(service, RelayService)
        self.assertEqual(service.listener.description, "tcp:0:interface=127.0.0.1")
        self.assertEqual(service.registry.ttl, 7)


class NodeOptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()
        (self.folder / "a.txt").write_bytes(b"alpha")

    def parse(self, *argv: str, folder: bool = True) -> NodeOptions:
        options = NodeOptions()
        options.parseOptions((["--dir", str(self.folder)] if folder else []) + list(argv))
        return options

    def usageError(self, *argv: str, folder: bool = True) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*argv, folder=folder)
        return str(caught.exception)

    def test_contract(self) -> None:
        """twistd peernode keeps every option it has had, long and short."""
        self.assertLessEqual(
            {"--relay", "-r", "--dir", "-d", "--port", "-p", "--advertise", "-a",
             "--heartbeat", "--rescan", "--udp-port", "--no-udp"},
            names(NodeOptions()),
        )

    def test_defaults(self) -> None:
        """By default: relay localhost:8000, an OS-chosen TCP port, rescans every 10 s, UDP on all interfaces."""
        options = self.parse()
        self.assertEqual(
            {k: options[k] for k in ("relay", "port", "advertise", "heartbeat", "rescan", "udp")},
            {"relay": "localhost:8000", "port": "tcp:0", "advertise": None, "heartbeat": None,
             "rescan": DEFAULT_RESCAN, "udp": (0, "")},
        )

    def test_relayDefaultIgnoresEnvironment(self) -> None:
        """twistd peernode's --relay default is fixed; $P2PRELAY_RELAY is the .tac's and p2p-peer's."""
        self.patch(os, "environ", dict(os.environ, P2PRELAY_RELAY="elsewhere:1"))
        self.assertEqual(self.parse()["relay"], "localhost:8000")

    def test_dirRequired(self) -> None:
        """--dir is required."""
        self.assertEqual(self.usageError(folder=False), "--dir is required")

    def test_dirNotADirectory(self) -> None:
        """A --dir that is not a folder is a usage error."""
        self.assertIn("not a directory", self.usageError("--dir", str(self.folder / "a.txt")))

    def test_badRelay(self) -> None:
        """A --relay that is neither HOST:PORT nor a client endpoint description is a usage error."""
        self.assertIn("--relay", self.usageError("--relay", "nowhere"))

    def test_badPort(self) -> None:
        """A --port no endpoint parser accepts is a usage error, not a failed start."""
        self.usageError("--port", "nosuch:0")

    def test_durations(self) -> None:
        """--heartbeat and --rescan take fractional seconds."""
        options = self.parse("--heartbeat", "0.5", "--rescan", "2")
        self.assertEqual((options["heartbeat"], options["rescan"]), (0.5, 2.0))

    def test_badHeartbeat(self) -> None:
        """A zero, negative or non-numeric --heartbeat is a usage error (it would break callLater)."""
        for value in ("-1", "0", "abc", "inf"):
            with self.subTest(value=value):
                self.assertIn(f"--heartbeat {value}: not a positive number", self.usageError("--heartbeat", value))

    def test_badRescan(self) -> None:
        """A zero or negative --rescan is a usage error."""
        for value in ("-5", "0"):
            with self.subTest(value=value):
                self.assertIn(f"--rescan {value}", self.usageError("--rescan", value))

    def test_udpFollowsPortInterface(self) -> None:
        """UDP is served on the --port interface by default."""
        self.assertEqual(self.parse("--port", "tcp:0:interface=127.0.0.1")["udp"], (0, "127.0.0.1"))

    def test_udpPort(self) -> None:
        """--udp-port sets the UDP port, still on the --port interface."""
        self.assertEqual(
            self.parse("--port", "tcp:0:interface=127.0.0.1", "--udp-port", "5555")["udp"],
            (5555, "127.0.0.1"),
        )

    def test_udpPortInterface(self) -> None:
        """--udp-port udp:PORT:interface=ADDR sets both."""
        self.assertEqual(
            self.parse("--udp-port", "udp:5555:interface=127.0.0.2")["udp"], (5555, "127.0.0.2")
        )

    def test_badUdpPort(self) -> None:
        """A --udp-port that is not a port is a usage error."""
        self.assertIn("--udp-port", self.usageError("--udp-port", "udp:many"))

    def test_noUdp(self) -> None:
        """--no-udp serves TCP only."""
        self.assertIsNone(self.parse("--no-udp")["udp"])

    def node(self, *argv: str) -> tuple[NodeService, UDPReactor]:
        reactor = UDPReactor()
        node = makeNodeService(self.parse(*argv), reactor, runInThread=syncThread)
        node.startService()
        self.addCleanup(node.stopService)
        return node, reactor

    def test_makeService(self) -> None:
        """makeService assembles a node from the options: folder, port, advertise, timings."""
        node, reactor = self.node(
            "--port", "tcp:7000:interface=127.0.0.1", "--advertise", "node.example",
            "--heartbeat", "5", "--rescan", "3",
        )
        self.successResultOf(node.ready)
        self.assertEqual(reactor.tcpServers[0][0::3], (7000, "127.0.0.1"))
        self.assertEqual(list(node.share.entries), ["a.txt"])
        registrar = node.registrar
        self.assertEqual(
            (registrar.advertise, registrar.heartbeat, registrar.rescanInterval),
            ("node.example", 5.0, 3.0),
        )

    def test_makeServiceBindsUdpOnPortInterface(self) -> None:
        """The assembled node binds UDP on the --port interface."""
        node, reactor = self.node("--port", "tcp:0:interface=127.0.0.1")
        self.successResultOf(node.ready)
        [udp] = reactor.udpPorts
        self.assertEqual((udp.number, udp.interface), (40000, "127.0.0.1"))

    def test_makeServiceNoUdp(self) -> None:
        """With --no-udp the assembled node binds no UDP port."""
        node, reactor = self.node("--no-udp")
        self.successResultOf(node.ready)
        self.assertEqual(reactor.udpPorts, [])


SECRET = b"a shared secret of some length"


class IdentityOptionsTests(SynchronousTestCase):
    """--key and --secret-file on nodes, --secret-file and --private on the relay."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()
        self.secretFile = Path(self.mktemp()).absolute()
        self.secretFile.write_bytes(SECRET + b"\n")

    def node(self, *argv: str) -> NodeOptions:
        options = NodeOptions()
        options.parseOptions(["--dir", str(self.folder), *argv])
        return options

    def relay(self, *argv: str) -> RelayOptions:
        options = RelayOptions()
        options.parseOptions(list(argv))
        return options

    def test_keyFileMadeAndKept(self) -> None:
        """--key PATH makes the key there on first use; the node id is the key's, the same next time."""
        path = Path(self.mktemp()).absolute() / "node.key"
        first = self.node("--key", str(path))["nodeKey"]
        self.assertTrue(path.exists())
        self.assertEqual(self.node("--key", str(path))["nodeKey"].node, first.node)

    def test_defaultKeyPerFolder(self) -> None:
        """Without --key the key lives in the state folder, one per shared folder, outside it."""
        key = self.node()["nodeKey"]
        from p2prelay.identity import defaultKeyPath

        path = defaultKeyPath(self.folder)
        self.assertTrue(path.exists())
        self.assertNotIn(str(self.folder), str(path))
        self.assertEqual(self.node()["nodeKey"].node, key.node)

    def test_badKeyFile(self) -> None:
        """A --key file that is not a key is a usage error naming it."""
        path = Path(self.mktemp()).absolute()
        path.write_bytes(b"junk")
        with self.assertRaises(usage.UsageError) as caught:
            self.node("--key", str(path))
        self.assertIn("--key", str(caught.exception))

    def test_nodeKeyUsed(self) -> None:
        """The assembled node serves and registers with the key from --key."""
        path = Path(self.mktemp()).absolute()
        options = self.node("--key", str(path))
        node = makeNodeService(options, UDPReactor(), runInThread=syncThread)
        self.assertEqual(node.node, options["nodeKey"].node)
        self.assertIs(node.files.key, options["nodeKey"])

    def test_nodeSecret(self) -> None:
        """--secret-file gives the node the secret, surrounding white space stripped."""
        options = self.node("--secret-file", str(self.secretFile))
        self.assertEqual(options["secret"], SECRET)
        node = makeNodeService(options, UDPReactor(), runInThread=syncThread)
        self.assertEqual(node.secret, SECRET)

    def test_missingSecretFile(self) -> None:
        """A --secret-file that cannot be read is a usage error, on node and relay."""
        self.assertRaises(usage.UsageError, self.node, "--secret-file", "/nonexistent/secret")
        self.assertRaises(usage.UsageError, self.relay, "--secret-file", "/nonexistent/secret")

    def test_relaySecretAndPrivate(self) -> None:
        """The relay's --secret-file and --private reach its factory."""
        options = self.relay("--secret-file", str(self.secretFile), "--private")
        service = makeRelayService(options, UDPReactor())
        self.assertEqual((service.factory.secret, service.factory.private), (SECRET, True))

    def test_relayOpenByDefault(self) -> None:
        """Without options the relay has no secret and answers clients freely."""
        service = makeRelayService(self.relay(), UDPReactor())
        self.assertEqual((service.factory.secret, service.factory.private), (None, False))

    def test_privateNeedsSecret(self) -> None:
        """--private without --secret-file is a usage error."""
        with self.assertRaises(usage.UsageError) as caught:
            self.relay("--private")
        self.assertIn("--secret-file", str(caught.exception))
