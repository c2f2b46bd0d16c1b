"""Certificates of the direct links: one per node, issued under a mesh authority, pinned.

Two checks keep a link to members, in the spirit of Syncthing's device IDs:

- *The mesh authority.* Its Ed25519 key is derived from the mesh key, so every member
  can issue itself a certificate and trust exactly the certificates issued under it.
  A stranger's TLS handshake fails inside OpenSSL, before anything is read from it.
- *The pin.* A node's certificate names its peer id, and the SHA-256 of the certificate
  travels in the node's advert, signed by its libp2p key. After the handshake each side
  checks the other's certificate against the pin of the peer it names (the acceptor)
  or the peer it dialed (the dialer); a member presenting another member's name, or a
  listener other than the one dialed, is closed before a frame moves.

The authority's key is derived, never stored; a node's own key and certificate live in
its data dir (mode 0600) and are re-issued when the mesh key changes.
"""

import datetime
import hashlib
import hmac
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
_VALID = datetime.timedelta(days=365 * 100)  # rotation is by mesh key or a new identity


class CertificateError(ValueError):
    """A link certificate that cannot be made or read."""


def fingerprint(der: bytes) -> str:
    """The pin of a certificate: SHA-256 of its DER bytes, in hex."""
    return hashlib.sha256(der).hexdigest()


def _authority_key(mesh_secret: bytes) -> ed25519.Ed25519PrivateKey:
    seed = hmac.new(mesh_secret, b"salala link authority v1", hashlib.sha256).digest()
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def _authority(mesh_secret: bytes) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    """The mesh's authority: the same key and certificate on every member."""
    key = _authority_key(mesh_secret)
    public = key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "salala mesh authority")])
    serial = int.from_bytes(hashlib.sha256(public.public_bytes_raw()).digest()[:16], "big") >> 1
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(_EPOCH)
        .not_valid_after(_EPOCH + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(key, None)
    )
    return key, cert


def _issue(mesh_secret: bytes, peer_id: str) -> tuple[bytes, bytes]:
    """A fresh key and a certificate naming ``peer_id``, issued by the mesh authority."""
    authority_key, authority = _authority(mesh_secret)
    key = ed25519.Ed25519PrivateKey.generate()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)]))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_EPOCH)
        .not_valid_after(_EPOCH + _VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(authority_key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def peer_named(der: bytes) -> str | None:
    """The peer id a certificate names (its common name), or None."""
    try:
        cert = x509.load_der_x509_certificate(der)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    value = names[0].value if len(names) == 1 else None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class LinkIdentity:
    """This node's link certificate and the TLS contexts that present and check it."""

    peer_id: str
    pin: str
    server: ssl.SSLContext
    client: ssl.SSLContext


def _issued_for(key_pem: bytes, cert_pem: bytes, mesh_secret: bytes, peer_id: str) -> bool:
    """Whether the stored pair is whole: the certificate issued under this mesh key for
    this peer, and the key its own (a crash between two writes leaves them apart)."""
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        _authority_key(mesh_secret).public_key().verify(cert.signature, cert.tbs_certificate_bytes)
        key = serialization.load_pem_private_key(key_pem, None)
        matches = key.public_key().public_bytes(*raw) == cert.public_key().public_bytes(*raw)
    except Exception:  # unreadable, or issued under another mesh key
        return False
    return matches and peer_named(cert.public_bytes(serialization.Encoding.DER)) == peer_id


def _context(
    side: ssl._SSLMethod, authority_pem: str, key_path: Path, cert_path: Path
) -> ssl.SSLContext:
    context = ssl.SSLContext(side)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # identity is the pin, checked after the handshake
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=authority_pem)
    context.load_cert_chain(cert_path, key_path)
    return context


def load_link_identity(directory: Path, mesh_secret: bytes, peer_id: str) -> LinkIdentity:
    """This node's link certificate from ``directory`` (made when missing, or when it
    was issued under another mesh key or for another identity)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, cert_path = directory / "link.key", directory / "link.crt"
    try:
        key, current = key_path.read_bytes(), cert_path.read_bytes()
    except OSError:
        key, current = b"", b""
    if not _issued_for(key, current, mesh_secret, peer_id):
        key_pem, cert_pem = _issue(mesh_secret, peer_id)
        for path, data in ((key_path, key_pem), (cert_path, cert_pem)):
            fd, tmp = tempfile.mkstemp(dir=directory)
            with os.fdopen(fd, "wb") as out:  # mkstemp's file is 0600 already
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        current = cert_pem
    der = x509.load_pem_x509_certificate(current).public_bytes(serialization.Encoding.DER)
    authority_pem = _authority(mesh_secret)[1].public_bytes(serialization.Encoding.PEM).decode()
    try:
        server = _context(ssl.PROTOCOL_TLS_SERVER, authority_pem, key_path, cert_path)
        client = _context(ssl.PROTOCOL_TLS_CLIENT, authority_pem, key_path, cert_path)
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"link certificate in {directory} does not load: {exc}") from exc
    return LinkIdentity(peer_id, fingerprint(der), server, client)
