"""
``p2p-demo``: the whole network on this machine, narrated, then torn down.

It runs exactly what a user would type -- ``twistd relay``, three
``twistd peernode`` and ``p2p-fetch`` -- as separate processes on
OS-chosen loopback ports, so it doubles as a smoke test of an install.
:class:`Daemon` is also how the end-to-end tests' harness
(``tests/support.py``) starts its daemons.

This is a process supervisor, not a network program, so it drives its
children with plain blocking calls rather than a reactor.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

START_TIMEOUT = 20.0
LISTENING = re.compile(r"(?:relay|peernode) listening on (?P<host>[^\s]+):(?P<port>\d+)")
REGISTERED = re.compile(r"announced (?P<count>\d+) files? \(")

SAMPLES = {
    "peer1": {"sample1.txt": "Hello from peer 1.\nThis is sample1.txt.\n"},
    "peer2": {"sample2.txt": "Hello from peer 2.\nThis is sample2.txt, the one the README fetches.\n"},
    "peer3": {"sample3.txt": "Hello from peer 3.\nThis is sample3.txt.\n"},
}


def script(name: str) -> List[str]:
    """The command for one of our console scripts, from this interpreter's install."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which(name)
    if found:
        return [found]
    if name == "twistd":
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    return [sys.executable, "-c", "from p2prelay.cli.fetch import main; main()"]


class Daemon:
    """
    One twistd process; its log lines are collected so callers can wait
    for "listening on" (to learn an OS-chosen port) or any other event.
    """

    def __init__(
        self, args: Sequence[str], cwd: Optional[str] = None, env=None, prefix: Sequence[str] = ()
    ) -> None:
        # prefix: what runs twistd, e.g. ``ip netns exec NS`` for a namespace.
        command = [*prefix, *script("twistd"), "-n", "--pidfile=", *args]
        self.args = list(args)
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.log: List[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def waitFor(self, pattern: "re.Pattern[str]", timeout: float = START_TIMEOUT) -> "re.Match[str]":
        """The first log line (from now on) matching pattern."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.args[0]} did not log {pattern.pattern!r}:\n" + "".join(self.log[-20:])
                )
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(
                    f"{self.args[0]} exited ({self.process.wait()}):\n" + "".join(self.log[-20:])
                )
            match = pattern.search(line)
            if match:
                return match

    def listening(self) -> tuple[str, int]:
        match = self.waitFor(LISTENING)
        return match.group("host"), int(match.group("port"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def writeSamples(root: Path) -> List[Path]:
    folders = []
    for peer, files in SAMPLES.items():
        folder = root / peer
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
        folders.append(folder)
    return folders


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="p2p-demo",
        description="Start a relay and three peer nodes on loopback, fetch a file "
        "through all three phases, and shut everything down.",
    )
    parser.add_argument(
        "--examples",
        default="examples",
        help="folder with peer1, peer2, peer3 to share (default ./examples; "
        "sample files are generated when it is missing)",
    )
    parser.add_argument("--file", default="sample2.txt", help="file to fetch (default sample2.txt)")
    args = parser.parse_args(argv)
    sys.exit(run(Path(args.examples), args.file))


def run(examples: Path, name: str) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="p2p-demo-"))
    examples = examples.resolve()
    if all((examples / p).is_dir() for p in SAMPLES):
        folders = [examples / p for p in SAMPLES]
    else:
        folders = writeSamples(scratch / "examples")
    daemons: List[Daemon] = []
    try:
        say("== starting the relay")
        relay = Daemon(["relay", "--port", "tcp:0:interface=127.0.0.1"], cwd=str(scratch))
        daemons.append(relay)
        host, port = relay.listening()
        address = f"{host}:{port}"
        say(f"   relay listening on {address}")

        say("== phase 1: registration -- three peer nodes register their files")
        for folder in folders:
            node = Daemon(
                [
                    "peernode",
                    "--relay",
                    address,
                    "--dir",
                    str(folder),
                    "--port",
                    "tcp:0:interface=127.0.0.1",
                ],
                cwd=str(scratch),
            )
            daemons.append(node)
            nhost, nport = node.listening()
            count = node.waitFor(REGISTERED).group("count")
            say(f"   node serving {folder} on {nhost}:{nport} registered {count} file(s)")

        say("== phase 2: discovery -- the client asks the relay for the active peers")
        env = dict(os.environ, P2PRELAY_RELAY=address)
        peers = subprocess.run(
            script("p2p-fetch") + ["--peers"], env=env, capture_output=True, text=True, timeout=30
        )
        sys.stdout.write("".join(f"   {line}\n" for line in peers.stdout.splitlines()))
        if peers.returncode != 0:
            say(f"   p2p-fetch --peers failed: {peers.stderr.strip()}")
            return 1

        say(f"== phase 3: transfer -- p2p-fetch -v {name} (narration on stderr, content on stdout)")
        fetched = subprocess.run(
            script("p2p-fetch") + ["-v", name], env=env, capture_output=True, timeout=60
        )
        for line in fetched.stderr.decode("utf-8", "replace").splitlines():
            say(f"   {line}")
        say("   --- content ---")
        sys.stdout.write(fetched.stdout.decode("utf-8", "replace"))
        say("   ---------------")
        if fetched.returncode != 0:
            say(f"== p2p-fetch exited {fetched.returncode}")
            return 1
        say(f"== fetched {name}: {len(fetched.stdout)} bytes, verified by size and SHA-256")
        return 0
    except (TimeoutError, RuntimeError) as e:
        say(f"== demo failed: {e}")
        return 1
    finally:
        say("== shutting down")
        for daemon in reversed(daemons):
            daemon.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        say("   all daemons stopped")


if __name__ == "__main__":
    main()
