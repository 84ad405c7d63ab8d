"""
What users type for the relay (``relayAddress``, used by every command
through ``clientEndpoint`` and ``checkClientAddress``), and how a name
that does not resolve is reported (``NoSuchHost``).  Resolvers are
injected: no test sends a DNS query.
"""

from __future__ import annotations

import socket

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import addresses
from p2prelay.addresses import (
    DEFAULT_RELAY_PORT,
    AddressError,
    NoSuchHost,
    TCPClient,
    checkClientAddress,
    clientEndpoint,
    relayAddress,
    udpInterfaceFor,
    udpPort,
)


class RelayAddressTests(SynchronousTestCase):
    """The forms the README promises for --relay."""

    def test_barePort(self) -> None:
        """A bare port is that port on localhost."""
        self.assertEqual(relayAddress("8001"), ("localhost", 8001))
        self.assertEqual(relayAddress(" 8001 "), ("localhost", 8001))

    def test_barePortOutOfRange(self) -> None:
        """A bare port outside 1-65535 is an AddressError saying so."""
        for value in ("0", "65536", "99999"):
            with self.subTest(value=value):
                self.assertIn("out of range", str(self.assertRaises(AddressError, relayAddress, value)))

    def test_bareHost(self) -> None:
        """A bare host name or IPv4 address is the relay's default port there."""
        self.assertEqual(DEFAULT_RELAY_PORT, 8000)
        for host in ("relay.example.org", "localhost", "10.0.0.1", "bücher.example"):
            with self.subTest(host=host):
                self.assertEqual(relayAddress(host), (host, 8000))

    def test_bareBracketedIPv6(self) -> None:
        """[V6] alone is that address on the default port."""
        self.assertEqual(relayAddress("[::1]"), ("::1", 8000))

    def test_bracketsAroundNoAddress(self) -> None:
        """Brackets around something that is no IPv6 address are refused."""
        self.assertRaises(AddressError, relayAddress, "[relay]")

    def test_hostPort(self) -> None:
        """HOST:PORT and [V6]:PORT are themselves."""
        self.assertEqual(relayAddress("relay.example:9000"), ("relay.example", 9000))
        self.assertEqual(relayAddress("127.0.0.1:8000"), ("127.0.0.1", 8000))
        self.assertEqual(relayAddress("[::1]:8001"), ("::1", 8001))

    def test_description(self) -> None:
        """An endpoint description is handed back as it is, for clientFromString."""
        for value in ("tcp:relay.example:8000", "tls:relay.example:8443", "unix:/run/relay.sock"):
            with self.subTest(value=value):
                self.assertEqual(relayAddress(value), value)

    def test_unbracketedIPv6(self) -> None:
        """An IPv6 address without brackets is a usage error naming the form to type."""
        for value, meant in (("::1:8000", "[::1]:8000"), ("::1", "[::1]:8000"),
                             ("fe80::1", "[fe80::1]:8000"), ("2001:db8::1:443", "[2001:db8::1]:443")):
            with self.subTest(value=value):
                e = self.assertRaises(AddressError, relayAddress, value)
                self.assertEqual(str(e), f"IPv6 addresses need brackets: {meant}")

    def test_notAnAddress(self) -> None:
        """Empty text, spaces inside, or an endpoint type alone are refused."""
        for value in ("", "  ", "two words", "tcp", "a/b"):
            with self.subTest(value=value):
                self.assertRaises(AddressError, relayAddress, value)

    @settings(max_examples=300, deadline=None)
    @given(st.text(st.characters(codec="utf-8"), max_size=30)
           | st.lists(st.sampled_from(["[", "]", ":", "::1", "8000", "tcp", "host", " ", "1", "\u00b2"]),
                      max_size=6).map("".join))
    @example("\u00b2")
    @example("[\u00b2]")
    def test_anyText(self, value: str) -> None:
        """Any text gives (host, port 1-65535), a description, or AddressError; never another exception."""
        try:
            address = relayAddress(value)
        except AddressError:
            return
        if isinstance(address, str):
            self.assertIn(":", address)
        else:
            host, port = address
            self.assertTrue(host)
            self.assertTrue(1 <= port <= 65535)


class EveryCommandTests(SynchronousTestCase):
    """checkClientAddress and clientEndpoint, which every command uses, take every form."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_checkAcceptsEveryForm(self) -> None:
        """Each promised form passes the check, connecting nowhere."""
        for value in ("8001", "relay.example.org", "relay.example.org:8000", "[::1]:8000",
                      "[::1]", "tcp:relay.example.org:8000"):
            with self.subTest(value=value):
                checkClientAddress(value)

    def test_checkRefusesUnbracketedIPv6(self) -> None:
        """The check refuses ::1:8000 with the bracketed form."""
        e = self.assertRaises(AddressError, checkClientAddress, "::1:8000")
        self.assertIn("[::1]:8000", str(e))

    def test_checkRefusesBadDescription(self) -> None:
        """A description no endpoint parser takes is still refused."""
        self.assertRaises(AddressError, checkClientAddress, "nosuch:1:2")

    def test_barePortEndpoint(self) -> None:
        """A bare port dials localhost at that port with a TCPClient."""
        made = clientEndpoint(self.reactor, "8001", timeout=3)
        self.assertIsInstance(made, TCPClient)
        self.assertEqual((made.host, made.port, made.timeout), ("localhost", 8001, 3))

    def test_bareHostEndpoint(self) -> None:
        """A bare host dials its port 8000 with a TCPClient."""
        made = clientEndpoint(self.reactor, "relay.example.org")
        self.assertIsInstance(made, TCPClient)
        self.assertEqual((made.host, made.port), ("relay.example.org", 8000))


class NoSuchHostTests(SynchronousTestCase):
    """A relay name that does not resolve: NoSuchHost, 'NAME:PORT: no such host'."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = Factory.forProtocol(Protocol)

    def connect(self, resolve, host: str = "relay.nowhere", port: int = 8000) -> Deferred:
        return TCPClient(self.reactor, host, port, resolve=resolve).connect(self.factory)

    def test_message(self) -> None:
        """NoSuchHost reads 'NAME:PORT: no such host' and is a DNSLookupError."""
        e = NoSuchHost("relay.nowhere", 8001)
        self.assertEqual(str(e), "relay.nowhere:8001: no such host")
        self.assertIsInstance(e, error.DNSLookupError)
        self.assertEqual((e.host, e.port), ("relay.nowhere", 8001))

    def test_resolverSaysNoName(self) -> None:
        """A resolver failing with EAI_NONAME fails the connection with NoSuchHost, dialling nothing."""
        d = self.connect(lambda host, port: fail(socket.gaierror(socket.EAI_NONAME, "Name or service not known")))
        failure = self.failureResultOf(d, NoSuchHost)
        self.assertEqual(str(failure.value), "relay.nowhere:8000: no such host")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_noAddresses(self) -> None:
        """A name that resolves to no address is NoSuchHost too."""
        self.failureResultOf(self.connect(lambda host, port: succeed([])), NoSuchHost)

    def test_temporaryFailureIsNotNoSuchHost(self) -> None:
        """A lookup that failed for now (EAI_AGAIN) is a DNSLookupError that does not claim the name is unknown."""
        d = self.connect(lambda host, port: fail(socket.gaierror(socket.EAI_AGAIN, "Temporary failure")))
        failure = self.failureResultOf(d, error.DNSLookupError)
        self.assertNotIsInstance(failure.value, NoSuchHost)
        self.assertIn("relay.nowhere:8000: name lookup failed (Temporary failure)", str(failure.value))

    def test_fromClientEndpoint(self) -> None:
        """The relay given as a bare host reaches the resolver as NAME, 8000, and NoSuchHost names both."""
        asked = []

        def resolve(host, port):
            asked.append((host, port))
            return fail(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

        endpoint = clientEndpoint(self.reactor, "relay.nowhere")
        endpoint.resolve = resolve
        failure = self.failureResultOf(endpoint.connect(self.factory), NoSuchHost)
        self.assertEqual(asked, [("relay.nowhere", 8000)])
        self.assertEqual(str(failure.value), "relay.nowhere:8000: no such host")


class PlainHostTests(SynchronousTestCase):
    def test_mappedIPv4(self) -> None:
        """An IPv4-mapped IPv6 address is written as plain IPv4."""
        self.assertEqual(addresses.plainHost("::ffff:10.77.4.1"), "10.77.4.1")
        self.assertEqual(addresses.plainHost("::FFFF:10.77.4.1"), "10.77.4.1")

    def test_othersUnchanged(self) -> None:
        """Real IPv6, IPv4 and names are left alone."""
        for host in ("fd77:4::1", "::1", "10.77.4.1", "relay.example.org", "::ffff:nothost"):
            self.assertEqual(addresses.plainHost(host), host)

    def test_hostPort(self) -> None:
        """hostPort brackets an IPv6 host and shows a mapped IPv4 one plain, as users write them."""
        self.assertEqual(
            [addresses.hostPort(h, 8) for h in ("10.0.0.1", "::1", "::ffff:10.0.0.2", "a.example")],
            ["10.0.0.1:8", "[::1]:8", "10.0.0.2:8", "a.example:8"],
        )

    def test_describePeerPlain(self) -> None:
        """Logs show a dual-stack socket's IPv4 peer as host:port, not [::ffff:...]:port."""
        from twisted.internet.address import IPv6Address

        self.assertEqual(addresses.describePeer(IPv6Address("TCP", "::ffff:10.77.4.1", 5)), "10.77.4.1:5")


class UdpPortTests(SynchronousTestCase):
    """What --udp-port takes: a port, or udp:PORT[:interface=ADDR] for either family."""

    def test_escapedIPv6Interface(self) -> None:
        """An IPv6 interface with its colons escaped, as in tcp6: descriptions, is that address."""
        self.assertEqual(udpPort(r"udp:0:interface=fd77\:4\:\:1"), (0, "fd77:4::1"))

    def test_bracketedIPv6Interface(self) -> None:
        """An IPv6 interface in brackets is that address."""
        self.assertEqual(udpPort("udp:5555:interface=[fd77:4::1]"), (5555, "fd77:4::1"))

    def test_unclosedBracket(self) -> None:
        """An interface whose bracket is never closed is refused."""
        self.assertRaises(AddressError, udpPort, "udp:0:interface=[fd77:4::1")

    def test_unescapedIPv6Interface(self) -> None:
        """An IPv6 interface with bare colons is refused (they separate fields)."""
        self.assertRaises(AddressError, udpPort, "udp:0:interface=fd77:4::1")

    def test_notAnIPv6Address(self) -> None:
        """Escaped colons around something that is no IPv6 address are refused."""
        self.assertIn("not an IPv6 address", str(self.assertRaises(AddressError, udpPort, r"udp:0:interface=a\:b")))

    def test_IPv4Interface(self) -> None:
        """An IPv4 interface is unchanged."""
        self.assertEqual(udpPort("udp:0:interface=127.0.0.2"), (0, "127.0.0.2"))


class UdpInterfaceForTests(SynchronousTestCase):
    """Where UDP is served beside a TCP server description, by default."""

    def test_tcp6Everywhere(self) -> None:
        """Beside tcp6: without an interface, UDP is on '::' (both families), not IPv4 only."""
        self.assertEqual(udpInterfaceFor("tcp6:0"), "::")

    def test_tcp6Interface(self) -> None:
        """Beside tcp6: with an interface, UDP is on that IPv6 address."""
        self.assertEqual(udpInterfaceFor(r"tcp6:0:interface=fd77\:4\:\:1"), "fd77:4::1")

    def test_tcpEverywhere(self) -> None:
        """Beside tcp: without an interface, UDP is on every IPv4 address ('')."""
        self.assertEqual(udpInterfaceFor("tcp:0"), "")

    def test_tcpInterface(self) -> None:
        """Beside tcp: with an interface, UDP is there."""
        self.assertEqual(udpInterfaceFor("tcp:0:interface=127.0.0.1"), "127.0.0.1")
