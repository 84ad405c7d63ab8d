"""
Where the relay keeps its registry: behind one interface
(:mod:`.interface`), in this process (:mod:`.memory`) or in Redis
(:mod:`.redis`, addressed by :mod:`.url`), so several relays share one.
"""
