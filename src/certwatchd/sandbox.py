"""A throwaway PKI and a certbot-shaped configuration tree.

`Authority` issues leaf certificates from a private root and intermediate;
`LetsEncryptTree` lays them out and renews them the way certbot 2.x does, so
the daemon, its tests and its benchmarks meet the same files, modes, links
and renewal order as on a real machine. Nothing here is fit to protect
anything: keys are kept in memory and written unencrypted.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificatePublicKeyTypes,
    )

KeyType = Literal["ec", "rsa", "ed25519"]

_LeafKey = (
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
)

_CA_LIFETIME = timedelta(days=3650)
_CA_BACKDATE = timedelta(days=1)
_LEAF_BACKDATE = timedelta(hours=1)
_LEAF_LIFETIME = timedelta(days=90)
_COMMON_NAME_MAX = 64

# The order certbot's storage code swaps the live links in.
_KINDS = ("cert", "privkey", "chain", "fullchain")
# The order it writes a new generation into the archive.
_WRITE_ORDER = ("privkey", "cert", "chain", "fullchain")

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_TOP_DIR_MODE = 0o700
_LINEAGE_DIR_MODE = 0o755

_LIVE_README = b"""\
Each directory here is one certificate lineage. Its cert.pem, chain.pem,
fullchain.pem and privkey.pem are symbolic links into ../archive/, and
every renewal points them at a newer generation. Read the files through
these links rather than copying them: copies go stale at the next renewal.
"""

_LINEAGE_README = b"""\
cert.pem       the server certificate alone
chain.pem      the intermediate certificate(s)
fullchain.pem  cert.pem followed by chain.pem; what most servers want
privkey.pem    the private key; keep it secret

These are links into ../../archive/ and move at every renewal.
"""


@dataclass(frozen=True)
class Issued:
    """One issued leaf with its key and chain, all PEM bytes.

    The key is unencrypted PKCS8; `cert_pem` holds the leaf alone and
    `chain_pem` the intermediate alone.
    """

    key_pem: bytes
    cert_pem: bytes
    chain_pem: bytes

    @property
    def fullchain_pem(self) -> bytes:
        """The leaf followed by the intermediate."""
        return self.cert_pem + self.chain_pem


class Authority:
    """A throwaway root CA and intermediate that issue leaf certificates.

    Build one with `create`; both CA keys are EC P-256 and live only in
    memory. A leaf verifies against `root_pem`, with `intermediate_pem` as
    its chain, under the web PKI policy of cryptography's verifier for any
    well-formed name among its DNS names.
    """

    root_pem: bytes
    intermediate_pem: bytes

    def __init__(
        self,
        root_cert: x509.Certificate,
        intermediate_key: ec.EllipticCurvePrivateKey,
        intermediate_cert: x509.Certificate,
    ) -> None:
        self._intermediate_key = intermediate_key
        self._intermediate_cert = intermediate_cert
        self.root_pem = root_cert.public_bytes(serialization.Encoding.PEM)
        self.intermediate_pem = intermediate_cert.public_bytes(
            serialization.Encoding.PEM
        )

    @classmethod
    def create(cls, name: str = "certwatchd throwaway CA") -> Authority:
        """Make a fresh root and an intermediate signed by it."""
        now = datetime.now(UTC)
        not_before = now - _CA_BACKDATE
        not_after = now + _CA_LIFETIME

        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _ca_name(name, "root")
        root_cert = _builder(
            subject=root_name,
            issuer=root_name,
            public_key=root_key.public_key(),
            issuer_key=root_key,
            validity=(not_before, not_after),
            basic_constraints=x509.BasicConstraints(ca=True, path_length=None),
            key_usage=_CA_KEY_USAGE,
            purposes=None,
        ).sign(root_key, hashes.SHA256())

        intermediate_key = ec.generate_private_key(ec.SECP256R1())
        intermediate_cert = _builder(
            subject=_ca_name(name, "intermediate"),
            issuer=root_name,
            public_key=intermediate_key.public_key(),
            issuer_key=root_key,
            validity=(not_before, not_after),
            basic_constraints=x509.BasicConstraints(ca=True, path_length=0),
            key_usage=_CA_KEY_USAGE,
            purposes=[
                ExtendedKeyUsageOID.SERVER_AUTH,
                ExtendedKeyUsageOID.CLIENT_AUTH,
            ],
        ).sign(root_key, hashes.SHA256())

        return cls(root_cert, intermediate_key, intermediate_cert)

    def issue(
        self,
        names: Sequence[str],
        *,
        key_type: KeyType = "ec",
        rsa_bits: int = 2048,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        common_name: str | None = None,
    ) -> Issued:
        """Issue a leaf for `names` with a new key of `key_type`.

        Names go into the SAN extension verbatim, however malformed, as
        long as they are ASCII; no names means no SAN extension. The
        validity defaults to 90 days from an hour ago. The common name
        defaults to the first name when it is 1 to 64 characters long,
        as Let's Encrypt does; otherwise the subject is empty.
        """
        key = _leaf_key(key_type, rsa_bits)

        if not_before is None:
            not_before = datetime.now(UTC) - _LEAF_BACKDATE
        if not_after is None:
            not_after = not_before + _LEAF_LIFETIME
        if common_name is None and names:
            first = names[0]
            if 1 <= len(first) <= _COMMON_NAME_MAX:
                common_name = first

        subject = x509.Name(
            []
            if common_name is None
            else [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        )
        builder = _builder(
            subject=subject,
            issuer=self._intermediate_cert.subject,
            public_key=key.public_key(),
            issuer_key=self._intermediate_key,
            validity=(not_before, not_after),
            basic_constraints=x509.BasicConstraints(
                ca=False, path_length=None
            ),
            key_usage=_key_usage(
                digital_signature=True,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
            ),
            purposes=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        if names:
            # RFC 5280 wants the SAN critical when the subject is empty.
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                critical=common_name is None,
            )
        cert = builder.sign(self._intermediate_key, hashes.SHA256())

        return Issued(
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            chain_pem=self.intermediate_pem,
        )

    def write_roots(self, path: Path) -> Path:
        """Write the root certificate to `path` (0644, replacing any file).

        Returns `path`, ready for a CA bundle setting.
        """
        path.unlink(missing_ok=True)
        _write_file(path, self.root_pem, _PUBLIC_MODE)

        return path


class LetsEncryptTree:
    """A certbot --config-dir whose live/ links into archive/.

    Lineages are created and renewed the way certbot does it.
    Construction creates `config_dir`, and `live/` (with its README) and
    `archive/` at mode 0700 when they are missing; existing directories
    are left as they are. Files are not fsynced: this tree is for tests
    and benchmarks, not for surviving a power cut.
    """

    config_dir: Path
    live: Path
    archive: Path

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.live = config_dir / "live"
        self.archive = config_dir / "archive"

        config_dir.mkdir(parents=True, exist_ok=True)
        for directory in (self.archive, self.live):
            if not directory.exists():
                directory.mkdir(mode=_TOP_DIR_MODE)
                # mkdir's mode is filtered by the umask; say it exactly.
                directory.chmod(_TOP_DIR_MODE)

        readme = self.live / "README"
        if not readme.exists():
            _write_file(readme, _LIVE_README, _PUBLIC_MODE)

    def create_lineage(self, name: str, issued: Issued) -> Path:
        """Create lineage `name` at version 1 and return its live directory.

        Raises FileExistsError when the lineage already exists, and
        ValueError when `name` cannot be a single directory name.
        """
        _check_lineage_name(name)
        archive_dir = self.archive / name
        live_dir = self.live / name

        archive_dir.mkdir(mode=_LINEAGE_DIR_MODE)
        live_dir.mkdir(mode=_LINEAGE_DIR_MODE)

        self._write_generation(name, 1, issued)

        for kind in _KINDS:
            link = live_dir / _pem(kind)
            link.symlink_to(self._link_target(name, kind, 1))
        _write_file(live_dir / "README", _LINEAGE_README, _PUBLIC_MODE)

        return live_dir

    def renew(self, name: str, issued: Issued, *, pause: float = 0.0) -> None:
        """Store `issued` as the next version of `name` and move the links.

        Follows certbot: the archive files first, then previous_*.pem links
        to the old targets, then unlink and symlink of cert, privkey, chain
        and fullchain in that order, sleeping `pause` seconds between two
        swaps, then the previous_*.pem links are removed.
        """
        _check_lineage_name(name)
        live_dir = self.live / name
        version = self._newest_archived(name) + 1

        self._write_generation(name, version, issued)

        previous = [live_dir / f"previous_{_pem(kind)}" for kind in _KINDS]
        for kind, link in zip(_KINDS, previous, strict=True):
            # certbot points these at absolute paths.
            current = live_dir / _pem(kind)
            target = os.path.normpath(live_dir.absolute() / current.readlink())
            link.symlink_to(target)

        for index, kind in enumerate(_KINDS):
            if index and pause > 0:
                time.sleep(pause)
            link = live_dir / _pem(kind)
            link.unlink()
            link.symlink_to(self._link_target(name, kind, version))

        for link in previous:
            link.unlink()

    def version(self, name: str) -> int:
        """Return the archive version that live/<name>/cert.pem points at.

        During a renewal the other links may still point at the old one.
        """
        _check_lineage_name(name)
        link = self.live / name / _pem("cert")
        target = link.readlink()

        match = re.fullmatch(r"cert(\d+)\.pem", target.name)
        if match is None:
            msg = f"{link} points at '{target}', expected .../certN.pem"
            raise ValueError(msg)

        return int(match.group(1))

    def _write_generation(
        self, name: str, version: int, issued: Issued
    ) -> None:
        """Write the four archive files of one version, the key first."""
        archive_dir = self.archive / name
        for kind in _WRITE_ORDER:
            mode = _PRIVATE_MODE if kind == "privkey" else _PUBLIC_MODE
            path = archive_dir / f"{kind}{version}.pem"
            _write_file(path, _content(issued, kind), mode)

    def _newest_archived(self, name: str) -> int:
        """Return the highest version of any file in archive/<name>/."""
        pattern = re.compile(r"(?:cert|privkey|chain|fullchain)(\d+)\.pem")
        versions = [
            int(match.group(1))
            for entry in (self.archive / name).iterdir()
            if (match := pattern.fullmatch(entry.name))
        ]
        if not versions:
            msg = f"archive/{name} holds no versions, expected at least 1"
            raise FileNotFoundError(msg)

        return max(versions)

    @staticmethod
    def _link_target(name: str, kind: str, version: int) -> str:
        """Return the relative target a live link of `kind` should have."""
        return f"../../archive/{name}/{kind}{version}.pem"


def _pem(kind: str) -> str:
    """Return the live file name of `kind`."""
    return f"{kind}.pem"


def _content(issued: Issued, kind: str) -> bytes:
    """Return what certbot stores in a file of `kind` for `issued`."""
    by_kind = {
        "cert": issued.cert_pem,
        "chain": issued.chain_pem,
        "fullchain": issued.fullchain_pem,
        "privkey": issued.key_pem,
    }

    return by_kind[kind]


def _check_lineage_name(name: str) -> None:
    """Raise ValueError unless `name` is usable as one directory name."""
    if not name or name in {".", ".."} or "/" in name or "\0" in name:
        msg = f"lineage name {name!r} is not a single directory name"
        raise ValueError(msg)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with exactly `mode` and write `data` to it.

    The file is created with `mode` itself, so it is never more open than
    that; the fchmod only restores bits the umask took away. An existing
    file, or a symlink in its place, is an error.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)

    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)
        file.write(data)


def _leaf_key(key_type: KeyType, rsa_bits: int) -> _LeafKey:
    """Generate a new leaf key of `key_type`."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(
            public_exponent=65537, key_size=rsa_bits
        )
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()

    msg = f"key type {key_type!r} is not one of 'ec', 'rsa', 'ed25519'"
    raise ValueError(msg)


def _ca_name(name: str, role: str) -> x509.Name:
    """Return the subject of the CA certificate playing `role`."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {role}"),
        ]
    )


def _builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    issuer_key: ec.EllipticCurvePrivateKey,
    validity: tuple[datetime, datetime],
    basic_constraints: x509.BasicConstraints,
    key_usage: x509.KeyUsage,
    purposes: list[x509.ObjectIdentifier] | None,
) -> x509.CertificateBuilder:
    """Return an unsigned certificate with the extensions all ours share.

    `purposes` becomes the extended key usage; None leaves it out.
    """
    not_before, not_after = validity
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(basic_constraints, critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()
            ),
            critical=False,
        )
    )
    if purposes is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(purposes), critical=False
        )

    return builder


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """Return a KeyUsage with only the named bits set."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


_CA_KEY_USAGE = _key_usage(
    digital_signature=True, key_cert_sign=True, crl_sign=True
)
