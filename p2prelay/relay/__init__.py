"""
The relay: the directory peer nodes register with and clients ask.

``protocol`` translates lines into calls on ``registry`` (the knowledge,
no Twisted in it); ``store`` keeps it on disk; ``service`` assembles them.
"""
