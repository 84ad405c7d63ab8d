#!/usr/bin/env python3
"""
Transfer throughput: p2p-fetch over TCP and over UDP against a plain-socket
``sendfile`` of the same file, all measured in one run on loopback.

    python benchmarks/transfer.py              # 256 MiB, 3 runs each
    python benchmarks/transfer.py --size 64 --runs 5

Each p2p-fetch figure is a whole command as a user runs it (``-o DIR``:
process start, relay lookup, transfer, SHA-256 check, rename), so it is
compared with a baseline that only moves bytes socket to file.  Ratios are
of medians; higher is better.  Absolute figures vary from machine to
machine, the ratios much less.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2prelay.demo import REGISTERED, Daemon, script  # noqa: E402

LOOPBACK = "tcp:0:interface=127.0.0.1"
MiB = 1024 * 1024


def makeFile(path: Path, size: int) -> None:
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def sendfileBaseline(path: Path, out: Path) -> float:
    """Seconds to move the file over a loopback socket with sendfile()."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn, open(path, "rb") as f:
            conn.sendfile(f)

    thread = threading.Thread(target=serve)
    thread.start()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c, open(out, "wb") as f:
        while chunk := c.recv(256 * 1024):
            f.write(chunk)
    elapsed = time.perf_counter() - started
    thread.join()
    server.close()
    return elapsed


def timeFetch(relay: str, name: str, out: Path, extra: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run(
        script("p2p-fetch") + ["--relay", relay, "-o", str(out), *extra, name],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"p2p-fetch {' '.join(extra)} failed: {result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="file size in MiB (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    args = parser.parse_args()
    size = args.size * MiB

    scratch = Path(tempfile.mkdtemp(prefix="p2p-bench-"))
    daemons = []
    try:
        share = scratch / "share"
        share.mkdir()
        path = share / "bench.bin"
        makeFile(path, size)

        relay = Daemon(["relay", "--port", LOOPBACK], cwd=str(scratch))
        daemons.append(relay)
        host, port = relay.listening()
        address = f"{host}:{port}"
        node = Daemon(
            ["peernode", "--relay", address, "--dir", str(share), "--port", LOOPBACK],
            cwd=str(scratch),
        )
        daemons.append(node)
        node.listening()
        node.waitFor(REGISTERED, timeout=120)

        cases = {
            "sendfile baseline": lambda: sendfileBaseline(path, scratch / "baseline.bin"),
            "p2p-fetch TCP": lambda: timeFetch(address, path.name, scratch / "tcp", []),
            "p2p-fetch UDP (1400 B blocks)": lambda: timeFetch(
                address, path.name, scratch / "udp", ["--udp"]
            ),
            "p2p-fetch UDP (16 KiB blocks)": lambda: timeFetch(
                address, path.name, scratch / "udp16", ["--udp", "--udp-block", "16384"]
            ),
        }
        medians = {}
        print(f"{args.size} MiB file, {args.runs} runs each, loopback, {os.cpu_count()} cores")
        for label, run in cases.items():
            times = [run() for _ in range(args.runs)]
            medians[label] = statistics.median(times)
            rate = size / medians[label] / MiB
            print(f"  {label:<32} {rate:8.0f} MiB/s  (median of {', '.join(f'{t:.2f}' for t in times)} s)")
        base = medians["sendfile baseline"]
        tcp = medians["p2p-fetch TCP"]
        print("ratios (throughput; higher is better):")
        print(f"  TCP / sendfile baseline          {base / tcp:6.2f}")
        for label in ("p2p-fetch UDP (1400 B blocks)", "p2p-fetch UDP (16 KiB blocks)"):
            print(f"  {label[10:]:<32} / TCP {tcp / medians[label]:6.2f}")
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
