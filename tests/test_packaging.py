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


# Entries of the running environment's site-packages the scratch venv must
# not see: an install of this project, in any of pip's forms.
OURS = ("p2prelay", "__editable__", "easy-install.pth", "__pycache__", "dropin.cache")


def linkDependencies(site: Path, target: Path) -> None:
    """
    Make everything installed in ``site`` importable from ``target`` (a
    fresh venv's site-packages) through symbolic links, except this
    project: the venv then sees p2prelay only as pip installs it there.
    ``twisted`` and ``twisted/plugins`` are real folders of links, so pip
    can add our plugin file to them without touching ``site``.
    """

    def link(source: Path, into: Path, expand: dict) -> None:
        into.mkdir(exist_ok=True)
        for entry in source.iterdir():
            if entry.name.startswith(OURS) or entry.name.endswith(".egg-link"):
                continue
            if entry.name in expand:
                link(entry, into / entry.name, expand[entry.name])
            else:
                os.symlink(entry, into / entry.name)

    link(site, target, {"twisted": {"plugins": {}}})


class InstallTests(SynchronousTestCase):
    """
    Install a copy of the project into a fresh virtualenv, both ways, and
    ask that venv's twistd for its plugins.  The venv borrows this
    interpreter's installed dependencies (see :func:`linkDependencies`), so
    pip installs the project alone (``--no-deps``) and nothing is
    downloaded but the build backend, into pip's build environment.
    """

    def setUp(self) -> None:
        if os.environ.get("P2PRELAY_SKIP_INSTALL_TESTS"):
            raise SkipTest("P2PRELAY_SKIP_INSTALL_TESTS is set")
        import twisted

        self.scratch = Path(self.mktemp()).resolve()
        self.source = self.scratch / "src"
        shutil.copytree(ROOT, self.source, ignore=IGNORE)
        self.venv = self.scratch / "venv"
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(self.venv)], check=True, timeout=120
        )
        self.bin = self.venv / "bin"
        [self.site] = self.venv.glob("lib/python*/site-packages")
        linkDependencies(Path(twisted.__file__).resolve().parent.parent, self.site)

    def pip(self, *args: str) -> None:
        result = subprocess.run(
            [
                str(self.bin / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                "--no-deps", "--no-compile", *args,
            ],
            cwd=str(self.source),
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])

    def run_(self, *command: str) -> str:
        # Run from elsewhere so the checkout is not on sys.path by accident.
        result = subprocess.run(
            command, cwd=str(self.scratch), capture_output=True, text=True, timeout=120
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def taps(self) -> str:
        """``twistd --help`` as this venv's python runs it (the twistd script is Twisted's, not ours)."""
        return self.run_(
            str(self.bin / "python"), "-c", "from twisted.scripts.twistd import run; run()", "--help"
        )

    def test_plainThenEditable(self) -> None:
        """
        twistd --help lists relay and peernode after pip install . and after
        pip install -e .; the console scripts are installed and run.
        """
        self.pip(".")
        plugin = self.site / "twisted" / "plugins" / "p2prelay_plugins.py"
        self.assertTrue(plugin.is_file() and not plugin.is_symlink(), "pip install . copies the plugin")
        help = self.taps()
        self.assertRegex(help, r"\n\s+relay\s")
        self.assertRegex(help, r"\n\s+peernode\s")
        for name in ("p2p-fetch", "p2p-peer", "p2p-demo"):
            self.assertTrue((self.bin / name).is_file(), f"no {name} script")
        self.assertRegex(self.run_(str(self.bin / "p2p-fetch"), "--version"), r"^p2p-fetch \d")

        self.pip("--force-reinstall", "-e", ".")
        site = self.run_(str(self.bin / "python"), "-c", "import p2prelay; print(p2prelay.__file__)").strip()
        self.assertTrue(site.startswith(str(self.source)), f"not editable: {site}")
        self.assertFalse(plugin.exists(), "the plain install's plugin copy should be gone")
        help = self.taps()
        self.assertRegex(help, r"\n\s+relay\s")
        self.assertRegex(help, r"\n\s+peernode\s")
