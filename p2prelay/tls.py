"""
TLS for relays and transfers: what a node presents, and what a client accepts.

Two kinds of trust, for two kinds of server:

- A **node** has no certificate authority: its identity is its Ed25519
  key (:class:`~p2prelay.identity.NodeKey`), and the relay's index lists
  that key for it.  The node's TLS port presents a self-signed
  certificate for the key itself (:func:`nodeCertificate`), TLS 1.3 only,
  and a client connecting with :func:`pinnedTLSEndpoint` accepts the peer
  only if the certificate's public key *is* the key the relay listed.
  TLS 1.3's CertificateVerify proves the peer holds that key's private
  half, so nothing else about the certificate (issuer, names, dates)
  matters.
- A **relay** is an ordinary TLS server (``ssl:`` endpoint, certificate and
  key files); :func:`relayClientEndpoint` verifies it against the CAs in a
  PEM file and the host name, as any TLS client does.

Both client endpoints fire ``connect()`` only once the handshake is done
and the peer verified, so a failure is a failed connection with a plain
reason (:class:`TLSKeyMismatch`, :class:`TLSFailed`, or a ``TimeoutError``
for a handshake that does not finish within the connect timeout), never a
half-open connection the application must make sense of.

Importing this module imports OpenSSL (about 230 ms): import it only when
TLS is actually used, so a plain TCP fetch never pays for it.
"""

from __future__ import annotations

import base64
import datetime
import weakref
from typing import Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS, trustRootFromCertificates
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .addresses import hostPort
from .identity import NodeKey

RECEIVE_SIZE = 256 * 1024  # bytes per recv() on a transfer, as client/get.py reads
MAX_CA_FILE = 1024 * 1024  # bytes read from a --relay-ca file
CERTIFICATE_BACKDATE = datetime.timedelta(days=1)  # tolerate clocks running behind
# RFC 5280 4.1.2.5: 99991231235959Z means "no well-defined expiration".  The
# certificate only carries the key; the relay's index says which key to trust.
NO_EXPIRY = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)

log = Logger()


class TLSKeyMismatch(Exception):
    """The peer's TLS certificate is not for the key the relay listed."""


class TLSFailed(Exception):
    """A TLS handshake failed; the message says how."""


class TLSConfigError(ValueError):
    """A CA file (or other TLS setting) we cannot use; the message says why."""


def publicKeyOf(certificate: x509.Certificate) -> Optional[str]:
    """
    The certificate's public key as :attr:`NodeKey.public` spells it
    (unpadded base64url of the raw Ed25519 key), or None if it is not an
    Ed25519 key.
    """
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# Node side: a self-signed certificate for the node's own key.

_certificates: "weakref.WeakKeyDictionary[NodeKey, x509.Certificate]" = weakref.WeakKeyDictionary()
_serverCreators: "weakref.WeakKeyDictionary[NodeKey, _NodeServerCreator]" = weakref.WeakKeyDictionary()


def _privateKey(key: NodeKey):
    # The one place the private half leaves NodeKey: into this process's
    # OpenSSL context, which must sign the TLS handshake with it.
    return key._private


def nodeCertificate(key: NodeKey) -> x509.Certificate:
    """
    A self-signed X.509 certificate for the node's Ed25519 key (made once
    per key).  Its subject names the node id, for people reading it; a
    client trusts it only for the key inside.
    """
    certificate = _certificates.get(key)
    if certificate is None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2prelay node {key.node}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(_privateKey(key).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CERTIFICATE_BACKDATE)
            .not_valid_after(NO_EXPIRY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(_privateKey(key), None)  # Ed25519 signs with no separate hash
        )
        _certificates[key] = certificate
    return certificate


@implementer(IOpenSSLServerConnectionCreator)
class _NodeServerCreator:
    """TLS 1.3 server connections presenting the node's own certificate."""

    def __init__(self, key: NodeKey) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # one GET per connection
        context.use_privatekey(_privateKey(key))
        context.use_certificate(nodeCertificate(key))
        context.check_privatekey()
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def nodeServerCreator(key: NodeKey) -> IOpenSSLServerConnectionCreator:
    """The TLS server settings of a node's TLS port (made once per key)."""
    creator = _serverCreators.get(key)
    if creator is None:
        creator = _serverCreators[key] = _NodeServerCreator(key)
    return creator


def nodeTLSFactory(key: NodeKey, factory: Factory, clock=None) -> TLSMemoryBIOFactory:
    """
    ``factory`` (the node's file server) behind TLS with the node's key: listen
    on any plain server endpoint with it.  Connections through it count
    against ``factory``'s own caps, like those on the plain port.
    """
    return TLSMemoryBIOFactory(nodeServerCreator(key), False, factory, clock=clock)


# Client side: connect() fires only with a verified peer.


@implementer(IHandshakeListener)
class _Gate(Protocol):
    """
    Stands in for the application's protocol until the handshake is done,
    then hands the (TLS) transport to it and forwards everything.
    """

    def __init__(self, attempt: "_Attempt") -> None:
        self.attempt = attempt
        self.inner: Optional[Protocol] = None

    def connectionMade(self) -> None:
        self.attempt.connected(self)

    def handshakeCompleted(self) -> None:
        self.attempt.handshakeDone(self)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
        else:
            self.attempt.lost(reason)


class _GateFactory(Factory):
    noisy = False

    def __init__(self, attempt: "_Attempt") -> None:
        self.attempt = attempt

    def buildProtocol(self, addr: object) -> _Gate:
        return _Gate(self.attempt)


class _Attempt:
    """One ``connect()``: TCP, then the handshake, then the application."""

    def __init__(self, endpoint: "_TLSClientEndpoint", factory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.deferred: Deferred = Deferred(self._cancel)
        self.gate: Optional[_Gate] = None
        self.timer = None
        self.timedOut = False

    def start(self) -> Deferred:
        e = self.endpoint
        tlsFactory = TLSMemoryBIOFactory(e.creator, True, _GateFactory(self), clock=e.reactor)
        self.connecting = e.wrapped.connect(tlsFactory)
        self.connecting.addErrback(self._connectFailed)
        return self.deferred

    def _connectFailed(self, failure: Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(failure)

    def connected(self, gate: _Gate) -> None:
        self.gate = gate
        tcp = getattr(gate.transport, "transport", None)
        if self.endpoint.receiveSize and hasattr(tcp, "bufferSize"):
            # The application's own bufferSize would land on the TLS wrapper.
            tcp.bufferSize = self.endpoint.receiveSize
        if self.endpoint.timeout:
            self.timer = self.endpoint.reactor.callLater(self.endpoint.timeout, self._tooSlow)

    def _tooSlow(self) -> None:
        self.timer = None
        self.timedOut = True
        self.gate.transport.abortConnection()

    def _stopTimer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def handshakeDone(self, gate: _Gate) -> None:
        self._stopTimer()
        if self.deferred.called:  # cancelled meanwhile
            gate.transport.abortConnection()
            return
        tls = gate.transport
        problem = self.endpoint.check(tls)
        if problem is not None:
            tls.failVerification(Failure(problem))
            return
        inner = self.factory.buildProtocol(tls.getPeer())
        if inner is None:
            tls.abortConnection()
            self.deferred.errback(error.ConnectError(string="the protocol factory refused the connection"))
            return
        gate.inner = inner
        inner.makeConnection(tls)
        self.deferred.callback(inner)

    def lost(self, reason: Failure) -> None:
        self._stopTimer()
        if self.deferred.called:
            return
        if self.timedOut:
            self.deferred.errback(
                error.TimeoutError(
                    string=f"no TLS handshake with {self.endpoint.where} "
                    f"within {self.endpoint.timeout:g} seconds"
                )
            )
            return
        self.deferred.errback(Failure(self.endpoint.explain(reason)))

    def _cancel(self, d: Deferred) -> None:
        self._stopTimer()
        if self.gate is None:
            self.connecting.cancel()
        else:
            self.gate.transport.abortConnection()


def _openSSLReasons(e: SSL.Error) -> str:
    """An OpenSSL error stack as words: 'certificate verify failed'."""
    reasons = []
    for entry in e.args[0] if e.args and isinstance(e.args[0], list) else []:
        if isinstance(entry, tuple) and entry and entry[-1]:
            reasons.append(str(entry[-1]))
    return "; ".join(reasons) or str(e) or "TLS error"


@implementer(IStreamClientEndpoint)
class _TLSClientEndpoint:
    """
    TLS over ``wrapped``; ``connect()`` fires once the peer is verified.

    ``receiveSize``, when given, is the TCP transport's read size.
    ``check(tlsProtocol)`` may return an exception to refuse a peer after
    the handshake; ``describe(reasons)`` turns OpenSSL's reasons for a
    failed handshake into the message of a :class:`TLSFailed`.
    """

    def __init__(
        self,
        reactor,
        wrapped: IStreamClientEndpoint,
        creator,
        where: str,
        timeout: float,
        check: Callable[[object], Optional[Exception]] = lambda tls: None,
        describe: Optional[Callable[[str], str]] = None,
        receiveSize: Optional[int] = None,
    ) -> None:
        self.reactor = reactor
        self.receiveSize = receiveSize
        self.wrapped = wrapped
        self.creator = creator
        self.where = where
        self.timeout = timeout
        self.check = check
        self.describe = describe or (lambda reasons: f"TLS handshake with {where} failed: {reasons}")

    def connect(self, factory) -> Deferred:
        return _Attempt(self, factory).start()

    def explain(self, reason: Failure) -> Exception:
        """The exception a handshake that ended with ``reason`` raises."""
        e = reason.value if reason is not None else None
        if isinstance(e, (TLSKeyMismatch, TLSFailed)):
            return e
        if isinstance(e, SSL.Error):
            return TLSFailed(self.describe(_openSSLReasons(e)))
        if type(e).__name__ == "VerificationError":  # service_identity: wrong host name
            return TLSFailed(f"the TLS certificate of {self.where} is not for that host ({e})")
        if isinstance(e, (error.ConnectionDone, error.ConnectionLost)):
            return TLSFailed(f"{self.where} closed the connection during the TLS handshake")
        return TLSFailed(f"TLS handshake with {self.where} failed: {e}")


# Pinned to a node's key.


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedCreator:
    """TLS 1.3 client connections that accept only one Ed25519 key."""

    def __init__(self, publicKey: str, where: str) -> None:
        self.publicKey = publicKey
        self.where = where
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        self._context = context

    def mismatch(self) -> TLSKeyMismatch:
        return TLSKeyMismatch(f"TLS key of {self.where} does not match the relay's index")

    def _verify(self, connection, certificate, errno: int, depth: int, ok: int) -> bool:
        # Only the leaf matters, and only its key: no CA vouches for a node.
        if depth != 0:
            return True
        try:
            if publicKeyOf(certificate.to_cryptography()) == self.publicKey:
                return True
            connection.get_app_data().failVerification(Failure(self.mismatch()))
        except BaseException:  # an exception raised into OpenSSL is lost
            log.failure("while checking a node's TLS key")
        return False

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def pinnedTLSEndpoint(reactor, host: str, port: int, publicKey: str, timeout: float) -> IStreamClientEndpoint:
    """
    A client endpoint to a node's TLS port that accepts the peer only if
    its certificate's key is ``publicKey`` (as :attr:`NodeKey.public`, the
    form the relay lists); anything else fails the connection with
    :class:`TLSKeyMismatch`.  ``timeout`` bounds the TCP connect, and then
    the handshake.  Reads are of ``RECEIVE_SIZE`` bytes, as for a plain
    transfer (measured: 64 KiB reads cost a quarter of TLS throughput).
    """
    where = hostPort(host, port)
    creator = _PinnedCreator(publicKey, where)

    def check(tls) -> Optional[Exception]:
        # Belt and braces: the verify callback has checked the leaf already.
        certificate = tls.getPeerCertificate()
        if certificate is None or publicKeyOf(certificate.to_cryptography()) != publicKey:
            return creator.mismatch()
        return None

    return _TLSClientEndpoint(
        reactor,
        HostnameEndpoint(reactor, host, port, timeout=timeout),
        creator,
        where,
        timeout,
        check=check,
        receiveSize=RECEIVE_SIZE,
    )


# A relay, verified against a CA file.


def loadCAFile(path: str):
    """
    A trust root of the CA certificates in the PEM file ``path``; raises
    :class:`TLSConfigError` for a file that is missing or holds none.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CA_FILE + 1)
    except OSError as e:
        raise TLSConfigError(f"cannot read CA file {path}: {e.strerror or e}") from None
    if len(data) > MAX_CA_FILE:
        raise TLSConfigError(f"CA file {path} is over {MAX_CA_FILE} bytes")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSConfigError(f"CA file {path} holds no PEM certificate")
    return trustRootFromCertificates([Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates])


def relayClientEndpoint(reactor, host: str, port: int, caFile: str, timeout: float) -> IStreamClientEndpoint:
    """
    A client endpoint to a relay's TLS port (an ``ssl:`` listener): the
    relay's certificate must chain to a CA in ``caFile`` (PEM) and name
    ``host``.  TLS 1.2 or later.
    """
    trust = loadCAFile(caFile)
    where = hostPort(host, port)
    options = optionsForClientTLS(
        host, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}
    )

    def describe(reasons: str) -> str:
        if "certificate verify failed" in reasons:
            return f"the TLS certificate of relay {where} is not signed by a CA in {caFile} ({reasons})"
        return f"TLS handshake with relay {where} failed: {reasons}"

    return _TLSClientEndpoint(
        reactor,
        HostnameEndpoint(reactor, host, port, timeout=timeout),
        options,
        f"relay {where}",
        timeout,
        describe=describe,
    )


def relayEndpoint(reactor, value: str, caFile: str, timeout: float) -> IStreamClientEndpoint:
    """
    :func:`relayClientEndpoint` from what a user typed for ``--relay``
    alongside ``--relay-ca``: ``HOST:PORT`` (or ``tls:HOST:PORT``), or a
    comma list of those, each reached over TLS and verified against
    ``caFile``, as a :class:`~p2prelay.addresses.FailoverEndpoint`.
    Raises :class:`~p2prelay.addresses.AddressError` or
    :class:`TLSConfigError` with the reason.
    """
    from .addresses import AddressError, failoverEndpoint, parseHostPort

    if "," in value:
        loadCAFile(caFile)  # once, before any relay: a bad file is one error
        return failoverEndpoint(value, lambda name: relayEndpoint(reactor, name, caFile, timeout))
    text = value.strip()
    pair = parseHostPort(text[4:] if text.startswith("tls:") else text)
    if pair is None:
        raise AddressError(f"{value!r}: with a CA file, give the relay as HOST:PORT")
    return relayClientEndpoint(reactor, pair[0], pair[1], caFile, timeout)
