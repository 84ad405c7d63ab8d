"""
Names in a shared folder that the protocol cannot carry: skipped, with one
warning per scan, never a traceback or a node that cannot start.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from p2prelay.node.share import SharedDirectory
from tests.support import syncThread


class OddNameTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        (self.root / "good.txt").write_bytes(b"fine")
        self.share = SharedDirectory(self.root, runInThread=syncThread)

    def create(self, name: bytes) -> None:
        """A real file with a bytes name, as another program could leave one."""
        os.close(os.open(os.path.join(os.fsencode(self.root), name), os.O_CREAT | os.O_WRONLY, 0o644))

    def scan(self) -> list[dict]:
        with capturedLogs() as events:
            self.successResultOf(self.share.scan())
        return [e for e in events if e["log_level"] >= LogLevel.warn]

    def test_notUTF8(self):
        """A file whose name is not valid UTF-8 is skipped; the rest are shared."""
        self.create(b"bad\xff.txt")
        self.scan()
        self.assertEqual(sorted(self.share.entries), ["good.txt"])

    def test_newline(self):
        """A file whose name holds a newline or another control character is skipped."""
        self.create(b"two\nlines.txt")
        self.create(b"bell\x07.txt")
        self.scan()
        self.assertEqual(sorted(self.share.entries), ["good.txt"])

    def test_notUTF8Directory(self):
        """Files inside a folder whose name is not UTF-8 are skipped too."""
        (self.root / os.fsdecode(b"dir\xfe")).mkdir()
        self.create(b"dir\xfe/inner.txt")
        self.scan()
        self.assertEqual(sorted(self.share.entries), ["good.txt"])

    def test_oneWarningPerScan(self):
        """However many odd names, each scan logs one warning, naming them escaped."""
        for i in range(20):
            self.create(b"bad%d\xff" % i)
        self.create(b"two\nlines")
        [warning] = self.scan()
        text = formatEvent(warning)
        self.assertIn("21 files", text)
        self.assertIn("\\xff", text)
        self.assertNotIn("\n", text)
        [again] = self.scan()
        self.assertIn("21 files", formatEvent(again))

    def test_newlineEscaped(self):
        """A newline in a skipped name is shown escaped, so the warning stays one line."""
        self.create(b"two\nlines")
        [warning] = self.scan()
        self.assertIn("two\\nlines", formatEvent(warning))

    def test_cleanFolderNoWarning(self):
        """A folder of ordinary names logs no warning."""
        self.assertEqual(self.scan(), [])
