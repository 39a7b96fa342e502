"""Properties of the loading entry points over arbitrary and mutated bytes.

The contract: every entry point returns a value or raises PairError,
never anything else, and never hangs. Mutations start from a fixed PKI
(RSA signatures and Ed25519 keys are deterministic, the clock is pinned)
and Hypothesis runs derandomized, so a run that fails fails every time.
"""

from __future__ import annotations

import base64
import binascii
import os
import random
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certwatchd.certificate import (
    CertificateFile,
    Pair,
    TrustStore,
    load_pair,
    parse_certificates,
    parse_private_key,
)
from certwatchd.errors import PairError
from certwatchd.pem import read_small_file, split_pem
from certwatchd.sources import Pending, Source, read_lineage

EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
NOW = EPOCH + timedelta(days=30)
PATH = Path("/nonexistent/fullchain.pem")
LINKS = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")
_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z ]+)-----\n(.*?)-----END \1-----\n", re.DOTALL
)

pytestmark = pytest.mark.timeout(60)

CHECKS = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),
    max_examples=150,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)


def is_probable_prime(number: int) -> bool:
    """Run Miller-Rabin with fixed bases: enough for test keys."""
    for small in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if number % small == 0:
            return number == small
    odd, shifts = number - 1, 0
    while odd % 2 == 0:
        odd, shifts = odd // 2, shifts + 1
    for base in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        value = pow(base, odd, number)
        if value in {1, number - 1}:
            continue
        for _ in range(shifts - 1):
            value = pow(value, 2, number)
            if value == number - 1:
                break
        else:
            return False
    return True


def seeded_prime(seed: int, bits: int) -> int:
    """Return the first probable prime from a seeded starting point."""
    rng = random.Random(seed)  # noqa: S311 - reproducible, not secret
    candidate = rng.getrandbits(bits) | 3 << (bits - 2) | 1
    while not is_probable_prime(candidate) or candidate % 65537 == 1:
        candidate += 2
    return candidate


def seeded_rsa(seed: int, bits: int = 2048) -> rsa.RSAPrivateKey:
    """Build the same RSA key for the same seed."""
    p = seeded_prime(seed, bits // 2)
    q = seeded_prime(seed + 1000, bits // 2)
    exponent = 65537
    d = pow(exponent, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=d % (p - 1),
        dmq1=d % (q - 1),
        iqmp=pow(q, -1, p),
        public_numbers=rsa.RSAPublicNumbers(exponent, p * q),
    )
    return numbers.private_key()


def certificate(
    subject: str,
    key,
    issuer: tuple[str, rsa.RSAPrivateKey] | None,
    *,
    serial: int,
    names: tuple[str, ...] = (),
) -> x509.Certificate:
    """Sign a certificate deterministically (RSA PKCS#1 v1.5)."""
    subject_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    )
    issuer_name, signer = subject_name, key
    if issuer is not None:
        issuer_name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]
        )
        signer = issuer[1]
    is_ca = not names
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(EPOCH - timedelta(days=365 if is_ca else 1))
        .not_valid_after(EPOCH + timedelta(days=3650 if is_ca else 90))
        .add_extension(
            x509.BasicConstraints(
                ca=is_ca, path_length=None if not is_ca else 1
            ),
            critical=True,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.public_key()
            ),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        ).add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def pem(item) -> bytes:
    """Encode a certificate or an unencrypted PKCS#8 key as PEM."""
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Pki:
    """A fixed root, intermediate and three leaves with their keys."""

    def __init__(self) -> None:
        root_key, intermediate_key = seeded_rsa(1), seeded_rsa(2)
        self.root = certificate("root", root_key, None, serial=1)
        intermediate = certificate(
            "intermediate", intermediate_key, ("root", root_key), serial=2
        )
        signer = ("intermediate", intermediate_key)
        keys = {
            "ec": ec.derive_private_key(3, ec.SECP256R1()),
            "ed25519": ed25519.Ed25519PrivateKey.from_private_bytes(
                bytes(31) + b"\x04"
            ),
            "rsa": seeded_rsa(5),
        }
        self.pairs: dict[str, tuple[bytes, bytes]] = {}
        self.leaves: set[str] = set()
        for serial, (kind, key) in enumerate(keys.items(), start=10):
            leaf = certificate(
                "example.com",
                key,
                signer,
                serial=serial,
                names=("example.com", f"{kind}.example.com"),
            )
            fullchain = pem(leaf) + pem(intermediate)
            self.pairs[kind] = (fullchain, pem(key))
            self.leaves.add(leaf.fingerprint(hashes.SHA256()).hex())
        self.certificates = [c for c, _ in self.pairs.values()]
        self.keys = [k for _, k in self.pairs.values()]
        self.files = self.certificates + self.keys


@pytest.fixture(scope="module")
def pki() -> Pki:
    """Build the fixed PKI once per module."""
    return Pki()


@pytest.fixture(scope="module")
def trust(pki, tmp_path_factory) -> TrustStore:
    """Trust the fixed root only."""
    roots = tmp_path_factory.mktemp("roots") / "roots.pem"
    roots.write_bytes(pem(pki.root))
    return TrustStore.from_setting(str(roots))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Give a directory that examples overwrite in turn."""
    return tmp_path_factory.mktemp("scratch")


def blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split PEM into (label, DER) pairs, skipping undecodable blocks."""
    found = []
    for label, body in _BLOCK.findall(data):
        try:
            found.append((label, base64.b64decode(body)))
        except binascii.Error:
            continue
    return found


def armour(label: bytes, der: bytes) -> bytes:
    """Encode DER as a PEM block with 64-column lines."""
    text = base64.b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return (
        b"\n".join(
            [
                b"-----BEGIN " + label + b"-----",
                *lines,
                b"-----END " + label + b"-----",
            ]
        )
        + b"\n"
    )


@st.composite
def mutated(draw, originals: list[bytes]) -> bytes:
    """Take a valid PEM file and spoil it one to three times."""
    data = draw(st.sampled_from(originals))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(
            st.sampled_from(
                ["truncate", "flip", "der", "delete", "repeat", "splice"]
            )
        )
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if how == "truncate":
            data = data[:at]
        elif how == "flip" and data:
            bit = draw(st.integers(1, 255))
            data = data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :]
        elif how == "der":
            data = flip_der(draw, data)
        elif how == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 64)) :]
        elif how == "repeat":
            data = (
                data[:at]
                + data[at : at + draw(st.integers(1, 64))]
                + data[at:]
            )
        elif how == "splice":
            data = splice(draw, data, originals)
    return data


def flip_der(draw, data: bytes) -> bytes:
    """Change one byte inside the DER of one block, and re-armour."""
    found = blocks(data)
    if not found:
        return data
    index = draw(st.integers(0, len(found) - 1))
    label, der = found[index]
    at = draw(st.integers(0, len(der) - 1))
    value = draw(st.integers(0, 255))
    found[index] = (label, der[:at] + bytes([value]) + der[at + 1 :])
    return b"".join(armour(label, der) for label, der in found)


def splice(draw, data: bytes, originals: list[bytes]) -> bytes:
    """Reorder, drop or borrow whole blocks, with odd separators."""
    pool = blocks(data) + [b for o in originals for b in blocks(o)]
    if not pool:
        return data
    chosen = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
    glue = draw(st.sampled_from([b"", b"\n", b"\r\n", b" \t\n", b"junk\n"]))
    return glue.join(armour(label, der) for label, der in chosen)


def outcome(call, *args):
    """Return what ``call`` returned, or the PairError it raised."""
    try:
        return call(*args)
    except PairError as error:
        refusal = error
    assert refusal.path
    assert refusal.reason
    return refusal


def write(directory: Path, name: str, data: bytes) -> Path:
    """Replace ``directory/name`` with a regular file holding ``data``."""
    path = directory / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.write_bytes(data)
    return path


PEMISH = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"-----BEGIN CERTIFICATE-----\n",
                b"-----END CERTIFICATE-----",
                b"-----BEGIN PRIVATE KEY-----\r\n",
                b"-----END PRIVATE KEY-----",
                b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n",
                b"Proc-Type: 4,ENCRYPTED\n",
                b"MIIB",
                b"\n",
                b"\r\n",
                b" ",
                b"\x30\x82",
            ]
        ),
        st.binary(max_size=16),
    ),
    max_size=24,
).map(b"".join)
ANY_BYTES = st.one_of(st.binary(max_size=4096), PEMISH)


@CHECKS
@given(data=ANY_BYTES)
def test_split_pem_returns_whole_blocks_or_refuses(data):
    """split_pem yields only complete blocks, or raises PairError."""
    result = outcome(split_pem, data, PATH)

    if not isinstance(result, PairError):
        assert result
        for label, block in result:
            assert block.startswith(b"-----BEGIN " + label + b"-----")
            assert block.rstrip().endswith(b"-----END " + label + b"-----")


@CHECKS
@given(data=ANY_BYTES)
def test_parse_certificates_of_arbitrary_bytes(data):
    """Arbitrary bytes are never mistaken for a certificate file."""
    result = outcome(parse_certificates, data, PATH)

    assert isinstance(result, PairError)


@CHECKS
@given(data=ANY_BYTES)
def test_parse_private_key_of_arbitrary_bytes(data):
    """Arbitrary bytes are never mistaken for a private key."""
    result = outcome(parse_private_key, data, PATH)

    assert isinstance(result, PairError)


@settings(CHECKS, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=65536))
def test_read_small_file_returns_exactly_what_the_file_holds(scratch, data):
    """A regular file under the limit is read whole and unchanged."""
    path = write(scratch, "small.pem", data)

    assert read_small_file(path) == data


@settings(CHECKS, suppress_health_check=list(HealthCheck))
@given(cert=ANY_BYTES, key=ANY_BYTES)
def test_load_pair_of_arbitrary_files(scratch, trust, cert, key):
    """Two files of arbitrary bytes are refused, never anything else."""
    cert_path = write(scratch, "fullchain.pem", cert)
    key_path = write(scratch, "privkey.pem", key)

    result = outcome(load_pair, cert_path, key_path, trust, NOW)

    assert isinstance(result, PairError)


@CHECKS
@given(data=st.data())
def test_parse_certificates_of_mutated_pem(pki, data):
    """A spoiled certificate file parses to a CertificateFile or is refused."""
    spoiled = data.draw(mutated(pki.files))

    result = outcome(parse_certificates, spoiled, PATH)

    assert isinstance(result, (CertificateFile, PairError))


@CHECKS
@given(data=st.data())
def test_parse_private_key_of_mutated_pem(pki, data):
    """A spoiled key file parses to a usable key or is refused."""
    spoiled = data.draw(mutated(pki.files))

    result = outcome(parse_private_key, spoiled, PATH)

    if not isinstance(result, PairError):
        assert result.public_key() is not None


@settings(CHECKS, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_load_pair_of_mutated_pem_never_accepts_another_leaf(
    pki, trust, scratch, data
):
    """A spoiled pair is refused, or is exactly one of the original leaves."""
    kind = data.draw(st.sampled_from(sorted(pki.pairs)))
    cert, key = pki.pairs[kind]
    which = data.draw(st.sampled_from(["cert", "key", "both"]))
    if which in {"cert", "both"}:
        cert = data.draw(mutated(pki.files))
    if which in {"key", "both"}:
        key = data.draw(mutated(pki.files))
    cert_path = write(scratch, "fullchain.pem", cert)
    key_path = write(scratch, "privkey.pem", key)

    result = outcome(load_pair, cert_path, key_path, trust, NOW)

    if not isinstance(result, PairError):
        assert isinstance(result, Pair)
        assert result.fingerprint in pki.leaves


@CHECKS
@given(data=st.data())
def test_spliced_certificate_blocks_keep_the_first_as_leaf(pki, data):
    """Whole blocks in any order: the first is the leaf, or it is refused."""
    pool = [b for c in pki.certificates for b in blocks(c)]
    chosen = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
    glue = data.draw(st.sampled_from([b"\n", b"\r\n", b"\n\n \n"]))
    text = glue.join(armour(label, der) for label, der in chosen)

    result = outcome(parse_certificates, text, PATH)

    first = x509.load_der_x509_certificate(chosen[0][1])
    if isinstance(result, PairError):
        assert "leaf must come first" in result.reason
    else:
        assert result.leaf == first
        assert len(result.chain) == len(chosen) - 1


@CHECKS
@given(data=st.data())
def test_truncated_fullchain_keeps_its_leaf_or_is_refused(pki, data):
    """Cutting a fullchain anywhere never yields a different leaf."""
    fullchain = data.draw(st.sampled_from(pki.certificates))
    at = data.draw(st.integers(0, len(fullchain)))

    result = outcome(parse_certificates, fullchain[:at], PATH)

    if not isinstance(result, PairError):
        leaf = x509.load_pem_x509_certificate(fullchain)
        assert result.leaf == leaf


NAME_BYTES = (
    st.binary(min_size=1, max_size=255)
    .map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
    .filter(lambda b: b not in {b".", b".."})
)
TARGETS = st.one_of(
    st.sampled_from(
        [
            b"/dev/zero",
            b"/dev/urandom",
            b"/nonexistent",
            b".",
            b"..",
            b"fullchain.pem",
            b"privkey.pem",
            b"../../archive/good/fullchain1.pem",
            b"../../archive/good/privkey1.pem",
            b"../../archive/good/fullchain2.pem",
            b"../../archive/good/cert1.pem",
            b"../../archive/good",
        ]
    ),
    st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\0", b"_")),
)
ENTRY = st.one_of(
    st.none(),
    st.tuples(st.just("link"), TARGETS),
    st.tuples(st.just("file"), ANY_BYTES),
    st.tuples(st.just("directory"), st.none()),
    st.tuples(st.just("fifo"), st.none()),
)


def make_entry(path: Path, entry) -> None:
    """Create ``path`` as a link, file, directory or FIFO, or nothing."""
    if entry is None:
        return
    kind, value = entry
    if kind == "link":
        os.symlink(value, os.fsencode(path))
    elif kind == "file":
        path.write_bytes(value)
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)


LINEAGES = st.tuples(
    NAME_BYTES,
    st.fixed_dictionaries(dict.fromkeys((*LINKS, "previous_cert.pem"), ENTRY)),
    st.booleans(),
)


@settings(CHECKS, max_examples=100, suppress_health_check=list(HealthCheck))
@given(lineage=LINEAGES)
def test_read_lineage_of_arbitrary_names_and_links(
    pki, trust, scratch, lineage
):
    """A lineage of odd names and links is a source, pending or nothing."""
    name, entries, settled = lineage
    root = scratch / "tree"
    if root.exists():
        shutil.rmtree(root)
    archive = root / "archive" / "good"
    archive.mkdir(parents=True)
    fullchain, key = pki.pairs["ec"]
    (archive / "fullchain1.pem").write_bytes(fullchain)
    (archive / "privkey1.pem").write_bytes(key)
    directory = root / "live" / os.fsdecode(name)
    directory.mkdir(parents=True)
    for link, entry in entries.items():
        make_entry(directory / link, entry)

    found = read_lineage(root / "live", os.fsdecode(name), settled=settled)

    assert found is None or isinstance(found, (Source, Pending))
    if isinstance(found, Source):
        pair = outcome(load_pair, found.cert_path, found.key_path, trust, NOW)
        assert isinstance(pair, (Pair, PairError))


def test_a_serial_number_of_zero_is_refused_without_a_warning(pki):
    """A leaf numbered 0 is refused; no deprecation warning escapes."""
    fullchain = pki.certificates[0]
    (label, der), chain = blocks(fullchain)
    assert der.count(b"\x02\x01\x0a") == 1
    spoiled = armour(label, der.replace(b"\x02\x01\x0a", b"\x02\x01\x00"))

    result = outcome(parse_certificates, spoiled + armour(*chain), PATH)

    assert isinstance(result, PairError)
    assert "serial number is not positive" in result.reason
    assert not result.breaks_tls
