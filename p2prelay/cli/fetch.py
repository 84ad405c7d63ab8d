"""
``p2p-fetch``: the command-line client.

stdout carries only file contents (or the listing or JSON asked for);
everything meant for the person at the terminal goes to stderr.  Every
failure ends as a one-line message and an exit status, never a traceback.

This module is the entry point: :func:`main` parses the options
(:mod:`.options`), installs the reactor and the signal handlers, and
:func:`run` drives one :class:`~.session.Client`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional, Sequence

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred

from .. import wire
from ..addresses import AddressError, relayAddress, splitRelays
from ..client.fetcher import Fetcher, RelayUnreachable
from .console import Console
from .options import parseArgs
from .session import Client


async def run(
    reactor,
    args: argparse.Namespace,
    console: Optional[Console] = None,
    fetcher: Optional[Fetcher] = None,
    interrupt: Optional[Deferred] = None,
) -> int:
    """
    One p2p-fetch run of parsed ``args``; returns the exit status.

    ``console`` (the terminal) and ``fetcher`` (the network) default to the
    real ones; tests pass fakes.  When ``interrupt`` fires (with a signal's
    number), the run stops: downloads in progress are cancelled, what they
    verified stays for a resume (with -o), ``interrupted; N of M MiB kept
    for resume`` goes to stderr and the status is 128 + the number.
    """
    if console is None:
        interactive = not (args.names or args.peers or args.stats or args.list is not None)
        console = Console(reactor, interactive)
    client = Client(reactor, args, console, fetcher)  # parseArgs has checked --relay
    err = client.err
    if interrupt is not None:
        interrupt.addCallback(client.interrupt)
    try:
        if args.stats:
            await client.showStats()
        elif args.peers:
            await client.listPeers()
        elif args.list is not None:
            await client.listFiles(args.list)
        elif args.names:
            words = getattr(args, "words", args.names)
            names = await client.resolveNames(words) if any("," in w for w in words) else args.names
            await client.fetchAll(names)
        else:
            await client.interact()
    except RelayUnreachable as e:
        err(f"p2p-fetch: {client.relayMessage(e)}")
        client.relayUnreachable = True
    except wire.ProtocolError as e:
        err(f"p2p-fetch: relay answered {e}")
        client.failed += 1
    except CancelledError:
        pass  # interrupted while asking the relay
    finally:
        if client.bars is not None:
            client.bars.close()
        if client.interrupted is not None:
            err(f"p2p-fetch: {client.interruptedMessage()}")
        await console.close()
    return client.exitCode()


def needsTLS(args: argparse.Namespace) -> bool:
    """Whether this run may speak TLS: --tls, --relay-ca, or --relay as a description."""
    if args.tls or args.relay_ca:
        return True
    try:
        return any(isinstance(relayAddress(name), str) for name in splitRelays(args.relay))
    except AddressError:
        return True


class _NoOpenSSL:
    """A ``sys.meta_path`` finder under which OpenSSL cannot be imported."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "OpenSSL" or name.startswith("OpenSSL."):
            raise ModuleNotFoundError(f"{name} is left out of a plain TCP p2p-fetch", name=name)
        return None


def installReactor(tls: bool) -> None:
    """
    Import (and so install) the default reactor; without ``tls``, as if
    pyOpenSSL were not installed.

    Twisted's TCP transport and reactor import the whole TLS stack
    (pyOpenSSL, cryptography, service_identity) when they can, which was a
    third of a small fetch's run time; they work without it (Twisted
    supports installs that lack it), and a run that speaks no TLS never
    needs it.  Later imports of OpenSSL are not refused.
    """
    if tls or "twisted.internet.reactor" in sys.modules or "OpenSSL" in sys.modules:
        from twisted.internet import reactor  # noqa: F401

        return
    finder = _NoOpenSSL()
    sys.meta_path.insert(0, finder)
    try:
        from twisted.internet import reactor  # noqa: F401, F811
    finally:
        sys.meta_path.remove(finder)


def catchSignals(reactor, interrupt: Deferred) -> None:
    """
    SIGINT and SIGTERM fire ``interrupt`` with their number (in place of
    the reactor's own handlers, which would just stop it and have every
    transfer in flight fail as if its peer had).  A second one ends the
    process at once.
    """

    def fire(signum: int) -> None:
        if not interrupt.called:
            interrupt.callback(signum)

    def handler(signum: int, frame: object) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        reactor.callFromThread(fire, signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parseArgs(sys.argv[1:] if argv is None else argv)
    installReactor(needsTLS(args))

    async def start(reactor) -> None:
        interrupt: Deferred = Deferred()
        reactor.callWhenRunning(catchSignals, reactor, interrupt)
        code = await run(reactor, args, interrupt=interrupt)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: Deferred.fromCoroutine(start(reactor)))
