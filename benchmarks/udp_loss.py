#!/usr/bin/env python3
"""
UDP against TCP on a 100 Mbit/s link with random loss, and on loopback.

    sudo python benchmarks/udp_loss.py                 # 32 MiB, 5 runs of each
    sudo python benchmarks/udp_loss.py --runs 3 --loss 0 1 5
    sudo python benchmarks/udp_loss.py --smoke         # tiny file, one run: checks it works

It needs root (network namespaces); otherwise it prints why and exits 0.

Two network namespaces made here, joined by a veth pair: the node's
(10.231.0.1/24) and the client's (10.231.0.2/24), with no route anywhere
else.  Both veth ends get ``tc qdisc ... tbf rate 100mbit burst 32kbit
latency 50ms``; random loss is an ``nft`` rule (``numgen random mod 100 <
N drop``) in a table made in the client's namespace, on what arrives at its
veth end: the data direction, so acknowledgements and the relay's traffic
are not lost but every data packet (and the node's handshake answers) may
be.  ``--loss-at sender`` drops on the node's output hook instead, where
the sender's own ``sendmsg`` sees ``EPERM`` for each dropped datagram (a
local firewall's way of refusing), which UDP must survive as TCP does.
The relay runs in the client's namespace, so a lookup never crosses the
lossy link, but it still dials the node back across it.

Every figure is a whole ``p2p-fetch -o DIR`` command, TCP and ``--udp``
interleaved, and the medians' ratio is printed (UDP time / TCP time
inverted: above 1 is UDP faster); the client's own figure (``--json``
"seconds": lookup, transfer, check) is printed beside it.  The loopback
pair runs in the client's namespace too (relay and node on 127.0.0.1),
with the default block size (60 KiB towards a loopback address) and with
``--udp-block 1400`` named.

Everything made here (namespaces, and with them the veth pair, the
qdiscs, the nft table and the processes inside) is removed in a
``finally``, on SIGINT and SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import makeFile  # noqa: E402

from p2prelay.cli.demo import LISTENING, REGISTERED, Daemon, script  # noqa: E402
from tests.netns import run  # noqa: E402  (the test suite's namespace harness)

MiB = 1024 * 1024
NODE_ADDRESS = "10.231.0.1"
CLIENT_ADDRESS = "10.231.0.2"
PREFIX = 24
RATE = "100mbit"
TBF = ["rate", RATE, "burst", "32kbit", "latency", "50ms"]
TABLE = "p2prelay_bench"  # the nft table made (and deleted) in one namespace
START_TIMEOUT = 60.0


class Skip(Exception):
    """The benchmark cannot run here (not root, no namespaces): one line why."""


class Link:
    """
    Two namespaces and the veth pair between them, shaped by tbf, with a
    loss rule settable in the node's namespace.  ``close`` deletes all of
    it and is safe to call twice and after a partial setup.
    """

    def __init__(self, tag: Optional[str] = None, lossAt: str = "receiver") -> None:
        tag = tag or str(os.getpid())
        self.node = f"p2pbench-node-{tag}"
        self.client = f"p2pbench-client-{tag}"
        self.nodeIf = f"p2pn{tag}"[:15]
        self.clientIf = f"p2pc{tag}"[:15]
        self.made: List[str] = []
        self.loss = 0
        if lossAt == "receiver":  # what the client's veth end receives
            self.lossNs, self.hook, self.match = self.client, "input", f'iifname "{self.clientIf}"'
        else:  # what the node sends on its veth end: EPERM for the sender
            self.lossNs, self.hook, self.match = self.node, "output", f'oifname "{self.nodeIf}"'

    def open(self) -> None:
        for ns in (self.node, self.client):
            # Recorded before it exists: a signal between the two must not
            # leave a namespace nobody deletes (deleting a missing one is harmless).
            self.made.append(ns)
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run(
            "ip", "-n", self.node, "link", "add", self.nodeIf, "type", "veth",
            "peer", "name", self.clientIf, "netns", self.client,
        )  # fmt: skip
        for ns, dev, address in (
            (self.node, self.nodeIf, NODE_ADDRESS),
            (self.client, self.clientIf, CLIENT_ADDRESS),
        ):
            run("ip", "-n", ns, "addr", "add", f"{address}/{PREFIX}", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", *TBF)
        self.nft(f"add table inet {TABLE}")
        self.nft(
            f"add chain inet {TABLE} loss "
            f"{{ type filter hook {self.hook} priority 0 ; policy accept ; }}"
        )

    def nft(self, command: str) -> str:
        return run("ip", "netns", "exec", self.lossNs, "nft", command)

    def setLoss(self, percent: int) -> None:
        """Drop ``percent`` % of the data direction's packets, at random."""
        self.nft(f"flush chain inet {TABLE} loss")
        if percent:
            self.nft(
                f"add rule inet {TABLE} loss {self.match} numgen random mod 100 < {percent} drop"
            )
        self.loss = percent

    def close(self) -> None:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.made:
                run("ip", "netns", "exec", self.lossNs, "nft", "delete", "table", "inet", TABLE,
                    check=False)  # fmt: skip
            while self.made:  # deleting a namespace deletes its veth end, qdisc and table
                run("ip", "netns", "del", self.made.pop(), check=False)
        finally:
            for s, handler in held.items():
                signal.signal(s, handler)


def netnsDaemon(namespace: str, args: Sequence[str], cwd: str) -> Daemon:
    """One ``twistd -n`` process inside a namespace, its log collected."""
    return Daemon(args, cwd=cwd, prefix=["ip", "netns", "exec", namespace])


class Network:
    """A relay and a node serving ``share``; fetches run in ``clientNs``."""

    def __init__(self, scratch: Path, share: Path, clientNs: str, nodeNs: str,
                 relayHost: str, nodeHost: str, tag: str) -> None:  # fmt: skip
        self.scratch, self.clientNs, self.tag = scratch, clientNs, tag
        self.daemons: List[Daemon] = []
        try:
            self._start(share, nodeNs, relayHost, nodeHost)
        except BaseException:  # a signal or a failed start: stop what did start
            self.close()
            raise

    def _start(self, share: Path, nodeNs: str, relayHost: str, nodeHost: str) -> None:
        scratch, tag = self.scratch, self.tag
        relay = netnsDaemon(self.clientNs, ["relay", "--port", f"tcp:0:interface={relayHost}"], str(scratch))
        self.daemons.append(relay)
        host, port = relay.waitFor(LISTENING, START_TIMEOUT).group("host", "port")
        self.relay = f"{host}:{port}"
        node = netnsDaemon(
            nodeNs,
            [
                "peernode", "--relay", self.relay, "--dir", str(share),
                "--port", f"tcp:0:interface={nodeHost}", "--key", str(scratch / f"{tag}.key"),
            ],
            str(scratch),
        )  # fmt: skip
        self.daemons.append(node)
        node.waitFor(REGISTERED, START_TIMEOUT)

    def fetch(self, name: str, extra: Sequence[str]) -> tuple[float, float]:
        """(whole-command seconds, the client's own seconds) of one fetch."""
        out = self.scratch / f"out-{self.tag}"
        shutil.rmtree(out, ignore_errors=True)
        command = [
            "ip", "netns", "exec", self.clientNs, *script("p2p-fetch"),
            "--relay", self.relay, "-o", str(out), "--json", *extra, name,
        ]  # fmt: skip
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"p2p-fetch {' '.join(extra)} failed: {result.stderr.strip()}")
        inside = json.loads(result.stdout.splitlines()[-1])["seconds"]
        return elapsed, inside

    def close(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()


UDP_1400 = "UDP 1400"  # the Ethernet-sized blocks, named, on loopback


def compare(
    net: Network, name: str, runs: int, size: int, label: str, blocks1400: bool = False
) -> Dict[str, float]:
    """TCP and UDP interleaved ``runs`` times; prints and returns the medians."""
    variants: Dict[str, List[str]] = {"TCP": [], "UDP": ["--udp"]}
    if blocks1400:
        variants[UDP_1400] = ["--udp", "--udp-block", "1400"]
    samples: Dict[str, List[tuple[float, float]]] = {v: [] for v in variants}
    failed = {v: 0 for v in variants}
    for _ in range(runs):
        for variant, extra in variants.items():
            try:
                samples[variant].append(net.fetch(name, extra))
            except RuntimeError as e:
                failed[variant] += 1
                print(f"  {label:<14} {variant}  failed: {e}", flush=True)
    for variant, values in samples.items():
        if not values:
            raise RuntimeError(f"{label}: every {variant} fetch failed")
    medians = {}
    for variant, values in samples.items():
        whole = statistics.median(v[0] for v in values)
        inside = statistics.median(v[1] for v in values)
        spread = max(v[0] for v in values) - min(v[0] for v in values)
        medians[variant] = whole
        medians[variant + " inside"] = inside
        print(
            f"  {label:<14} {variant}  {size / whole / MiB:7.1f} MiB/s whole command "
            f"(median of {len(values)}, {failed[variant]} failed, spread {spread:.2f} s), "
            f"{size / inside / MiB:7.1f} MiB/s in-process",
            flush=True,
        )
    for variant in variants:
        if variant == "TCP":
            continue
        ratio = medians["TCP"] / medians[variant]
        inside = medians["TCP inside"] / medians[variant + " inside"]
        print(
            f"  {label:<14} {variant}/TCP  {ratio:5.2f}x whole command, {inside:5.2f}x in-process",
            flush=True,
        )
    medians["ratio"] = medians["TCP"] / medians["UDP"]
    medians["ratio inside"] = medians["TCP inside"] / medians["UDP inside"]
    return medians


def preflight() -> None:
    if os.geteuid() != 0:
        raise Skip("needs root (network namespaces, tc, nft)")
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} is not installed")
    probe = f"p2pbench-probe-{os.getpid()}"
    try:
        result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if result.returncode != 0:
            raise Skip(f"ip netns add fails: {result.stderr.strip()}")
    finally:  # even when interrupted between the two
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks


def benchmark(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    size = int(args.size * MiB)
    results: Dict[str, Dict[str, float]] = {}
    link = Link(lossAt=args.loss_at)
    scratch = Path(tempfile.mkdtemp(prefix="p2p-udp-loss-"))
    nets: List[Network] = []
    previous = {s: signal.signal(s, _terminate) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        share = scratch / "share"
        share.mkdir()
        makeFile(share / "bench.bin", size)
        link.open()
        print(
            f"{args.size:g} MiB, {args.runs} runs of each, interleaved; link: veth + tbf {RATE} "
            f"both ways, loss on the data direction; {os.cpu_count()} cores",
            flush=True,
        )
        if args.loss:
            lossy = Network(
                scratch, share, link.client, link.node, CLIENT_ADDRESS, NODE_ADDRESS, "link"
            )
            nets.append(lossy)
        for percent in args.loss:
            link.setLoss(percent)
            results[f"link {percent}%"] = compare(lossy, "bench.bin", args.runs, size, f"{percent}% loss")
        link.setLoss(0)
        if not args.no_loopback:
            loop = Network(scratch, share, link.client, link.client, "127.0.0.1", "127.0.0.1", "lo")
            nets.append(loop)
            loopSize = int(args.loopback_size * MiB)
            if loopSize != size:
                makeFile(share / "loop.bin", loopSize)
                loop.daemons[-1].waitFor(REGISTERED, timeout=120)  # after its rescan
            name = "loop.bin" if loopSize != size else "bench.bin"
            results["loopback"] = compare(loop, name, args.runs, loopSize, "loopback", True)
    finally:
        for net in reversed(nets):
            net.close()
        link.close()
        shutil.rmtree(scratch, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=32, help="file size in MiB (default 32)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("--loss", type=int, nargs="*", default=[0, 1, 5],
                        help="loss rates in %% on the link (none: loopback only)")  # fmt: skip
    parser.add_argument("--loopback-size", type=float, default=None,
                        help="loopback file size in MiB (default: --size)")  # fmt: skip
    parser.add_argument("--loss-at", choices=("receiver", "sender"), default="receiver",
                        help="drop arriving at the client (default) or leaving the node, "
                        "where the node's sends fail with EPERM")  # fmt: skip
    parser.add_argument("--no-loopback", action="store_true", help="skip the loopback pair")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny file, one run, 5%% loss only: checks that it all works")  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.runs, args.loss = 0.25, 1, [5]
        args.loopback_size = None
    if args.loopback_size is None:
        args.loopback_size = args.size
    try:
        preflight()
    except Skip as e:
        print(f"skipped: {e}")
        return 0
    results = benchmark(args)
    if args.smoke:
        print("smoke: " + json.dumps({k: round(v["ratio"], 2) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
