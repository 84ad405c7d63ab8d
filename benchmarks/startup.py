#!/usr/bin/env python3
"""
Start-up cost: whole ``p2p-fetch`` commands against a running relay and
node, beside ``curl`` fetching the same files from ``python -m http.server``
and ``python -c pass`` (the interpreter's own floor), all in one run.

    python benchmarks/startup.py                 # 15 rounds, 100 x 16 MiB at once
    python benchmarks/startup.py --rounds 31 --concurrent 100 --size 16
    python benchmarks/startup.py --smoke         # tiny and quick, for the test suite

Each round runs every command once, in turn (interleaved, so a busy
neighbour slows all of them alike), and the figures are medians:

* a 1 KiB file to stdout, one process: ``p2p-fetch NAME`` against
  ``curl URL``, and ``python -c pass``;
* ``--concurrent`` processes started at once, each saving a ``--size`` MiB
  file with ``-o``: ``p2p-fetch -o`` against ``curl -o``, wall time until
  the last one exits.

It also runs one 1 KiB fetch under ``python -X importtime`` and says how
long its imports took and whether the TLS stack (OpenSSL, cryptography) or
the UDP code was loaded.  The children run with bytecode caching on (as an
installed command has), whatever ``PYTHONDONTWRITEBYTECODE`` says here.
Without curl the curl columns are left out.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2prelay.cli.demo import REGISTERED, Daemon, script  # noqa: E402

# A listen backlog for a burst of clients (Twisted's default of 50 drops
# SYNs, which then wait a second or more to be sent again).
LOOPBACK = "tcp:0:interface=127.0.0.1:backlog=1024"
MiB = 1024 * 1024
SMALL = "small.bin"
LARGE = "large.bin"
SERVING = re.compile(r"port (\d+)")
# Modules whose presence after a plain TCP fetch means it imported too much.
HEAVY = ("OpenSSL", "cryptography", "service_identity", "p2prelay.udp", "automat")


def childEnv() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run(command: List[str], env: Dict[str, str]) -> float:
    """Seconds one command takes, start to exit; it must succeed."""
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({result.returncode}): {result.stderr.decode()}")
    return elapsed


CPU: Dict[str, List[float]] = {}


def childCPU() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def runMany(commands: List[List[str]], env: Dict[str, str], label: str) -> float:
    """
    Seconds from starting every command at once until the last exits; the
    CPU seconds each took on average are kept in CPU[label].
    """
    cpu = childCPU()
    started = time.perf_counter()
    processes = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        for c in commands
    ]
    failures = []
    for p in processes:
        _, err = p.communicate()
        if p.returncode != 0:
            failures.append(err.decode().strip())
    elapsed = time.perf_counter() - started
    CPU.setdefault(label, []).append((childCPU() - cpu) / len(commands))
    if failures:
        raise SystemExit(f"{len(failures)} of {len(commands)} failed, e.g.: {failures[0]}")
    return elapsed


def importReport(arguments: List[str], env: Dict[str, str]) -> str:
    """One p2p-fetch run of ``arguments`` under -X importtime: import time, heavy modules."""
    probe = (
        "import sys, atexit\n"
        "atexit.register(lambda: print('MODULES', *sorted(sys.modules), file=sys.stderr))\n"
        "from p2prelay.cli.fetch import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", probe, *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    lines = result.stderr.splitlines()
    total = 0
    for line in lines:
        if line.startswith("import time:") and "|" in line:
            field = line.split(":", 1)[1].split("|")[0].strip()
            if field.isdigit():
                total += int(field)
    listed = [line.split()[1:] for line in lines if line.startswith("MODULES ")]
    if result.returncode != 0 or not listed:
        raise SystemExit(f"p2p-fetch under -X importtime failed: {lines[-5:]}")
    loaded = set(listed[-1])
    heavy = sorted(h for h in HEAVY if h in loaded)
    return (
        f"imports during one 1 KiB fetch: {total / 1000:.0f} ms by -X importtime (which inflates "
        f"them), {len(loaded)} modules; heavy ones loaded: {', '.join(heavy) or 'none'}"
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds of single commands (default 15)")
    parser.add_argument(
        "--concurrent", type=int, default=100, help="processes started at once (default 100)"
    )
    parser.add_argument("--size", type=float, default=16, help="MiB each of them saves (default 16)")
    parser.add_argument(
        "--concurrent-rounds", type=int, default=3, help="rounds of the concurrent runs (default 3)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, a few seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.concurrent, args.size, args.concurrent_rounds = 2, 3, 0.25, 1

    # Stopped with SIGTERM, still stop the daemons and remove the scratch folder.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    env = childEnv()
    curl = shutil.which("curl")
    scratch = Path(tempfile.mkdtemp(prefix="p2p-startup-"))
    daemons: List[Daemon] = []
    http: Optional[subprocess.Popen] = None
    try:
        share = scratch / "share"
        share.mkdir()
        (share / SMALL).write_bytes(os.urandom(1024))
        (share / LARGE).write_bytes(os.urandom(int(args.size * MiB)))

        # Every client comes from 127.0.0.1: the per-address caps are lifted
        # so that they measure start-up, not the limits.
        room = str(max(512, 4 * args.concurrent))
        caps = ["--max-connections", room, "--max-per-address", room]
        relay = Daemon(["relay", "--port", LOOPBACK, *caps], cwd=str(scratch), env=env)
        daemons.append(relay)
        host, port = relay.listening()
        address = f"{host}:{port}"
        node = Daemon(
            ["peernode", "--relay", address, "--dir", str(share), "--port", LOOPBACK, *caps,
             "--max-gets-per-address", room],
            cwd=str(scratch),
            env=env,
        )
        daemons.append(node)
        node.listening()
        node.waitFor(REGISTERED, timeout=120)

        url = None
        if curl:
            http = subprocess.Popen(
                [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                cwd=share,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert http.stdout is not None
            match = SERVING.search(http.stdout.readline())
            if match is None:
                raise SystemExit("python -m http.server did not say its port")
            url = f"http://127.0.0.1:{match.group(1)}"

        fetch = script("p2p-fetch") + ["--relay", address]
        single: Dict[str, List[str]] = {
            "python -c pass": [sys.executable, "-c", "pass"],
            # What Twisted's reactor costs to import, the TLS stack refused
            # as p2p-fetch refuses it: the floor of any Twisted command.
            "import the reactor": [
                sys.executable,
                "-c",
                "import sys; sys.modules['OpenSSL'] = None; import twisted.internet.reactor",
            ],
            "p2p-fetch 1 KiB": fetch + [SMALL],
        }
        if url:
            single["curl 1 KiB"] = [curl, "-sf", f"{url}/{SMALL}"]
        run(single["p2p-fetch 1 KiB"], env)  # warm: bytecode written, caches filled

        times: Dict[str, List[float]] = {label: [] for label in single}
        for _ in range(args.rounds):
            for label, command in single.items():
                times[label].append(run(command, env))

        outs = scratch / "out"

        def many(label: str, make: Callable[[Path], List[str]]) -> float:
            shutil.rmtree(outs, ignore_errors=True)
            dirs = [outs / str(i) for i in range(args.concurrent)]
            for d in dirs:
                d.mkdir(parents=True)
            return runMany([make(d) for d in dirs], env, label)

        concurrent: Dict[str, Callable[[Path], List[str]]] = {
            # curl waits up to 300 s to connect; 3 s (the default) is too
            # short for a node on a 2-core machine busy with 100 starting clients.
            "p2p-fetch -o": lambda d: fetch + ["--connect-timeout", "60", "-o", str(d), LARGE],
        }
        if url:
            concurrent["curl -o"] = lambda d: [curl, "-sf", "-o", str(d / LARGE), f"{url}/{LARGE}"]
        ctimes: Dict[str, List[float]] = {label: [] for label in concurrent}
        for _ in range(args.concurrent_rounds):
            for label, make in concurrent.items():
                ctimes[label].append(many(label, make))

        report = importReport(["--relay", address, SMALL], env)
    finally:
        if http is not None:
            http.terminate()
            http.wait()
        for daemon in reversed(daemons):
            daemon.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    def spread(values: List[float]) -> str:
        return f"{min(values) * 1000:.0f}-{max(values) * 1000:.0f}"

    print(f"{args.rounds} rounds, interleaved, loopback, {os.cpu_count()} cores; medians (min-max) in ms")
    for label, values in times.items():
        print(f"  {label:<26} {statistics.median(values) * 1000:7.0f}  ({spread(values)})")
    size = f"{args.size:g} MiB"
    print(f"{args.concurrent} processes at once, {size} each, {args.concurrent_rounds} round(s):")
    for label, values in ctimes.items():
        print(
            f"  {label:<26} {statistics.median(values) * 1000:7.0f}  ({spread(values)}),"
            f" {statistics.median(CPU[label]) * 1000:.0f} ms CPU per process"
        )
    fetch1 = statistics.median(times["p2p-fetch 1 KiB"])
    floor = statistics.median(times["python -c pass"])
    print("ratios of medians (lower is better):")
    print(f"  p2p-fetch 1 KiB / python -c pass   {fetch1 / floor:6.1f}")
    reactor = statistics.median(times["import the reactor"])
    print(f"  p2p-fetch 1 KiB / import the reactor {fetch1 / reactor:4.1f}")
    if url:
        print(f"  p2p-fetch 1 KiB / curl 1 KiB       {fetch1 / statistics.median(times['curl 1 KiB']):6.1f}")
        many_ratio = statistics.median(ctimes["p2p-fetch -o"]) / statistics.median(ctimes["curl -o"])
        print(f"  {args.concurrent} x p2p-fetch -o / {args.concurrent} x curl -o   {many_ratio:6.1f}")
    print(f"targets: 1 KiB fetch under 150 ms: {fetch1 * 1000:.0f} ms", end="")
    if url:
        print(f"; {args.concurrent} at once within 3x of curl: {many_ratio:.1f}x")
    else:
        print("; curl not found, no concurrent ratio")
    print(report)


if __name__ == "__main__":
    main()
