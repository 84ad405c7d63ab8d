"""
Progress bars on stderr while files download: one line per file (its name,
bytes and percent, rate, ETA and the peers in use), and one overall line
when several move at once.

The lines are formatted by ``tqdm.format_meter``; drawing them is ours, so
that they are driven from the downloads' byte counts by a LoopingCall on
the reactor's clock (10 times a second, not once per chunk) and so that a
message or the prompt can take the lines' place: :meth:`Bars.message`
clears them, writes, and redraws them below; :meth:`Bars.close` clears
them for good.
"""

from __future__ import annotations

import shutil
from typing import Callable, Dict, List, Optional, Protocol

from twisted.internet.task import LoopingCall

from ..human import humanRate, humanSize, plural
from .console import visible

TICK = 0.1  # seconds between two redraws
SMOOTHING = 0.1  # weight of the latest tick in the rate shown (about a second's memory)
NAME_WIDTH = 24  # characters of a file's name shown at most

CLEAR = "\r\x1b[J"  # back to the line's start, erase it and everything below


class Transfer(Protocol):
    """What a running download tells the bars (the fetcher's attempt)."""

    name: str

    @property
    def received(self) -> int: ...

    @property
    def total(self) -> Optional[int]: ...

    @property
    def peers(self) -> List[str]: ...


class _Bar:
    def __init__(self, transfer: Transfer, now: float) -> None:
        self.transfer = transfer
        self.started = now
        self.last = now
        self.lastBytes = transfer.received
        self.rate: Optional[float] = None

    def sample(self, now: float) -> None:
        received = self.transfer.received
        dt = now - self.last
        if dt <= 0:
            return
        if received < self.lastBytes:  # a new attempt started over
            self.lastBytes = 0
        latest = (received - self.lastBytes) / dt
        self.rate = latest if self.rate is None else SMOOTHING * latest + (1 - SMOOTHING) * self.rate
        self.last, self.lastBytes = now, received


def _short(name: str) -> str:
    name = visible(name)
    return name if len(name) <= NAME_WIDTH else "..." + name[-(NAME_WIDTH - 3) :]


def _peers(peers: List[str]) -> str:
    if not peers:
        return ""
    if len(peers) == 1:
        return f"from {visible(peers[0])}"
    return f"from {len(peers)} peers"


class Bars:
    """
    The progress lines of one run.  ``write`` puts text on stderr as it is;
    ``clock`` drives the redraws; ``columns`` is the terminal's width
    (asked of the terminal when None).
    """

    def __init__(self, clock, write: Callable[[str], None], columns: Optional[int] = None) -> None:
        self.clock = clock
        self.write = write
        self.columns = columns
        self.bars: Dict[str, _Bar] = {}
        self.drawn = 0  # lines on the screen now
        self.loop: Optional[LoopingCall] = None

    def watch(self, transfer: Transfer) -> None:
        """Show ``transfer`` (replacing an earlier one of the same name)."""
        self.bars[transfer.name] = _Bar(transfer, self.clock.seconds())
        if self.loop is None:
            self.loop = LoopingCall(self.tick)
            self.loop.clock = self.clock
            self.loop.start(TICK, now=False)

    def done(self, name: str) -> None:
        """``name`` finished (or failed): its line goes."""
        if self.bars.pop(name, None) is not None:
            self._clear()
            if self.bars:
                self._draw()
            else:
                self._stop()

    def message(self, show: Callable[[], None]) -> None:
        """Run ``show`` (which writes whole lines) with the bars out of its way."""
        if not self.drawn:
            show()
            return
        self._clear()
        show()
        self._draw()

    def close(self) -> None:
        """Clear every line and stop redrawing."""
        self.bars.clear()
        self._clear()
        self._stop()

    def tick(self) -> None:
        now = self.clock.seconds()
        for bar in self.bars.values():
            bar.sample(now)
        self._clear()
        self._draw()

    # Drawing.

    def _width(self) -> int:
        return self.columns or shutil.get_terminal_size((80, 24)).columns

    def lines(self) -> List[str]:
        from tqdm import tqdm

        now = self.clock.seconds()
        width = self._width()
        lines = []

        def meter(prefix: str, n: int, total: Optional[int], elapsed: float, rate, postfix: str) -> str:
            if total is not None and n > total:
                total = None
            # tqdm has no binary unit suffixes: sizes and rates are ours
            # (``276.0 MiB``), as in every other message of p2p-fetch.
            sizes = f"{humanSize(n)}/{humanSize(total)}" if total is not None else humanSize(n)
            speed = humanRate(rate) if rate else "?/s"
            layout = (
                "{l_bar}{bar}| " + sizes + " [{elapsed}<{remaining}, " + speed + "{postfix}]"
                if total is not None
                else "{desc}" + sizes + " [{elapsed}, " + speed + "{postfix}]"
            )
            return tqdm.format_meter(
                n,
                total,
                elapsed,
                ncols=width - 1,
                prefix=prefix,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                rate=rate,
                postfix=postfix or None,
                bar_format=layout,
            )

        for name, bar in self.bars.items():
            t = bar.transfer
            lines.append(meter(_short(name), t.received, t.total, now - bar.started, bar.rate, _peers(t.peers)))
        if len(self.bars) > 1:
            bars = list(self.bars.values())
            totals = [b.transfer.total for b in bars]
            total = None if None in totals else sum(totals)  # type: ignore[arg-type]
            rates = [b.rate for b in bars if b.rate is not None]
            started = min(b.started for b in bars)
            lines.append(
                meter(
                    f"{plural(len(bars), 'file')}",
                    sum(b.transfer.received for b in bars),
                    total,
                    now - started,
                    sum(rates) if rates else None,
                    "",
                )
            )
        return lines

    def _draw(self) -> None:
        lines = self.lines()
        if not lines:
            return
        text = "\n".join(lines)
        if len(lines) > 1:
            text += f"\x1b[{len(lines) - 1}A"  # back up to the first line
        self.write(text + "\r")
        self.drawn = len(lines)

    def _clear(self) -> None:
        if self.drawn:
            self.write(CLEAR)
            self.drawn = 0

    def _stop(self) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.loop = None
