"""
p2prelay: a relay-based peer-to-peer file-sharing system on Twisted.

The relay keeps a directory of peer nodes and the files they hold; nodes
serve their folders; ``p2p-fetch`` asks the relay and downloads straight
from the peers.  ``docs/protocol.rst`` describes what crosses the wire.
"""

__version__ = "0.1.0"
