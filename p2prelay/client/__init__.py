"""
The client's machinery, shared by ``p2p-fetch`` and ``p2p-peer``.

``relay`` asks the relay, ``get`` fetches from one peer, ``fetcher`` holds
the failover policy, ``download`` the verified sink that commits by rename.
"""
