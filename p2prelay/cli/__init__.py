"""
The console programs: ``p2p-fetch``, ``p2p-peer`` and ``p2p-demo``.

``console`` owns the terminal for all of them: typed lines in, file
contents out, human messages on stderr.
"""
