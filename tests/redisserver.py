"""
A real ``redis-server`` for the tests: started on a free loopback port (or
a unix socket) in a temporary folder, with no persistence, and stopped.

Tests that need one call :func:`need` first: it skips them with a one-line
reason where no ``redis-server`` binary is installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from twisted.trial.unittest import SkipTest

STARTUP = 10.0  # seconds a redis-server may take to accept connections
POLL = 0.01


def binary() -> Optional[str]:
    return shutil.which("redis-server")


def need() -> str:
    """The redis-server binary, or the test is skipped with the reason."""
    found = binary()
    if found is None:
        raise SkipTest("no redis-server binary (Debian package redis-server; .ci/run installs it)")
    return found


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process: ``start()``, ``stop()``, ``restart()`` (same port, empty)."""

    def __init__(self, unix: bool = False, password: Optional[str] = None, both: bool = False) -> None:
        """On a unix socket (``unix``), a loopback port, or ``both``."""
        self.binary = need()
        # A unix socket's path must stay under 108 bytes: not in whatever
        # deep temporary folder a test may have made the default.
        short = "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else None
        self.folder = Path(tempfile.mkdtemp(prefix="p2p-redis-", dir=short))
        self.port = 0 if unix and not both else freePort()
        self.path = str(self.folder / "redis.sock") if unix or both else None
        self.password = password
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        """The TCP address if it has one, else the socket's."""
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return self.unixURL

    @property
    def unixURL(self) -> str:
        return f"unix://{self.path}?db=0"

    def start(self) -> "RedisServer":
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]
        if self.path is not None:
            args += ["--unixsocket", self.path, "--unixsocketperm", "700"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdout=open(self.folder / "stderr", "ab"), stderr=subprocess.STDOUT, cwd=self.folder
        )
        deadline = time.monotonic() + STARTUP
        while not self._accepts():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.folder / 'stderr').read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(POLL)
        return self

    def _accepts(self) -> bool:
        if not self.port:
            family, where = socket.AF_UNIX, self.path
        else:
            family, where = socket.AF_INET, ("127.0.0.1", self.port)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(where)
            except OSError:
                return False
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
            return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> None:
        """Stopped and started again on the same address, holding nothing (no persistence)."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def started(case, unix: bool = False, password: Optional[str] = None) -> RedisServer:
    """A running server for ``case``, stopped and removed at its cleanup."""
    server = RedisServer(unix=unix, password=password)
    case.addCleanup(server.cleanup)
    return server.start()
