"""
The relay's registry on disk (``--state PATH``), so a restart loses nothing.

SQLite, the embedded default: one file, atomic transactions, nothing to
run.  Changes are written as they happen, incrementally, by a
:class:`StateWriter`: one thread that owns its own connection and takes
changes from a queue -- an upsert of one row on a registration, a new
``expires`` on a heartbeat, a delete on an unregistration or expiry --
and commits them in batches (one transaction per ``BATCH_DELAY``), so the
reactor thread never waits on the disk.  A relay that starts loads the
file at once (:meth:`StateStore.load`).  A file that cannot be read, or that a relay
with a newer schema (``PRAGMA user_version``) wrote, is moved aside with a
warning and the relay starts empty -- it never refuses to start over its own
cache, and never rewrites a newer relay's file.

Schema 2 added each node's public key, whether the relay reached it, and
the address it registered from.  A schema-1 file holds keyless entries no
node could ever prove again, so its table is dropped (with a warning) and
the nodes simply register again.  Schema 4 added each file's manifest root
and piece size (``[name, size, sha256, root, piece]`` in the ``files`` JSON,
the plain three for a file announced without a root); a schema-3 file's
rows are all of the plain kind, so it is read as it is and carries on as
schema 4 (a schema-3 relay then moves the file aside as newer, rather than
misreading it).
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, List, Optional

from twisted.logger import Logger

from ..wire import FileEntry
from .registry import Listener, Peer

SCHEMA_VERSION = 4  # PRAGMA user_version of the files this code writes
BATCH_DELAY = 0.2  # seconds the writer gathers changes before one commit
COLUMNS = "node, host, port, udp, expires, files, key, reachable, source, tls"
UPSERT = (
    f"INSERT INTO peers ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(node) DO UPDATE SET host=excluded.host, port=excluded.port,"
    " udp=excluded.udp, expires=excluded.expires, files=excluded.files, key=excluded.key,"
    " reachable=excluded.reachable, source=excluded.source, tls=excluded.tls"
)


class StateUnwritable(Exception):
    """``--state PATH`` names a file the relay cannot write: which, and why."""

    def __init__(self, path: str | Path, why: str) -> None:
        super().__init__(str(path), why)
        self.path = str(path)
        self.why = why

    def __str__(self) -> str:
        return f"--state {self.path}: {self.why}"


def checkWritable(path: str | Path) -> None:
    """
    Raise :class:`StateUnwritable` unless the relay can keep its state at
    ``path``: its folder exists and takes new files (SQLite writes its
    journal beside it), and the file, if there, is a writable file.
    Probed by doing it, so it holds for root and for read-only mounts alike.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise StateUnwritable(path, f"folder {folder} does not exist")
    if path.is_dir():
        raise StateUnwritable(path, "is a folder")
    try:
        if path.exists():
            with open(path, "ab"):
                pass
        probe = folder / f".{path.name}.p2prelay-probe-{os.getpid()}"
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise StateUnwritable(path, f"cannot write there ({e.strerror or e})") from None


class NewerSchema(Exception):
    """The state file was written by a relay with a newer schema."""


class StateStore:
    log = Logger()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _connect(self, **options) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5, **options)
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
                # In the order rows were first written: first registration first.
                rows = db.execute(f"SELECT {COLUMNS} FROM peers ORDER BY rowid").fetchall()
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
        entries = [_entry(*item) for item in json.loads(files)]
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
        """Replace the whole file's contents with ``peers`` (one transaction)."""
        rows = [_row(p) for p in peers]
        db = self._connect()
        try:
            with db:
                db.execute("DELETE FROM peers")
                db.executemany(UPSERT, rows)
        finally:
            db.close()


def _entry(name, size, sha256, root=None, piece=None) -> FileEntry:
    if root is None:
        return FileEntry(str(name), int(size), str(sha256))
    return FileEntry(str(name), int(size), str(sha256), root=str(root), pieceSize=int(piece))


def _row(p: Peer) -> tuple:
    files = p.files
    listed = []
    for i, name in enumerate(files.names):
        item = [name, files.sizes[i], files.digest(i).hex()]
        root = files.root(i)
        if root is not None:
            item += [root, files.pieceSize(i)]
        listed.append(item)
    return (
        p.node, p.host, p.port, p.udp, p.expires, json.dumps(listed),
        p.key, int(p.reachable), p.source, p.tls,
    )


_STOP = object()


class StateWriter(Listener):
    """
    Writes a registry's changes to a :class:`StateStore` as they happen, on
    one thread of its own that owns the only writing connection.

    Set it as ``registry.listener``; the reactor thread only puts each
    change on a queue.  The thread commits every change it gathered within
    ``batchDelay`` in one transaction (a row a node re-registered or beat
    several times in a batch is written once).  :meth:`close` writes what
    is left and waits for the thread.  A file a newer relay wrote is never
    written (its changes are dropped, with one warning).
    """

    log = Logger()

    def __init__(self, store: StateStore, batchDelay: float = BATCH_DELAY) -> None:
        self.store = store
        self.batchDelay = batchDelay
        self._queue: "queue.SimpleQueue[object]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self.commits = 0  # transactions written (for tests and benchmarks)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="p2prelay-state", daemon=True)
        self._thread.start()

    def upserted(self, peer: Peer) -> None:
        self._queue.put(("upsert", peer))

    def refreshed(self, peer: Peer) -> None:
        self._queue.put(("expires", peer))

    def removed(self, node: str) -> None:
        self._queue.put(("delete", node))

    def close(self) -> None:
        """Write every change queued so far, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        db = None
        try:
            db = self.store._connect(check_same_thread=True)
            db.execute("PRAGMA synchronous = NORMAL")
        except (NewerSchema, sqlite3.Error) as e:
            self.log.warn(
                "cannot write state to {path}: {error}; changes are not saved",
                path=str(self.store.path),
                error=str(e),
            )
            if db is not None:
                db.close()
            db = None
        try:
            stopping = False
            while not stopping:
                batch = [self._queue.get()]
                deadline = time.monotonic() + self.batchDelay
                while batch[-1] is not _STOP:
                    left = deadline - time.monotonic()
                    try:
                        batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
                    except queue.Empty:
                        break
                stopping = batch[-1] is _STOP
                if db is not None:
                    self._write(db, [change for change in batch if change is not _STOP])
        finally:
            if db is not None:
                db.close()

    def _write(self, db: sqlite3.Connection, batch: list) -> None:
        # The last change of a node decides; its peer object holds the
        # latest lifetime and reachability.
        last: dict = {}
        for what, subject in batch:
            node = subject if what == "delete" else subject.node
            previous = last.pop(node, None)
            if what == "expires" and previous is not None and previous[0] == "upsert":
                what = "upsert"  # an upsert's row already carries the lifetime
            last[node] = (what, subject)
        try:
            with db:
                for what, subject in last.values():
                    if what == "upsert":
                        db.execute(UPSERT, _row(subject))
                    elif what == "expires":
                        db.execute("UPDATE peers SET expires = ? WHERE node = ?", (subject.expires, subject.node))
                    else:
                        db.execute("DELETE FROM peers WHERE node = ?", (subject,))
            self.commits += 1
        except sqlite3.Error as e:
            self.log.warn("cannot save state to {path}: {error}", path=str(self.store.path), error=str(e))
