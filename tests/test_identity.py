"""
Tests for p2prelay.identity: node keys, ids, proofs and shared secrets.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2prelay import identity
from p2prelay.identity import IdentityError, NodeKey


class NodeKeyTests(SynchronousTestCase):
    def test_idDerivedFromKey(self) -> None:
        """A key's node id is what nodeIdOf computes from its public half."""
        key = NodeKey.generate()
        self.assertEqual(identity.nodeIdOf(key.public), key.node)
        self.assertEqual(len(key.node), 2 * identity.NODE_ID_BYTES)

    def test_distinctKeysDistinctIds(self) -> None:
        """Two generated keys have different ids."""
        self.assertNotEqual(NodeKey.generate().node, NodeKey.generate().node)

    def test_createdOnceThenKept(self) -> None:
        """loadOrCreate makes a key on first use and loads the same one after."""
        path = Path(self.mktemp()) / "deep" / "node.key"
        first = NodeKey.loadOrCreate(path)
        second = NodeKey.loadOrCreate(path)
        self.assertEqual(first.node, second.node)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    def test_noTemporaryLeftBehind(self) -> None:
        """Creating a key leaves only the key file in its folder."""
        path = Path(self.mktemp()) / "node.key"
        NodeKey.loadOrCreate(path)
        self.assertEqual(os.listdir(path.parent), ["node.key"])

    def test_garbageKeyFile(self) -> None:
        """A file that is not a private key is an IdentityError naming it."""
        path = Path(self.mktemp())
        path.write_bytes(b"not a key")
        e = self.assertRaises(IdentityError, NodeKey.loadOrCreate, path)
        self.assertIn(str(path), str(e))

    def test_otherKeyType(self) -> None:
        """A PEM key of another algorithm is refused."""
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
        )

        path = Path(self.mktemp())
        other = ec.generate_private_key(ec.SECP256R1())
        path.write_bytes(other.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        e = self.assertRaises(IdentityError, NodeKey.loadOrCreate, path)
        self.assertIn("Ed25519", str(e))

    def test_defaultPathPerFolder(self) -> None:
        """Two shared folders get two key paths, both outside the folders."""
        a, b = Path(self.mktemp()), Path(self.mktemp())
        a.mkdir()
        b.mkdir()
        pa, pb = identity.defaultKeyPath(a), identity.defaultKeyPath(b)
        self.assertNotEqual(pa, pb)
        for folder, path in ((a, pa), (b, pb)):
            self.assertFalse(str(path.resolve()).startswith(str(folder.resolve())))

    def test_defaultPathFollowsStateDir(self) -> None:
        """$P2PRELAY_STATE_DIR moves the state folder."""
        here = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, identity.STATE_ENV: here})
        self.assertTrue(str(identity.defaultKeyPath(".")).startswith(here))


class ProofTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = NodeKey.generate()
        self.nonce = identity.newNonce()

    def test_proofVerifies(self) -> None:
        """A proof made for a nonce and request verifies against them."""
        sig = self.key.prove(identity.REGISTER_PROOF, self.nonce, b"request")
        message = identity.transcript(identity.REGISTER_PROOF, self.nonce, b"request")
        self.assertTrue(identity.verify(self.key.public, sig, message))

    def test_otherNonceFails(self) -> None:
        """A proof replayed against a fresh nonce does not verify."""
        sig = self.key.prove(identity.REGISTER_PROOF, self.nonce, b"request")
        message = identity.transcript(identity.REGISTER_PROOF, identity.newNonce(), b"request")
        self.assertFalse(identity.verify(self.key.public, sig, message))

    def test_otherRequestFails(self) -> None:
        """A proof does not cover a different request."""
        sig = self.key.prove(identity.REGISTER_PROOF, self.nonce, b"request")
        message = identity.transcript(identity.REGISTER_PROOF, self.nonce, b"requesT")
        self.assertFalse(identity.verify(self.key.public, sig, message))

    def test_otherPurposeFails(self) -> None:
        """A heartbeat proof is no unregister proof."""
        sig = self.key.prove(identity.HEARTBEAT_PROOF, self.nonce, b"r")
        message = identity.transcript(identity.UNREGISTER_PROOF, self.nonce, b"r")
        self.assertFalse(identity.verify(self.key.public, sig, message))

    def test_otherKeyFails(self) -> None:
        """Another key's signature is refused."""
        sig = NodeKey.generate().prove(identity.REGISTER_PROOF, self.nonce, b"r")
        message = identity.transcript(identity.REGISTER_PROOF, self.nonce, b"r")
        self.assertFalse(identity.verify(self.key.public, sig, message))

    @given(st.text(max_size=200), st.text(max_size=200))
    def test_arbitraryTextNeverRaises(self, key: str, sig: str) -> None:
        """Whatever arrives as key= and sig=, verify answers False, never raises."""
        self.assertFalse(identity.verify(key, sig, b"message"))
        node = identity.nodeIdOf(key)
        self.assertTrue(node is None or len(node) == 2 * identity.NODE_ID_BYTES)

    def test_nonCanonicalEncodingRefused(self) -> None:
        """A key spelled with non-zero padding bits is not the same key."""
        last = self.key.public[-1]
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        twin = self.key.public[:-1] + alphabet[alphabet.index(last) ^ 1]
        self.assertIsNone(identity.nodeIdOf(twin))


class SecretTests(SynchronousTestCase):
    def test_proofChecks(self) -> None:
        """The right secret's proof passes; another secret's fails."""
        proof = identity.secretProof(b"s" * 16, b"transcript")
        self.assertTrue(identity.checkSecretProof(b"s" * 16, b"transcript", proof))
        self.assertFalse(identity.checkSecretProof(b"t" * 16, b"transcript", proof))
        self.assertFalse(identity.checkSecretProof(b"s" * 16, b"transcript", "\u00e9" * 64))

    def test_loadStripsWhitespace(self) -> None:
        """A secret file's trailing newline is not part of the secret."""
        path = Path(self.mktemp())
        path.write_bytes(b"0123456789abcdef\n")
        self.assertEqual(identity.loadSecret(path), b"0123456789abcdef")

    def test_shortSecretRefused(self) -> None:
        """A secret under MIN_SECRET bytes is refused."""
        path = Path(self.mktemp())
        path.write_bytes(b"short\n")
        self.assertRaises(IdentityError, identity.loadSecret, path)

    def test_missingSecretFile(self) -> None:
        """A secret file that cannot be read is an IdentityError."""
        self.assertRaises(IdentityError, identity.loadSecret, self.mktemp())
