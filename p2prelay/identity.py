"""
Who a node is, and how it proves it: an Ed25519 key pair per node.

Anyone who can reach a relay can send it anything, so a node's entry is
bound to a key rather than to a name it chose: the node id is derived from
the public key, and every request that changes an entry (REGISTER,
HEARTBEAT, UNREGISTER) and every dial-back answer carries a signature over
a nonce the relay chose for that one connection.  A captured request sent
again meets a fresh nonce, so replaying it does nothing.

Closed networks add a shared secret: the same transcript is also
authenticated with HMAC-SHA256 under the secret, compared in constant time;
the secret itself never crosses the wire.

This module does no network I/O.  ``cryptography`` is imported only when a
key is made, loaded or checked, so a plain ``p2p-fetch`` never pays for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Optional

NODE_ID_BYTES = 16  # the id is the first 16 bytes of SHA-256(public key), in hex
NONCE_BYTES = 24
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_SECRET_FILE = 4096  # bytes read from --secret-file
MIN_SECRET = 16  # bytes a shared secret must have, after stripping white space

# Domain separation: a signature made for one purpose is useless for another.
REGISTER_PROOF = b"register"
HEARTBEAT_PROOF = b"heartbeat"
UNREGISTER_PROOF = b"unregister"
DIALBACK_PROOF = b"dialback"
CLIENT_PROOF = b"client"
CONTROL_PROOF = b"control"  # opening a firewalled node's control connection

STATE_ENV = "P2PRELAY_STATE_DIR"


class IdentityError(Exception):
    """A key file or secret that cannot be used; the message says why."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, size: int) -> Optional[bytes]:
    """Decode unpadded base64url of exactly ``size`` bytes, or None."""
    if len(text) != (size * 4 + 2) // 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != size or _b64(raw) != text:  # one canonical spelling only
        return None
    return raw


def newNonce() -> str:
    """A fresh, unguessable challenge for one connection."""
    return _b64(secrets.token_bytes(NONCE_BYTES))


def nodeIdOf(publicKey: str) -> Optional[str]:
    """The node id a public key (base64url) stands for, or None if malformed."""
    raw = _unb64(publicKey, PUBLIC_KEY_BYTES)
    if raw is None:
        return None
    return hashlib.sha256(raw).digest()[:NODE_ID_BYTES].hex()


def transcript(purpose: bytes, nonce: str, request: bytes) -> bytes:
    """
    What a proof covers: its purpose, the relay's nonce and a digest of
    every request byte the prover sent on this connection.
    """
    return transcriptOfDigest(purpose, nonce, hashlib.sha256(request).digest())


def transcriptOfDigest(purpose: bytes, nonce: str, digest: bytes) -> bytes:
    """
    :func:`transcript` from the SHA-256 ``digest`` of the request bytes, for
    a verifier that hashed them as they arrived instead of keeping them.
    """
    return b"p2prelay/1 proof\n" + purpose + b"\n" + nonce.encode("ascii") + b"\n" + digest


def verify(publicKey: str, signature: str, message: bytes) -> bool:
    """True only if ``signature`` is the key's Ed25519 signature of ``message``."""
    raw = _unb64(publicKey, PUBLIC_KEY_BYTES)
    sig = _unb64(signature, SIGNATURE_BYTES)
    if raw is None or sig is None:
        return False
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class NodeKey:
    """
    A node's key pair.  ``public`` (base64url) and ``node`` (the id) are
    what the relay learns; the private half never leaves this object.
    """

    def __init__(self, private) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._private = private
        raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public = _b64(raw)
        self.node = hashlib.sha256(raw).digest()[:NODE_ID_BYTES].hex()

    @classmethod
    def generate(cls) -> "NodeKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def loadOrCreate(cls, path: Path) -> "NodeKey":
        """
        The key kept at ``path``, made there (mode 0600) on first use, so a
        restarted node keeps its identity.
        """
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
            load_pem_private_key,
        )

        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as e:
            raise IdentityError(f"cannot read key {path}: {e.strerror or e}") from None
        if data is not None:
            try:
                private = load_pem_private_key(data, password=None)
            except (ValueError, TypeError) as e:
                raise IdentityError(f"{path} is not an unencrypted private key ({e})") from None
            if not isinstance(private, Ed25519PrivateKey):
                raise IdentityError(f"{path} is not an Ed25519 key")
            return cls(private)
        key = cls.generate()
        pem = key._private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            try:
                # link() refuses to replace: if another process made the key
                # first, theirs wins and we load it.
                os.link(temporary, path)
            except FileExistsError:
                return cls.loadOrCreate(path)
            finally:
                os.unlink(temporary)
        except OSError as e:
            raise IdentityError(f"cannot create key {path}: {e.strerror or e}") from None
        return key

    def sign(self, message: bytes) -> str:
        return _b64(self._private.sign(message))

    def prove(self, purpose: bytes, nonce: str, request: bytes) -> str:
        """The signature answering a relay's nonce for ``request``."""
        return self.sign(transcript(purpose, nonce, request))


def stateHome() -> Path:
    """Where p2prelay keeps per-user state: ``$P2PRELAY_STATE_DIR``, else XDG."""
    override = os.environ.get(STATE_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "p2prelay"


def nodeStateDir(sharedFolder: str | Path) -> Path:
    """
    Where a node keeps its state (key, manifest cache): outside its shared
    folder and keyed by that folder's real path.
    """
    real = os.path.realpath(sharedFolder)
    tag = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return stateHome() / "nodes" / tag


def defaultKeyPath(sharedFolder: str | Path) -> Path:
    """
    A node's key file, in :func:`nodeStateDir`: two nodes never share a
    key, and a restart finds its own.
    """
    return nodeStateDir(sharedFolder) / "node.key"


# Shared secrets (--secret-file).


def loadSecret(path: str | Path) -> bytes:
    """The secret in ``path`` (surrounding white space ignored)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except OSError as e:
        raise IdentityError(f"cannot read secret file {path}: {e.strerror or e}") from None
    if len(data) > MAX_SECRET_FILE:
        raise IdentityError(f"secret file {path} is over {MAX_SECRET_FILE} bytes")
    secret = data.strip()
    if len(secret) < MIN_SECRET:
        raise IdentityError(f"secret file {path} holds under {MIN_SECRET} bytes")
    return secret


def secretProof(secret: bytes, message: bytes) -> str:
    """HMAC-SHA256 of a transcript under the shared secret, hex."""
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def checkSecretProof(secret: bytes, message: bytes, proof: str) -> bool:
    """Constant-time comparison of a claimed proof with the right one."""
    return hmac.compare_digest(secretProof(secret, message).encode("ascii"), proof.encode("ascii", "replace"))
