"""
The relay's registry on disk (``--state PATH``), so a restart loses nothing.

SQLite, the embedded default: one file, atomic transactions, nothing to
run.  Every save rewrites the table in one transaction, so the file always
holds one consistent snapshot.  A file that cannot be read is moved aside
with a warning and the relay starts empty -- it never refuses to start over
its own cache.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, List

from twisted.logger import Logger

from ..wire import FileEntry
from .registry import Peer

SCHEMA_VERSION = 1


class StateStore:
    log = Logger()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5)
        db.execute(
            "CREATE TABLE IF NOT EXISTS peers ("
            " node TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL,"
            " udp INTEGER, expires REAL NOT NULL, files TEXT NOT NULL)"
        )
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return db

    def load(self) -> List[Peer]:
        """Every stored peer; a broken file is moved aside and yields none."""
        if not self.path.exists():
            return []
        try:
            with self._connect() as db:
                rows = db.execute(
                    "SELECT node, host, port, udp, expires, files FROM peers"
                ).fetchall()
            db.close()
            return [self._peer(*row) for row in rows]
        except (sqlite3.Error, ValueError, TypeError, KeyError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            try:
                os.replace(self.path, aside)
            except OSError:
                aside = None
            self.log.warn(
                "state file {path} is unreadable ({error}); moved to {aside}, starting empty",
                path=str(self.path),
                error=str(e),
                aside=str(aside),
            )
            return []

    @staticmethod
    def _peer(node, host, port, udp, expires, files) -> Peer:
        entries = [FileEntry(str(n), int(s), str(h)) for n, s, h in json.loads(files)]
        return Peer(
            node=str(node),
            host=str(host),
            port=int(port),
            files={e.name: e for e in entries},
            expires=float(expires),
            udp=int(udp) if udp is not None else None,
        )

    def save(self, peers: Iterable[Peer]) -> None:
        rows = [
            (
                p.node,
                p.host,
                p.port,
                p.udp,
                p.expires,
                json.dumps([[e.name, e.size, e.sha256] for e in p.files.values()]),
            )
            for p in peers
        ]
        db = self._connect()
        try:
            with db:
                db.execute("DELETE FROM peers")
                db.executemany("INSERT INTO peers VALUES (?, ?, ?, ?, ?, ?)", rows)
        finally:
            db.close()
