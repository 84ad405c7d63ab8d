"""
The relay's registry on disk (``--state PATH``), so a restart loses nothing.

SQLite, the embedded default: one file, atomic transactions, nothing to
run.  Every save rewrites the table in one transaction, so the file always
holds one consistent snapshot.  A file that cannot be read, or that a relay
with a newer schema (``PRAGMA user_version``) wrote, is moved aside with a
warning and the relay starts empty -- it never refuses to start over its own
cache, and never rewrites a newer relay's file.

Schema 2 added each node's public key, whether the relay reached it, and
the address it registered from.  A schema-1 file holds keyless entries no
node could ever prove again, so its table is dropped (with a warning) and
the nodes simply register again.
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

SCHEMA_VERSION = 3  # PRAGMA user_version of the files this code writes


class NewerSchema(Exception):
    """The state file was written by a relay with a newer schema."""


class StateStore:
    log = Logger()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            db.close()
            raise NewerSchema(
                f"schema version {version}, newer than this relay's {SCHEMA_VERSION}"
            )
        if version < SCHEMA_VERSION:
            columns = [row[1] for row in db.execute("PRAGMA table_info(peers)")]
            if columns and "key" not in columns:
                self.log.warn(
                    "state file {path} is from an older relay: its entries have no keys "
                    "and are dropped; nodes register again",
                    path=str(self.path),
                )
                db.execute("DROP TABLE peers")
            elif columns and "tls" not in columns:
                db.execute("ALTER TABLE peers ADD COLUMN tls INTEGER")
        db.execute(
            "CREATE TABLE IF NOT EXISTS peers ("
            " node TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL,"
            " udp INTEGER, expires REAL NOT NULL, files TEXT NOT NULL,"
            " key TEXT, reachable INTEGER NOT NULL, source TEXT, tls INTEGER)"
        )
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return db

    def load(self) -> List[Peer]:
        """
        Every stored peer.  A file that cannot be read, or that a newer
        relay wrote, is moved aside (never rewritten) and yields none.
        """
        if not self.path.exists():
            return []
        try:
            db = self._connect()
            try:
                rows = db.execute(
                    "SELECT node, host, port, udp, expires, files, key, reachable, source, tls"
                    " FROM peers"
                ).fetchall()
            finally:
                db.close()
            return [self._peer(*row) for row in rows]
        except NewerSchema as e:
            self._moveAside("newer", str(e))
        except (sqlite3.Error, ValueError, TypeError, KeyError) as e:
            self._moveAside("corrupt", str(e))
        return []

    def _moveAside(self, why: str, error: str) -> None:
        aside: Path | None = self.path.with_name(f"{self.path.name}.{why}-{int(time.time())}")
        try:
            os.replace(self.path, aside)
        except OSError:
            aside = None
        self.log.warn(
            "state file {path} is unusable ({error}); moved to {aside}, starting empty",
            path=str(self.path),
            error=error,
            aside=str(aside),
        )

    @staticmethod
    def _peer(node, host, port, udp, expires, files, key, reachable, source, tls) -> Peer:
        entries = [FileEntry(str(n), int(s), str(h)) for n, s, h in json.loads(files)]
        return Peer(
            node=str(node),
            host=str(host),
            port=int(port),
            files={e.name: e for e in entries},
            expires=float(expires),
            udp=int(udp) if udp is not None else None,
            key=str(key) if key is not None else None,
            reachable=bool(reachable),
            source=str(source) if source is not None else None,
            tls=int(tls) if tls is not None else None,
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
                p.key,
                int(p.reachable),
                p.source,
                p.tls,
            )
            for p in peers
        ]
        db = self._connect()
        try:
            with db:
                db.execute("DELETE FROM peers")
                db.executemany("INSERT INTO peers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        finally:
            db.close()
