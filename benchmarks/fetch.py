#!/usr/bin/env python3
"""
A verified ``p2p-fetch -o`` against curl, sendfile and iperf3, on loopback,
all in one run: issue 9's target 2.

    python benchmarks/fetch.py                   # 1 GiB, 5 rounds
    python benchmarks/fetch.py --size 256 --runs 7 --dir /dev/shm
    python benchmarks/fetch.py --smoke           # 1 MiB, 1 round: does it run?

Contenders, each a whole command as a user runs it, writing into the same
folder (``--dir``, default the system's temporary folder; the output is
deleted and ``sync`` run between runs, outside the timing):

- ``p2p-fetch -o`` from a peernode (relay lookup, transfer, SHA-256 check
  against the announced hash, rename);
- ``curl -o`` from ``python -m http.server`` serving the same file;
- ``curl -o`` followed by ``sha256sum`` (checked against the known hash),
  and by ``openssl dgst -sha256`` (much faster than coreutils here: it
  uses the CPU's SHA instructions);
- a plain ``sendfile()`` over a loopback socket into a file, and
  ``iperf3 -n`` (memory to memory) as ceilings.

Each round runs every contender once, in a rotated order, so drift in the
machine's load hits all alike; figures are medians.  Also reported: the
node's CPU-seconds per GiB (``/proc/PID/stat`` before and after each
fetch), the node's peak RSS (``VmHWM``) and the client's (``wait4``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import makeFile  # noqa: E402

from p2prelay.cli.demo import REGISTERED, Daemon, script  # noqa: E402

LOOPBACK = "tcp:0:interface=127.0.0.1"
MiB = 1024 * 1024
GiB = 1024 * MiB
TICK = os.sysconf("SC_CLK_TCK")

# Issue 9, target 2.
TARGET_VS_CURL_SHA = 1.2
TARGET_VS_CURL = 0.9
TARGET_NODE_CPU = 0.3  # CPU-seconds per GiB
TARGET_RSS = 64 * MiB


def cpuSeconds(pid: int) -> float:
    """User plus system CPU time of one process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def peakRSS(pid: int) -> int:
    """Bytes: the process's resident-set high-water mark."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def run(command: list[str]) -> tuple[float, int, str]:
    """Wall seconds, 0 (no RSS figure) and stdout of one command."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({process.returncode}): {err.decode(errors='replace')}")
    return elapsed, 0, out.decode()


def runMeasured(command: list[str]) -> tuple[float, int, str]:
    """As :func:`run`, with the child's own peak RSS from ``wait4``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{command[0]} failed ({process.returncode}): {err.read().decode(errors='replace')}")
        return elapsed, usage.ru_maxrss * 1024, out.read().decode()


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self, args: argparse.Namespace, scratch: Path, out: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.out = out  # the folder every contender writes into
        self.size = args.size * MiB
        self.times: dict[str, list[float]] = {}
        self.nodeCPU: list[float] = []
        self.clientRSS: list[int] = []
        self.daemons: list = []

    def setUp(self) -> None:
        share = self.scratch / "share"
        share.mkdir()
        self.path = share / "bench.bin"
        self.sha256 = makeFile(self.path, self.size)
        relay = Daemon(["relay", "--port", LOOPBACK], cwd=str(self.scratch))
        self.daemons.append(relay)
        host, port = relay.listening()
        self.relay = f"{host}:{port}"
        self.node = Daemon(
            ["peernode", "--relay", self.relay, "--dir", str(share), "--port", LOOPBACK],
            cwd=str(self.scratch),
        )
        self.daemons.append(self.node)
        self.node.listening()
        self.node.waitFor(REGISTERED, timeout=300)  # hashing the share comes first
        self.http = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(share)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.http.stdout is not None
        line = self.http.stdout.readline()
        match = re.search(r"port (\d+)", line)
        if not match:
            raise SystemExit(f"http.server said {line!r}")
        self.url = f"http://127.0.0.1:{match.group(1)}/{self.path.name}"
        threading.Thread(target=self.http.stdout.read, daemon=True).start()

    def tearDown(self) -> None:
        if getattr(self, "http", None) is not None:
            self.http.terminate()
            self.http.wait()
        for daemon in reversed(self.daemons):
            daemon.stop()

    # Contenders: each returns the seconds it took, verified where it says so.

    def target(self) -> Path:
        return self.out / self.path.name

    def checkSize(self) -> None:
        got = self.target().stat().st_size
        if got != self.size:
            raise SystemExit(f"wrote {got} bytes, expected {self.size}")

    def p2pFetch(self) -> float:
        pid = self.node.process.pid
        before = cpuSeconds(pid)
        seconds, rss, out = runMeasured(
            script("p2p-fetch") + ["--relay", self.relay, "-o", str(self.out), "--json", self.path.name]
        )
        self.nodeCPU.append(cpuSeconds(pid) - before)
        self.clientRSS.append(rss)
        record = json.loads(out)
        if record["sha256"] != self.sha256:
            raise SystemExit("p2p-fetch announced another hash")
        self.checkSize()
        return seconds

    def curl(self) -> float:
        seconds, _, _ = run(["curl", "-sS", "-o", str(self.target()), self.url])
        self.checkSize()
        return seconds

    def curlSha256sum(self) -> float:
        started = time.perf_counter()
        run(["curl", "-sS", "-o", str(self.target()), self.url])
        _, _, out = run(["sha256sum", str(self.target())])
        seconds = time.perf_counter() - started
        if out.split()[0] != self.sha256:
            raise SystemExit("curl's copy does not hash to the file's SHA-256")
        return seconds

    def curlOpenssl(self) -> float:
        """As :meth:`curlSha256sum` with OpenSSL's SHA-256 (SHA-NI where the CPU has it)."""
        started = time.perf_counter()
        run(["curl", "-sS", "-o", str(self.target()), self.url])
        _, _, out = run(["openssl", "dgst", "-sha256", "-r", str(self.target())])
        seconds = time.perf_counter() - started
        if out.split()[0] != self.sha256:
            raise SystemExit("curl's copy does not hash to the file's SHA-256 (openssl)")
        return seconds

    def sendfile(self) -> float:
        """A socket fed by sendfile() on a thread, read into a file: the floor of any TCP copy to disk."""
        server = socket.create_server(("127.0.0.1", 0))

        def serve() -> None:
            conn, _ = server.accept()
            with conn, open(self.path, "rb") as f:
                conn.sendfile(f)

        thread = threading.Thread(target=serve)
        thread.start()
        started = time.perf_counter()
        with socket.create_connection(server.getsockname()) as c, open(self.target(), "wb") as f:
            buffer = bytearray(256 * 1024)
            view = memoryview(buffer)
            while n := c.recv_into(buffer):
                f.write(view[:n])
        seconds = time.perf_counter() - started
        thread.join()
        server.close()
        self.checkSize()
        return seconds

    def iperf3(self) -> float:
        for _ in range(3):  # a port taken meanwhile, a stray client: try another
            seconds = self._iperf3Once()
            if seconds is not None:
                return seconds
        raise SystemExit("iperf3 failed three times")

    def _iperf3Once(self) -> Optional[float]:
        port = freePort()
        server = subprocess.Popen(
            ["iperf3", "-s", "-1", "--forceflush", "-p", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            for line in server.stdout:  # wait for it to listen
                if "listening" in line:
                    break
            started = time.perf_counter()
            result = subprocess.run(
                ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", str(self.size), "-J"],
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - started
        finally:
            server.kill()
            server.wait()
        try:
            bits = json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError):
            print(f"  (iperf3: {result.stdout[-300:]!r})", file=sys.stderr)
            return None
        return self.size * 8 / bits if bits else wall  # (a tiny --smoke transfer has no rate)

    def contenders(self) -> dict[str, Callable[[], float]]:
        found = {
            "p2p-fetch -o (verified)": self.p2pFetch,
            "curl -o": self.curl,
            "curl -o + sha256sum": self.curlSha256sum,
            "sendfile to file": self.sendfile,
        }
        if shutil.which("openssl"):
            found["curl -o + openssl dgst"] = self.curlOpenssl
        if shutil.which("iperf3"):
            found["iperf3 (memory)"] = self.iperf3
        return found

    def round(self, number: int) -> None:
        contenders = list(self.contenders().items())
        shift = number % len(contenders)
        for label, contender in contenders[shift:] + contenders[:shift]:
            self.clean()
            self.times.setdefault(label, []).append(contender())
        self.clean()

    def clean(self) -> None:
        try:
            self.target().unlink()
        except FileNotFoundError:
            pass
        os.sync()  # the last run's dirty pages are not the next one's cost


def report(bench: Bench) -> dict:
    size = bench.size
    medians = {label: statistics.median(t) for label, t in bench.times.items()}
    print(
        f"{bench.args.size} MiB file, {bench.args.runs} rounds (rotated order), loopback,"
        f" {os.cpu_count()} cores, output in {bench.out}"
    )
    for label, t in bench.times.items():
        spread = f"{size / max(t) / MiB:5.0f}-{size / min(t) / MiB:5.0f}"
        print(f"  {label:<26} {size / medians[label] / MiB:7.0f} MiB/s median  (range {spread})")
    fetch = medians["p2p-fetch -o (verified)"]
    figures = {
        "vs curl -o + sha256sum": medians["curl -o + sha256sum"] / fetch,
        "vs curl -o": medians["curl -o"] / fetch,
        **(
            {"vs curl -o + openssl dgst": medians["curl -o + openssl dgst"] / fetch}
            if "curl -o + openssl dgst" in medians
            else {}
        ),
        "vs sendfile": medians["sendfile to file"] / fetch,
        "node CPU-s/GiB": statistics.median(bench.nodeCPU) * GiB / size,
        "node peak RSS MiB": peakRSS(bench.node.process.pid) / MiB,
        "client peak RSS MiB": max(bench.clientRSS) / MiB,
    }
    if "iperf3 (memory)" in medians:
        figures["vs iperf3"] = medians["iperf3 (memory)"] / fetch
    targets = {
        "vs curl -o + sha256sum": (">=", TARGET_VS_CURL_SHA),
        "vs curl -o": (">=", TARGET_VS_CURL),
        "node CPU-s/GiB": ("<", TARGET_NODE_CPU),
        "node peak RSS MiB": ("<", TARGET_RSS / MiB),
        "client peak RSS MiB": ("<", TARGET_RSS / MiB),
    }
    print("p2p-fetch, throughput ratios of medians (higher is better) and costs:")
    for label, value in figures.items():
        line = f"  {label:<24} {value:7.2f}"
        if label in targets:
            op, goal = targets[label]
            met = value >= goal if op == ">=" else value < goal
            line += f"   target {op} {goal:g}: {'met' if met else 'MISSED'}"
        print(line)
    return figures


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--dir", default=None, help="folder for the file and the copies (default: the temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="1 MiB, 1 round: check that it runs")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.runs = 1, 1
    for tool in ("curl", "sha256sum"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed")
    scratch = Path(tempfile.mkdtemp(prefix="p2p-fetch-bench-", dir=args.dir))
    out = scratch / "out"
    out.mkdir()
    bench = Bench(args, scratch, out)
    try:
        bench.setUp()
        for number in range(args.runs):
            bench.round(number)
        figures = report(bench)
        if args.json:
            print(json.dumps(figures))
    finally:
        bench.tearDown()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
