#!/usr/bin/env python3
"""
Real relays on the registry's backends side by side: WHOHAS lookups per
second and p99 latency at one million index entries, through a ``twistd
relay`` in memory, one on Redis, and two on the same Redis together.

    python benchmarks/relays_redis.py            # 10,000 peers x 100 files = 1M entries
    python benchmarks/relays_redis.py --smoke    # 100 x 10, one short round each (the suite runs it)

It reuses ``benchmarks/relay.py``'s fake nodes and load generator (two
processes; every node its own Ed25519 key and source address in
127.16.0.0/16, answering the relay's dial-backs), and starts its own
``redis-server`` on a free loopback port with no persistence, in a
temporary folder, stopped at the end (also on Ctrl-C and SIGTERM).

In this order:

- registers every node with an in-memory relay, then with a relay on
  ``--registry redis://...`` (the real path: REGISTER, challenge, PROOF,
  dial-back, one Lua script in Redis), timing each;
- starts a second relay on the same Redis and checks that both Redis
  relays and the in-memory one give the same holders for a few names;
- interleaves rounds of WHOHAS at each concurrency (16 and 64) against:
  the in-memory relay, the one Redis relay, both Redis relays together
  (generator process 1 asks the first, process 2 the second: the load
  split over the two) and a no-op server (the generator's ceiling);
  rate, p50 and p99 are medians over the rounds;
- reports, for every round, each relay's and redis-server's CPU share (from
  /proc/PID/stat), the generator's busiest process and the whole machine's
  CPU share, then the CPU each lookup costs in each process and what that
  says about more cores and machines; and the ratios (Redis one relay /
  memory; two relays / one relay).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.relay import (  # noqa: E402  (the checkout first on sys.path)
    CLK_TCK,
    POPULAR,
    Generators,
    Relay,
    cpuSeconds,
    poolName,
    queryRound,
    split,
    startNoopServer,
)
from p2prelay.relay.registry import MAX_HOLDERS  # noqa: E402  (the relay's default WHOHAS cap)

CORES = os.cpu_count() or 1
CHECKED_NAMES = 8  # names whose holders every relay must list alike
MEMORY, ONE, TWO, NOOP = "memory, one relay", "redis, one relay", "redis, two relays", "no-op server"


def machineBusy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / CLK_TCK, sum(fields) / CLK_TCK


def ask(port: int, line: bytes, timeout: float = 10.0) -> list[bytes]:
    """One request to a relay on loopback; the answer's lines up to END (or a refusal)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(line)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if not data.endswith(b"\n"):
                continue
            if data[6:7] != b"2" or data.splitlines()[-1].startswith(b"P2P/1 END"):
                break
    return data.splitlines()


def holders(port: int, name: str) -> set[bytes]:
    """The holder lines a relay answers to WHOHAS name (status and END left out)."""
    from p2prelay import wire

    lines = ask(port, wire.request(wire.WHOHAS, name=name))
    if not lines or lines[0][6:9] != b"200":
        raise RuntimeError(f"WHOHAS {name} on port {port}: {lines[:1]}")
    return set(lines[1:-1])


def redisInfo(port: int, section: str) -> dict[str, str]:
    """redis-server's INFO section as a dict (a raw RESP exchange, no client library)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"INFO {section}\r\n".encode())
        data = b""
        while True:
            data += s.recv(65536)
            if b"\r\n" in data:
                head, rest = data.split(b"\r\n", 1)
                if len(rest) >= int(head[1:]) + 2:
                    break
    pairs = (line.split(":", 1) for line in rest.decode().splitlines() if ":" in line)
    return {k: v for k, v in pairs}


class Meters:
    """CPU seconds of named processes (and of the machine) between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = {name: cpuSeconds(pid) for name, pid in self.pids.items()}
        self.machine0 = machineBusy()

    def stop(self) -> dict[str, float]:
        """Each process's share of one core, and ``machine``: the share of all cores busy."""
        wall = time.perf_counter() - self.t0
        shares = {name: (cpuSeconds(pid) - self.cpu0[name]) / wall for name, pid in self.pids.items()}
        busy, total = machineBusy()
        shares["machine"] = (busy - self.machine0[0]) / max(total - self.machine0[1], 1e-9)
        shares["wall"] = wall
        return shares


def register(gens: Generators, args, port: int, meters: Meters) -> dict:
    gens.target(port)
    window = split(args.window, args.workers)
    meters.start()
    t0 = time.perf_counter()
    results = gens.call("register", lambda w: {"window": window[w]})
    wall = time.perf_counter() - t0
    cpu = meters.stop()
    failed = sum(r["failed"] for r in results)
    return {"wall": wall, "rate": args.peers / wall, "failed": failed, "cpu": cpu,
            "generatorBusy": max(r["cpu"] / r["wall"] for r in results),
            "errors": [e for r in results for e in r["errors"]][:3]}


def pct(x: float) -> str:
    return f"{x:.0%}"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run(args) -> dict:
    from tests.redisserver import RedisServer

    folder = Path(tempfile.mkdtemp(prefix="relays-redis-bench-"))
    extra = ["--ttl", str(args.ttl), *(args.relay_arg or [])]
    relays: dict[str, Relay] = {}
    server = gens = noop = None
    report: dict = {"peers": args.peers, "files": args.files, "entries": args.peers * args.files}

    def relay(name: str, *more: str) -> Relay:
        (folder / name).mkdir()
        relays[name] = Relay(ROOT, folder / name, [*extra, *more])
        return relays[name]

    try:
        memory = relay("memory")
        server = RedisServer()  # assigned before it starts, so an interrupt while it starts stops it
        server.start()
        url = server.url
        redisPid = server.process.pid
        print(f"{args.peers:,} peers x {args.files} files = {args.peers * args.files:,} index entries;"
              f" {args.workers} generator processes; {CORES} cores; redis-server pid {redisPid} at {url}",
              flush=True)
        gens = Generators(args.workers, args, memory.port)

        # 1. The same nodes registered with the in-memory relay, then through a Redis relay.
        first = relay("redis1", "--registry", url)
        pids = {"memory": memory.process.pid, "redis1": first.process.pid, "redis-server": redisPid}
        meters = Meters(pids)
        report["register"] = {}
        for label, name, target in (("memory", "memory", memory), ("redis", "redis1", first)):
            r = report["register"][label] = register(gens, args, target.port, meters)
            also = f", redis-server CPU {pct(r['cpu']['redis-server'])}" if label == "redis" else ""
            print(f"registered {args.peers - r['failed']:,}/{args.peers:,} with the {label} relay in"
                  f" {r['wall']:.1f} s ({r['rate']:,.0f}/s): relay CPU {pct(r['cpu'][name])}{also},"
                  f" generator busiest {pct(r['generatorBusy'])}, machine {pct(r['cpu']['machine'])}",
                  flush=True)
            if r["failed"]:
                print("  errors:", r["errors"])
        if report["register"]["redis"]["wall"] > 120:
            print(f"  registering through Redis took over 2 minutes:"
                  f" {report['register']['redis']['rate']:,.0f} registrations/s", flush=True)
        info = redisInfo(server.port, "memory")
        keys = redisInfo(server.port, "keyspace")
        report["redisMemory"] = int(info["used_memory"])
        report["rss"] = {"memory": memory.rss(), "redis1": first.rss()}
        print(f"redis-server holds {info['used_memory_human']} ({keys.get('db0', 'no keys')});"
              f" relay RSS: in memory {memory.rss() / 2**20:.0f} MiB, on Redis {first.rss() / 2**20:.0f} MiB",
              flush=True)

        # 2. A second relay on the same Redis: the same answers, no re-registration.
        second = relay("redis2", "--registry", url)
        pids["redis2"] = second.process.pid
        pool = max(1, args.peers * (args.files - 1) // 10)
        names = [POPULAR] + [poolName(j) for j in range(0, pool, max(1, pool // CHECKED_NAMES))][:CHECKED_NAMES]
        for name in names:
            # A name held by more than the cap lists a random sample of its
            # holders (on every backend, to spread the load): only as many.
            answers = [holders(r.port, name) for r in (memory, first, second)]
            capped = len(answers[0]) >= MAX_HOLDERS
            if len({len(a) for a in answers}) > 1 or not capped and not answers[0] == answers[1] == answers[2]:
                raise RuntimeError(f"relays disagree on {name}: {[len(a) for a in answers]} holders")
        report["alike"] = len(names)
        print(f"second relay pid {second.process.pid} on the same Redis: {len(names)} names, the same holders"
              f" from all three relays ({len(holders(second.port, POPULAR))}, a random sample, for the popular"
              f" name)", flush=True)

        # 3. Interleaved rounds.
        noopPort, noop = startNoopServer()
        pids["noop"] = noop.pid
        contenders = [
            (MEMORY, [("127.0.0.1", memory.port)], ["memory"]),
            (ONE, [("127.0.0.1", first.port)], ["redis1"]),
            (TWO, [("127.0.0.1", first.port), ("127.0.0.1", second.port)], ["redis1", "redis2"]),
            (NOOP, [("127.0.0.1", noopPort)], ["noop"]),
        ]
        for label, targets, _ in contenders:  # warm up: connections, caches, the JIT-less paths
            queryRound(gens, args.workers, max(args.concurrency), args.warmup, targets=targets)
        rounds: dict = {}
        for _ in range(args.rounds):
            for c in args.concurrency:
                for label, targets, _ in contenders:
                    meters.start()
                    result = queryRound(gens, args.workers, c, args.seconds, targets=targets)
                    result["cpu"] = cpu = meters.stop()
                    # The cores busy outside this benchmark's processes (others' work on a shared machine).
                    ours = sum(cpu[name] for name in pids) + result["generatorCpu"] / cpu["wall"]
                    cpu["others"] = max(0.0, cpu["machine"] * CORES - ours)
                    rounds.setdefault((label, c), []).append(result)

        # 4. The table.
        report["whohas"] = {}
        print()
        print(f"WHOHAS at {args.peers * args.files:,} entries, medians of {args.rounds} round(s) of"
              f" {args.seconds:g} s (CPU: share of one core; machine: of all {CORES} cores;"
              f" others: cores busy outside this benchmark)")
        print(f"{'contender':<19} {'c':>3} {'lookups/s':>10} {'p50 ms':>7} {'p99 ms':>7}  {'relay CPU':<11}"
              f" {'redis CPU':>9} {'generator':>9} {'machine':>7} {'others':>6}  rounds (lookups/s)")
        for c in args.concurrency:
            for label, _, mine in contenders:
                results = rounds[(label, c)]
                med = lambda f: statistics.median(f(x) for x in results)  # noqa: E731
                figure = {
                    "rate": med(lambda x: x["rate"]), "p50": med(lambda x: x["p50"]), "p99": med(lambda x: x["p99"]),
                    "generatorBusy": med(lambda x: x["generatorBusy"]),
                    "machine": med(lambda x: x["cpu"]["machine"]),
                    "others": med(lambda x: x["cpu"]["others"]),
                    "redisCpu": med(lambda x: x["cpu"]["redis-server"]),
                    "relayCpu": {name: med(lambda x: x["cpu"][name]) for name in mine},
                    "failed": sum(x["failed"] for x in results),
                    "rates": [round(x["rate"]) for x in results],
                    # CPU-seconds per lookup, per process (the figures to scale from)
                    "relayCost": {name: med(lambda x: x["cpu"][name] * x["cpu"]["wall"] / max(x["count"], 1))
                                  for name in mine},
                    "redisCost": med(lambda x: x["cpu"]["redis-server"] * x["cpu"]["wall"] / max(x["count"], 1)),
                    "generatorCost": med(lambda x: x["generatorCpu"] / max(x["count"], 1)),
                    "workerRates": [round(statistics.median(x["workerRates"][w] for x in results))
                                    for w in range(args.workers)],
                }
                report["whohas"][f"{label} c={c}"] = figure
                relayCpu = " + ".join(pct(v) for v in figure["relayCpu"].values()) or "-"
                redisCpu = pct(figure["redisCpu"]) if label in (ONE, TWO) else "-"
                failed = f"  FAILED {figure['failed']}" if figure["failed"] else ""
                print(f"{label:<19} {c:>3} {figure['rate']:>10,.0f} {figure['p50'] * 1e3:>7.1f}"
                      f" {figure['p99'] * 1e3:>7.1f}  {relayCpu:<11} {redisCpu:>9}"
                      f" {pct(figure['generatorBusy']):>9} {pct(figure['machine']):>7} {figure['others']:>6.2f}"
                      f"  {figure['rates']}{failed}")
                if figure["failed"]:
                    print("  errors:", next(x["errors"] for x in results if x["failed"]))

        # 5. Ratios, and what one lookup costs where.
        print()
        for c in args.concurrency:
            m, one, two = (report["whohas"][f"{label} c={c}"] for label in (MEMORY, ONE, TWO))
            print(f"c={c}: redis one relay / memory: rate {ratio(one['rate'], m['rate']):.2f},"
                  f" p99 {ratio(one['p99'], m['p99']):.2f}; two relays / one relay:"
                  f" rate {ratio(two['rate'], one['rate']):.2f}, p99 {ratio(two['p99'], one['p99']):.2f}"
                  f" (per relay {' + '.join(f'{r:,}' for r in two['workerRates'])}/s)")
        c = max(args.concurrency)
        m, one, two = (report["whohas"][f"{label} c={c}"] for label in (MEMORY, ONE, TWO))
        us = lambda seconds: f"{seconds * 1e6:.0f} us"  # noqa: E731
        memoryCost, relayCost = m["relayCost"]["memory"], one["relayCost"]["redis1"]
        redisCost, genCost = one["redisCost"], one["generatorCost"]
        print(f"CPU per lookup at c={c}: relay in memory {us(memoryCost)}, relay on Redis {us(relayCost)},"
              f" redis-server {us(redisCost)}, load generator {us(genCost)}")
        print(f"  so one core runs about {ratio(1, memoryCost):,.0f}/s as an in-memory relay,"
              f" {ratio(1, relayCost):,.0f}/s as a Redis relay; one redis-server (single-threaded) about"
              f" {ratio(1, redisCost):,.0f}/s, enough for about {ratio(relayCost, redisCost):.1f} busy Redis"
              f" relays before it is the bottleneck")
        whole = relayCost + redisCost + genCost
        print(f"  here the Redis path costs {us(whole)} of CPU per lookup, all processes together: {CORES} cores"
              f" allow about {ratio(CORES, whole):,.0f}/s however many relays (measured: one relay"
              f" {one['rate']:,.0f}/s, two {two['rate']:,.0f}/s; in memory about"
              f" {ratio(CORES, memoryCost + m['generatorCost']):,.0f}/s, measured {m['rate']:,.0f}/s)")
        report["costs"] = {"memoryRelay": memoryCost, "redisRelay": relayCost, "redisServer": redisCost,
                           "generator": genCost}
    finally:
        if gens is not None:
            gens.stop()
        if noop is not None:
            noop.kill()
        for r in relays.values():
            r.stop()
        if server is not None:
            server.cleanup()
        if report.get("costs"):
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"the relays' logs are in {folder}", file=sys.stderr)
    return report


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per WHOHAS round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per contender")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of lookups per contender first")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument("--window", type=int, default=64, help="registrations in flight")
    parser.add_argument("--ttl", type=float, default=3600.0, help="the relays' --ttl (longer than the run)")
    parser.add_argument("--relay-arg", action="append", help="extra option for every relay (repeatable)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--smoke", action="store_true", help="100 peers x 10 files, one short round each")
    args = parser.parse_args(argv)
    if args.smoke:
        args.peers, args.files, args.rounds, args.seconds, args.warmup = 100, 10, 1, 0.3, 0.1
        args.concurrency = [16]
    from tests.redisserver import binary

    if binary() is None:
        print("no redis-server binary (Debian package redis-server): nothing to compare", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1]),) * 2)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    problems = sum(r["failed"] for r in report["register"].values())
    problems += sum(f["failed"] for f in report["whohas"].values())
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
