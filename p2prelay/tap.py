"""
twistd's view of p2prelay: the options of each daemon and ``makeService``.

The plugin file and the ``.tac`` files call these and nothing else, so a
daemon started either way is assembled the same way.
"""

from __future__ import annotations

import os

from twisted.python import usage

from .addresses import (
    AddressError,
    checkClientAddress,
    clientEndpoint,
    interfaceOf,
    serverDescription,
    udpPort,
)
from .node.service import NodeService
from .node.upkeep import DEFAULT_RESCAN
from .relay.registry import DEFAULT_TTL
from .relay.service import RelayService


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number of seconds")
    return number


def _server(value: str) -> str:
    try:
        return serverDescription(value)
    except AddressError as e:
        raise ValueError(str(e)) from None


class RelayOptions(usage.Options):
    synopsis = "[--port DESC] [--ttl SECONDS] [--state PATH]"
    longdesc = (
        "The p2prelay relay: the directory peer nodes register with and clients ask. "
        "DESC is a port number or a Twisted server endpoint description, "
        "e.g. tcp:8000:interface=127.0.0.1."
    )
    optParameters = [
        ["port", "p", "tcp:8000", "Where to listen (port number or endpoint description).", _server],
        ["ttl", None, DEFAULT_TTL, "Seconds a registration lives without a heartbeat.", _positive],
        ["state", None, None, "SQLite file keeping the registry across restarts "
         "(default: in memory only)."],
    ]


class NodeOptions(usage.Options):
    synopsis = "--relay HOST:PORT --dir DIR [--port DESC] [--advertise HOST]"
    longdesc = (
        "A p2prelay peer node: shares DIR, registers with the relay and serves "
        "files to clients."
    )
    optParameters = [
        ["relay", "r", "localhost:8000", "The relay: HOST:PORT or a client endpoint description."],
        ["dir", "d", None, "The folder to share (required)."],
        ["port", "p", "tcp:0", "Where to serve (port number or endpoint description; "
         "default: an OS-chosen port, which is what gets registered).", _server],
        ["advertise", "a", None, "Host to register (default: the address the relay sees)."],
        ["heartbeat", None, None, "Seconds between heartbeats (default: a third of the "
         "lifetime the relay grants).", _positive],
        ["rescan", None, DEFAULT_RESCAN, "Seconds between rescans of DIR.", _positive],
        ["udp-port", None, None, "Where to serve over UDP: a port or udp:PORT:interface=ADDR "
         "(default: an OS-chosen port on the --port interface)."],
    ]
    optFlags = [["no-udp", None, "Do not serve over UDP."]]

    def postOptions(self) -> None:
        if not self["dir"]:
            raise usage.UsageError("--dir is required")
        if not os.path.isdir(self["dir"]):
            raise usage.UsageError(f"--dir {self['dir']}: not a directory")
        try:
            checkClientAddress(self["relay"])
        except AddressError as e:
            raise usage.UsageError(f"--relay: {e}") from None
        if self["no-udp"]:
            self["udp"] = None
        else:
            try:
                self["udp"] = udpPort(self["udp-port"] or "0", interfaceOf(self["port"]))
            except AddressError as e:
                raise usage.UsageError(f"--udp-port: {e}") from None


def makeRelayService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    return RelayService(reactor, config["port"], config["ttl"], config["state"])


def makeNodeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    return NodeService(
        reactor,
        relay=clientEndpoint(reactor, config["relay"]),
        directory=config["dir"],
        description=config["port"],
        advertise=config["advertise"],
        heartbeat=config["heartbeat"],
        rescan=config["rescan"],
        udp=config["udp"],
    )
