#!/usr/bin/env python3
"""
The throughput cost of TLS: one file fetched from a node's file server over
its plain port and over its TLS port (TLS 1.3, pinned to the node's
Ed25519 key), on loopback.

    python benchmarks/tls.py                 # 256 MiB, 5 runs each
    python benchmarks/tls.py --size 64 --runs 7

The server is the node's own ``FileServerFactory``, listening on a plain
port and behind ``p2prelay.tls.nodeTLSFactory``, in a child process (so
server and client each have a core, as two machines would); the client
sends one GET per run and hashes the body as ``p2p-fetch`` does (SHA-256),
writing nothing to disk.  Runs alternate plain/TLS so drift in the
machine's load hits both alike; figures are medians, the ratio is TLS
throughput over plain.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import makeFile  # noqa: E402

MiB = 1024 * 1024
RECEIVE_SIZE = 256 * 1024  # as the client's GetProtocol reads


def serve(folder: str) -> None:
    """The child: a node's file server on a plain and a TLS port; prints them."""
    from twisted.internet import reactor

    from p2prelay import identity, tls
    from p2prelay.listening import ListeningService
    from p2prelay.node.server import FileServerFactory
    from p2prelay.node.share import SharedDirectory

    key = identity.NodeKey.generate()
    share = SharedDirectory(folder)
    files = FileServerFactory(share, reactor, key=key)
    plain = ListeningService(reactor, "tcp:0:interface=127.0.0.1", files, "plain")
    secure = ListeningService(reactor, "tcp:0:interface=127.0.0.1", tls.nodeTLSFactory(key, files, reactor), "tls")

    async def start() -> None:
        await share.scan()
        plain.startService()
        secure.startService()
        ports = [(await s.whenListening).getHost().port for s in (plain, secure)]
        print(json.dumps({"plain": ports[0], "tls": ports[1], "key": key.public}), flush=True)

    from twisted.internet.defer import ensureDeferred

    reactor.callWhenRunning(lambda: ensureDeferred(start()).addErrback(lambda f: (f.printTraceback(), reactor.stop())))
    reactor.run()


def client(ports: dict, name: str, size: int, sha256: str, order: list[str]) -> dict[str, list[float]]:
    """Fetch the file once per entry of ``order``; seconds per transport."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred
    from twisted.internet.protocol import Factory, Protocol

    from p2prelay import tls, wire
    from p2prelay.addresses import tcpEndpoint

    class Get(Protocol):
        def __init__(self) -> None:
            self.done: Deferred[None] = Deferred()
            self.head = b""
            self.body = 0
            self.hash = hashlib.sha256()

        def connectionMade(self) -> None:
            if hasattr(self.transport, "bufferSize"):
                self.transport.bufferSize = RECEIVE_SIZE
            self.transport.write(wire.request(wire.GET, name=name))

        def dataReceived(self, data: bytes) -> None:
            if self.head is not None:
                self.head += data
                if b"\n" not in self.head:
                    return
                line, _, data = self.head.partition(b"\n")
                self.head = None
                status = wire.parseLine(line.rstrip(b"\r"))
                if status.status != wire.OK:
                    raise RuntimeError(f"server said {status}")
            self.body += len(data)
            self.hash.update(data)

        def connectionLost(self, reason=None) -> None:
            if self.body != size or self.hash.hexdigest() != sha256:
                self.done.errback(RuntimeError(f"got {self.body} bytes, wrong or short"))
            else:
                self.done.callback(None)

    class One(Factory):
        noisy = False

        def __init__(self, proto):
            self.proto = proto

        def buildProtocol(self, addr):
            return self.proto

    times: dict[str, list[float]] = {"plain": [], "tls": []}

    async def run() -> None:
        for kind in order:
            if kind == "tls":
                endpoint = tls.pinnedTLSEndpoint(reactor, "127.0.0.1", ports["tls"], ports["key"], 30)
            else:
                endpoint = tcpEndpoint(reactor, "127.0.0.1", ports["plain"], timeout=30)
            proto = Get()
            started = time.perf_counter()
            await endpoint.connect(One(proto))
            await proto.done
            times[kind].append(time.perf_counter() - started)
            print(f"  {kind:5} {size / MiB / times[kind][-1]:8.1f} MiB/s", flush=True)

    failures = []

    def main() -> None:
        d = ensureDeferred(run())
        d.addErrback(failures.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(main)
    reactor.run()
    if failures:
        failures[0].raiseException()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="MiB (default 256)")
    parser.add_argument("--runs", type=int, default=5, help="runs per transport (default 5)")
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="1 MiB, one run each: does it work")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.runs = 1, 1
    if args.serve:
        serve(args.serve)
        return
    size = args.size * MiB
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "share"
        folder.mkdir()
        sha256 = makeFile(folder / "bench.bin", size)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(folder)], stdout=subprocess.PIPE, text=True
        )
        try:
            ports = json.loads(server.stdout.readline())
            order = ["plain", "tls"] * args.runs
            print(f"{args.size} MiB, {args.runs} runs each, alternating:")
            times = client(ports, "bench.bin", size, sha256, order)
        finally:
            server.terminate()
            server.wait()
    plain = args.size / statistics.median(times["plain"])
    secure = args.size / statistics.median(times["tls"])
    print(f"plain TCP: {plain:8.1f} MiB/s (median)")
    print(f"TLS 1.3:   {secure:8.1f} MiB/s (median, Ed25519 pinned, {_cipher()})")
    print(f"TLS / plain: {secure / plain:.2f}")


def _cipher() -> str:
    from OpenSSL import SSL

    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()


if __name__ == "__main__":
    main()
