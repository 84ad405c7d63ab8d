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
import json
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

from benchmarks.common import makeFile  # noqa: E402

from p2prelay.cli.demo import REGISTERED, Daemon, script  # noqa: E402

LOOPBACK = "tcp:0:interface=127.0.0.1"
MiB = 1024 * 1024


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


INSIDE: dict[str, list[float]] = {}


def timeFetch(relay: str, name: str, out: Path, extra: list[str]) -> float:
    """Whole-command seconds; the client's own figure (lookup, transfer,
    verification, without process start) is kept in INSIDE."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run(
        script("p2p-fetch") + ["--relay", relay, "-o", str(out), "--json", *extra, name],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"p2p-fetch {' '.join(extra)} failed: {result.stderr}")
    INSIDE.setdefault(" ".join(extra), []).append(json.loads(result.stdout)["seconds"])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="file size in MiB (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--smoke", action="store_true", help="1 MiB, one run: does it work")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.runs = 1, 1
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

        variants = {
            "TCP": [],
            "UDP, default blocks": ["--udp"],
            "UDP, 1400 B blocks": ["--udp", "--udp-block", "1400"],
        }
        print(f"{args.size} MiB file, {args.runs} runs each, loopback, {os.cpu_count()} cores")
        times = [sendfileBaseline(path, scratch / "baseline.bin") for _ in range(args.runs)]
        base = statistics.median(times)
        print(f"  {'sendfile baseline':<22} {size / base / MiB:7.0f} MiB/s")
        medians = {}
        for label, extra in variants.items():
            whole = [
                timeFetch(address, path.name, scratch / "out", extra) for _ in range(args.runs)
            ]
            inside = statistics.median(INSIDE[" ".join(extra)])
            medians[label] = (statistics.median(whole), inside)
            print(
                f"  p2p-fetch {label:<18} {size / medians[label][0] / MiB:7.0f} MiB/s whole command,"
                f" {size / inside / MiB:5.0f} MiB/s in-process"
            )
        print("ratios of median throughput (higher is better), whole command / in-process:")
        tcp = medians["TCP"]
        print(f"  TCP against sendfile         {base / tcp[0]:5.2f} / {base / tcp[1]:5.2f}")
        for label in ("UDP, default blocks", "UDP, 1400 B blocks"):
            udp = medians[label]
            print(f"  {label + ' against TCP':<28} {tcp[0] / udp[0]:5.2f} / {tcp[1] / udp[1]:5.2f}")
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
