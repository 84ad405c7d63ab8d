# A relay for `twistd -ny tac/relay.tac`, configured by environment:
#   P2PRELAY_PORT   where to listen (port or endpoint description; default 8000)
#   P2PRELAY_TTL    seconds a registration lives (default 90)
#   P2PRELAY_STATE  SQLite file that keeps the registry across restarts
import os

from twisted.application.service import Application

from p2prelay.tap import RelayOptions, makeRelayService

options = RelayOptions()
arguments = ["--port", os.environ.get("P2PRELAY_PORT", "8000")]
if os.environ.get("P2PRELAY_TTL"):
    arguments += ["--ttl", os.environ["P2PRELAY_TTL"]]
if os.environ.get("P2PRELAY_STATE"):
    arguments += ["--state", os.environ["P2PRELAY_STATE"]]
options.parseOptions(arguments)

application = Application("p2prelay relay")
makeRelayService(options).setServiceParent(application)
