"""
``--registry`` turned into a Redis address: ``redis://HOST:PORT/DB`` or
``unix:///path/redis.sock?db=N``.

The password is never part of the URL (a command line is visible to every
user of the machine in ``ps``): it is read from a file named separately
(``--registry-password-file``), its first line, whitespace stripped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlsplit

import attrs

DEFAULT_PORT = 6379
MAX_DB = 15  # a default redis-server has databases 0..15


class RegistryURLError(ValueError):
    """``--registry`` or its password file cannot be used; the message says why."""


@attrs.frozen
class RedisAddress:
    """Where a Redis is: host and port, or a unix socket path; the database; the password."""

    host: Optional[str] = None
    port: int = DEFAULT_PORT
    path: Optional[str] = None
    db: int = 0
    password: Optional[str] = attrs.field(default=None, repr=False)

    def describe(self) -> str:
        """The address for messages (never the password)."""
        where = f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"
        return f"{where} db {self.db}"


def _db(text: str, url: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise RegistryURLError(f"{url}: the database must be a number, not {text!r}") from None
    if not 0 <= db <= MAX_DB:
        raise RegistryURLError(f"{url}: the database must be 0 to {MAX_DB}")
    return db


def readPassword(path: str | Path) -> str:
    """The password in the first line of ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RegistryURLError(f"cannot read the Redis password file {path}: {e}") from None
    lines = text.splitlines()
    password = lines[0].strip() if lines else ""
    if not password:
        raise RegistryURLError(f"the Redis password file {path} is empty")
    return password


def parse(url: str, passwordFile: str | Path | None = None) -> RedisAddress:
    """
    The address ``url`` names, with the password from ``passwordFile``.

    Refuses a password or user in the URL itself, so it never sits on a
    command line.
    """
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise RegistryURLError(
            "put the Redis password in a file and name it with --registry-password-file, "
            "not in --registry"
        )
    password = readPassword(passwordFile) if passwordFile is not None else None
    query = parse_qs(parts.query, keep_blank_values=True)
    if parts.scheme == "redis":
        if not parts.hostname:
            raise RegistryURLError(f"{url}: no host (redis://HOST:PORT/DB)")
        try:
            port = parts.port if parts.port is not None else DEFAULT_PORT
        except ValueError:
            raise RegistryURLError(f"{url}: the port must be a number 1 to 65535") from None
        if not 0 < port < 65536:
            raise RegistryURLError(f"{url}: the port must be a number 1 to 65535")
        path = parts.path.strip("/")
        db = _db(path, url) if path else 0
        if set(query) - {"db"}:
            raise RegistryURLError(f"{url}: unknown parameter {sorted(set(query) - {'db'})[0]}")
        if "db" in query:
            if path:
                raise RegistryURLError(f"{url}: the database given twice")
            db = _db(query["db"][-1], url)
        return RedisAddress(host=parts.hostname, port=port, db=db, password=password)
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise RegistryURLError(f"{url}: a socket needs an absolute path (unix:///path/redis.sock)")
        if set(query) - {"db"}:
            raise RegistryURLError(f"{url}: unknown parameter {sorted(set(query) - {'db'})[0]}")
        db = _db(query["db"][-1], url) if "db" in query else 0
        return RedisAddress(path=parts.path, db=db, password=password)
    raise RegistryURLError(
        f"{url}: not a registry address (redis://HOST:PORT/DB or unix:///path/redis.sock?db=N)"
    )
