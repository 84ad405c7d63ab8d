# A peer node for `twistd -ny tac/peernode.tac`, configured by environment:
#   P2PRELAY_RELAY      the relay, HOST:PORT (default localhost:8000)
#   P2PRELAY_DIR        the folder to share (required)
#   P2PRELAY_NODE_PORT  where to serve (default: an OS-chosen port)
#   P2PRELAY_ADVERTISE  host to register instead of the one the relay sees
import os

from twisted.application.service import Application

from p2prelay.tap import NodeOptions, makeNodeService

options = NodeOptions()
arguments = [
    "--relay", os.environ.get("P2PRELAY_RELAY", "localhost:8000"),
    "--dir", os.environ.get("P2PRELAY_DIR", ""),
    "--port", os.environ.get("P2PRELAY_NODE_PORT", "tcp:0"),
]
if os.environ.get("P2PRELAY_ADVERTISE"):
    arguments += ["--advertise", os.environ["P2PRELAY_ADVERTISE"]]
options.parseOptions(arguments)

application = Application("p2prelay peer node")
makeNodeService(options).setServiceParent(application)
