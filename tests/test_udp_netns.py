"""
A smoke run of ``benchmarks/udp_loss.py``: its namespaces, veth pair, tbf
qdiscs and nft loss rule are set up, a tiny file is fetched over TCP and
UDP across them and over loopback, and everything is torn down, also
when the benchmark is stopped with SIGTERM half way.  No timing is
checked here.  Needs root; skipped with a one-line reason otherwise.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial import unittest

from .netns import skipUnlessNamespaces

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "udp_loss.py"
PREFIX = "p2pbench-"


def benchmarkNamespaces() -> list:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


class UDPLossBenchmarkSmokeTests(unittest.TestCase):
    def setUp(self) -> None:
        skipUnlessNamespaces("tc", "nft")
        self.before = set(benchmarkNamespaces())

    def assertNothingLeft(self) -> None:
        self.assertEqual(set(benchmarkNamespaces()) - self.before, set())

    def test_smokeRun(self) -> None:
        """--smoke fetches over the lossy link and loopback and leaves no namespace behind."""
        result = subprocess.run(
            [sys.executable, str(BENCHMARK), "--smoke"], capture_output=True, text=True, timeout=120
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("smoke: ", result.stdout)
        self.assertIn("5% loss", result.stdout)
        self.assertIn("loopback", result.stdout)
        self.assertNotIn("failed:", result.stdout)
        self.assertNothingLeft()

    def test_stoppedHalfWay(self) -> None:
        """SIGTERM while the namespaces exist still deletes them."""
        process = subprocess.Popen(
            [sys.executable, str(BENCHMARK), "--smoke"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        deadline = time.monotonic() + 60
        while not set(benchmarkNamespaces()) - self.before:
            if time.monotonic() > deadline or process.poll() is not None:
                self.fail("the benchmark never made its namespaces")
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        self.assertNotEqual(process.returncode, 0)
        self.assertNothingLeft()



class UDPLossBenchmarkSkipTests(unittest.TestCase):
    def test_skipsWithoutRoot(self) -> None:
        """Not root: one line saying why, exit status 0, nothing made."""
        code = (
            "import os, runpy, sys; os.geteuid = lambda: 1000; "
            f"sys.argv = [{str(BENCHMARK)!r}, '--smoke']; "
            f"runpy.run_path({str(BENCHMARK)!r}, run_name='__main__')"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout.strip().splitlines(), ["skipped: needs root (network namespaces, tc, nft)"]
        )
