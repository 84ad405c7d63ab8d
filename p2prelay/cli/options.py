"""
What the ``p2p-fetch`` command line asks for: its options and their checks
(:func:`parseArgs`, a usage error exits 2), the exit statuses, and the
:class:`~p2prelay.client.fetcher.Fetcher` the options describe (:func:`buildFetcher`).
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from twisted.internet.defer import fail
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from .. import __version__, wire
from ..addresses import (
    AddressError,
    FailoverEndpoint,
    checkClientAddress,
    clientEndpoint,
    failoverEndpoint,
    relayAddress,
    splitRelays,
)
from ..client.relay import secretProver
from ..client.fetcher import (
    CONNECT_TIMEOUT,
    MAX_HOLDERS,
    PEER_TIMEOUT,
    SOURCES,
    SPEED_LIMIT,
    SPEED_TIME,
    Fetcher,
    WALK,
    PeerAddress,
)
from .console import splitNames

EXIT_OK = 0
EXIT_NOT_FETCHED = 1
EXIT_USAGE = 2  # argparse exits with this status on usage errors
EXIT_RELAY = 3
EXIT_SIGNAL = 128  # + the signal's number: 130 after Ctrl-C (SIGINT), 143 after SIGTERM

# The UDP block sizes, as p2prelay.udp has them (test_cli_fetch checks): the
# UDP code is imported only by a fetch that uses it.
UDP_DEFAULT_BLOCK = 1400
UDP_MIN_BLOCK = 64
UDP_MAX_BLOCK = 60 * 1024

DEFAULT_RELAY = "localhost:8000"
RELAY_ENV = "P2PRELAY_RELAY"

EPILOG = """\
exit status:
  0  every file was fetched (or the listing was printed)
  1  some file could not be fetched (not found, every peer failed, exists)
  2  usage error
  3  the relay could not be reached
  130  interrupted (Ctrl-C; 143 after SIGTERM)

With one NAME and no -o, the verified file's bytes are written to stdout and
nothing else is; a file of several pieces is written piece by piece, each as
soon as it is verified (several NAMEs are each fetched whole first, and
printed in the order given). With no NAME, an interactive prompt (on stderr)
asks for names until EOF or 'quit'.

With -o, a file of several pieces is downloaded into NAME.part beside its
final name, with a journal of the verified pieces (NAME.part.journal); an
interrupted or failed download keeps both, and the next p2p-fetch -o of the
same name resumes with only the missing pieces (--no-resume starts over).
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2p-fetch",
        description="Fetch files from a p2prelay network: ask the relay who holds "
        "them, then download directly from the peers, failing over from one to the next.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="file names to fetch; a comma list such as 'a.txt, b.txt' works too",
    )
    p.add_argument(
        "--relay",
        default=os.environ.get(RELAY_ENV, DEFAULT_RELAY),
        help=f"relay as HOST:PORT or a client endpoint description; several as a comma "
        f"list (a.example:8000,b.example:8000, at most 8), asked in order with failover "
        f"(default: ${RELAY_ENV}, else {DEFAULT_RELAY})",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="save files into DIR instead of printing; '-o -' prints to stdout even binary "
        "files to a terminal",
    )
    p.add_argument("--force", action="store_true", help="with -o, replace files that exist")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="with -o, ignore (and remove) what an interrupted download of the same file kept",
    )
    p.add_argument(
        "--sources",
        type=int,
        default=SOURCES,
        metavar="N",
        help=f"holders a file of several pieces is fetched from at once (default {SOURCES}; "
        "1: one peer at a time)",
    )
    p.add_argument(
        "--parallel", type=int, default=4, metavar="N", help="files fetched at once (default 4)"
    )
    p.add_argument("--peers", action="store_true", help="list the active peers and exit")
    p.add_argument(
        "--stats", action="store_true", help="print the relay's headline figures (STATS) and exit"
    )
    p.add_argument(
        "--list",
        nargs="?",
        const="",
        metavar="PATTERN",
        help="list the network's files (substring or glob such as '*.txt') and exit",
    )
    p.add_argument(
        "--json", action="store_true", help="machine-readable output: JSON lines on stdout"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=PEER_TIMEOUT,
        metavar="SECONDS",
        help=f"idle timeout of every connection, and the relay's connect timeout "
        f"(default {PEER_TIMEOUT:g})",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds to connect to a peer, and again for its first answer (default {CONNECT_TIMEOUT:g})",
    )
    p.add_argument(
        "--speed-limit",
        type=float,
        default=SPEED_LIMIT,
        metavar="BYTES_PER_S",
        help=f"abandon a peer sending slower than this for --speed-time seconds, as curl "
        f"(default {SPEED_LIMIT}; 0 turns it off)",
    )
    p.add_argument(
        "--speed-time",
        type=float,
        default=SPEED_TIME,
        metavar="SECONDS",
        help=f"see --speed-limit (default {SPEED_TIME:g})",
    )
    p.add_argument(
        "--max-holders",
        type=int,
        default=MAX_HOLDERS,
        metavar="N",
        help=f"peers contacted per file at most (default {MAX_HOLDERS})",
    )
    p.add_argument(
        "--walk",
        type=int,
        default=WALK,
        metavar="N",
        help=f"for a name the relay's index lists no holder of, ask at most N other active "
        f"peers (default {WALK}; 0: none)",
    )
    p.add_argument(
        "--secret-file",
        metavar="PATH",
        help="the shared secret of a private relay (one that asks clients to prove it)",
    )
    p.add_argument(
        "--udp", action="store_true", help="fetch over UDP instead of TCP (the relay stays on TCP)"
    )
    p.add_argument(
        "--no-listen",
        action="store_true",
        help="never accept connections, e.g. behind NAT: reach firewalled peers via the relay "
        "(default: ask a firewalled peer to connect back to an ephemeral port first)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="fetch only over TLS, from peers that offer it, checking each peer's key "
        "against the one the relay lists",
    )
    p.add_argument(
        "--relay-ca",
        metavar="FILE",
        help="CA certificates (PEM) to verify the relay with: --relay (HOST:PORT, or each "
        "of a comma list) is then reached over TLS",
    )
    p.add_argument(
        "--udp-block",
        type=int,
        default=None,
        metavar="BYTES",
        help=f"UDP block size (default {UDP_DEFAULT_BLOCK}, fits a 1500-byte Ethernet MTU, "
        f"or {UDP_MAX_BLOCK} towards a loopback address; up to {UDP_MAX_BLOCK} on "
        "jumbo-frame links)",
    )
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        action="store_true",
        help="progress bars on stderr even when it is not a terminal (default: on a terminal, "
        "unless the file's contents are printed to that terminal)",
    )
    shown.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="narrate each phase on stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def parseArgs(argv: Sequence[str]) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    args.words = list(args.names)  # as typed: a comma may be part of a name (see resolveNames)
    args.names = splitNames(args.names)
    # -o -: stdout, explicitly (binary contents to a terminal too).
    args.stdout = args.output == "-"
    if args.stdout:
        args.output = None
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    if args.connect_timeout <= 0:
        p.error("--connect-timeout must be positive")
    if args.speed_limit < 0:
        p.error("--speed-limit must not be negative")
    if args.speed_time <= 0:
        p.error("--speed-time must be positive")
    if args.max_holders < 1:
        p.error("--max-holders must be at least 1")
    if args.sources < 1:
        p.error("--sources must be at least 1")
    if args.walk < 0:
        p.error("--walk must not be negative")
    args.secret = None
    if args.secret_file:
        from ..identity import IdentityError, loadSecret

        try:
            args.secret = loadSecret(args.secret_file)
        except IdentityError as e:
            p.error(f"--secret-file: {e}")
    if args.udp_block is not None and not UDP_MIN_BLOCK <= args.udp_block <= UDP_MAX_BLOCK:
        p.error(f"--udp-block must be {UDP_MIN_BLOCK}..{UDP_MAX_BLOCK}")
    if args.tls and args.udp:
        p.error("--tls and --udp exclude each other")
    if args.relay_ca:
        from ..tls import TLSConfigError, loadCAFile  # imports OpenSSL: only for a TLS relay

        try:
            loadCAFile(args.relay_ca)
        except TLSConfigError as e:
            p.error(f"--relay-ca: {e}")
        try:
            names = splitRelays(args.relay)
        except AddressError as e:
            p.error(f"--relay: {e}")
        for name in names:
            try:
                address = relayAddress(name.strip().removeprefix("tls:"))
            except AddressError as e:
                p.error(f"--relay: {e}" if len(names) == 1 else f"--relay: {name}: {e}")
            if isinstance(address, str):
                p.error("--relay: with --relay-ca, give the relay as a port, a host or HOST:PORT"
                        + ("" if len(names) == 1 else f" (not {name!r})"))
    if args.force and not args.output:
        p.error("--force only makes sense with -o DIR")
    if args.no_resume and not args.output:
        p.error("--no-resume only makes sense with -o DIR")
    if args.json and args.names and not args.output:
        p.error("--json with file names needs -o DIR (stdout carries the JSON)")
    if args.stats and (args.peers or args.list is not None or args.names):
        p.error("--stats takes no file names, --peers or --list")
    if args.peers and args.list is not None:
        p.error("--peers and --list exclude each other; ask for one at a time")
    if args.output is not None and args.output != "-" and Path(args.output).exists() and not Path(args.output).is_dir():
        p.error(f"-o: {args.output} is not a folder")
    if (args.peers or args.list is not None) and args.names:
        p.error("--peers and --list take no file names")
    try:
        checkClientAddress(args.relay)
    except AddressError as e:
        p.error(f"--relay: {e}")
    for name in args.names:
        try:
            wire.checkName(name)
        except wire.ProtocolError as e:
            p.error(f"{name!r}: {e.message}")
    return args

class NoTLS(Exception):
    """With --tls: the relay lists no TLS port (and key) for this peer."""


@implementer(IStreamClientEndpoint)
class _Refused:
    def __init__(self, why: str = "offers no TLS") -> None:
        self.why = why

    def connect(self, factory):
        return fail(NoTLS(self.why))


def tlsPeerEndpoint(reactor, timeout: float) -> Callable[[PeerAddress], object]:
    """
    --tls: a peer's TLS port, pinned to the key the relay lists for it; a
    peer listed without one, or firewalled (a path through the relay is
    not TLS to the peer), is a failed attempt (and not reported dead).
    """
    from ..tls import pinnedTLSEndpoint

    def endpoint(peer: PeerAddress):
        if peer.firewalled:
            return _Refused("is firewalled: --tls needs a direct connection")
        if peer.tls is None or peer.key is None:
            return _Refused()
        return pinnedTLSEndpoint(reactor, peer.host, peer.tls, peer.key, timeout)

    return endpoint


def buildFetcher(
    reactor,
    args: argparse.Namespace,
    report: Callable[[str], None],
    *,
    relay=None,
    peerEndpoint: Optional[Callable[[PeerAddress], object]] = None,
) -> Fetcher:
    """
    The Fetcher the options ask for; failed attempts (and, with ``-v``,
    every phase) are told to ``report``.  ``relay`` and ``peerEndpoint``
    replace the endpoints made from ``--relay`` and the peers' addresses.
    """
    if relay is None:
        if getattr(args, "relay_ca", None):
            from ..tls import relayClientEndpoint

            def tlsRelay(name: str):
                host, port = relayAddress(name.strip().removeprefix("tls:"))  # parseArgs checked it
                return relayClientEndpoint(reactor, host, port, args.relay_ca, args.timeout)

            if "," in args.relay:
                relay = failoverEndpoint(args.relay, tlsRelay)
            else:
                relay = tlsRelay(args.relay)
        else:
            relay = clientEndpoint(reactor, args.relay, timeout=args.timeout)
    if args.verbose and isinstance(relay, FailoverEndpoint):
        relay.narrate = report  # "relay a:8000 unreachable (connection refused); trying b:8001"
    if peerEndpoint is None and getattr(args, "tls", False):
        peerEndpoint = tlsPeerEndpoint(reactor, args.connect_timeout)
    fetcher = Fetcher(
        reactor,
        relay,
        timeout=args.timeout,
        report=report,
        verbose=report if args.verbose else (lambda line: None),
        peerEndpoint=peerEndpoint,
        connectTimeout=args.connect_timeout,
        speedLimit=args.speed_limit,
        speedTime=args.speed_time,
        maxHolders=args.max_holders,
        prover=secretProver(args.secret) if getattr(args, "secret", None) else None,
        sources=getattr(args, "sources", SOURCES),
        walk=getattr(args, "walk", WALK),
        listen=not getattr(args, "no_listen", False),
    )
    if args.udp:
        fetcher.transfer = functools.partial(fetcher.transferUDP, blockSize=args.udp_block)
    return fetcher

