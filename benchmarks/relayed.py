#!/usr/bin/env python3
"""
Relayed transfers against direct ones: one file fetched by ``p2p-fetch``
straight from a node, and through a circuit at the relay from a node the
relay cannot reach, in the same run, on loopback; and what relaying costs
the relay in CPU.

    python benchmarks/relayed.py                # 256 MiB, 5 rounds
    python benchmarks/relayed.py --size 64 --rounds 7
    python benchmarks/relayed.py --piece-size 64M   # the nodes cut 4 pieces, not 64
    python benchmarks/relayed.py --smoke        # 4 MiB, one round: checks it works

Two relays and two nodes serving the same folder (one file, one page
cache): the *direct* node registers with the first relay as usual; the
*firewalled* one registers with the second relay advertising
``127.0.0.1:PORT`` where nothing listens, so the relay's dial-back is
refused, the node keeps a control connection, and ``p2p-fetch
--no-listen`` gets the file through a circuit: client -> relay -> node
(which connected out to the relay).  Each holder is the only one its
relay knows, so neither fetch can take the other's path; the ``--json``
record's ``path`` is checked every time (``direct`` / ``relay``).

Every figure is a whole ``p2p-fetch -o DIR --json`` command (start-up,
lookup, transfer, the client's SHA-256 check), direct and relayed
interleaved (the order swaps each round, so drift hits both alike); the
client's own figure (``--json`` "seconds") is printed beside it.  Medians;
the ratio is relayed throughput over direct (the issue's target: 0.5 or
better).  The relay's CPU-seconds per GiB relayed is its process's
utime + stime (``/proc/PID/stat``) over the relayed rounds only, divided
by the GiB that crossed it.  Each piece is one RELAY request, and the
relay allows one address only so many at once: back-to-back relayed
fetches of big files meet its 503s (each round says how many attempts
failed first); ``--settle S`` waits before each relayed fetch so they
start with the allowance refilled.  A fetch that has not finished after
``--fetch-timeout`` seconds is stopped and counted as failed (so is one
that came by another path); every process started here is stopped in a
``finally``, on SIGINT and SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import makeFile  # noqa: E402

from p2prelay.cli.demo import REGISTERED, Daemon, script  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
LOOPBACK = "tcp:0:interface=127.0.0.1"
START_TIMEOUT = 120.0  # a node hashes the whole file before it registers
NODE_OPEN = re.compile(r"control connection to relay \S+ open")
RELAY_OPEN = re.compile(r"control connection from \S+ at \S+ open")
DIRECT, RELAYED = "direct", "relay"  # the --json record's "path" for each


def cpuSeconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces; the rest follows its ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def closedPort() -> int:
    """A loopback port nothing listens on (the OS chose it, then it was closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Network:
    """The two relays and two nodes; :meth:`close` stops every one it started."""

    def __init__(self, scratch: Path, share: Path, pieceSize: str, timeout: float) -> None:
        self.scratch, self.pieceSize, self.timeout = scratch, pieceSize, timeout
        self.daemons: List[Daemon] = []
        try:
            self._start(share)
        except BaseException:
            self.close()
            raise

    def daemon(self, args: Sequence[str]) -> Daemon:
        d = Daemon(list(args), cwd=str(self.scratch))
        self.daemons.append(d)
        return d

    def relay(self) -> tuple[Daemon, str]:
        relay = self.daemon(["relay", "--port", LOOPBACK])
        host, port = relay.listening()
        return relay, f"{host}:{port}"

    def node(self, relay: str, share: Path, name: str, *extra: str) -> Daemon:
        return self.daemon(
            ["peernode", "--relay", relay, "--dir", str(share), "--port", LOOPBACK, "--no-udp",
             "--key", str(self.scratch / f"{name}.key"), "--piece-size", self.pieceSize, *extra]
        )  # fmt: skip

    def _start(self, share: Path) -> None:
        _, self.directRelay = self.relay()
        self.relayDaemon, self.relayedRelay = self.relay()
        direct = self.node(self.directRelay, share, "direct")
        firewalled = self.node(
            self.relayedRelay, share, "firewalled", "--advertise", f"127.0.0.1:{closedPort()}"
        )
        direct.waitFor(REGISTERED, START_TIMEOUT)
        firewalled.waitFor(NODE_OPEN, START_TIMEOUT)
        self.relayDaemon.waitFor(RELAY_OPEN, START_TIMEOUT)

    def fetch(self, path: str, name: str, size: int) -> tuple[float, float, int]:
        """
        (whole-command seconds, the client's own seconds, failed attempts on
        the way, e.g. the relay's 503 past its path allowance) of one fetch.
        """
        out = self.scratch / "out"
        shutil.rmtree(out, ignore_errors=True)
        if path == DIRECT:
            extra = ["--relay", self.directRelay]
        else:
            extra = ["--relay", self.relayedRelay, "--no-listen"]
        command = [*script("p2p-fetch"), *extra, "-q", "--json", "-o", str(out), name]
        started = time.perf_counter()
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"p2p-fetch {' '.join(extra)} not done after {self.timeout:g} s")
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"p2p-fetch {' '.join(extra)} failed: {result.stderr.strip()}")
        record = json.loads(result.stdout.splitlines()[-1])
        if record.get("path") != path or record.get("size") != size:
            raise RuntimeError(f"expected {size} B via {path}, got {record}")
        return elapsed, record["seconds"], len(record.get("attempts", []))

    def close(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()


def benchmark(args: argparse.Namespace) -> Dict[str, float]:
    size = int(args.size * MiB)
    scratch = Path(tempfile.mkdtemp(prefix="p2p-relayed-"))
    try:
        share = scratch / "share"
        share.mkdir()
        makeFile(share / "bench.bin", size)
        net = Network(scratch, share, args.piece_size, args.fetch_timeout)
        try:
            print(
                f"{args.size:g} MiB, {args.rounds} rounds, direct and relayed interleaved, "
                f"loopback; pieces of {args.piece_size}; {os.cpu_count()} cores",
                flush=True,
            )
            return rounds(net, "bench.bin", size, args.rounds, args.settle)
        finally:
            net.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def rounds(net: Network, name: str, size: int, count: int, settle: float = 0) -> Dict[str, float]:
    samples: Dict[str, List[tuple[float, float, int]]] = {DIRECT: [], RELAYED: []}
    failed = {DIRECT: 0, RELAYED: 0}
    relayCPU = 0.0  # over the relayed fetches that succeeded
    pid = net.relayDaemon.process.pid
    for round in range(count):
        order = (DIRECT, RELAYED) if round % 2 == 0 else (RELAYED, DIRECT)
        for path in order:
            if path == RELAYED and settle:
                time.sleep(settle)  # the relay's REVERSE/RELAY allowance for our address refills
            before = cpuSeconds(pid)
            try:
                sample = net.fetch(path, name, size)
            except RuntimeError as e:
                failed[path] += 1
                print(f"  round {round + 1} {path:<6} failed: {e}", flush=True)
                continue
            if path == RELAYED:
                relayCPU += cpuSeconds(pid) - before
            samples[path].append(sample)
            print(
                f"  round {round + 1} {path:<6} {size / sample[0] / MiB:8.1f} MiB/s whole command, "
                f"{size / sample[1] / MiB:8.1f} MiB/s in-process"
                + (f", {sample[2]} failed attempts first" if sample[2] else ""),
                flush=True,
            )
    for path, values in samples.items():
        if not values:
            raise RuntimeError(f"every {path} fetch failed")
    figures: Dict[str, float] = {}
    for path, values in samples.items():
        whole = statistics.median(v[0] for v in values)
        inside = statistics.median(v[1] for v in values)
        spread = max(v[0] for v in values) - min(v[0] for v in values)
        figures[path] = whole
        figures[path + " inside"] = inside
        label = "direct:" if path == DIRECT else "relayed:"
        print(
            f"{label:<9} {size / whole / MiB:8.1f} MiB/s whole command (median of {len(values)}, "
            f"{failed[path]} failed, spread {spread:.2f} s), {size / inside / MiB:8.1f} MiB/s in-process",
            flush=True,
        )
    figures["ratio"] = figures[DIRECT] / figures[RELAYED]
    figures["ratio inside"] = figures[DIRECT + " inside"] / figures[RELAYED + " inside"]
    relayed = size * len(samples[RELAYED]) / GiB
    figures["relay CPU-s/GiB"] = relayCPU / relayed
    print(
        f"relayed/direct: {figures['ratio']:.2f}x whole command, "
        f"{figures['ratio inside']:.2f}x in-process (target: 0.5x or better)"
    )
    print(
        f"relay CPU-s/GiB relayed: {figures['relay CPU-s/GiB']:.2f} "
        f"({relayCPU:.2f} CPU-s for {relayed * 1024:.0f} MiB)"
    )
    return figures


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=256, help="file size in MiB (default 256)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each (default 5)")
    parser.add_argument("--piece-size", default="4M",
                        help="the nodes' --piece-size (default 4M, the node's default)")  # fmt: skip
    parser.add_argument("--fetch-timeout", type=float, default=300,
                        help="seconds before a fetch counts as failed (default 300)")  # fmt: skip
    parser.add_argument("--settle", type=float, default=0,
                        help="seconds to wait before each relayed fetch, so the relay's allowance of "
                        "path requests per address (one per piece) refills (default 0)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="4 MiB, one round: checks that it all works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.rounds = 4, 1
    previous = {s: signal.signal(s, _terminate) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        figures = benchmark(args)
    except RuntimeError as e:
        print(f"failed: {e}")
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if args.smoke:
        print("smoke: " + json.dumps({k: round(v, 2) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
