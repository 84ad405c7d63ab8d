"""
What the tests share: in-memory connections and clock stepping, a fake
terminal for the console commands, and the harness that runs the real
daemons for the end-to-end tests.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import wire
from p2prelay.cli.console import Console
from p2prelay.cli.demo import LISTENING, REGISTERED, Daemon, script

# In memory.

CLIENT = IPv4Address("TCP", "127.0.0.1", 45678)


def flushPumps(pumps: Iterable[iosim.IOPump]) -> None:
    """Pump every in-memory connection until no bytes move on any of them."""
    moved = True
    while moved:
        moved = False
        for pump in list(pumps):
            moved = pump.flush() or moved


def syncThread(f, *args):
    """A ``runInThread`` that runs the call at once, in the test's thread."""
    return maybeDeferred(f, *args)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class MemoryNetwork:
    """
    Client endpoints that connect, in memory, to server factories; every
    connection's pump is kept so :meth:`flush` can move all the bytes.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pumps: List[iosim.IOPump] = []
        self.connections: List[str] = []

    def endpoint(self, label: str, factory=None, error: Optional[Exception] = None) -> "MemoryEndpoint":
        return MemoryEndpoint(self, label, factory, error)

    def flush(self) -> None:
        flushPumps(self.pumps)


class MemoryEndpoint:
    """A client endpoint reaching one server factory in memory (or failing with ``error``)."""

    def __init__(self, network: MemoryNetwork, label: str, factory=None, error=None) -> None:
        self.network = network
        self.label = label
        self.factory = factory
        self.error = error

    def connect(self, clientFactory):
        self.network.connections.append(self.label)
        if self.error is not None:
            return fail(self.error)
        server = self.factory.buildProtocol(CLIENT)
        client = clientFactory.buildProtocol(None)
        serverIO = iosim.FakeTransport(server, True, peerAddress=CLIENT)
        clientIO = iosim.FakeTransport(client, False)
        self.network.pumps.append(
            iosim.connect(server, serverIO, client, clientIO, greet=False, clock=self.network.clock)
        )
        return succeed(client)


def drive(d: Deferred, clock: Clock, network: MemoryNetwork, step: float = 1.0, rounds: int = 1000) -> Deferred:
    """
    Let ``d`` run to its end: pump every connection, then step the clock,
    until it fires or ``rounds`` steps have passed (then it is returned
    unfired, for the test to fail on).
    """
    for _ in range(rounds):
        network.flush()
        if d.called:
            break
        clock.advance(step)
    return d


# The terminal.


class FakeStdio(StringTransport):
    """
    What ``StandardIO(protocol)`` is to a protocol, in memory: input is
    :meth:`type`-d, output collects in ``value()``.

    A pull producer (the console's file sender) is asked for one chunk at
    once, as a real stdout does; with ``autoDrain`` it is asked again and
    again, as if each chunk left at once, else only on :meth:`drain`.
    ``closeAfter=N`` behaves like ``| head -c N``: the reader goes away once
    N bytes are out.  ``transcript`` records (stream, bytes) in order,
    shared with the terminal's stderr.
    """

    def __init__(
        self,
        protocol,
        *,
        autoDrain: bool = True,
        closeAfter: Optional[int] = None,
        transcript: Optional[list] = None,
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.autoDrain = autoDrain
        self.closeAfter = closeAfter
        self.transcript = transcript if transcript is not None else []
        self.writeClosed = False
        protocol.makeConnection(self)

    # Input.

    def type(self, data: Union[str, bytes]) -> None:
        self.protocol.dataReceived(data.encode("utf-8") if isinstance(data, str) else data)

    def closeRead(self) -> None:
        """End of input (the user pressed Ctrl-D)."""
        self.protocol.readConnectionLost()

    # Output.

    def write(self, data: bytes) -> None:
        if self.writeClosed:
            return
        if self.closeAfter is not None and len(self.value()) + len(data) >= self.closeAfter:
            data = data[: self.closeAfter - len(self.value())]
            super().write(data)
            self.transcript.append(("stdout", data))
            self.readerGone()
            return
        super().write(data)
        self.transcript.append(("stdout", data))

    def registerProducer(self, producer, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()
            while self.autoDrain and self.producer is producer:
                producer.resumeProducing()

    def drain(self) -> None:
        """Everything written so far has left: a pull producer may send more."""
        if self.producer is not None and not self.streaming:
            self.producer.resumeProducing()

    def readerGone(self) -> None:
        """The reading end closed (EPIPE): stop the producer, lose the write side."""
        self.writeClosed = True
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.writeConnectionLost()

    def loseWriteConnection(self) -> None:
        if not self.writeClosed:
            self.writeClosed = True
            self.protocol.writeConnectionLost()


class FakeTerminal:
    """
    A :class:`Console` on a :class:`FakeStdio`, its stderr captured: the
    person at the terminal, for in-process tests of a command's ``run()``.
    """

    def __init__(self, **stdioOptions) -> None:
        self.transcript: list = []
        self.console = Console(
            None,
            interactive=True,
            stdio=lambda protocol: FakeStdio(protocol, transcript=self.transcript, **stdioOptions),
            stderr=lambda text: self.transcript.append(("stderr", text.encode("utf-8"))),
        )
        self.stdio: FakeStdio = self.console.stdio

    def type(self, text: str) -> None:
        self.stdio.type(text)

    def eof(self) -> None:
        self.stdio.closeRead()

    @property
    def stdout(self) -> bytes:
        return self.stdio.value()

    @property
    def stderr(self) -> str:
        return b"".join(data for stream, data in self.transcript if stream == "stderr").decode("utf-8")


# Real daemons, for the end-to-end tests.

LOOPBACK = "tcp:0:interface=127.0.0.1"
_running: "set[Daemon]" = set()


@atexit.register
def _killLeftovers() -> None:
    """Whatever a crashed test run left behind does not outlive it."""
    for daemon in list(_running):
        if daemon.process.poll() is None:
            daemon.process.kill()


def waitUntil(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Poll an observable condition; seconds until it held, or fail past ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - started


def relayQuery(address: str, payload: bytes, timeout: float = 10.0) -> List[wire.Message]:
    """
    One request to a relay over a plain blocking socket: its status line
    (a 2xx, else ProtocolError) followed by the items of its list, if any.
    """
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(payload)
        reader = s.makefile("rb")
        status = wire.parseLine(reader.readline().rstrip(b"\n"))
        if status.status is None or not 200 <= status.status < 300:
            raise wire.ProtocolError(status.status or 0, status.text)
        count = int(status.get("count", "0"))
        items = [wire.parseLine(reader.readline().rstrip(b"\n")) for _ in range(count)]
        if status.get("count") is not None:
            end = wire.parseLine(reader.readline().rstrip(b"\n"))
            assert end.word == wire.END, end
        return [status, *items]


class Network:
    """
    A relay and any number of nodes, as real ``twistd`` processes on
    OS-chosen loopback ports, in a scratch folder of their own; and the
    commands a user would run against them.  :meth:`close` stops every
    process it started and removes the folder.
    """

    def __init__(self, root: Optional[Path] = None, relayArgs: Sequence[str] = ()) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="p2prelay-e2e-")).resolve()
        self.daemons: List[Daemon] = []
        self.nodes: List[Daemon] = []
        try:
            self.relay = self.startRelay(LOOPBACK, *relayArgs)
        except BaseException:
            self.close()
            raise

    # Daemons.

    def daemon(self, args: Sequence[str]) -> Daemon:
        d = Daemon(list(args), cwd=str(self.root))
        self.daemons.append(d)
        _running.add(d)
        return d

    def startRelay(self, port: str, *extra: str) -> Daemon:
        """Start a relay on ``port`` (a server endpoint) and wait until it listens."""
        relay = self.daemon(["relay", "--port", port, *extra])
        host, number = relay.listening()
        self.address = f"{host}:{number}"
        self.relay = relay
        return relay

    def restartRelay(self, *extra: str) -> Daemon:
        """SIGKILL the relay and start a new one on the same port."""
        port = self.address.rsplit(":", 1)[1]
        self.relay.stop(signal.SIGKILL)
        return self.startRelay(f"tcp:{port}:interface=127.0.0.1", *extra)

    def startNode(self, folder: Path, *extra: str) -> Daemon:
        """Start a node sharing ``folder``; see :meth:`registered`."""
        return self.daemon(
            ["peernode", "--relay", self.address, "--dir", str(folder), "--port", LOOPBACK, *extra]
        )

    def registered(self, node: Daemon) -> Daemon:
        """Wait until a started node has registered with the relay."""
        node.waitFor(REGISTERED)
        self.nodes.append(node)
        return node

    def node(self, folder: Path, *extra: str) -> Daemon:
        return self.registered(self.startNode(folder, *extra))

    def nodesInParallel(self, *specs: Sequence) -> List[Daemon]:
        """Start several nodes at once, each ``(folder, *extra)``, and wait for all."""
        started = [self.startNode(folder, *extra) for folder, *extra in specs]
        return [self.registered(node) for node in started]

    def listening(self, daemon: Daemon) -> tuple[str, int]:
        """Where a started daemon listens (TCP), as its log says."""
        for line in daemon.log:
            match = LISTENING.search(line)
            if match:
                return match.group("host"), int(match.group("port"))
        host, port = daemon.listening()
        return host, port

    def close(self) -> None:
        for d in self.daemons:
            d.stop(signal.SIGKILL)
            _running.discard(d)
        shutil.rmtree(self.root, ignore_errors=True)

    # Files.

    def folder(self, name: str, files: Dict[str, Union[str, bytes]]) -> Path:
        folder = self.root / name
        folder.mkdir()
        for fname, content in files.items():
            path = folder / fname
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return folder

    # Asking the relay.

    def query(self, payload: bytes) -> List[wire.Message]:
        return relayQuery(self.address, payload)

    def peers(self) -> List[wire.Message]:
        """The relay's active peers (PEER items), or fails if it is not answering."""
        return self.query(wire.request(wire.PEERS))[1:]

    def peerCount(self) -> int:
        """How many peers the relay lists; -1 while it does not answer."""
        try:
            return len(self.peers())
        except OSError:
            return -1

    def registrations(self, port: int) -> int:
        """How often the relay has logged registering the node serving on ``port``."""
        pattern = re.compile(rf"registered \S+ at \S+:{port} with ")
        return sum(1 for line in self.relay.log if pattern.search(line))

    def files(self, pattern: str = "") -> List[wire.Message]:
        """The relay's FILE items matching ``pattern``."""
        return self.query(wire.request(wire.SEARCH, pattern=pattern))[1:]

    # Commands.

    def env(self) -> Dict[str, str]:
        return dict(os.environ, P2PRELAY_RELAY=self.address)

    def fetch(self, *args: str, input: Optional[bytes] = None, timeout: float = 60):
        """Run ``p2p-fetch ARGS`` to its end against this relay."""
        return subprocess.run(
            script("p2p-fetch") + list(args),
            env=self.env(),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=str(self.root),
        )


class NetworkTestCase(SynchronousTestCase):
    """
    End-to-end tests that share one :class:`Network` per class: started
    in ``setUpClass`` (relay, then :meth:`startNodes`), torn down in
    ``tearDownClass`` -- or at once if starting it failed.
    """

    net: Network
    relayArgs: Sequence[str] = ()

    @classmethod
    def setUpClass(cls) -> None:
        cls.net = Network(relayArgs=cls.relayArgs)
        try:
            cls.startNodes(cls.net)
        except BaseException:
            cls.net.close()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.net.close()

    @classmethod
    def startNodes(cls, net: Network) -> None:
        """Start the class's nodes; none by default."""
