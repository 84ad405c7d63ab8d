"""
One node per shared folder: a lock file in the node's state folder
(:func:`p2prelay.identity.nodeStateDir`), held while the node runs.

The relay cannot know that two nodes share one folder (each has its own
key, so its own node id); the machine can.  A second node sharing the
same folder finds the lock held and warns: clients would see every file
twice, under two node ids.  ``flock`` locks end with the process, so a
node that crashed leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

from .. import identity

LOCK_NAME = "node.lock"


def defaultLockPath(sharedFolder: str | Path) -> Path:
    """Where the node sharing ``sharedFolder`` holds its lock."""
    return identity.nodeStateDir(sharedFolder) / LOCK_NAME


class FolderLock:
    """
    An exclusive, non-blocking ``flock`` on ``path``; the holder writes its
    pid there so the one who finds it held can say who holds it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """
        Take the lock: None when taken (or when the lock file cannot be made
        at all: not a reason to refuse to serve), else who holds it
        (``pid 1234``, or ``another process``).
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            return f"pid {holder}" if holder.isdigit() else "another process"
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock
