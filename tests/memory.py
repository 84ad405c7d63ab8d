from .support import flushPumps  # noqa: F401  (moved to tests/support.py)
