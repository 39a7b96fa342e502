"""Loading and validating one certificate/key pair.

Everything here reads bytes and judges them; nothing writes. A pair that
fails any rule raises :class:`PairError` naming the file and the reason.
"""

from __future__ import annotations

import binascii
import errno
import os
import re
import ssl
import stat
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import (
    ec,
    ed25519,
    padding,
    rsa,
)
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.verification import (
    PolicyBuilder,
    Store,
    VerificationError,
)

from certwatchd.errors import ConfigError, PairError
from certwatchd.names import is_dns_name, is_wildcard

MAX_FILE_BYTES = 1 << 20
MIN_RSA_BITS = 2048

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----",
    re.DOTALL,
)
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)

PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
)


def read_small_file(path: Path) -> bytes:
    """Read a regular file of at most 1 MiB without ever blocking.

    Symlinks are followed; a FIFO, a device, a directory or a larger file
    is refused before anything is read from it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise PairError(str(path), _open_failure(exc)) from None

    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _file_kind(info.st_mode)
            msg = f"is {kind}, expected a regular file"
            raise PairError(str(path), msg)
        if info.st_size > MAX_FILE_BYTES:
            msg = f"is {info.st_size} bytes, expected at most 1 MiB"
            raise PairError(str(path), msg)

        chunks = []
        remaining = MAX_FILE_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        msg = f"cannot be read: {exc.strerror}"
        raise PairError(str(path), msg) from None
    finally:
        os.close(fd)

    data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:
        msg = "grew past 1 MiB while being read"
        raise PairError(str(path), msg)
    return data


def _open_failure(exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "does not exist (or is a dangling link)",
        errno.ELOOP: "is a symlink loop",
        errno.EACCES: "is not readable (permission denied)",
        errno.EPERM: "is not readable (operation not permitted)",
        errno.ENOTDIR: "has a path component that is not a directory",
    }
    return reasons.get(exc.errno or 0, f"cannot be opened: {exc.strerror}")


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def split_pem(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """Split PEM text into ``(label, whole block)`` pairs.

    Only white space may stand between and around the blocks: text that
    is not PEM, DER, a truncated block or trailing junk is refused.
    """
    if not data.strip():
        raise PairError(str(path), "is empty")

    blocks = []
    position = 0
    for match in _PEM_BLOCK.finditer(data):
        if data[position : match.start()].strip():
            break
        blocks.append((match.group(1), match.group(0) + b"\n"))
        position = match.end()

    if not blocks:
        raise PairError(str(path), _not_pem_reason(data))
    if data[position:].strip():
        offset = (
            position + len(data[position:]) - len(data[position:].lstrip())
        )
        msg = f"has data that is not PEM after byte {offset}"
        if b"-----BEGIN" in data[position:]:
            msg = f"has a truncated or malformed PEM block at byte {offset}"
        raise PairError(str(path), msg)
    return blocks


def _not_pem_reason(data: bytes) -> str:
    if data.startswith((b"\x30\x82", b"\x30\x81")):
        return "is DER (binary), expected PEM"
    if b"-----BEGIN" in data:
        return "has a truncated or malformed PEM block"
    return "is not PEM"


@dataclass(frozen=True)
class CertificateFile:
    """A parsed certificate file: the leaf first, then its chain."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @cached_property
    def pem(self) -> bytes:
        """The certificates alone, re-encoded, leaf first."""
        encoding = serialization.Encoding.PEM
        return b"".join(
            cert.public_bytes(encoding) for cert in (self.leaf, *self.chain)
        )


def parse_certificates(data: bytes, path: Path) -> CertificateFile:
    """Parse a leaf-first certificate file."""
    blocks = split_pem(data, path)
    certificates = []
    for index, (label, block) in enumerate(blocks):
        if label in _KEY_LABELS or label == b"ENCRYPTED PRIVATE KEY":
            msg = "holds a private key, expected certificates"
            raise PairError(str(path), msg)
        if label != b"CERTIFICATE":
            msg = f"holds a {label.decode()} block, expected certificates"
            raise PairError(str(path), msg)
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            msg = f"has a certificate that cannot be parsed (block {index})"
            raise PairError(str(path), msg) from None

    if _is_ca(certificates[0]):
        msg = "starts with a CA certificate; the leaf must come first"
        raise PairError(str(path), msg)
    return CertificateFile(certificates[0], tuple(certificates[1:]))


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        )
    except (x509.ExtensionNotFound, ValueError):
        return False
    return constraints.value.ca


def parse_private_key(data: bytes, path: Path) -> PrivateKey:
    """Parse an unencrypted RSA (2048 bits or more), EC or Ed25519 key."""
    blocks = split_pem(data, path)
    if len(blocks) != 1:
        msg = f"holds {len(blocks)} PEM blocks, expected one private key"
        raise PairError(str(path), msg)

    label, block = blocks[0]
    if label == b"CERTIFICATE":
        msg = "holds a certificate, expected a private key"
        raise PairError(str(path), msg)
    if label == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type:" in block:
        msg = "holds an encrypted private key; Prosody needs it unencrypted"
        raise PairError(str(path), msg)
    if label not in _KEY_LABELS:
        msg = f"holds a {label.decode()} block, expected a private key"
        raise PairError(str(path), msg)

    try:
        # OpenSSL's full RSA consistency check costs tens of milliseconds
        # per key; load_pair proves the key with a signature instead.
        key = serialization.load_pem_private_key(
            block, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, UnsupportedAlgorithm, binascii.Error):
        msg = "holds a private key that cannot be parsed"
        raise PairError(str(path), msg) from None
    return _check_key_type(key, path)


def _check_key_type(key: object, path: Path) -> PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            msg = f"holds a {key.key_size}-bit RSA key, expected 2048 or more"
            raise PairError(str(path), msg)
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, _CURVES):
            msg = (
                f"holds an EC key on {key.curve.name}, expected P-256/384/521"
            )
            raise PairError(str(path), msg)
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    msg = f"holds a {type(key).__name__}, expected an RSA, EC or Ed25519 key"
    raise PairError(str(path), msg)


def dns_names(leaf: x509.Certificate, path: Path) -> tuple[str, ...]:
    """Return the leaf's SAN DNS names, refusing any that is unsafe."""
    try:
        extension = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        names = extension.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    except ValueError:
        msg = "has a malformed subjectAltName extension"
        raise PairError(str(path), msg) from None

    if not names:
        msg = "has no DNS name in subjectAltName"
        raise PairError(str(path), msg, breaks_tls=False)
    for name in names:
        if not is_dns_name(name, allow_wildcard=True):
            msg = (
                f"names {name!r} in subjectAltName, which is not a"
                " lower-case DNS name"
            )
            raise PairError(str(path), msg, breaks_tls=False)
    return tuple(dict.fromkeys(names))


class TrustStore:
    """Roots a chain must verify to, or none for ``trust = "none"``."""

    def __init__(self, roots: list[x509.Certificate] | None) -> None:
        self._store = Store(roots) if roots is not None else None

    @classmethod
    def from_setting(cls, trust: str) -> TrustStore:
        """Build the store ``validation.trust`` names."""
        if trust == "none":
            return cls(None)
        path = Path(trust) if trust != "system" else _system_bundle()
        try:
            with warnings.catch_warnings():
                # Some distributions' bundles hold a legacy root with a
                # negative serial; cryptography warns about it, and it is
                # not ours to fix.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                roots = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as exc:
            msg = (
                f"trusted roots {path} cannot be loaded ({exc});"
                " expected a PEM file of certificates (validation.trust)"
            )
            raise ConfigError(msg) from None
        return cls(roots)

    @property
    def verifies(self) -> bool:
        """Say whether chains are checked at all."""
        return self._store is not None

    def verify(
        self, certs: CertificateFile, name: str, now: datetime, path: Path
    ) -> None:
        """Verify the chain for ``name`` with the server-auth policy."""
        if self._store is None:
            return
        subject = name
        if is_wildcard(name):
            subject = "certwatchd-probe" + name[1:]

        builder = PolicyBuilder().store(self._store).time(now)
        verifier = builder.build_server_verifier(x509.DNSName(subject))
        try:
            verifier.verify(certs.leaf, list(certs.chain))
        except VerificationError as exc:
            msg = f"has a chain that does not verify: {exc}"
            raise PairError(str(path), msg, breaks_tls=False) from None


def _system_bundle() -> Path:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    msg = (
        "no system trust store found (looked at"
        f" {paths.openssl_cafile}); install ca-certificates or set"
        " validation.trust to a PEM file"
    )
    raise ConfigError(msg)


@dataclass(frozen=True)
class Pair:
    """A validated certificate and key, ready to install."""

    cert_path: Path
    key_path: Path
    certs: CertificateFile
    names: tuple[str, ...]
    key_pem: bytes = field(repr=False)

    @property
    def not_before(self) -> datetime:
        """Start of the leaf's validity, UTC."""
        return self.certs.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        """End of the leaf's validity, UTC."""
        return self.certs.leaf.not_valid_after_utc

    @property
    def serial(self) -> str:
        """The leaf's serial number in hex."""
        return f"{self.certs.leaf.serial_number:x}"

    @property
    def issuer(self) -> str:
        """The leaf's issuer as an RFC 4514 string."""
        return self.certs.leaf.issuer.rfc4514_string()

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf's DER, hex."""
        return self.certs.leaf.fingerprint(hashes.SHA256()).hex()


def load_pair(
    cert_path: Path,
    key_path: Path,
    trust: TrustStore,
    now: datetime | None = None,
) -> Pair:
    """Read, parse and validate one pair; raise :class:`PairError` if bad.

    Checks, in order: both files readable and PEM, the certificate file
    starts with the leaf, a usable unencrypted key that matches the leaf,
    the validity window, safe SAN DNS names, and the chain.
    """
    now = now or datetime.now(UTC)
    cert_data = read_small_file(cert_path)
    key_data = read_small_file(key_path)
    certs = parse_certificates(cert_data, cert_path)
    key = parse_private_key(key_data, key_path)

    if not same_public_key(key, certs.leaf):
        msg = f"does not match the certificate in {cert_path}"
        raise PairError(str(key_path), msg)
    if not signs_for(key, certs.leaf):
        msg = (
            "cannot make a signature the certificate's public key accepts;"
            " the key is damaged"
        )
        raise PairError(str(key_path), msg)

    leaf = certs.leaf
    if now < leaf.not_valid_before_utc:
        msg = f"is not valid before {leaf.not_valid_before_utc.isoformat()}"
        raise PairError(str(cert_path), msg, breaks_tls=False)
    if now > leaf.not_valid_after_utc:
        msg = f"expired at {leaf.not_valid_after_utc.isoformat()}"
        raise PairError(str(cert_path), msg, breaks_tls=False)

    names = dns_names(leaf, cert_path)
    trust.verify(certs, names[0], now, cert_path)
    return Pair(cert_path, key_path, certs, names, key_data.strip() + b"\n")


def signs_for(key: PrivateKey, leaf: x509.Certificate) -> bool:
    """Say whether ``key`` signs what the leaf's public key verifies.

    This is what TLS asks of the key, and it catches a damaged RSA key
    whose public half still matches, at a fraction of the cost of
    OpenSSL's full consistency check.
    """
    data = b"certwatchd key check"
    public = leaf.public_key()
    try:
        if isinstance(key, rsa.RSAPrivateKey) and isinstance(
            public, rsa.RSAPublicKey
        ):
            pad = padding.PKCS1v15()
            signature = key.sign(data, pad, hashes.SHA256())
            public.verify(signature, data, pad, hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(
            public, ec.EllipticCurvePublicKey
        ):
            algorithm = ec.ECDSA(hashes.SHA256())
            public.verify(key.sign(data, algorithm), data, algorithm)
        elif isinstance(key, ed25519.Ed25519PrivateKey) and isinstance(
            public, ed25519.Ed25519PublicKey
        ):
            public.verify(key.sign(data), data)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def same_public_key(key: PrivateKey, leaf: x509.Certificate) -> bool:
    """Say whether ``key`` is the private half of the leaf's public key."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        leaf_public = leaf.public_key().public_bytes(der, spki)
    except (ValueError, UnsupportedAlgorithm):
        return False
    return key.public_key().public_bytes(der, spki) == leaf_public
