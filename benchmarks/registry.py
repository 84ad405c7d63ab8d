#!/usr/bin/env python3
"""
The registry's backends side by side: WHOHAS lookups (``holders(name)``)
per second and their latency at one million index entries, in memory and
in a real ``redis-server`` (started here, on a free loopback port, with no
persistence), in one run.

    python benchmarks/registry.py            # 10,000 peers x 100 files = 1M entries
    python benchmarks/registry.py --smoke    # 100 x 10, a second or two (the suite runs it)

What it does, in this order:

- loads the same peers into each backend through ``register`` (each a
  Deferred; for Redis 64 in flight, one Lua script each), timing it;
- looks up random names (file names come from a pool so each has about ten
  holders) for ``--seconds`` per contender and reports lookups/s with
  p50/p99 latency (from the call to its Deferred firing):
  in memory (already-fired Deferreds, one at a time);
  Redis with 1 and 16 lookups in flight from one process (one relay);
  Redis with 16 in flight from each of two processes (two relays on this
  machine, each its own reactor and connection); and Redis through its
  unix socket;
- heartbeats (``refresh`` of random peers) the same way;
- reports Redis's own CPU share during each Redis run and its memory.

With 2 shared cores, the client processes and redis-server compete: the
figures say how busy each was.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAME_POOL_FACTOR = 10  # entries per distinct name: about ten holders each
TICKS = os.sysconf("SC_CLK_TCK")


def names(peers: int, files: int) -> list[str]:
    pool = max(1, peers * files // NAME_POOL_FACTOR)
    return [f"music/album-{i // 10:05}/track-{i:06}.flac" for i in range(pool)]


def peerFiles(index: int, files: int, pool: list[str]):
    from p2prelay.wire import FileEntry

    rng = random.Random(index)
    chosen = rng.sample(range(len(pool)), min(files, len(pool)))
    return [FileEntry(pool[i], 1000 + i, f"{i:064x}") for i in chosen]


async def load(backend, peers: int, files: int, pool: list[str], inflight: int) -> float:
    from twisted.internet import defer

    started = time.perf_counter()
    pending: list = []
    for i in range(peers):
        d = backend.register(f"node{i:06}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 7000,
                             peerFiles(i, files, pool), key=f"key{i}", source=f"src{i}")
        pending.append(d)
        if len(pending) >= inflight:
            await defer.gatherResults(pending)
            pending = []
    await defer.gatherResults(pending)
    return time.perf_counter() - started


async def lookups(backend, pool: list[str], seconds: float, inflight: int, seed: int, heartbeats: int = 0) -> dict:
    """
    holders() of random names for ``seconds`` with ``inflight`` outstanding;
    with ``heartbeats`` (the number of peers), refresh() of random peers instead.
    """
    from twisted.internet import defer

    rng = random.Random(seed)
    if heartbeats:
        nodes = [f"node{i:06}" for i in range(heartbeats)]

        def call():
            return backend.refresh(rng.choice(nodes)).addCallback(lambda peer: [peer])
    else:

        def call():
            return backend.holders(rng.choice(pool))

    latencies: list[float] = []
    found = 0
    deadline = time.perf_counter() + seconds
    done = defer.Deferred()
    state = {"open": 0}

    def one() -> None:
        started = time.perf_counter()
        state["open"] += 1

        def answered(holders) -> None:
            nonlocal found
            latencies.append(time.perf_counter() - started)
            found += len(holders)
            state["open"] -= 1
            if time.perf_counter() < deadline:
                one()
            elif state["open"] == 0 and not done.called:
                done.callback(None)

        call().addCallback(answered)

    cpu = time.process_time()
    began = time.perf_counter()
    if inflight == 1 and getattr(backend, "client", None) is None:
        # In memory every Deferred has fired already: a plain loop, no recursion.
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            d = call()
            found += len(d.result)
            latencies.append(time.perf_counter() - started)
    else:
        for _ in range(inflight):
            one()
        await done
    elapsed = time.perf_counter() - began
    return {
        "count": len(latencies),
        "elapsed": elapsed,
        "cpu": time.process_time() - cpu,
        "holders": found / max(1, len(latencies)),
        "latencies": latencies,
    }


def summary(label: str, result: dict, extra: str = "", unit: str = "lookups/s") -> str:
    lat = sorted(result["latencies"])
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0
    rate = result["count"] / result["elapsed"] if result["elapsed"] else 0.0
    each = f"{result['holders']:.1f} holders each; " if unit == "lookups/s" else ""
    return (
        f"{label:<38} {rate:>8,.0f} {unit:<9}  p50 {p50:6.3f} ms  p99 {p99:6.3f} ms"
        f"  ({each}client CPU {result['cpu'] / result['elapsed']:.0%}{extra})"
    )


def redisCpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def worker(reactor, url: str, seconds: float, inflight: int, seed: int, peers: int, files: int) -> None:
    """One of the two 'relays': lookups from its own process, the result as JSON on stdout."""
    from p2prelay.relay.backends import redis as redisbackend
    from p2prelay.relay.backends.url import parse

    backend = await redisbackend.connect(parse(url), reactor, prefix="bench:")
    pool = names(peers, files)
    await lookups(backend, pool, 0.2, inflight, seed + 1)  # warm up
    result = await lookups(backend, pool, seconds, inflight, seed)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    await backend.close()


async def main(reactor, options) -> None:
    from p2prelay.relay.backends import redis as redisbackend
    from p2prelay.relay.backends.memory import MemoryBackend
    from p2prelay.relay.backends.url import parse
    from p2prelay.relay.registry import Registry
    from tests.redisserver import RedisServer, binary

    peers, files, seconds = options.peers, options.files, options.seconds
    pool = names(peers, files)
    maxTotal = max(peers, 100_000)
    print(f"{peers:,} peers x {files} files = {peers * files:,} index entries, {len(pool):,} distinct names")

    memory = MemoryBackend(Registry(reactor.seconds, 3600.0, maxTotal=maxTotal, maxPerSource=peers))
    took = await load(memory, peers, files, pool, 1)
    print(f"memory: loaded in {took:.1f} s ({peers / took:,.0f} registrations/s)")
    await lookups(memory, pool, min(0.5, seconds), 1, 1)
    print(summary("memory backend", await lookups(memory, pool, seconds, 1, 2)))
    print(summary("memory backend, heartbeats", await lookups(memory, pool, seconds, 1, 2, peers), unit="beats/s"))
    del memory

    if binary() is None:
        print("redis: skipped, no redis-server binary")
        return
    server = RedisServer(both=True).start()
    try:
        backend = await redisbackend.connect(
            parse(server.url), reactor, ttl=3600.0, maxTotal=maxTotal, maxPerSource=peers, prefix="bench:"
        )
        took = await load(backend, peers, files, pool, 64)
        info = await backend.client.execute_command("INFO", "memory")
        used = next(line.split(":", 1)[1] for line in info.splitlines() if line.startswith("used_memory_human:"))
        print(f"redis: loaded in {took:.1f} s ({peers / took:,.0f} registrations/s), redis-server holds {used.strip()}")
        pid = server.process.pid
        for inflight in (1, 16):
            await lookups(backend, pool, min(0.5, seconds), inflight, 3)
            cpu = redisCpu(pid)
            result = await lookups(backend, pool, seconds, inflight, 4)
            share = (redisCpu(pid) - cpu) / result["elapsed"]
            print(summary(f"redis, one relay, c={inflight}", result, f"; redis-server CPU {share:.0%}"))
        cpu = redisCpu(pid)
        result = await lookups(backend, pool, seconds, 16, 5, peers)
        share = (redisCpu(pid) - cpu) / result["elapsed"]
        print(summary("redis, one relay, heartbeats c=16", result, f"; redis-server CPU {share:.0%}", unit="beats/s"))
        local = await redisbackend.connect(parse(server.unixURL), reactor, prefix="bench:")
        await lookups(local, pool, min(0.5, seconds), 16, 6)
        cpu = redisCpu(pid)
        result = await lookups(local, pool, seconds, 16, 7)
        share = (redisCpu(pid) - cpu) / result["elapsed"]
        print(summary("redis, one relay, c=16, unix socket", result, f"; redis-server CPU {share:.0%}"))
        await local.close()
        # Two relays: two processes, 16 in flight each, at the same time.
        cpu = redisCpu(pid)
        began = time.perf_counter()
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", server.url, "--seconds", str(seconds),
                 "--peers", str(peers), "--files", str(files), "--seed", str(10 + i)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        from twisted.internet import threads

        outs = await threads.deferToThread(lambda: [w.communicate(timeout=120 + 2 * seconds)[0] for w in workers])
        wall = time.perf_counter() - began
        share = (redisCpu(pid) - cpu) / wall
        results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
        for i, result in enumerate(results):
            print(summary(f"redis, two relays: relay {i + 1} c=16", result))
        joint = {
            "count": sum(r["count"] for r in results),
            "elapsed": max(r["elapsed"] for r in results),
            "cpu": sum(r["cpu"] for r in results),
            "holders": statistics.fmean(r["holders"] for r in results),
            "latencies": [x for r in results for x in r["latencies"]],
        }
        print(summary("redis, two relays together", joint, f"; redis-server CPU about {share:.0%}"))
        await backend.close()
    finally:
        server.cleanup()


def parseArgs(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="100 peers x 10 files, short runs")
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0, help="per contender")
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.smoke:
        options.peers, options.files, options.seconds = 100, 10, 0.3
    return options


if __name__ == "__main__":
    from twisted.internet import defer, task

    options = parseArgs()
    if options.worker:
        task.react(lambda r: defer.ensureDeferred(worker(
            r, options.worker, options.seconds, 16, options.seed, options.peers, options.files)))
    else:
        task.react(lambda r: defer.ensureDeferred(main(r, options)))
