"""
twistd's options for both daemons (``twistd relay``, ``twistd peernode``)
and the services ``makeService`` assembles from them.  The option names
are a contract: scripts and unit files use them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import tap_node, tap_relay
from p2prelay.limits import MAX_INFLIGHT_BYTES
from p2prelay.negotiation import (
    CLOSE_DEADLINE,
    IDLE_TIMEOUT,
    MIN_RATE,
    NEGOTIATION_DEADLINE,
    REQUEST_DEADLINE,
)
from p2prelay.node.service import NodeService
from p2prelay.node.upkeep import DEFAULT_RESCAN
from p2prelay.pieces import PIECE_SIZE
from p2prelay.relay import dialback
from p2prelay.relay.registry import DEFAULT_TTL, MAX_PER_SOURCE, MAX_TOTAL
from p2prelay.relay.service import RelayService
from p2prelay.tap import (
    ByteSize,
    NodeOptions,
    RelayOptions,
    makeNodeService,
    makeRelayService,
    parseSize,
)
from p2prelay.udp import server as udpServer

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


class RelayRegistryOptionsTests(SynchronousTestCase):
    """--registry and --registry-password-file: where the relay keeps its registry."""

    def parse(self, *argv: str) -> RelayOptions:
        options = RelayOptions()
        options.parseOptions(list(argv))
        return options

    def test_inMemoryByDefault(self) -> None:
        """Without --registry the registry is in memory: no Redis address."""
        self.assertIsNone(self.parse()["redis"])

    def test_tcp(self) -> None:
        """redis://HOST:PORT/DB names a Redis on TCP and its database."""
        address = self.parse("--registry", "redis://10.0.0.5:6380/3")["redis"]
        self.assertEqual((address.host, address.port, address.db, address.path), ("10.0.0.5", 6380, 3, None))

    def test_unix(self) -> None:
        """unix:///path?db=N names a Redis on a unix socket."""
        address = self.parse("--registry", "unix:///run/redis.sock?db=2")["redis"]
        self.assertEqual((address.path, address.db), ("/run/redis.sock", 2))

    def test_passwordFromFile(self) -> None:
        """--registry-password-file gives the password, its first line."""
        path = self.mktemp()
        Path(path).write_text("s3cret\nignored\n")
        address = self.parse("--registry", "redis://h/0", "--registry-password-file", path)["redis"]
        self.assertEqual(address.password, "s3cret")

    def test_malformed(self) -> None:
        """A --registry that names no Redis is a usage error saying what is wrong."""
        for url, says in [
            ("http://h/0", "not a registry address"),
            ("redis://h:99999/0", "port"),
            ("redis://h/99", "database"),
            ("redis://:pw@h/0", "--registry-password-file"),
            ("unix:relative.sock", "absolute path"),
        ]:
            with self.subTest(url=url):
                with self.assertRaises(usage.UsageError) as caught:
                    self.parse("--registry", url)
                self.assertIn("--registry", str(caught.exception))
                self.assertIn(says, str(caught.exception))

    def test_passwordFileMissing(self) -> None:
        """A password file that cannot be read is a usage error."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--registry", "redis://h/0", "--registry-password-file", self.mktemp())
        self.assertIn("cannot read the Redis password file", str(caught.exception))

    def test_passwordFileAlone(self) -> None:
        """--registry-password-file without --registry is a usage error."""
        with self.assertRaises(usage.UsageError):
            self.parse("--registry-password-file", "x")

    def test_notWithState(self) -> None:
        """--state (the in-memory registry's file) and --registry exclude each other."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--registry", "redis://h/0", "--state", "s.db")
        self.assertIn("--state", str(caught.exception))


class RelayPathOptionsTests(SynchronousTestCase):
    """The relay's options for firewalled nodes: control connections and relayed circuits."""

    def parse(self, *argv: str) -> RelayOptions:
        options = RelayOptions()
        options.parseOptions(list(argv))
        return options

    def usageError(self, *argv: str) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*argv)
        return str(caught.exception)

    def test_defaults(self) -> None:
        """By default the relay relays: 64 circuits, 8 per node, 2G and an hour each, no rate cap, 1024 control connections."""
        from p2prelay.relay.circuits import CircuitLimits

        options = self.parse()
        self.assertEqual(options.circuitLimits(), CircuitLimits())
        self.assertEqual(
            (options.circuitLimits().maxCircuits, options.circuitLimits().maxPerNode,
             options.circuitLimits().bytes, options.circuitLimits().seconds,
             options.circuitLimits().rate, options["max-control"]),
            (64, 8, 2 << 30, 3600.0, 0, 1024),
        )

    def test_given(self) -> None:
        """Each option sets its limit."""
        options = self.parse(
            "--no-relaying", "--max-circuits", "10", "--max-circuits-per-node", "2",
            "--circuit-bytes", "512M", "--circuit-seconds", "90", "--relay-rate", "20M",
            "--max-control", "50",
        )
        limits = options.circuitLimits()
        self.assertEqual(
            (limits.relaying, limits.maxCircuits, limits.maxPerNode, limits.bytes, limits.seconds, limits.rate),
            (False, 10, 2, 512 << 20, 90.0, 20 << 20),
        )
        self.assertEqual(options["max-control"], 50)

    def test_relayRateZero(self) -> None:
        """--relay-rate 0 is no cap."""
        self.assertEqual(self.parse("--relay-rate", "0").circuitLimits().rate, 0)

    def test_badValues(self) -> None:
        """Bad values are usage errors naming the option."""
        for argv, text in [
            (("--max-circuits", "0"), "--max-circuits 0: not a whole number"),
            (("--max-circuits-per-node", "x"), "--max-circuits-per-node x: not a whole number"),
            (("--max-control", "-3"), "--max-control -3: not a whole number"),
            (("--circuit-bytes", "lots"), "--circuit-bytes lots: not a size"),
            (("--circuit-seconds", "0"), "--circuit-seconds 0: not a positive number"),
            (("--relay-rate", "-1"), "--relay-rate -1: not a rate"),
        ]:
            with self.subTest(argv=argv):
                self.assertIn(text, self.usageError(*argv))

    def test_makeServiceWiresLimits(self) -> None:
        """makeService hands the limits to the relay's factory."""
        reactor = UDPReactor()
        service = makeRelayService(
            self.parse("--port", "tcp:0:interface=127.0.0.1", "--max-circuits", "3",
                       "--relay-rate", "1M", "--max-control", "5", "--no-relaying"),
            reactor,
        )
        factory = service.factory
        self.assertEqual(
            (factory.circuits.limits.maxCircuits, factory.circuits.limits.relaying, factory.controls.maximum),
            (3, False, 5),
        )
        self.assertEqual(factory.circuits.limiter.rate, 1 << 20)

    def test_help(self) -> None:
        """Every path option has a help string."""
        text = str(RelayOptions())
        for name in ("--no-relaying", "--max-circuits", "--max-circuits-per-node", "--circuit-bytes",
                     "--circuit-seconds", "--relay-rate", "--max-control"):
            self.assertIn(name, text)


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
            {"relay": "localhost:8000", "port": "tcp6:0:interface=\\:\\:", "advertise": None, "heartbeat": None,
             "rescan": DEFAULT_RESCAN, "udp": (0, "::")},
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

    def test_dirMissing(self) -> None:
        """A --dir that does not exist says so, rather than "not a directory"."""
        self.assertIn("does not exist", self.usageError("--dir", str(self.folder / "nothing")))

    def test_badRelay(self) -> None:
        """A --relay that is neither HOST:PORT nor a client endpoint description is a usage error."""
        self.assertIn("--relay", self.usageError("--relay", "no where"))

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

    def test_udpPortEscapedIPv6Interface(self) -> None:
        """--udp-port takes an IPv6 interface with escaped colons, as tcp6: descriptions do."""
        self.assertEqual(
            self.parse("--udp-port", r"udp:0:interface=fd77\:4\:\:1")["udp"], (0, "fd77:4::1")
        )

    def test_udpPortBracketedIPv6Interface(self) -> None:
        """--udp-port takes an IPv6 interface in brackets."""
        self.assertEqual(
            self.parse("--udp-port", "udp:0:interface=[fd77:4::1]")["udp"], (0, "fd77:4::1")
        )

    def test_udpFollowsTcp6(self) -> None:
        """Beside --port tcp6: without an interface, UDP is served on '::' (both families)."""
        self.assertEqual(self.parse("--port", "tcp6:0")["udp"], (0, "::"))

    def test_udpFollowsTcp6Interface(self) -> None:
        """Beside --port tcp6: with an interface, UDP is served on that IPv6 address."""
        self.assertEqual(
            self.parse("--port", r"tcp6:0:interface=fd77\:4\:\:1")["udp"], (0, "fd77:4::1")
        )

    def test_advertiseHost(self) -> None:
        """A bare --advertise HOST registers that host and the port bound."""
        options = self.parse("--advertise", "node.example")
        self.assertEqual((options["advertise"], options["advertisePort"]), ("node.example", None))

    def test_advertiseUnbracketedIPv6(self) -> None:
        """A bare IPv6 --advertise is a host, as it has always been."""
        options = self.parse("--advertise", "fd77:4::1")
        self.assertEqual((options["advertise"], options["advertisePort"]), ("fd77:4::1", None))

    def test_advertiseHostPort(self) -> None:
        """--advertise HOST:PORT registers that host and port (a router's forwarded port)."""
        options = self.parse("--advertise", "203.0.113.7:17000")
        self.assertEqual((options["advertise"], options["advertisePort"]), ("203.0.113.7", 17000))

    def test_advertiseBracketedIPv6Port(self) -> None:
        """--advertise [V6]:PORT registers that address and port."""
        options = self.parse("--advertise", "[2001:db8::7]:17000")
        self.assertEqual((options["advertise"], options["advertisePort"]), ("2001:db8::7", 17000))

    def test_advertiseBracketedIPv6(self) -> None:
        """--advertise [V6] registers that address and the port bound."""
        options = self.parse("--advertise", "[2001:db8::7]")
        self.assertEqual((options["advertise"], options["advertisePort"]), ("2001:db8::7", None))

    def test_badAdvertise(self) -> None:
        """An --advertise port out of range, or brackets around no IPv6 address, is a usage error."""
        for value in ("node.example:70000", "[node]:80", "[node]"):
            with self.subTest(value=value):
                self.assertIn("--advertise", self.usageError("--advertise", value))

    def test_advertiseUdp(self) -> None:
        """--advertise-udp PORT is the UDP port to register."""
        self.assertEqual(self.parse("--advertise-udp", "17001")["advertise-udp"], 17001)

    def test_badAdvertiseUdp(self) -> None:
        """An --advertise-udp that is not a port 1-65535, or with --no-udp, is a usage error."""
        for argv in (("--advertise-udp", "0"), ("--advertise-udp", "x"), ("--no-udp", "--advertise-udp", "1")):
            with self.subTest(argv=argv):
                self.assertIn("--advertise-udp", self.usageError(*argv))

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

    def test_makeServiceBindsUdpBesideTcp6(self) -> None:
        """Beside --port tcp6:0 the assembled node binds UDP on '::', not IPv4 only."""
        node, reactor = self.node("--port", "tcp6:0")
        self.successResultOf(node.ready)
        [udp] = reactor.udpPorts
        self.assertEqual(udp.interface, "::")

    def test_makeServiceAdvertisedPorts(self) -> None:
        """--advertise HOST:PORT and --advertise-udp reach the registrar."""
        node, reactor = self.node("--advertise", "203.0.113.7:17000", "--advertise-udp", "17001")
        self.successResultOf(node.ready)
        registrar = node.registrar
        self.assertEqual(
            (registrar.advertise, registrar.registeredPort, registrar.advertiseUdp),
            ("203.0.113.7", 17000, 17001),
        )

    def test_makeServiceNoUdp(self) -> None:
        """With --no-udp the assembled node binds no UDP port."""
        node, reactor = self.node("--no-udp")
        self.successResultOf(node.ready)
        self.assertEqual(reactor.udpPorts, [])

    def test_maxRate(self) -> None:
        """--max-rate takes a size with a suffix and gives the node one limiter at that rate."""
        node, reactor = self.node("--max-rate", "20M")
        self.assertEqual(node.limiter.rate, 20 * 1024 * 1024)
        self.assertIs(node.files.limiter, node.limiter)

    def test_noRateCapByDefault(self) -> None:
        """Without --max-rate uploads are not capped."""
        node, _ = self.node()
        self.assertIsNone(node.limiter)
        self.assertIsNone(node.files.limiter)

    def test_badMaxRate(self) -> None:
        """A --max-rate that is zero or not a size is a usage error."""
        for value in ("0", "fast", "-1M"):
            with self.subTest(value=value):
                self.assertIn("--max-rate", self.usageError("--max-rate", value))

    def test_maxUploads(self) -> None:
        """--max-uploads caps the file server's uploads in all; none by default."""
        node, _ = self.node("--max-uploads", "3")
        self.assertEqual(node.files.uploads.total, 3)
        plain, _ = self.node()
        self.assertIsNone(plain.files.uploads)

    def test_badMaxUploads(self) -> None:
        """A --max-uploads of zero is a usage error."""
        self.assertIn("--max-uploads", self.usageError("--max-uploads", "0"))

    def test_pieceSize(self) -> None:
        """--piece-size sets the pieces the share is hashed in; the default is 4 MiB."""
        node, _ = self.node("--piece-size", "64K")
        self.assertEqual(node.share.pieceSize, 64 * 1024)
        plain, _ = self.node()
        self.assertEqual(plain.share.pieceSize, PIECE_SIZE)

    def test_badPieceSize(self) -> None:
        """A --piece-size outside 16K..64M is a usage error."""
        for value in ("1K", "128M", "lots"):
            with self.subTest(value=value):
                self.assertIn("--piece-size", self.usageError("--piece-size", value))

    def test_manifestCacheBesideKey(self) -> None:
        """The node's manifest cache lives in its state folder, beside the key, never in the share."""
        from p2prelay.identity import nodeStateDir

        node, _ = self.node()
        self.successResultOf(node.ready)
        self.assertEqual(node.cache.path.parent, nodeStateDir(node.share.root))
        self.assertTrue(node.cache.path.exists())
        self.assertNotIn(str(node.share.root), str(node.cache.path))


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


CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)


def connect(factory):
    """A connection to ``factory`` from CLIENT: its protocol and StringTransport."""
    transport = StringTransport(peerAddress=CLIENT)
    protocol = factory.buildProtocol(CLIENT)
    protocol.makeConnection(transport)
    return protocol, transport


class SizeTests(SynchronousTestCase):
    """The size parser behind --max-registering-bytes and --min-rate."""

    def test_plainBytes(self) -> None:
        """A bare number is bytes; a B suffix changes nothing."""
        self.assertEqual((parseSize("65536"), parseSize("12B")), (65536, 12))

    def test_binarySuffixes(self) -> None:
        """K, M, G, T (any case, optionally KiB/KB) multiply by powers of 1024."""
        cases = {"64K": 64 << 10, "64m": 64 << 20, "64MiB": 64 << 20, "2GB": 2 << 30,
                 "1T": 1 << 40, " 8 k ": 8 << 10}
        for text, size in cases.items():
            with self.subTest(text=text):
                self.assertEqual(parseSize(text), size)

    def test_fraction(self) -> None:
        """A fraction is allowed, rounded down to whole bytes."""
        self.assertEqual((parseSize("1.5K"), parseSize(".5M")), (1536, 512 << 10))

    def test_notSizes(self) -> None:
        """Nothing, zero, negatives, unknown suffixes and other text are refused."""
        for text in ("", "0", "0K", "0.1", "-1", "64X", "M", "1e3", "64 M B", "nan", "inf", "1KK"):
            with self.subTest(text=text):
                self.assertRaises(ValueError, parseSize, text)

    def test_shown(self) -> None:
        """A size is shown with the largest suffix that is exact (as --help shows defaults)."""
        shown = [str(ByteSize(n)) for n in (64 << 20, 64 << 10, 1536, 1000, 3 << 30)]
        self.assertEqual(shown, ["64M", "64K", "1536", "1000", "3G"])


class RelayLimitOptionsTests(SynchronousTestCase):
    """Every limit of the relay is an option, with its constant as default, reaching the objects."""

    LIMITS = {
        "max-registrations": MAX_TOTAL,
        "max-registrations-per-address": MAX_PER_SOURCE,
        "max-registering-bytes": MAX_INFLIGHT_BYTES,
        "deadline": NEGOTIATION_DEADLINE,
        "min-rate": MIN_RATE,
        "idle-timeout": IDLE_TIMEOUT,
        "close-deadline": CLOSE_DEADLINE,
        "dialback-timeout": dialback.DIALBACK_TIMEOUT,
        "dialback-rate": 10.0,
        "dialback-burst": dialback.DIALBACK_BURST,
        "report-rate": 10.0,
        "report-burst": dialback.REPORT_BURST,
        "recheck-interval": dialback.RECHECK_INTERVAL,
    }

    def parse(self, *argv: str) -> RelayOptions:
        options = RelayOptions()
        options.parseOptions(list(argv))
        return options

    def service(self, *argv: str) -> tuple[RelayService, UDPReactor]:
        reactor = UDPReactor()
        return makeRelayService(self.parse(*argv), reactor), reactor

    def test_defaults(self) -> None:
        """Each limit option defaults to the constant the code uses (rates per minute)."""
        options = self.parse()
        self.assertEqual({k: options[k] for k in self.LIMITS}, self.LIMITS)

    def test_defaultsInHelp(self) -> None:
        """--help shows every limit option with its default, sizes with a suffix."""
        text = str(RelayOptions())
        for option in self.LIMITS:
            with self.subTest(option=option):
                self.assertIn(f"--{option}=", text)
        self.assertIn("[default: 64M]", text)
        self.assertIn("[default: 64K]", text)

    def test_defaultService(self) -> None:
        """Without options, the assembled relay has the standard limits."""
        service, _ = self.service()
        factory, registry = service.factory, service.registry
        self.assertEqual(
            (registry.maxTotal, registry.maxPerSource, factory.maxInflight, factory.deadline,
             factory.minRate, factory.idleTimeout, factory.dialback.timeout,
             factory.dialbacks.rate, factory.dialbacks.burst, factory.reports.rate,
             factory.reports.burst, factory.recheckInterval),
            (MAX_TOTAL, MAX_PER_SOURCE, MAX_INFLIGHT_BYTES, NEGOTIATION_DEADLINE, MIN_RATE,
             IDLE_TIMEOUT, dialback.DIALBACK_TIMEOUT, dialback.DIALBACK_RATE,
             dialback.DIALBACK_BURST, dialback.REPORT_RATE, dialback.REPORT_BURST,
             dialback.RECHECK_INTERVAL),
        )

    def test_registrationCaps(self) -> None:
        """--max-registrations and --max-registrations-per-address reach the registry."""
        service, _ = self.service(
            "--max-registrations", "500", "--max-registrations-per-address", "3"
        )
        self.assertEqual((service.registry.maxTotal, service.registry.maxPerSource), (500, 3))

    def test_registeringBytes(self) -> None:
        """--max-registering-bytes takes a suffix and reaches the factory as bytes."""
        service, _ = self.service("--max-registering-bytes", "2M")
        self.assertEqual(service.factory.maxInflight, 2 << 20)
        self.assertIs(type(service.factory.maxInflight), int)

    def test_dialbackLimits(self) -> None:
        """The dial-back options reach the dial-back, its buckets (per second) and the re-check."""
        service, _ = self.service(
            "--dialback-timeout", "2.5", "--dialback-rate", "30", "--dialback-burst", "4",
            "--report-rate", "6", "--report-burst", "2", "--recheck-interval", "90",
        )
        factory = service.factory
        self.assertEqual(
            (factory.dialback.timeout, factory.dialbacks.rate, factory.dialbacks.burst,
             factory.reports.rate, factory.reports.burst, factory.recheckInterval),
            (2.5, 0.5, 4, 0.1, 2, 90.0),
        )

    def test_dialbackBurstEnforced(self) -> None:
        """With --dialback-burst 2 a source gets two dial-backs at once, then a wait."""
        service, _ = self.service("--dialback-burst", "2", "--dialback-rate", "60")
        bucket = service.factory.dialbacks
        self.assertEqual([bucket.take("192.0.2.7") for _ in range(3)], [0.0, 0.0, 1.0])

    def test_deadline(self) -> None:
        """A relay connection is answered 408 once --deadline seconds pass, not before."""
        service, reactor = self.service("--deadline", "1.5")
        _, transport = connect(service.factory)
        reactor.advance(1.4)
        self.assertEqual(transport.value(), b"")
        reactor.advance(0.1)
        self.assertIn(b" 408 ", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_minRate(self) -> None:
        """Each byte received extends the relay's deadline by 1 / --min-rate seconds."""
        service, reactor = self.service("--deadline", "1", "--min-rate", "1K")
        protocol, transport = connect(service.factory)
        protocol.dataReceived(b"P2P/1 " + b"x" * 2042)  # 2 KiB: 2 s more
        reactor.advance(2.9)
        self.assertEqual(transport.value(), b"")
        reactor.advance(0.1)
        self.assertIn(b" 408 ", transport.value())

    def test_idleTimeout(self) -> None:
        """A relay connection silent for --idle-timeout seconds is closed."""
        service, reactor = self.service("--idle-timeout", "0.5")
        _, transport = connect(service.factory)
        reactor.advance(0.5)
        self.assertIn(b"408 :idle too long", transport.value())

    def test_closeDeadline(self) -> None:
        """A peer that does not take the relay's answer within --close-deadline s (plus its size at --min-rate) is cut off."""
        service, reactor = self.service("--close-deadline", "1", "--min-rate", "1M")
        protocol, transport = connect(service.factory)
        protocol.dataReceived(b"P2P/1 PEERS\n")
        self.assertTrue(transport.disconnecting)
        reactor.advance(0.99)
        self.assertFalse(transport.disconnected)
        reactor.advance(0.02)
        self.assertTrue(transport.disconnected)

    def test_badValues(self) -> None:
        """A zero, negative or non-numeric limit is a usage error naming the option."""
        bad = {
            "max-registrations": "0",
            "max-registrations-per-address": "-1",
            "max-registering-bytes": "lots",
            "deadline": "0",
            "min-rate": "0K",
            "idle-timeout": "inf",
            "close-deadline": "0",
            "dialback-timeout": "-5",
            "dialback-rate": "0",
            "dialback-burst": "1.5",
            "report-rate": "abc",
            "report-burst": "0",
            "recheck-interval": "nan",
        }
        for option, value in bad.items():
            with self.subTest(option=option):
                with self.assertRaises(usage.UsageError) as caught:
                    self.parse(f"--{option}", value)
                self.assertIn(f"--{option} {value}", str(caught.exception))


class NodeLimitOptionsTests(SynchronousTestCase):
    """Every limit of the node is an option, with its constant as default, reaching the objects."""

    LIMITS = {
        "request-deadline": REQUEST_DEADLINE,
        "idle-timeout": IDLE_TIMEOUT,
        "close-deadline": CLOSE_DEADLINE,
        "udp-max-transfers": udpServer.MAX_TRANSFERS,
        "udp-max-per-address": udpServer.MAX_TRANSFERS_PER_ADDRESS,
        "udp-idle-timeout": udpServer.IDLE_TIMEOUT,
        "udp-unacked-timeout": udpServer.UNACKED_TIMEOUT,
    }

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()

    def parse(self, *argv: str) -> NodeOptions:
        options = NodeOptions()
        options.parseOptions(["--dir", str(self.folder), *argv])
        return options

    def node(self, *argv: str) -> tuple[NodeService, UDPReactor]:
        reactor = UDPReactor()
        return makeNodeService(self.parse(*argv), reactor, runInThread=syncThread), reactor

    def test_defaults(self) -> None:
        """Each limit option defaults to the constant the code uses."""
        options = self.parse()
        self.assertEqual({k: options[k] for k in self.LIMITS}, self.LIMITS)

    def test_defaultsInHelp(self) -> None:
        """--help lists every limit option."""
        text = str(NodeOptions())
        for option in self.LIMITS:
            with self.subTest(option=option):
                self.assertIn(f"--{option}=", text)

    def test_udpLimits(self) -> None:
        """The --udp-* limits reach the node's UDP server."""
        node, _ = self.node(
            "--udp-max-transfers", "10", "--udp-max-per-address", "2",
            "--udp-idle-timeout", "12", "--udp-unacked-timeout", "1.5",
        )
        server = node.udpListener.protocol
        self.assertEqual(
            (server.maxTransfers, server.maxPerAddress, server.idleTimeout, server.unackedTimeout),
            (10, 2, 12.0, 1.5),
        )

    def test_defaultUdpLimits(self) -> None:
        """Without options the node's UDP server has the standard limits."""
        node, _ = self.node()
        server = node.udpListener.protocol
        self.assertEqual(
            (server.maxTransfers, server.maxPerAddress, server.idleTimeout, server.unackedTimeout),
            tuple(self.LIMITS[k] for k in ("udp-max-transfers", "udp-max-per-address",
                                           "udp-idle-timeout", "udp-unacked-timeout")),
        )

    def test_requestDeadline(self) -> None:
        """A node connection whose request line is not complete within --request-deadline gets 408."""
        node, reactor = self.node("--request-deadline", "2")
        protocol, transport = connect(node.files)
        protocol.dataReceived(b"P2P/1 GET")
        reactor.advance(1.9)
        self.assertEqual(transport.value(), b"")
        reactor.advance(0.1)
        self.assertIn(b" 408 ", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_idleTimeout(self) -> None:
        """A node connection silent for --idle-timeout seconds is closed."""
        node, reactor = self.node("--idle-timeout", "0.5")
        _, transport = connect(node.files)
        reactor.advance(0.5)
        self.assertIn(b"408 :idle too long", transport.value())

    def test_closeDeadline(self) -> None:
        """A client that does not take the node's last answer within --close-deadline s is cut off."""
        node, reactor = self.node("--close-deadline", "1")
        protocol, transport = connect(node.files)
        protocol.dataReceived(b"P2P/1 HELLO\n")
        self.assertIn(b" 400 ", transport.value())
        reactor.advance(0.99)
        self.assertFalse(transport.disconnected)
        reactor.advance(0.02)
        self.assertTrue(transport.disconnected)

    def test_badValues(self) -> None:
        """A zero, negative or non-numeric limit is a usage error naming the option."""
        bad = {
            "request-deadline": "0",
            "idle-timeout": "-1",
            "close-deadline": "never",
            "udp-max-transfers": "0",
            "udp-max-per-address": "x",
            "udp-idle-timeout": "nan",
            "udp-unacked-timeout": "0",
        }
        for option, value in bad.items():
            with self.subTest(option=option):
                with self.assertRaises(usage.UsageError) as caught:
                    self.parse(f"--{option}", value)
                self.assertIn(f"--{option} {value}", str(caught.exception))


DOCS = Path(__file__).resolve().parent.parent / "docs"


def fetchDefaults() -> dict[str, object]:
    """p2p-fetch's options, as typed, with their defaults."""
    from p2prelay.cli.options import parser

    return {
        option: action.default
        for action in parser()._actions
        for option in action.option_strings
        if option.startswith("--")
    }


def daemonDefaults(options: usage.Options) -> dict[str, object]:
    """A twistd plugin's options, as typed, with their defaults."""
    return {f"--{name}": options.defaults.get(name) for name in options.synonyms.values()}


def sameDefault(documented: str, actual: object) -> bool:
    """A default as the docs write it (``5``, ``64M``, ``none``) is the option's default."""
    if documented == "none":
        return actual is None
    try:
        return parseSize(documented) == actual
    except ValueError:
        return documented == str(actual)


class DocumentedLimitsTests(SynchronousTestCase):
    """The docs name real options, and the limits tables give their real defaults."""

    def setUp(self) -> None:
        from p2prelay.cli.peer import PeerOptions

        self.options = {
            "relay": daemonDefaults(RelayOptions()),
            "node": daemonDefaults(NodeOptions()),
            "peer": daemonDefaults(PeerOptions()),
            "client": fetchDefaults(),
        }

    def test_optionNamesExist(self) -> None:
        """Every ``--option`` in limits.rst, security.rst and protocol.rst is an option of some command."""
        known = set().union(*self.options.values())
        for doc in ("limits.rst", "security.rst", "protocol.rst"):
            text = (DOCS / doc).read_text()
            for name in set(re.findall(r"``(--[a-z][a-z0-9-]*)", text)):
                with self.subTest(doc=doc, option=name):
                    self.assertIn(name, known)

    def test_securityLimitsTable(self) -> None:
        """security.rst's limits table: each row's option exists on its command, with that default."""
        rows = re.findall(
            r"^(relay|node|client)\s+``(--[a-z-]+)``\s+(\S+)\s*$",
            (DOCS / "security.rst").read_text(),
            re.MULTILINE,
        )
        self.assertGreaterEqual(len(rows), 30)
        for command, option, default in rows:
            with self.subTest(command=command, option=option):
                self.assertIn(option, self.options[command])
                self.assertTrue(sameDefault(default, self.options[command][option]), default)

    def test_limitsTables(self) -> None:
        """limits.rst's table per command: each option exists there, with the default it says."""
        text = (DOCS / "limits.rst").read_text()
        sections = {"relay": "The relay (", "node": "The node (", "client": "The client ("}
        for command, heading in sections.items():
            section = text[text.index(heading):]
            table = section.split("\n\n", 2)[1]  # the paragraph after the heading
            rows = re.findall(r"^``(--[a-z-]+)``\s+(\S+)\s", table, re.MULTILINE)
            self.assertGreaterEqual(len(rows), 6, command)
            for option, default in rows:
                with self.subTest(command=command, option=option):
                    self.assertIn(option, self.options[command])
                    self.assertTrue(sameDefault(default, self.options[command][option]), default)

    def test_everyLimitOptionDocumented(self) -> None:
        """Every limit option of relay and node appears in limits.rst's table and security.rst's."""
        limits = (DOCS / "limits.rst").read_text()
        security = (DOCS / "security.rst").read_text()
        every = (
            list(RelayLimitOptionsTests.LIMITS)
            + list(NodeLimitOptionsTests.LIMITS)
            + ["max-connections", "max-per-address", "max-gets-per-address"]
        )
        for option in every:
            with self.subTest(option=option):
                self.assertIn(f"``--{option}``", limits)
                self.assertIn(f"``--{option}``", security)


class MetricsOptionsTests(SynchronousTestCase):
    """--metrics DESC on both daemons, --verbose on the relay."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir()

    def relay(self, *argv: str) -> RelayOptions:
        options = RelayOptions()
        options.parseOptions(list(argv))
        return options

    def node(self, *argv: str) -> NodeOptions:
        options = NodeOptions()
        options.parseOptions(["--dir", str(self.folder), *argv])
        return options

    def test_offByDefault(self) -> None:
        """Without --metrics neither daemon serves metrics or keeps a registry."""
        relay = makeRelayService(self.relay(), UDPReactor())
        node = makeNodeService(self.node(), UDPReactor(), runInThread=syncThread)
        self.assertIsNone(relay.metrics)
        self.assertIsNone(relay.factory.metrics)
        self.assertIsNone(node.metrics)
        self.assertIsNone(node.files.metrics)

    def test_relayMetrics(self) -> None:
        """Relay --metrics DESC: a child service listens there and the protocol counts into its registry."""
        service = makeRelayService(self.relay("--metrics", "tcp:9101:interface=127.0.0.1"), UDPReactor())
        [child] = [s for s in service if getattr(s, "what", None) == "metrics"]
        self.assertEqual(child.description, "tcp:9101:interface=127.0.0.1")
        self.assertIs(service.factory.metrics, service.metrics)
        self.assertEqual(service.metrics.registry.get_sample_value("p2prelay_relay_peers"), 0)

    def test_bareMetricsPort(self) -> None:
        """--metrics takes a bare port, as --port does."""
        self.assertEqual(self.relay("--metrics", "9101")["metrics"], "tcp:9101")

    def test_badMetrics(self) -> None:
        """An unparseable --metrics is a usage error."""
        self.assertRaises(usage.UsageError, self.relay, "--metrics", "nonsense")
        self.assertRaises(usage.UsageError, self.node, "--metrics", "tcp:abc")

    def test_nodeMetrics(self) -> None:
        """Node --metrics DESC: the file server counts into the node's registry, whose gauges read the share."""
        (self.folder / "a.txt").write_bytes(b"alpha")
        node = makeNodeService(self.node("--metrics", "tcp:0"), UDPReactor(), runInThread=syncThread)
        [child] = [s for s in node if getattr(s, "what", None) == "metrics"]
        self.assertEqual(child.description, "tcp:0")
        self.assertIs(node.files.metrics, node.metrics)
        self.successResultOf(node.share.scan())
        registry = node.metrics.registry
        self.assertEqual(registry.get_sample_value("p2prelay_node_files_shared"), 1)
        self.assertEqual(registry.get_sample_value("p2prelay_node_bytes_shared"), 5)

    def test_verbose(self) -> None:
        """Relay --verbose (-v) turns on the lookup lines; off by default."""
        self.assertFalse(makeRelayService(self.relay(), UDPReactor()).factory.verbose)
        self.assertTrue(makeRelayService(self.relay("-v"), UDPReactor()).factory.verbose)

    def test_relayName(self) -> None:
        """The node knows the relay as --relay names it, for its log lines."""
        node = makeNodeService(self.node("--relay", "localhost:8001"), UDPReactor(), runInThread=syncThread)
        self.assertEqual(node.relayName, "localhost:8001")


class StateCheckTests(SynchronousTestCase):
    """A --state the relay cannot write stops it at start, not with a warning later."""

    def service(self, state: str) -> RelayService:
        options = RelayOptions()
        options.parseOptions(["--state", state])
        return makeRelayService(options, UDPReactor())

    def test_missingFolder(self) -> None:
        """Under twistd, a --state in a folder that does not exist is one critical line and exit 1."""
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        path = os.path.join(self.mktemp(), "state.db")
        service = self.service(path)
        with capturedLogs() as events:
            with self.assertRaises(SystemExit) as caught:
                service.privilegedStartService()
        self.assertEqual(caught.exception.code, 1)
        [line] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(
            line, f"relay cannot start: --state {path}: folder {os.path.dirname(path)} does not exist"
        )
        self.assertIsNone(service.listener.port, "no port bound")

    def test_startedDirectly(self) -> None:
        """Started without twistd, the relay raises StateUnwritable."""
        from p2prelay.relay.store import StateUnwritable

        service = self.service(os.path.join(self.mktemp(), "state.db"))
        self.assertRaises(StateUnwritable, service.startService)

    def test_aFolder(self) -> None:
        """A --state that is a folder is refused."""
        from p2prelay.relay.store import StateUnwritable, checkWritable

        folder = self.mktemp()
        os.mkdir(folder)
        with self.assertRaises(StateUnwritable) as caught:
            checkWritable(folder)
        self.assertEqual(caught.exception.why, "is a folder")

    def test_readOnlyFolder(self) -> None:
        """A --state in a folder nobody may write to is refused."""
        from p2prelay.relay.store import StateUnwritable, checkWritable

        if os.geteuid() == 0:
            raise __import__("unittest").SkipTest("root writes to read-only folders")
        folder = Path(self.mktemp())
        folder.mkdir()
        folder.chmod(0o500)
        self.addCleanup(folder.chmod, 0o700)
        self.assertRaises(StateUnwritable, checkWritable, folder / "state.db")

    def test_writable(self) -> None:
        """A --state in a writable folder passes, and the probe leaves nothing behind."""
        from p2prelay.relay.store import checkWritable

        folder = Path(self.mktemp())
        folder.mkdir()
        checkWritable(folder / "state.db")
        self.assertEqual(list(folder.iterdir()), [])


class FolderLockTests(SynchronousTestCase):
    """Two nodes sharing one folder: the second is warned."""

    def test_secondHolderTold(self) -> None:
        """A second lock on the same file is refused with the holder's pid; free again once released."""
        from p2prelay.node.lock import FolderLock

        path = Path(self.mktemp()) / "node.lock"
        first, second = FolderLock(path), FolderLock(path)
        self.assertIsNone(first.acquire())
        self.assertEqual(second.acquire(), f"pid {os.getpid()}")
        first.release()
        self.assertIsNone(second.acquire())
        second.release()

    def test_secondNodeWarns(self) -> None:
        """A node started on a folder another running node shares logs a warning naming the folder."""
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        lock = str(Path(self.mktemp()) / "node.lock")
        options = NodeOptions()
        options.parseOptions(["--dir", str(folder), "--no-udp"])
        nodes = []
        for _ in range(2):
            node = makeNodeService(options, UDPReactor(), runInThread=syncThread)
            node.lock = type(node.lock)(lock)
            nodes.append(node)
        with capturedLogs() as events:
            nodes[0].startService()
            nodes[1].startService()
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        [line] = [w for w in warnings if "already shares" in w]
        self.assertIn(f"already shares {folder} on this machine", line)
        for node in nodes:
            node.stopService()
