"""
Network namespaces for the tests that need a real network: made by the
test, given addresses of its choosing (10.77.x.y only, inside the
namespaces), and always deleted -- with every process still inside them
-- even when the test fails or is interrupted.

:class:`Namespaces` is the general part (namespaces, veth pairs,
addresses, nft, sysctl, daemons run inside with ``ip netns exec``);
:class:`NATTopology` is a small internet with one home router::

    relay 10.77.1.1 fd77:1::1 --+
                                +-- switch (a bridge) -- pub0 10.77.1.254  router
    client 10.77.1.2 fd77:1::2 -+                         lan0 10.77.2.254  (masquerade
                                                               |            out of pub0,
                                                         node 10.77.2.1     no forwards)

The node's only route is its default route to the router; the relay and
the client have no route at all beyond their own link, so nothing from
the public side can even address the LAN, and the router forwards no
port: the node can connect out (seen as 10.77.1.254), nobody can connect
in.  The router's forward chain also drops new connections that arrive
on its public side, as a home router does.

Skipped with a one-line reason (:func:`skipUnlessNamespaces`) when not
root or when ``ip`` (or ``nft``, if asked for) is missing.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import subprocess
import sys
from typing import List, Optional, Sequence

from twisted.trial.unittest import SkipTest

from p2prelay.cli.demo import Daemon

PREFIX = "p2ptest-"  # every namespace made here is named p2ptest-ROLE-PID-N
_counter = itertools.count(1)
_open: "set[Namespaces]" = set()


def run(*command: str, check: bool = True, input: Optional[str] = None, timeout: float = 30) -> str:
    """Run a command to its end; its stdout, or RuntimeError with its stderr."""
    result = subprocess.run(command, capture_output=True, text=True, input=input, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def namespaces() -> List[str]:
    """The names of the network namespaces that exist now."""
    out = run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unavailable(tools: Sequence[str] = ("ip",)) -> Optional[str]:
    """Why namespaces (and ``tools``) cannot be used here, in one line; None if they can."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"the {tool} command is not installed"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"ip netns add fails: {made.stderr.strip()}"
    finally:  # even when interrupted between the two
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def skipUnlessNamespaces(*tools: str) -> None:
    """Raise SkipTest (one line why) unless root and ``ip`` plus ``tools`` are here."""
    why = unavailable(("ip", *tools))
    if why is not None:
        raise SkipTest(why)


def python(code: str) -> List[str]:
    """A command running ``code`` with this interpreter (which has the project installed)."""
    return [sys.executable, "-c", code]


class Namespaces:
    """
    The namespaces one test makes, and what runs in them.  :meth:`close`
    stops the daemons, kills any other process left inside and deletes
    the namespaces (with them their veth ends, bridges, nft tables); it is
    safe to call twice and after a partial setup, and a signal during it
    does not cut it short.
    """

    def __init__(self, tag: Optional[str] = None) -> None:
        self.tag = tag or f"{os.getpid()}-{next(_counter)}"
        self.made: List[str] = []
        self.daemons: List[Daemon] = []
        _open.add(self)

    def add(self, role: str) -> str:
        """A new namespace for ``role`` with its loopback up; its name."""
        name = f"{PREFIX}{role}-{self.tag}"
        # Recorded before it exists: an interruption between the two must not
        # leave a namespace nobody deletes (deleting a missing one is harmless).
        self.made.append(name)
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, ns: str, name: str, peerNs: str, peerName: str) -> None:
        """A veth pair: ``name`` in ``ns``, ``peerName`` in ``peerNs``, both up."""
        run("ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", peerName,
            "netns", peerNs)  # fmt: skip
        run("ip", "-n", ns, "link", "set", name, "up")
        run("ip", "-n", peerNs, "link", "set", peerName, "up")

    def bridge(self, ns: str, name: str, ports: Sequence[str]) -> None:
        """A bridge ``name`` in ``ns`` joining ``ports`` (interfaces already there)."""
        run("ip", "-n", ns, "link", "add", name, "type", "bridge")
        run("ip", "-n", ns, "link", "set", name, "up")
        for port in ports:
            run("ip", "-n", ns, "link", "set", port, "master", name)

    def address(self, ns: str, dev: str, cidr: str, *flags: str) -> None:
        run("ip", "-n", ns, "addr", "add", cidr, "dev", dev, *flags)

    def route(self, ns: str, *spec: str) -> None:
        run("ip", "-n", ns, "route", "add", *spec)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        """Set ``key`` (e.g. net.ipv4.ip_forward) inside ``ns`` (no procps needed)."""
        path = "/proc/sys/" + key.replace(".", "/")
        run(*self.inside(ns), sys.executable, "-c", f"open({path!r}, 'w').write({value!r})")

    def nft(self, ns: str, *commands: str) -> None:
        """Each of ``commands`` as one ``nft`` invocation inside ``ns``."""
        for command in commands:
            run(*self.inside(ns), "nft", command)

    def inside(self, ns: str) -> List[str]:
        """The prefix that runs a command inside ``ns``."""
        return ["ip", "netns", "exec", ns]

    def runIn(self, ns: str, command: Sequence[str], timeout: float = 60, **kwargs):
        """Run ``command`` inside ``ns`` to its end (a CompletedProcess, bytes)."""
        return subprocess.run(
            [*self.inside(ns), *command], capture_output=True, timeout=timeout, **kwargs
        )

    def daemon(self, ns: str, args: Sequence[str], cwd: str) -> Daemon:
        """``twistd -n --pidfile= ARGS`` (our install's) inside ``ns``; stopped by close()."""
        d = Daemon(list(args), cwd=cwd, prefix=self.inside(ns))
        self.daemons.append(d)
        return d

    def close(self) -> None:
        held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.daemons:
                self.daemons.pop().stop(signal.SIGKILL)
            while self.made:
                ns = self.made.pop()
                # A namespace lives on while a process is inside it: whatever a
                # test started in it goes first.
                for pid in run("ip", "netns", "pids", ns, check=False).split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ValueError, ProcessLookupError):
                        pass
                run("ip", "netns", "del", ns, check=False)
            _open.discard(self)
        finally:
            for s, handler in held.items():
                signal.signal(s, handler)


@atexit.register
def _deleteLeftovers() -> None:
    """A crashed or interrupted test run's namespaces do not outlive it."""
    for made in list(_open):
        made.close()


class NATTopology(Namespaces):
    """The small internet drawn in the module's docstring; :meth:`open` builds it."""

    RELAY = "10.77.1.1"
    CLIENT = "10.77.1.2"
    ROUTER_PUBLIC = "10.77.1.254"
    # The public link speaks IPv6 too (the LAN does not): fd77:1::/64.
    RELAY6 = "fd77:1::1"
    CLIENT6 = "fd77:1::2"
    ROUTER_LAN = "10.77.2.254"
    NODE = "10.77.2.1"
    PUBLIC_IF = "pub0"  # the router's public interface: masquerade out of it
    LAN_IF = "lan0"

    def open(self) -> "NATTopology":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.switch = self.add("switch")
        self.relay = self.add("relay")
        self.client = self.add("client")
        self.router = self.add("router")
        self.node = self.add("node")
        # The public link: one bridge in its own namespace, a veth port each.
        self.veth(self.relay, "pub", self.switch, "relay")
        self.veth(self.client, "pub", self.switch, "client")
        self.veth(self.router, self.PUBLIC_IF, self.switch, "router")
        self.bridge(self.switch, "br0", ["relay", "client", "router"])
        self.address(self.relay, "pub", f"{self.RELAY}/24")
        self.address(self.client, "pub", f"{self.CLIENT}/24")
        self.address(self.router, self.PUBLIC_IF, f"{self.ROUTER_PUBLIC}/24")
        # nodad: usable at once, not after duplicate address detection.
        self.address(self.relay, "pub", f"{self.RELAY6}/64", "nodad")
        self.address(self.client, "pub", f"{self.CLIENT6}/64", "nodad")
        # The LAN behind the router.
        self.veth(self.router, self.LAN_IF, self.node, "lan")
        self.address(self.router, self.LAN_IF, f"{self.ROUTER_LAN}/24")
        self.address(self.node, "lan", f"{self.NODE}/24")
        self.route(self.node, "default", "via", self.ROUTER_LAN)
        self.sysctl(self.router, "net.ipv4.ip_forward", "1")
        try:
            self.nft(self.router, "add table ip nat")
        except RuntimeError as e:  # a kernel without nf_tables NAT: not this test's failure
            raise SkipTest(f"nft cannot make a nat table here: {e}")
        self.nft(
            self.router,
            "add chain ip nat postrouting { type nat hook postrouting priority 100 ; }",
            f'add rule ip nat postrouting oifname "{self.PUBLIC_IF}" masquerade',
            "add table ip filter",
            "add chain ip filter forward { type filter hook forward priority 0 ; policy drop ; }",
            "add rule ip filter forward ct state established,related accept",
            f'add rule ip filter forward iifname "{self.LAN_IF}" accept',
        )


# A listener and a connector, each a tiny Python program run inside a namespace.

LISTENER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
s.settimeout(float(sys.argv[2]))
print(s.getsockname()[1], flush=True)
try:
    c, peer = s.accept()
except socket.timeout:
    print("nobody", flush=True)
else:
    print(peer[0], flush=True)
"""

CONNECTOR = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError as e:
    print(type(e).__name__, e.errno, flush=True)
else:
    print("connected", flush=True)
"""


class Listener:
    """A TCP listener inside a namespace that accepts one connection and says from where."""

    def __init__(self, made: Namespaces, ns: str, host: str, timeout: float = 10) -> None:
        self.process = subprocess.Popen(
            [*made.inside(ns), *python(LISTENER), host, str(timeout)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def peer(self, timeout: float = 20) -> str:
        """The address the one connection came from, or 'nobody'."""
        out, _ = self.process.communicate(timeout=timeout)
        return out.strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def connect(made: Namespaces, ns: str, host: str, port: int, timeout: float = 3) -> str:
    """Connect from inside ``ns``: "connected", or the error's class name and errno."""
    result = made.runIn(ns, python(CONNECTOR) + [host, str(port), str(timeout)], text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()

