# A whole network in one process: `twistd -ny tac/demo.tac` (from the
# checkout) starts a relay on loopback and three peer nodes serving
# examples/peer1..3.  Then, in another terminal:
#   p2p-fetch --relay localhost:8000 sample2.txt
# P2PRELAY_PORT moves the relay (default 8000, loopback only).
import os

from twisted.application.service import Application

from p2prelay.tap import NodeOptions, RelayOptions, makeNodeService, makeRelayService

port = os.environ.get("P2PRELAY_PORT", "8000")
examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")

application = Application("p2prelay demo")

relay = RelayOptions()
relay.parseOptions(["--port", f"tcp:{port}:interface=127.0.0.1"])
makeRelayService(relay).setServiceParent(application)

for peer in ("peer1", "peer2", "peer3"):
    node = NodeOptions()
    node.parseOptions([
        "--relay", f"127.0.0.1:{port}",
        "--dir", os.path.join(examples, peer),
        "--port", "tcp:0:interface=127.0.0.1",
    ])
    makeNodeService(node).setServiceParent(application)
