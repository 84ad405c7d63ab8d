#!/usr/bin/env python3
"""
The relay at scale: a real ``twistd relay`` loaded with 10,000 peers of 100
files each (1M entries), every peer a fake node with its own Ed25519 key.

    python benchmarks/relay.py                  # 10,000 peers x 100 files
    python benchmarks/relay.py --smoke          # 100 x 10, a few seconds (the suite runs it)
    python benchmarks/relay.py --peers 2000 --tree /tmp/old-checkout   # another tree's relay

What it measures, in this order, and the issue's targets:

- registering every peer (REGISTER with its files, the relay's challenge,
  the PROOF, the relay's dial-back PROVE answered at the peer's address):
  under 30 s for 10,000;
- WHOHAS lookups/s at concurrency 1, 16 and 64 with p50/p99 (at least
  5,000/s at 16 with p99 under 20 ms), rounds interleaved, medians;
  the same against a no-op server (a canned answer, no registry) shows
  what the load generator itself can do;
- the relay's RSS holding all of it (under 200 MiB);
- SEARCH latency for heavy patterns (p99 under 200 ms) and the latency of
  WHOHAS sent while those searches run (under 20 ms);
- every peer heartbeating once per 30 s (HEARTBEAT, challenge, PROOF; the
  relay verifies an Ed25519 signature each time): the relay's CPU (under
  10 % of a core); and what one verification costs.

Every fake node registers from a source address of its own in 127.0.0.0/8
(a client socket bound to 127.16.x.y before connecting), so the relay's
per-address caps (64 registrations, 10 dial-backs a minute) hold per node,
as for real nodes, with the relay's default limits.  One listening socket
per load-generator process, on 0.0.0.0:P, answers the dial-backs of all its
nodes: the address a connection arrives at names the node.  File names come
from a pool so each name has about ten holders; one name is held by every
peer (its WHOHAS lists the 64-holder cap).

The load generator is two processes (asyncio, raw protocols), each measuring
its own CPU time: their utilisation is printed next to each figure, and the
no-op server's rate is the generator's ceiling on this machine.  The relay's
CPU comes from /proc/PID/stat.  With 2 shared cores the relay and the
generator compete; the figures say so.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import multiprocessing
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NODE_BASE = ipaddress.IPv4Address("127.16.0.1")  # node i registers from NODE_BASE + i
LANE_BASE = ipaddress.IPv4Address("127.64.0.1")  # query lanes (each its own source)
POPULAR = "popular/everyone-has-this.iso"
HOLDERS_PER_NAME = 10
LANE_ADDRESSES = 64  # source addresses each query lane cycles through
HEARTBEAT_INTERVAL = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def nodeAddress(i: int) -> str:
    return str(NODE_BASE + i)


def poolName(j: int) -> str:
    return f"music/artist{j % 997:03}/album{j % 89:02}/track-{j:07}.mp3"


def digestOf(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def namesOf(i: int, files: int, pool: int) -> list[int]:
    """Pool indexes node i holds (files - 1 of them; the popular name is the last)."""
    return [(i * (files - 1) + k) % pool for k in range(files - 1)]


# -- the relay process -----------------------------------------------------


def cpuSeconds(pid: int) -> float:
    """CPU seconds process ``pid`` has used (user + system), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """One ``twistd -n relay`` process from ``tree``."""

    def __init__(self, tree: Path, folder: Path, extra: list[str]) -> None:
        self.port = freePort()
        self.log = folder / "relay.log"
        env = dict(os.environ, PYTHONPATH=str(tree))
        twistd = Path(sys.executable).with_name("twistd")
        command = [
            str(twistd) if twistd.exists() else "twistd", "-n", "--pidfile=", "--logfile", str(self.log),
            "relay", "--port", f"tcp:{self.port}:interface=127.0.0.1", *extra,
        ]
        self.process = subprocess.Popen(command, cwd=tree, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.log.read_text()[-2000:] if self.log.exists() else ""
                    raise RuntimeError("the relay did not start:\n" + log)
                time.sleep(0.05)

    def cpu(self) -> float:
        """CPU seconds the relay has used (user + system)."""
        return cpuSeconds(self.process.pid)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- a no-op server: the load generator's ceiling -----------------------------


def noopServer(port: int, answer: bytes, ready) -> None:
    """A canned answer to every request line, then close (no registry)."""

    class Canned(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            if b"\n" in data:
                self.transport.write(answer)
                self.transport.close()

    async def main():
        loop = asyncio.get_running_loop()
        await loop.create_server(Canned, "127.0.0.1", port, backlog=1024, reuse_address=True)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


NOOP_ANSWER = b"P2P/1 200 count=0 :0 peers hold x\r\nP2P/1 END count=0\r\n"


def startNoopServer() -> tuple[int, "multiprocessing.Process"]:
    """The no-op server in a process of its own, listening: its port and process."""
    port = freePort()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    process = ctx.Process(target=noopServer, args=(port, NOOP_ANSWER, ready), daemon=True)
    process.start()
    ready.wait(10)
    return port, process


# -- the load generator (one per process) -----------------------------------


class Exchange(asyncio.Protocol):
    """One connection: send ``first``; ``onLine(line)`` returns bytes to send, True (done) or None."""

    def __init__(self, first: bytes, onLine, done: asyncio.Future) -> None:
        self.first = first
        self.onLine = onLine
        self.done = done
        self.buffer = b""

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.first)

    def data_received(self, data):
        self.buffer += data
        while b"\n" in self.buffer and not self.done.done():
            line, self.buffer = self.buffer.split(b"\n", 1)
            try:
                result = self.onLine(line.rstrip(b"\r"))
            except Exception as e:
                self.done.set_exception(e)
                self.transport.close()
                return
            if result is True:
                self.done.set_result(True)
                self.transport.close()
            elif result:
                self.transport.write(result)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed early: {exc}"))


class Generator:
    """A share of the fake nodes and query lanes, in one process."""

    def __init__(self, worker: int, workers: int, args, relayPort: int) -> None:
        from p2prelay import identity, wire

        self.identity, self.wire = identity, wire
        self.worker = worker
        self.relay = ("127.0.0.1", relayPort)
        self.args = args
        self.nodes = list(range(worker, args.peers, workers))
        self.keys = {i: identity.NodeKey.generate() for i in self.nodes}
        self.byAddress = {nodeAddress(i): self.keys[i] for i in self.nodes}
        self.pool = max(1, args.peers * (args.files - 1) // HOLDERS_PER_NAME)
        self.fileLines = {}
        self.proves = 0

    def fileLine(self, name: str, size: int) -> bytes:
        return (
            f"P2P/1 FILE name={quote(name, safe='')} size={size} sha256={digestOf(name)}\r\n"
        ).encode()

    def registration(self, i: int) -> bytes:
        key = self.keys[i]
        files = self.args.files
        lines = [f"P2P/1 REGISTER key={key.public} port={self.provePort} files={files}\r\n".encode()]
        for j in namesOf(i, files, self.pool):
            line = self.fileLines.get(j)
            if line is None:
                line = self.fileLines[j] = self.fileLine(poolName(j), j + 1)
            lines.append(line)
        lines.append(self.fileLine(POPULAR, 4242))
        lines.append(f"P2P/1 END count={files}\r\n".encode())
        return b"".join(lines)

    async def exchange(self, source: str, first: bytes, onLine) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        await loop.create_connection(
            lambda: Exchange(first, onLine, done), *self.relay, local_addr=(source, 0)
        )
        await done

    def proved(self, purpose: bytes, key, request: bytes, expect: str):
        """An onLine answering the relay's challenge, then expecting 200."""
        wire, identity = self.wire, self.identity

        def onLine(line: bytes):
            message = wire.parseLine(line)
            if message.status == wire.CONTINUE:
                sig = key.sign(identity.transcript(purpose, message.nonce(), request))
                return wire.request(wire.PROOF, sig=sig)
            if message.status == wire.OK:
                if expect == "reachable" and message.get("reachable") != "1":
                    raise RuntimeError(f"registered unreachable: {message.text}")
                return True
            raise RuntimeError(f"{message.word} {message.text}")

        return onLine

    # Dial-backs: one server answers for every node of this process.

    class Prover(asyncio.Protocol):
        def __init__(self, generator):
            self.g = generator
            self.buffer = b""

        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.buffer += data
            if b"\n" not in self.buffer:
                return
            g = self.g
            message = g.wire.parseLine(self.buffer.split(b"\n", 1)[0].rstrip(b"\r"))
            key = g.byAddress[self.transport.get_extra_info("sockname")[0]]
            sig = key.sign(g.identity.transcript(g.identity.DIALBACK_PROOF, message.nonce(), b""))
            self.transport.write(g.wire.status(g.wire.OK, key=key.public, sig=sig))
            self.transport.close()
            g.proves += 1

    async def startProver(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: self.Prover(self), "0.0.0.0", 0, backlog=1024, reuse_address=True
        )
        self.provePort = self.server.sockets[0].getsockname()[1]

    # Commands.

    async def register(self, window: int) -> dict:
        requests = {i: self.registration(i) for i in self.nodes}
        queue = list(self.nodes)
        errors = []
        start = time.perf_counter()
        cpu0 = time.process_time()

        async def lane():
            while queue:
                i = queue.pop()
                data = requests[i]
                try:
                    await self.exchange(
                        nodeAddress(i), data,
                        self.proved(self.identity.REGISTER_PROOF, self.keys[i], data, "reachable"),
                    )
                except Exception as e:
                    errors.append(str(e))

        await asyncio.gather(*(lane() for _ in range(window)))
        wall = time.perf_counter() - start
        return {"wall": wall, "cpu": time.process_time() - cpu0, "errors": errors[:5],
                "failed": len(errors), "proves": self.proves}

    def lookupRequest(self, rng: random.Random) -> bytes:
        if rng.random() < 1 / 16:
            name = POPULAR
        else:
            name = poolName(rng.randrange(self.pool))
        return self.wire.request(self.wire.WHOHAS, name=name)

    async def queries(self, lanes: int, lane0: int, duration: float, kind: str, target) -> dict:
        """Back-to-back queries on ``lanes`` connections' worth of concurrency."""
        rng = random.Random(self.worker)
        latencies: list[float] = []
        errors = []
        end = time.perf_counter() + duration
        cpu0 = time.process_time()
        start = time.perf_counter()
        relay = target

        def untilEnd(line: bytes):
            if line.startswith(b"P2P/1 END"):
                return True
            if line[6:7] in (b"4", b"5"):
                raise RuntimeError(line.decode(errors="replace"))
            return None

        async def lane(n: int):
            # Each lane cycles through addresses of its own, so the relay's
            # closed connections (TIME_WAIT) never exhaust one address's ports.
            sources = [str(LANE_BASE + n * LANE_ADDRESSES + k) for k in range(LANE_ADDRESSES)]
            loop = asyncio.get_running_loop()
            sent = 0
            while time.perf_counter() < end:
                source = sources[sent % LANE_ADDRESSES]
                sent += 1
                if kind == "search":
                    data = self.wire.request(self.wire.SEARCH, pattern=rng.choice(SEARCHES))
                else:
                    data = self.lookupRequest(rng)
                t0 = time.perf_counter()
                try:
                    done = loop.create_future()
                    await loop.create_connection(
                        lambda: Exchange(data, untilEnd, done), *relay, local_addr=(source, 0)
                    )
                    await done
                except Exception as e:
                    errors.append(str(e))
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(lane(lane0 + n) for n in range(lanes)))
        return {"latencies": latencies, "wall": time.perf_counter() - start,
                "cpu": time.process_time() - cpu0, "errors": errors[:5], "failed": len(errors)}

    async def heartbeat(self, duration: float, interval: float) -> dict:
        """Every node of this process beats once per ``interval``, spread evenly."""
        wire, identity = self.wire, self.identity
        start = time.perf_counter()
        cpu0 = time.process_time()
        beats, errors = 0, []
        count = len(self.nodes)
        pending = set()

        async def beat(i):
            nonlocal beats
            key = self.keys[i]
            data = wire.request(wire.HEARTBEAT, node=key.node)
            try:
                await self.exchange(nodeAddress(i), data,
                                    self.proved(identity.HEARTBEAT_PROOF, key, data, "alive"))
                beats += 1
            except Exception as e:
                errors.append(str(e))

        n = 0
        while True:
            due = start + n * interval / count
            if due >= start + duration:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(beat(self.nodes[n % count]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
        if pending:
            await asyncio.gather(*pending)
        return {"beats": beats, "sent": n, "wall": time.perf_counter() - start,
                "cpu": time.process_time() - cpu0, "errors": errors[:5], "failed": len(errors)}


SEARCHES = ["", "*", "*.mp3", "track-00", "*/album1?/*", "*a*b*c*", "nothing-matches-this"]


def generatorProcess(worker: int, workers: int, args, relayPort: int, conn) -> None:
    async def main():
        g = Generator(worker, workers, args, relayPort)
        await g.startProver()
        conn.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            name, params = command
            if name == "stop":
                break
            if name == "target":
                g.relay = tuple(params)
                conn.send("ok")
                continue
            result = await getattr(g, name)(**params)
            conn.send(result)

    asyncio.run(main())


class Generators:
    def __init__(self, count: int, args, relayPort: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes, self.processes = [], []
        for w in range(count):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=generatorProcess, args=(w, count, args, relayPort, theirs), daemon=True)
            p.start()
            self.pipes.append(mine)
            self.processes.append(p)
        for pipe in self.pipes:
            assert pipe.recv() == "ready"

    def call(self, name: str, perWorker) -> list:
        for w, pipe in enumerate(self.pipes):
            pipe.send((name, perWorker(w)))
        return [pipe.recv() for pipe in self.pipes]

    def target(self, port: int) -> None:
        for pipe in self.pipes:
            pipe.send(("target", ("127.0.0.1", port)))
        for pipe in self.pipes:
            pipe.recv()

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop", None))
            except OSError:
                pass
        for p in self.processes:
            p.join(5)
            if p.is_alive():
                p.kill()


# -- figures ------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def split(total: int, workers: int) -> list[int]:
    return [total // workers + (1 if w < total % workers else 0) for w in range(workers)]


def queryRound(gens: Generators, workers: int, concurrency: int, duration: float, kind="whohas",
               targets=None):
    """
    ``concurrency`` lanes split over the generator processes, all asking
    ``gens.relayTarget``, or with ``targets`` (addresses) worker w asking
    ``targets[w % len(targets)]``: the load split over several relays.
    """
    shares = split(concurrency, workers)
    offsets = [sum(shares[:w]) + 1000 * kind.startswith("s") for w in range(workers)]
    targets = targets or [gens.relayTarget]
    results = gens.call(
        "queries",
        lambda w: {"lanes": shares[w], "lane0": offsets[w], "duration": duration, "kind": kind,
                   "target": targets[w % len(targets)]},
    )
    latencies = [x for r in results for x in r["latencies"]]
    wall = max(r["wall"] for r in results)
    failed = sum(r["failed"] for r in results)
    errors = [e for r in results for e in r["errors"]]
    busy = [r["cpu"] / r["wall"] for r in results if r["latencies"]]
    return {
        "rate": len(latencies) / wall, "p50": quantile(latencies, 0.5), "p99": quantile(latencies, 0.99),
        "max": max(latencies, default=float("nan")), "count": len(latencies), "failed": failed,
        "errors": errors[:3], "generatorBusy": max(busy, default=0.0),
        "workerRates": [len(r["latencies"]) / r["wall"] for r in results],
        "generatorCpu": sum(r["cpu"] for r in results),
    }


def run(args) -> dict:
    tree = Path(args.tree).resolve() if args.tree else ROOT
    folder = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    # A lifetime longer than the run, so the first peers are still there when
    # the last register (heartbeats are measured on their own, every 30 s).
    extra = ["--ttl", str(args.ttl), *(args.relay_arg or [])]
    if args.state:
        extra += ["--state", str(folder / "state.sqlite")]
    relay = Relay(tree, folder, extra)
    report: dict = {"peers": args.peers, "files": args.files, "tree": str(tree)}
    gens = None
    noop = None
    profiler = None
    if args.profile:
        spy = Path(sys.executable).with_name("py-spy")
        profiler = subprocess.Popen(
            [str(spy), "record", "--pid", str(relay.process.pid), "--format", "raw", "-o", args.profile],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    try:
        rss0 = relay.rss()
        gens = Generators(args.workers, args, relay.port)
        gens.relayTarget = ("127.0.0.1", relay.port)
        print(f"relay pid {relay.process.pid} on port {relay.port}; {args.peers} peers x {args.files} files;"
              f" {args.workers} generator processes", flush=True)

        # 1. Registration.
        cpu0, t0 = relay.cpu(), time.perf_counter()
        window = split(args.window, args.workers)
        results = gens.call("register", lambda w: {"window": window[w]})
        wall = time.perf_counter() - t0
        failed = sum(r["failed"] for r in results)
        report["register"] = {
            "wall": wall, "rate": args.peers / wall, "failed": failed,
            "relayCpu": (relay.cpu() - cpu0) / wall,
            "generatorBusy": max(r["cpu"] / r["wall"] for r in results),
            "errors": [e for r in results for e in r["errors"]][:3],
        }
        print(f"registered {args.peers - failed}/{args.peers} in {wall:.1f} s ({args.peers / wall:.0f}/s);"
              f" relay CPU {report['register']['relayCpu']:.0%}, generator busiest"
              f" {report['register']['generatorBusy']:.0%}  (target < 30 s for 10,000)", flush=True)
        if failed:
            print("  errors:", report["register"]["errors"])

        # 2. Memory.
        time.sleep(args.settle)
        rss = relay.rss()
        entries = args.peers * args.files
        report["rss"] = {"bytes": rss, "before": rss0, "perEntry": (rss - rss0) / entries}
        print(f"relay RSS {rss / 2**20:.0f} MiB at {entries} entries ({rss0 / 2**20:.0f} MiB empty;"
              f" {(rss - rss0) / entries:.0f} B per entry)  (target < 200 MiB)", flush=True)

        # 3. WHOHAS at each concurrency, interleaved with the no-op server.
        noopPort, noop = startNoopServer()
        rounds: dict = {}
        for r in range(args.rounds):
            for c in args.concurrency:
                for target, port in (("relay", relay.port), ("noop", noopPort)):
                    gens.relayTarget = ("127.0.0.1", port)
                    cpu0, t0 = relay.cpu(), time.perf_counter()
                    result = queryRound(gens, args.workers, c, args.duration)
                    if target == "relay":
                        result["relayCpu"] = (relay.cpu() - cpu0) / (time.perf_counter() - t0)
                    rounds.setdefault((target, c), []).append(result)
        gens.relayTarget = ("127.0.0.1", relay.port)
        report["whohas"] = {}
        for c in args.concurrency:
            mine, floor = rounds[("relay", c)], rounds[("noop", c)]
            figure = {
                key: statistics.median(x[key] for x in mine)
                for key in ("rate", "p50", "p99", "generatorBusy", "relayCpu")
            }
            figure["noopRate"] = statistics.median(x["rate"] for x in floor)
            figure["failed"] = sum(x["failed"] for x in mine)
            figure["rates"] = [round(x["rate"]) for x in mine]
            report["whohas"][c] = figure
            print(
                f"WHOHAS c={c:>2}: {figure['rate']:6.0f}/s (rounds {figure['rates']}) p50 {ms(figure['p50'])}"
                f" p99 {ms(figure['p99'])}; relay CPU {figure['relayCpu']:.0%}, generator busiest"
                f" {figure['generatorBusy']:.0%}; no-op server {figure['noopRate']:.0f}/s"
                f" (ratio {figure['rate'] / figure['noopRate']:.2f}){'; FAILED ' + str(figure['failed']) if figure['failed'] else ''}",
                flush=True,
            )
            if figure["failed"]:
                print("  errors:", mine[0]["errors"])
        print("  (target >= 5,000/s at c=16 with p99 < 20 ms)")

        # 4. SEARCH, and WHOHAS while searches run.
        search = queryRound(gens, args.workers, 1, args.duration * 2, kind="search")
        both = gens.call(
            "queries",
            lambda w: {"lanes": 1, "lane0": 2000 + w, "duration": args.duration * 2,
                       "kind": "search" if w == 0 else "whohas", "target": gens.relayTarget},
        )
        during = both[1]["latencies"] if len(both) > 1 else []
        searching = both[0]["latencies"]
        report["search"] = {
            "p50": search["p50"], "p99": search["p99"], "max": search["max"], "count": search["count"],
            "whohasDuringP99": quantile(during, 0.99), "whohasDuringMax": max(during, default=float("nan")),
            "whohasDuringCount": len(during), "searchesDuring": len(searching),
        }
        print(f"SEARCH ({', '.join(repr(s) for s in SEARCHES)}): p50 {ms(search['p50'])} p99 {ms(search['p99'])}"
              f" max {ms(search['max'])} over {search['count']}  (target p99 < 200 ms)")
        print(f"WHOHAS during {len(searching)} searches: p99 {ms(report['search']['whohasDuringP99'])}"
              f" max {ms(report['search']['whohasDuringMax'])} over {len(during)}  (target < 20 ms)", flush=True)

        # 5. Heartbeats.
        interval = args.interval
        duration = args.heartbeat_duration
        cpu0, t0 = relay.cpu(), time.perf_counter()
        results = gens.call("heartbeat", lambda w: {"duration": duration, "interval": interval})
        wall = time.perf_counter() - t0
        cpu = (relay.cpu() - cpu0) / wall
        beats = sum(r["beats"] for r in results)
        failed = sum(r["failed"] for r in results)
        report["heartbeat"] = {"relayCpu": cpu, "beats": beats, "failed": failed, "rate": beats / wall,
                               "generatorBusy": max(r["cpu"] / r["wall"] for r in results),
                               "cpuPerBeat": (relay.cpu() - cpu0) / max(beats, 1)}
        print(f"heartbeats: {beats} in {wall:.1f} s ({beats / wall:.0f}/s, every peer once per {interval:g} s):"
              f" relay CPU {cpu:.1%} of a core ({report['heartbeat']['cpuPerBeat'] * 1e6:.0f} us per beat)"
              f"{'; FAILED ' + str(failed) if failed else ''}  (target < 10 %)", flush=True)
        if failed:
            print("  errors:", [e for r in results for e in r["errors"]][:3])
        report["verify"] = verifyCost()
        print(f"one Ed25519 verification (identity.verify): {report['verify'] * 1e6:.0f} us", flush=True)
        report["rssEnd"] = relay.rss()
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
            print(f"py-spy profile (collapsed stacks) in {args.profile}")
        if gens is not None:
            gens.stop()
        if noop is not None:
            noop.kill()
        relay.stop()
    return report


def verifyCost() -> float:
    from p2prelay import identity

    key = identity.NodeKey.generate()
    message = identity.transcript(identity.HEARTBEAT_PROOF, identity.newNonce(), b"x")
    sig = key.sign(message)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        assert identity.verify(key.public, sig, message)
    return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument("--window", type=int, default=64, help="registrations in flight")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per WHOHAS round")
    parser.add_argument("--interval", type=float, default=HEARTBEAT_INTERVAL)
    parser.add_argument("--heartbeat-duration", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS")
    parser.add_argument("--ttl", type=float, default=900.0, help="the relay's --ttl")
    parser.add_argument("--state", action="store_true", help="run the relay with --state")
    parser.add_argument("--tree", help="checkout whose relay to run (default: this one)")
    parser.add_argument("--relay-arg", action="append", help="extra relay option (repeatable)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--profile", help="record the relay with py-spy (collapsed stacks) into this file")
    parser.add_argument("--smoke", action="store_true", help="100 peers x 10 files, a few seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.peers, args.files, args.rounds, args.duration = 100, 10, 1, 0.3
        args.heartbeat_duration, args.interval, args.settle = 1.0, 1.0, 0.0
        args.concurrency = [1, 16]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1]),) * 2)
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    problems = report["register"]["failed"] + report["heartbeat"]["failed"]
    problems += sum(f["failed"] for f in report["whohas"].values())
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
