"""Loading and validating one certificate/key pair.

Everything here reads bytes and judges them; nothing writes. A pair that
fails any rule raises :class:`PairError` naming the file and the reason.
"""

from __future__ import annotations

import binascii
import hashlib
import ssl
import warnings
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

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
from certwatchd.pem import read_small_file, split_pem

MIN_RSA_BITS = 2048
# Part of every remembered verdict's key. Change it whenever validation
# refuses something it used to accept, so no verdict reached under the
# looser rules vouches for a pair.
_RULES = b"certwatchd validation rules 2"
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
# Chain certificates parsed so far, by their PEM block; emptied when
# this many distinct ones have been seen.
_CHAIN_CERTIFICATES: dict[bytes, x509.Certificate] = {}
_CHAIN_CERTIFICATES_KEPT = 64

# What cryptography raises for a certificate it cannot read through.
_UNREADABLE = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
)


@dataclass(frozen=True)
class CertificateFile:
    """A parsed certificate file: the leaf first, then its chain."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    pem: bytes


def certificate_blocks(blocks: list[tuple[bytes, bytes]]) -> bytes:
    """Join PEM blocks as installed: blocks only, with LF line ends."""
    return b"".join(block.replace(b"\r\n", b"\n") for _, block in blocks)


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
        if index == 0:
            certificates.append(_load_certificate(block, index, path))
        else:
            certificates.append(_load_chain_certificate(block, index, path))

    if _is_ca(certificates[0]):
        msg = "starts with a CA certificate; the leaf must come first"
        raise PairError(str(path), msg)
    return CertificateFile(
        certificates[0], tuple(certificates[1:]), certificate_blocks(blocks)
    )


def _load_chain_certificate(
    block: bytes, index: int, path: Path
) -> x509.Certificate:
    """Load a chain certificate, once per distinct block.

    Thousands of lineages share a handful of intermediates; a parsed
    certificate is immutable, so one parse serves them all.
    """
    known = _CHAIN_CERTIFICATES.get(block)
    if known is None:
        known = _load_certificate(block, index, path)
        if len(_CHAIN_CERTIFICATES) >= _CHAIN_CERTIFICATES_KEPT:
            _CHAIN_CERTIFICATES.clear()
        _CHAIN_CERTIFICATES[block] = known
    return known


def _load_certificate(
    block: bytes, index: int, path: Path
) -> x509.Certificate:
    """Load one certificate block and read what certwatchd uses of it.

    cryptography decodes names and extensions only when they are first
    read, and warns rather than fails about some encodings. Reading them
    here, with warnings caught, turns each of those failures into a
    refusal; once this returns, the same reads cannot fail later.
    """
    problem: str | None = None
    breaks_tls = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            certificate = x509.load_pem_x509_certificate(block)
            if certificate.serial_number <= 0:
                # OpenSSL still loads it; Let's Encrypt never issues one.
                problem = "its serial number is not positive (RFC 5280)"
                breaks_tls = False
            else:
                _read_through(certificate, leaf=index == 0)
        except _UNREADABLE as exc:
            problem = _unreadable_reason(exc)
            # OpenSSL loads a certificate whose version is out of range.
            breaks_tls = not isinstance(exc, x509.InvalidVersion)
    if problem is None and caught:
        problem = str(caught[0].message)
        breaks_tls = False
    if problem is not None:
        msg = (
            f"has a certificate that cannot be parsed (block {index}):"
            f" {problem}"
        )
        raise PairError(str(path), msg, breaks_tls=breaks_tls)
    return certificate


def _read_through(certificate: x509.Certificate, *, leaf: bool) -> None:
    """Decode every field that is decoded only on first use."""
    certificate.issuer.rfc4514_string()
    certificate.subject.rfc4514_string()
    # Reading the extensions decodes all of them.
    len(certificate.extensions)
    if leaf:
        certificate.public_key()


def _unreadable_reason(exc: Exception) -> str:
    if isinstance(exc, x509.InvalidVersion):
        # The field counts from 0: it holds 2 for X.509 version 3.
        version = exc.parsed_version + 1
        return f"it claims X.509 version {version}, which does not exist"
    if isinstance(exc, x509.DuplicateExtension):
        return f"it has the {exc.oid.dotted_string} extension twice"
    if isinstance(exc, UnsupportedAlgorithm):
        return f"its public key is of an unsupported type ({exc})"
    return str(exc) or type(exc).__name__


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        )
    except (x509.ExtensionNotFound, *_UNREADABLE):
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

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # OpenSSL's full RSA consistency check costs tens of
            # milliseconds per key; load_pair proves the key with a
            # signature instead.
            key = serialization.load_pem_private_key(
                block, password=None, unsafe_skip_rsa_key_validation=True
            )
        except (ValueError, TypeError, UnsupportedAlgorithm, binascii.Error):
            msg = "holds a private key that cannot be parsed"
            raise PairError(str(path), msg) from None
    if caught:
        msg = f"holds a private key that cannot be parsed: {caught[0].message}"
        raise PairError(str(path), msg)
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
    except _UNREADABLE:
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
        digest = hashlib.sha256(b"roots" if roots is not None else b"none")
        for root in roots or ():
            digest.update(root.fingerprint(hashes.SHA256()))
        self.identity = digest.hexdigest()

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
        except (VerificationError, *_UNREADABLE) as exc:
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
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    names: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    serial: str
    issuer: str
    fingerprint: str
    # The earliest expiry in the chain: past it the chain must be checked
    # again even if the files did not change.
    chain_not_after: datetime

    def check_window(self, now: datetime) -> None:
        """Refuse the pair outside its validity window."""
        if now < self.not_before:
            msg = f"is not valid before {self.not_before.isoformat()}"
            raise PairError(str(self.cert_path), msg, breaks_tls=False)
        if now > self.not_after:
            msg = f"expired at {self.not_after.isoformat()}"
            raise PairError(str(self.cert_path), msg, breaks_tls=False)


class Verdicts(Protocol):
    """Remembers pairs already validated, by a digest of their bytes."""

    def recall(
        self, digest: str, cert_path: Path, key_path: Path, blocks: bytes
    ) -> Pair | None:
        """Return the pair validated under ``digest``, if still current."""

    def remember(self, digest: str, pair: Pair) -> None:
        """Keep ``pair`` under ``digest``."""


def load_pair(
    cert_path: Path,
    key_path: Path,
    trust: TrustStore,
    now: datetime | None = None,
    verdicts: Verdicts | None = None,
) -> Pair:
    """Read, parse and validate one pair; raise :class:`PairError` if bad.

    Checks, in order: both files readable and PEM, the certificate file
    starts with the leaf, a usable unencrypted key that matches the leaf,
    the validity window, safe SAN DNS names, and the chain. With
    ``verdicts``, bytes validated before (under the same trust) skip the
    cryptography; only the validity window is checked again.
    """
    now = now or datetime.now(UTC)
    cert_data = read_small_file(cert_path)
    key_data = read_small_file(key_path)
    key_pem = key_data.strip() + b"\n"

    digest = hashlib.sha256(_RULES)
    digest.update(trust.identity.encode())
    digest.update(hashlib.sha256(cert_data).digest())
    digest.update(hashlib.sha256(key_data).digest())
    if verdicts is not None:
        blocks = certificate_blocks(split_pem(cert_data, cert_path))
        known = verdicts.recall(
            digest.hexdigest(), cert_path, key_path, blocks
        )
        if known is not None and now < known.chain_not_after:
            pair = replace(known, key_pem=key_pem)
            pair.check_window(now)
            return pair

    pair = _validate(cert_path, key_path, cert_data, key_data, trust, now)
    if verdicts is not None:
        verdicts.remember(digest.hexdigest(), pair)
    return pair


def _validate(  # noqa: PLR0917 - the steps of one validation
    cert_path: Path,
    key_path: Path,
    cert_data: bytes,
    key_data: bytes,
    trust: TrustStore,
    now: datetime,
) -> Pair:
    certs = parse_certificates(cert_data, cert_path)
    key = parse_private_key(key_data, key_path)
    if not same_public_key(key, certs.leaf):
        msg = f"does not match the certificate in {cert_path}"
        raise PairError(str(key_path), msg)
    if not is_whole(key, certs.leaf):
        msg = (
            "matches the certificate's public key but cannot serve it;"
            " the key is damaged"
        )
        raise PairError(str(key_path), msg)

    leaf = certs.leaf
    pair = Pair(
        cert_path=cert_path,
        key_path=key_path,
        cert_pem=certs.pem,
        key_pem=key_data.strip() + b"\n",
        names=(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=f"{leaf.serial_number:x}",
        issuer=leaf.issuer.rfc4514_string(),
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        chain_not_after=min(
            cert.not_valid_after_utc for cert in (leaf, *certs.chain)
        ),
    )
    pair.check_window(now)
    names = dns_names(leaf, cert_path)
    trust.verify(certs, names[0], now, cert_path)
    return replace(pair, names=names)


def is_whole(key: PrivateKey, leaf: x509.Certificate) -> bool:
    """Say whether ``key`` can do what TLS asks of it for the leaf.

    An RSA or Ed25519 key must make a signature the leaf's public key
    accepts: for RSA this catches damaged private numbers behind a
    matching public half, at a fraction of the cost of OpenSSL's full
    consistency check. An EC key needs nothing more: cryptography
    refuses to load one whose public point is not its scalar's, so the
    public half :func:`same_public_key` compared is the scalar's own.
    """
    try:
        public = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return False
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return isinstance(public, ec.EllipticCurvePublicKey)
    data = b"certwatchd key check"
    try:
        if isinstance(key, rsa.RSAPrivateKey) and isinstance(
            public, rsa.RSAPublicKey
        ):
            pad = padding.PKCS1v15()
            signature = key.sign(data, pad, hashes.SHA256())
            public.verify(signature, data, pad, hashes.SHA256())
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
