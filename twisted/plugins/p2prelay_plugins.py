"""
twistd plugins for p2prelay: ``twistd relay`` and ``twistd peernode``.

ServiceMaker names its tap module as a string, so twistd's plugin scan
imports nothing of p2prelay until one of these is used.
"""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "p2prelay relay",
    "p2prelay.tap_relay",
    "The p2prelay relay: a directory of peer nodes and their files.",
    "relay",
)

peernode = ServiceMaker(
    "p2prelay peer node",
    "p2prelay.tap_node",
    "A p2prelay peer node: shares a folder and serves it to clients.",
    "peernode",
)
