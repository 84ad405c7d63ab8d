"""
The daemons are twistd plugins, and twistd must find them however the
project was installed: a plain install copies ``twisted/plugins`` into
site-packages, an editable one must expose the checkout's copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "_trial_temp*", "__pycache__", "dropin.cache"
)


class PluginTests(SynchronousTestCase):
    def test_discoverable(self) -> None:
        """Twisted's plugin scan yields the relay and peernode taps."""
        names = {maker.tapname for maker in getPlugins(IServiceMaker)}
        self.assertIn("relay", names)
        self.assertIn("peernode", names)

    def test_tapsLoad(self) -> None:
        """Each plugin's tap module provides Options and makeService."""
        for maker in getPlugins(IServiceMaker):
            if maker.tapname in ("relay", "peernode"):
                self.assertTrue(callable(maker.makeService))
                maker.options().parseOptions(
                    ["--dir", str(ROOT / "examples" / "peer1")] if maker.tapname == "peernode" else []
                )


class InstallTests(SynchronousTestCase):
    """
    Install a copy of the project into a fresh virtualenv, both ways, and
    ask that venv's twistd for its plugins.  Dependencies come from pip's
    cache after the first install on a machine.
    """

    def setUp(self) -> None:
        if os.environ.get("P2PRELAY_SKIP_INSTALL_TESTS"):
            raise SkipTest("P2PRELAY_SKIP_INSTALL_TESTS is set")
        self.scratch = Path(self.mktemp()).resolve()
        self.source = self.scratch / "src"
        shutil.copytree(ROOT, self.source, ignore=IGNORE)
        self.venv = self.scratch / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True, timeout=120)
        self.bin = self.venv / "bin"

    def pip(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
            cwd=str(self.source),
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])

    def taps(self) -> str:
        # Run from elsewhere so the checkout is not on sys.path by accident.
        result = subprocess.run(
            [str(self.bin / "twistd"), "--help"],
            cwd=str(self.scratch),
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_plainThenEditable(self) -> None:
        """twistd --help lists relay and peernode after pip install . and pip install -e ."""
        self.pip(".")
        help = self.taps()
        self.assertRegex(help, r"\n\s+relay\s")
        self.assertRegex(help, r"\n\s+peernode\s")
        self.pip("--no-deps", "--force-reinstall", "-e", ".")
        site = subprocess.run(
            [str(self.bin / "python"), "-c", "import p2prelay; print(p2prelay.__file__)"],
            cwd=str(self.scratch),
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.assertTrue(site.startswith(str(self.source)), f"not editable: {site}")
        installedPlugin = list(self.venv.glob("lib/python*/site-packages/twisted/plugins/p2prelay_plugins.py"))
        self.assertEqual(installedPlugin, [], "the plain install's plugin copy should be gone")
        help = self.taps()
        self.assertRegex(help, r"\n\s+relay\s")
        self.assertRegex(help, r"\n\s+peernode\s")
