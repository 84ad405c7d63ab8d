"""
Smoke runs of the benchmarks in ``benchmarks/``: each runs end to end on
tiny inputs, so a change that breaks one is caught here.  The timed runs
are not part of the suite, and no timing is asserted.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

from twisted.trial.unittest import SynchronousTestCase

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# Every smoke run, with the programs it needs.  The first smoke test starts
# all of them at once: most of a smoke run is waiting (interpreters and
# daemons starting, sockets, sleeps between rounds), so side by side they
# take about as long as the longest one instead of the sum (some 20 s of
# the suite).  No figure is asserted, so sharing the cores changes nothing
# a test looks at.
SMOKES = {
    "fetch.py": ("curl", "sha256sum"),
    "startup.py": (),
    "relay.py": (),
    "transfer.py": (),
    "tls.py": (),
    "pieces.py": (),
    "registry.py": (),
    "relayed.py": (),
    "relays_redis.py": ("redis-server",),
}


class _Run:
    """One ``benchmarks/NAME --smoke``, its output in a temporary file."""

    def __init__(self, name: str) -> None:
        self.output = tempfile.TemporaryFile(mode="w+")
        self.errors = tempfile.TemporaryFile(mode="w+")
        # Its own session, so whatever it starts (daemons) goes with it.
        self.process = subprocess.Popen(
            [sys.executable, str(BENCHMARKS / name), "--smoke"],
            stdout=self.output,
            stderr=self.errors,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.output.seek(0)
        self.errors.seek(0)
        return subprocess.CompletedProcess(self.process.args, code, self.output.read(), self.errors.read())

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait()


_runs: Optional[Dict[str, _Run]] = None


def _started() -> Dict[str, _Run]:
    global _runs
    if _runs is None:
        _runs = {
            name: _Run(name) for name, tools in SMOKES.items() if all(shutil.which(t) for t in tools)
        }
    return _runs


@atexit.register
def _stopLeftovers() -> None:
    """Runs no test waited for (a -k selection, an interrupted suite) are stopped, daemons and all."""
    for run in (_runs or {}).values():
        run.kill()


def smoke(case: SynchronousTestCase, name: str, timeout: float = 240) -> str:
    """The output of ``benchmarks/NAME --smoke`` (started with the others), or the test fails."""
    run = _started().pop(name, None) or _Run(name)
    result = run.wait(timeout)
    case.assertEqual(result.returncode, 0, result.stdout + result.stderr)
    return result.stdout


class FetchBenchmarkTests(SynchronousTestCase):
    def setUp(self) -> None:
        for tool in ("curl", "sha256sum"):
            if not shutil.which(tool):
                raise self.skipTest(f"benchmarks/fetch.py needs {tool}")

    def test_smoke(self):
        """benchmarks/fetch.py --smoke runs every contender and reports every target-2 figure."""
        out = smoke(self, "fetch.py")
        for figure in (
            "p2p-fetch -o (verified)",
            "curl -o + sha256sum",
            "sendfile to file",
            "vs curl -o + sha256sum",
            "vs curl -o ",
            "node CPU-s/GiB",
            "node peak RSS MiB",
            "client peak RSS MiB",
        ):
            self.assertIn(figure, out)


class StartupBenchmarkTests(SynchronousTestCase):
    def test_smoke(self):
        """benchmarks/startup.py --smoke times every command and finds no TLS or UDP code loaded."""
        out = smoke(self, "startup.py")
        for figure in ("python -c pass", "import the reactor", "p2p-fetch 1 KiB", "p2p-fetch -o"):
            self.assertIn(figure, out)
        if shutil.which("curl"):
            self.assertIn("x p2p-fetch -o / 3 x curl -o", out)
        self.assertIn("heavy ones loaded: none", out)


class RelayBenchmarkTests(SynchronousTestCase):
    def test_smoke(self):
        """benchmarks/relay.py --smoke registers fake nodes and reports every target-1 figure."""
        out = smoke(self, "relay.py")
        for figure in (
            "registered 100/100",
            "relay RSS",
            "WHOHAS c= 1:",
            "WHOHAS c=16:",
            "no-op server",
            "SEARCH",
            "WHOHAS during",
            "heartbeats:",
            "Ed25519 verification",
        ):
            self.assertIn(figure, out)


class TransferBenchmarkTests(SynchronousTestCase):
    def test_smoke(self) -> None:
        """benchmarks/transfer.py --smoke moves a file by sendfile, TCP and UDP and prints the ratios."""
        out = smoke(self, "transfer.py")
        self.assertIn("TCP against sendfile", out)
        self.assertIn("UDP, 1400 B blocks against TCP", out)


class TLSBenchmarkTests(SynchronousTestCase):
    def test_smoke(self) -> None:
        """benchmarks/tls.py --smoke fetches over the plain and the TLS port and prints the ratio."""
        out = smoke(self, "tls.py")
        self.assertIn("TLS / plain:", out)


class PiecesBenchmarkTests(SynchronousTestCase):
    def test_smoke(self) -> None:
        """benchmarks/pieces.py --smoke times --sources 1 against the default, a SIGKILLed resume and the first byte."""
        out = smoke(self, "pieces.py")
        for figure in ("multi-source speedup:", "resume sent again:", "first byte after the relay answers:"):
            self.assertIn(figure, out)


class RegistryBenchmarkTests(SynchronousTestCase):
    def test_smoke(self):
        """benchmarks/registry.py --smoke loads and looks up through the memory and Redis backends."""
        out = smoke(self, "registry.py")
        self.assertIn("memory backend", out)
        if shutil.which("redis-server"):
            for figure in ("redis, one relay, c=1", "redis, one relay, c=16", "redis, two relays together"):
                self.assertIn(figure, out)


class RelayedBenchmarkTests(SynchronousTestCase):
    def test_smoke(self) -> None:
        """benchmarks/relayed.py --smoke fetches directly and through a circuit and prints every figure."""
        out = smoke(self, "relayed.py")
        for figure in ("direct:", "relayed:", "relayed/direct:", "relay CPU-s/GiB relayed:"):
            self.assertIn(figure, out)
        self.assertNotIn("failed:", out)


class RelaysRedisBenchmarkTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not shutil.which("redis-server"):
            raise self.skipTest("benchmarks/relays_redis.py needs a redis-server binary")

    def test_smoke(self) -> None:
        """benchmarks/relays_redis.py --smoke registers through real relays, memory and Redis, and prints the table and ratios."""
        out = smoke(self, "relays_redis.py")
        for figure in (
            "registered 100/100 with the memory relay",
            "registered 100/100 with the redis relay",
            "the same holders from all three relays",
            "memory, one relay    16",
            "redis, one relay     16",
            "redis, two relays    16",
            "redis one relay / memory:",
            "two relays / one relay:",
            "CPU per lookup",
        ):
            self.assertIn(figure, out)
        self.assertNotIn("FAILED", out)
