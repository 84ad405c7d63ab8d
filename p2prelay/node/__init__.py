"""
A peer node: shares one folder and serves it to clients.

``share`` is the only door into the folder, ``server`` answers GETs,
``upkeep`` keeps the node's entry at the relay true, ``service`` assembles
them.
"""
