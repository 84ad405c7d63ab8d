"""Sizes, rates and counts for people: p2prelay.human."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from p2prelay.human import humanRate, humanSize, plural

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


class HumanSizeTests(SynchronousTestCase):
    def test_bytes(self) -> None:
        """Below 1 KiB a size is exact bytes, without a decimal."""
        self.assertEqual([humanSize(n) for n in (0, 1, 512, 1023)], ["0 B", "1 B", "512 B", "1023 B"])

    def test_kibibyte(self) -> None:
        """1 KiB exactly is 1.0 KiB, with one decimal."""
        self.assertEqual(humanSize(KiB), "1.0 KiB")
        self.assertEqual(humanSize(1536), "1.5 KiB")

    def test_units(self) -> None:
        """Each binary unit from KiB to TiB, one decimal."""
        self.assertEqual(
            [humanSize(n) for n in (MiB, 2 * GiB, 3 * TiB)], ["1.0 MiB", "2.0 GiB", "3.0 TiB"]
        )

    def test_roundingCarriesToNextUnit(self) -> None:
        """Just under a unit never shows as 1024.0 of the smaller one."""
        self.assertEqual(humanSize(MiB - 1), "1.0 MiB")
        self.assertEqual(humanSize(GiB - 1), "1.0 GiB")
        self.assertEqual(humanSize(TiB - 1), "1.0 TiB")

    def test_justBelowTheCarry(self) -> None:
        """1023.9 KiB stays in KiB."""
        self.assertEqual(humanSize(int(1023.9 * KiB)), "1023.9 KiB")

    def test_tebibytesAreTheLast(self) -> None:
        """Beyond 1024 TiB the figure grows in TiB."""
        self.assertEqual(humanSize(2048 * TiB), "2048.0 TiB")

    def test_fractionalBytes(self) -> None:
        """A float below 1 KiB (an average, a rate) is shown as whole bytes."""
        self.assertEqual(humanSize(12.7), "12 B")

    def test_negative(self) -> None:
        """A negative size keeps its sign."""
        self.assertEqual(humanSize(-2 * KiB), "-2.0 KiB")


class HumanRateTests(SynchronousTestCase):
    def test_rate(self) -> None:
        """A rate is a size per second."""
        self.assertEqual(humanRate(1.5 * MiB), "1.5 MiB/s")
        self.assertEqual(humanRate(0), "0 B/s")


class PluralTests(SynchronousTestCase):
    def test_one(self) -> None:
        """One takes the singular."""
        self.assertEqual(plural(1, "file"), "1 file")

    def test_zeroAndMany(self) -> None:
        """Zero and more than one take the plural."""
        self.assertEqual([plural(0, "file"), plural(2, "file")], ["0 files", "2 files"])

    def test_irregular(self) -> None:
        """An irregular plural can be given."""
        self.assertEqual(plural(3, "entry", "entries"), "3 entries")
        self.assertEqual(plural(1, "entry", "entries"), "1 entry")
