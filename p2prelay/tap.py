"""
twistd's view of p2prelay: the options of each daemon and ``makeService``.

The plugin file and the ``.tac`` files call these and nothing else, so a
daemon started either way is assembled the same way.  ``NodeOptions`` is
the one definition of a peer node's options: ``p2p-peer`` parses its
command line with a subclass of it and assembles its node with
``makeNodeService``.  The option names are a contract (scripts and unit
files use them): add, never rename.
"""

from __future__ import annotations

import math
import os
import re

from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.python import usage

from .addresses import (
    CONNECT_TIMEOUT,
    AddressError,
    checkClientAddress,
    clientEndpoint,
    parseHostPort,
    serverDescription,
    udpInterfaceFor,
    udpPort,
)
from .limits import (
    MAX_INFLIGHT_BYTES,
    NODE_MAX_CONNECTIONS,
    NODE_MAX_GETS_PER_ADDRESS,
    NODE_MAX_PER_ADDRESS,
    RELAY_MAX_CONNECTIONS,
    RELAY_MAX_PER_ADDRESS,
    positiveInteger,
)
from .negotiation import (
    CLOSE_DEADLINE,
    IDLE_TIMEOUT,
    MIN_RATE,
    NEGOTIATION_DEADLINE,
    REQUEST_DEADLINE,
)
from .listening import NODE_DEFAULT_PORT
from .node.upkeep import DEFAULT_RESCAN
from .pieces import MAX_PIECE_SIZE, MIN_PIECE_SIZE, PIECE_SIZE
from .relay.dialback import (
    DIALBACK_BURST,
    DIALBACK_RATE,
    DIALBACK_TIMEOUT,
    RECHECK_INTERVAL,
    REPORT_BURST,
    REPORT_RATE,
)
from .relay.circuits import CIRCUIT_BYTES, CIRCUIT_SECONDS, MAX_CIRCUITS, MAX_CIRCUITS_PER_NODE
from .relay.control import MAX_CONTROL
from .relay.registry import DEFAULT_TTL, MAX_PER_SOURCE, MAX_TOTAL
from .udp.server import (
    IDLE_TIMEOUT as UDP_IDLE_TIMEOUT,
    MAX_TRANSFERS,
    MAX_TRANSFERS_PER_ADDRESS,
    UNACKED_TIMEOUT,
)

MINUTE = 60.0


def positiveNumber(option: str, unit: str):
    """A coercer for ``--option``: a positive, finite number (of ``unit``)."""

    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"--{option} {value}: not a positive number {unit}")
        return number

    return coerce


def seconds(option: str):
    """A coercer for ``--option``: a positive, finite number of seconds."""
    return positiveNumber(option, "of seconds")


def perMinute(option: str):
    """A coercer for ``--option``: a positive rate, per minute."""
    return positiveNumber(option, "per minute")


_SIZE = re.compile(r"\A\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:i?B)?|B)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ByteSize(int):
    """A number of bytes, shown with the largest binary suffix that is exact."""

    def __str__(self) -> str:
        for suffix in "TGMK":
            if self and self % _UNITS[suffix] == 0:
                return f"{int(self) // _UNITS[suffix]}{suffix}"
        return str(int(self))


def parseSize(text: str) -> ByteSize:
    """
    A number of bytes, with an optional binary suffix: ``65536``, ``64K``,
    ``64M``, ``1.5G``, ``64MiB`` (K, M, G, T are powers of 1024, any case).
    Raises ValueError for anything else or for less than one byte.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or "").upper()])
    if size < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return ByteSize(size)


def byteSize(option: str):
    """A coercer for ``--option SIZE``: see :func:`parseSize`."""

    def coerce(value: str) -> ByteSize:
        try:
            return parseSize(value)
        except ValueError:
            raise ValueError(
                f"--{option} {value}: not a size in bytes of at least 1 (a number, "
                "optionally with K, M, G or T)"
            ) from None

    return coerce


def _relayRate(value: str) -> ByteSize:
    """--relay-rate: bytes per second over all circuits, or 0 for no cap."""
    if value.strip() == "0":
        return ByteSize(0)
    try:
        return parseSize(value)
    except ValueError:
        raise ValueError(
            f"--relay-rate {value}: not a rate in bytes per second (a number, optionally "
            "with K, M or G; 0 for no cap)"
        ) from None


def _pieceSize(value: str) -> ByteSize:
    size = byteSize("piece-size")(value)
    if not MIN_PIECE_SIZE <= size <= MAX_PIECE_SIZE:
        raise ValueError(
            f"--piece-size {value}: not between {ByteSize(MIN_PIECE_SIZE)} and {ByteSize(MAX_PIECE_SIZE)}"
        )
    return size


def _server(value: str) -> str:
    try:
        description = serverDescription(value)
        # Parse it now (binding nothing) so a typo is a usage error, not a
        # failed start; no endpoint parser uses the reactor before listen().
        serverFromString(None, description)
    except AddressError as e:
        raise ValueError(str(e)) from None
    except Exception as e:
        raise ValueError(f"{value!r} is not a server endpoint description ({e})") from None
    return description


class RelayOptions(usage.Options):
    synopsis = "[--port DESC] [--ttl SECONDS] [--state PATH | --registry URL]"
    longdesc = (
        "The p2prelay relay: the directory peer nodes register with and clients ask. "
        "DESC is a port number or a Twisted server endpoint description, "
        "e.g. tcp:8000:interface=127.0.0.1."
    )
    optParameters = [
        ["port", "p", "tcp:8000", "Where to listen (port number or endpoint description).", _server],
        ["ttl", None, DEFAULT_TTL, "Seconds a registration lives without a heartbeat.",
         seconds("ttl")],
        ["state", None, None, "SQLite file keeping the registry across restarts "
         "(default: in memory only)."],
        ["registry", None, None, "Keep the registry in a Redis that several relays may share: "
         "redis://HOST:PORT/DB or unix:///path/redis.sock?db=N (default: in this process)."],
        ["registry-password-file", None, None, "File whose first line is the --registry "
         "Redis's password (never on the command line)."],
        ["max-connections", None, RELAY_MAX_CONNECTIONS, "Open connections at most, all "
         "clients together (more are answered 503 busy).", positiveInteger("max-connections")],
        ["max-per-address", None, RELAY_MAX_PER_ADDRESS, "Open connections at most from one "
         "address (an IPv6 /64).", positiveInteger("max-per-address")],
        ["max-registrations", None, MAX_TOTAL, "Live registrations at most, all addresses "
         "together (more are answered 503 busy).", positiveInteger("max-registrations")],
        ["max-registrations-per-address", None, MAX_PER_SOURCE, "Live registrations at most "
         "made from one address (an IPv6 /64).", positiveInteger("max-registrations-per-address")],
        ["max-registering-bytes", None, ByteSize(MAX_INFLIGHT_BYTES), "Bytes at most of "
         "registrations being received, all connections together (a new REGISTER over it "
         "is answered 503 busy); K, M, G: powers of 1024.", byteSize("max-registering-bytes")],
        ["deadline", None, NEGOTIATION_DEADLINE, "Seconds a whole request may take, from "
         "the connection to the answer (each byte received adds 1/--min-rate s).",
         seconds("deadline")],
        ["min-rate", None, ByteSize(MIN_RATE), "Bytes per second a long request must keep "
         "up to extend its deadline (K, M: powers of 1024).", byteSize("min-rate")],
        ["idle-timeout", None, IDLE_TIMEOUT, "Seconds a connection may stay silent.",
         seconds("idle-timeout")],
        ["close-deadline", None, CLOSE_DEADLINE, "Seconds a peer has to take the relay's "
         "answer (plus its size at --min-rate) before the connection is aborted.",
         seconds("close-deadline")],
        ["dialback-timeout", None, DIALBACK_TIMEOUT, "Seconds a dial-back (connect and "
         "answer) may take.", seconds("dialback-timeout")],
        ["dialback-rate", None, DIALBACK_RATE * MINUTE, "Dial-backs per minute one address "
         "may make the relay attempt (more are answered 503 busy).", perMinute("dialback-rate")],
        ["dialback-burst", None, DIALBACK_BURST, "Dial-backs one address may cause at once.",
         positiveInteger("dialback-burst")],
        ["report-rate", None, REPORT_RATE * MINUTE, "DEAD reports per minute accepted from "
         "one address.", perMinute("report-rate")],
        ["report-burst", None, REPORT_BURST, "DEAD reports accepted from one address at once.",
         positiveInteger("report-burst")],
        ["recheck-interval", None, RECHECK_INTERVAL, "Seconds at least between two re-checks "
         "of one node on DEAD reports.", seconds("recheck-interval")],
        ["secret-file", None, None, "A closed network: only nodes proving the shared secret "
         "in this file may register."],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics here (a port or server "
         "endpoint description, e.g. tcp:9101:interface=127.0.0.1; default: off).", _server],
        ["max-control", None, MAX_CONTROL, "Control connections at most that firewalled nodes "
         "may hold open (more are answered 503 busy).", positiveInteger("max-control")],
        ["max-circuits", None, MAX_CIRCUITS, "Relayed circuits at most, open or being opened, "
         "all nodes together (more are answered 503 busy).", positiveInteger("max-circuits")],
        ["max-circuits-per-node", None, MAX_CIRCUITS_PER_NODE, "Relayed circuits at most to "
         "one node.", positiveInteger("max-circuits-per-node")],
        ["circuit-bytes", None, ByteSize(CIRCUIT_BYTES), "Bytes at most one relayed circuit "
         "carries, both directions counted, before it is cut (a RELAY announcing more is "
         "answered 413); K, M, G: powers of 1024.", byteSize("circuit-bytes")],
        ["circuit-seconds", None, CIRCUIT_SECONDS, "Seconds at most a relayed circuit stays "
         "open before it is cut.", seconds("circuit-seconds")],
        ["relay-rate", None, ByteSize(0), "Bytes per second at most through all relayed "
         "circuits together, paced by pausing reads (K, M, G: powers of 1024; 0: no cap).",
         _relayRate],
    ]
    optFlags = [
        ["private", None, "Clients must prove the shared secret too (needs --secret-file)."],
        ["verbose", "v", "Log every lookup (WHOHAS, PEERS, SEARCH, STATS) at debug level."],
        ["no-relaying", None, "Relay no transfers for firewalled nodes (RELAY is answered "
         "503); control connections and reverse connections still work."],
    ]

    def postOptions(self) -> None:
        self["secret"] = _secret(self["secret-file"])
        if self["private"] and self["secret"] is None:
            raise usage.UsageError("--private needs --secret-file")
        self["redis"] = _registry(self["registry"], self["registry-password-file"], self["state"])

    def circuitLimits(self):
        """The relayed path's limits these options set."""
        from .relay.circuits import CircuitLimits

        return CircuitLimits(
            relaying=not self["no-relaying"],
            maxCircuits=self["max-circuits"],
            maxPerNode=self["max-circuits-per-node"],
            bytes=int(self["circuit-bytes"]),
            seconds=self["circuit-seconds"],
            rate=int(self["relay-rate"]),
        )


class NodeOptions(usage.Options):
    synopsis = "--relay HOST:PORT --dir DIR [--port DESC] [--advertise HOST[:PORT]]"
    longdesc = (
        "A p2prelay peer node: shares DIR, registers with the relay and serves "
        "files to clients."
    )
    optParameters = [
        ["relay", "r", "localhost:8000", "The relay: HOST:PORT or a client endpoint description; "
         "several as a comma list (a.example:8000,b.example:8000, at most 8), tried in order "
         "with failover, the one that last answered first."],
        ["dir", "d", None, "The folder to share (required)."],
        ["port", "p", NODE_DEFAULT_PORT, "Where to serve (port number or endpoint description; "
         "default: an OS-chosen port on IPv4 and IPv6 alike, IPv4 alone where IPv6 is "
         "unavailable; the port bound is what gets registered).", _server],
        ["advertise", "a", None, "Host to register, or HOST:PORT ([V6]:PORT) behind a router "
         "forwarding PORT to --port (default: the address the relay sees, and the port bound)."],
        ["advertise-udp", None, None, "UDP port to register, behind a router forwarding it to "
         "--udp-port (default: the UDP port bound)."],
        ["heartbeat", None, None, "Seconds between heartbeats (default: a third of the "
         "lifetime the relay grants).", seconds("heartbeat")],
        ["rescan", None, DEFAULT_RESCAN, "Seconds between rescans of DIR.", seconds("rescan")],
        ["udp-port", None, None, "Where to serve over UDP: a port or udp:PORT:interface=ADDR "
         "(an IPv6 ADDR as fd77\\:4\\:\\:1 or [fd77:4::1]; default: an OS-chosen port on the "
         "--port interface, both families for tcp6:)."],
        ["max-connections", None, NODE_MAX_CONNECTIONS, "Open connections at most, all "
         "clients together (more are answered 503 busy).", positiveInteger("max-connections")],
        ["max-per-address", None, NODE_MAX_PER_ADDRESS, "Open connections at most from one "
         "address (an IPv6 /64).", positiveInteger("max-per-address")],
        ["max-gets-per-address", None, NODE_MAX_GETS_PER_ADDRESS, "Downloads at most in "
         "flight for one address.", positiveInteger("max-gets-per-address")],
        ["request-deadline", None, REQUEST_DEADLINE, "Seconds a client has to send its whole "
         "request line.", seconds("request-deadline")],
        ["idle-timeout", None, IDLE_TIMEOUT, "Seconds a connection may stay silent (or a "
         "client not read what is sent).", seconds("idle-timeout")],
        ["close-deadline", None, CLOSE_DEADLINE, "Seconds a client has to take the end of an "
         "answer before the connection is aborted.", seconds("close-deadline")],
        ["udp-max-transfers", None, MAX_TRANSFERS, "UDP transfers at most at once, all "
         "addresses together.", positiveInteger("udp-max-transfers")],
        ["udp-max-per-address", None, MAX_TRANSFERS_PER_ADDRESS, "UDP transfers at most at "
         "once for one address.", positiveInteger("udp-max-per-address")],
        ["udp-idle-timeout", None, UDP_IDLE_TIMEOUT, "Seconds a UDP transfer survives without "
         "an acknowledgement.", seconds("udp-idle-timeout")],
        ["udp-unacked-timeout", None, UNACKED_TIMEOUT, "Seconds a UDP transfer whose client "
         "has acknowledged nothing yet keeps its slot.", seconds("udp-unacked-timeout")],
        ["key", None, None, "The node's key file, made on first start; the node id is the "
         "key's (default: in the user's state folder, one per shared folder)."],
        ["secret-file", None, None, "The shared secret of a closed network, as the relay has it."],
        ["tls-port", None, None, "Also serve over TLS here (a port or TCP server endpoint "
         "description; TLS 1.3 with the node's key, which clients pin to; default: no TLS).",
         _server],
        ["relay-ca", None, None, "CA certificates (PEM file) to verify the relay with: the relay "
         "(HOST:PORT, or each of a comma list) is then reached over TLS."],
        ["max-rate", None, None, "Bytes per second the node uploads at most, all TCP and TLS "
         "clients together, shared fairly (e.g. 20M; K, M, G: powers of 1024; default: no cap).",
         byteSize("max-rate")],
        ["max-uploads", None, None, "Downloads at most sending at once, all clients together; "
         "one more is answered 503 retry= (default: no cap but --max-connections).",
         positiveInteger("max-uploads")],
        ["piece-size", None, ByteSize(PIECE_SIZE), "Advanced: the size of the pieces files are "
         "hashed in for multi-source downloads (16K to 64M; every node sharing a file should use "
         "the same, or clients see different versions).", _pieceSize],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics here (a port or server "
         "endpoint description, e.g. tcp:9101:interface=127.0.0.1; default: off).", _server],
    ]
    optFlags = [["no-udp", None, "Do not serve over UDP."]]

    def postOptions(self) -> None:
        if not self["dir"]:
            raise usage.UsageError("--dir is required")
        if not os.path.exists(self["dir"]):
            raise usage.UsageError(f"--dir {self['dir']}: does not exist")
        if not os.path.isdir(self["dir"]):
            raise usage.UsageError(f"--dir {self['dir']}: not a directory")
        try:
            checkClientAddress(self["relay"])
        except AddressError as e:
            raise usage.UsageError(f"--relay: {e}") from None
        self["secret"] = _secret(self["secret-file"])
        _checkRelayCA(self)
        if self["tls-port"] and self["tls-port"].split(":", 1)[0] in ("ssl", "tls"):
            raise usage.UsageError(
                "--tls-port: give a port or a tcp: description; TLS is added with the node's key"
            )
        from .identity import IdentityError, NodeKey, defaultKeyPath

        try:
            self["nodeKey"] = NodeKey.loadOrCreate(self["key"] or defaultKeyPath(self["dir"]))
        except IdentityError as e:
            raise usage.UsageError(f"--key: {e}") from None
        if self["no-udp"]:
            self["udp"] = None
        else:
            try:
                self["udp"] = udpPort(self["udp-port"] or "0", udpInterfaceFor(self["port"]))
            except AddressError as e:
                raise usage.UsageError(f"--udp-port: {e}") from None
        _advertised(self)


def _advertised(config) -> None:
    """
    Split --advertise into the host and port to register (a bare HOST keeps
    the port bound: ``advertisePort`` None), and check --advertise-udp.
    """
    config["advertisePort"] = None
    if config["advertise"] is not None:
        config["advertise"], config["advertisePort"] = _advertiseHostPort(config["advertise"])
    value = config["advertise-udp"]
    if value is not None:
        if config["udp"] is None:
            raise usage.UsageError("--advertise-udp: there is no UDP with --no-udp")
        if not (value.isascii() and value.isdigit() and 0 < int(value) <= 65535):
            raise usage.UsageError(f"--advertise-udp {value}: not a port number 1-65535")
        config["advertise-udp"] = int(value)


def _advertiseHostPort(advertise: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT`` as (host, port or None)."""
    try:
        pair = parseHostPort(advertise)
    except AddressError as e:
        raise usage.UsageError(f"--advertise: {e}") from None
    text = advertise.strip()
    if pair is not None:
        host, port = pair
    elif text.startswith("["):
        host, port = (text[1:-1] if text.endswith("]") else ""), None
    else:
        return advertise, None  # a bare host (or an IPv6 address without brackets), as ever
    if (text.startswith("[") and not isIPv6Address(host)) or "[" in host or "]" in host:
        raise usage.UsageError(f"--advertise {advertise}: give HOST, HOST:PORT or [V6]:PORT")
    return host, port


def _checkRelayCA(config) -> None:
    """With --relay-ca, the CA file must be usable and --relay a HOST:PORT (or a list of them)."""
    if not config.get("relay-ca"):
        return
    from .tls import TLSConfigError, loadCAFile  # imports OpenSSL: only for a TLS relay

    try:
        loadCAFile(config["relay-ca"])
    except TLSConfigError as e:
        raise usage.UsageError(f"--relay-ca: {e}") from None
    from .addresses import splitRelays

    for name in splitRelays(config["relay"]):  # postOptions has checked the list
        if parseHostPort(name.strip().removeprefix("tls:")) is None:
            raise usage.UsageError("--relay: with --relay-ca, give the relay as HOST:PORT"
                                   + (f" (not {name!r})" if name != config["relay"] else ""))


def relayEndpoint(reactor, config, timeout: float):
    """
    The relay's client endpoint: over TLS with --relay-ca, else as --relay
    says; for a comma list, a FailoverEndpoint over the relays.
    """
    if config.get("relay-ca"):
        from .tls import relayEndpoint as tlsRelay

        return tlsRelay(reactor, config["relay"], config["relay-ca"], timeout)
    return clientEndpoint(reactor, config["relay"], timeout=timeout)


def _secret(path):
    """The shared secret in ``path`` (None without one), or a usage error."""
    if path is None:
        return None
    from .identity import IdentityError, loadSecret

    try:
        return loadSecret(path)
    except IdentityError as e:
        raise usage.UsageError(f"--secret-file: {e}") from None


def _registry(url, passwordFile, state):
    """``--registry`` (with its password file) as a RedisAddress, or None: in memory."""
    if url is None:
        if passwordFile is not None:
            raise usage.UsageError("--registry-password-file needs --registry")
        return None
    if state is not None:
        raise usage.UsageError("--state keeps the in-memory registry; a --registry Redis keeps its own")
    from .relay.backends.url import RegistryURLError, parse

    try:
        return parse(url, passwordFile)
    except RegistryURLError as e:
        raise usage.UsageError(f"--registry: {e}") from None


def makeRelayService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from .relay.service import RelayService  # p2p-peer, which imports this module, needs none

    return RelayService(
        reactor,
        config["port"],
        config["ttl"],
        config["state"],
        maxConnections=config["max-connections"],
        maxPerAddress=config["max-per-address"],
        secret=config.get("secret"),
        private=bool(config.get("private")),
        maxRegistrations=config["max-registrations"],
        maxRegistrationsPerAddress=config["max-registrations-per-address"],
        maxRegisteringBytes=int(config["max-registering-bytes"]),
        deadline=config["deadline"],
        minRate=int(config["min-rate"]),
        idleTimeout=config["idle-timeout"],
        closeDeadline=config["close-deadline"],
        dialbackTimeout=config["dialback-timeout"],
        dialbackRate=config["dialback-rate"] / MINUTE,
        dialbackBurst=config["dialback-burst"],
        reportRate=config["report-rate"] / MINUTE,
        reportBurst=config["report-burst"],
        recheckInterval=config["recheck-interval"],
        metrics=config.get("metrics"),
        verbose=bool(config.get("verbose")),
        circuits=RelayOptions.circuitLimits(config),
        maxControl=config["max-control"],
        registry=config.get("redis"),
    )


def makeNodeService(
    config, reactor=None, *, relayTimeout: float = CONNECT_TIMEOUT, runInThread=deferToThread
):
    """A peer node as ``config`` (a parsed :class:`NodeOptions`) describes it."""
    if reactor is None:
        from twisted.internet import reactor
    from .node.service import NodeService

    return NodeService(
        reactor,
        relay=relayEndpoint(reactor, config, relayTimeout),
        directory=config["dir"],
        description=config["port"],
        advertise=config["advertise"],
        advertisePort=config.get("advertisePort"),
        advertiseUdp=config.get("advertise-udp"),
        heartbeat=config["heartbeat"],
        rescan=config["rescan"],
        key=config.get("nodeKey"),
        secret=config.get("secret"),
        udp=config["udp"],
        tls=config.get("tls-port"),
        runInThread=runInThread,
        maxConnections=config["max-connections"],
        maxPerAddress=config["max-per-address"],
        maxGetsPerAddress=config["max-gets-per-address"],
        requestDeadline=config["request-deadline"],
        idleTimeout=config["idle-timeout"],
        closeDeadline=config["close-deadline"],
        udpMaxTransfers=config["udp-max-transfers"],
        udpMaxPerAddress=config["udp-max-per-address"],
        udpIdleTimeout=config["udp-idle-timeout"],
        udpUnackedTimeout=config["udp-unacked-timeout"],
        pieceSize=int(config["piece-size"]),
        maxRate=None if config["max-rate"] is None else int(config["max-rate"]),
        maxUploads=config["max-uploads"],
        metrics=config.get("metrics"),
        relayName=config["relay"],
    )
