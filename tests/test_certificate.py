import base64
import os
import textwrap
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from certwatchd.certificate import (
    TrustStore,
    load_pair,
    parse_certificates,
    parse_private_key,
)
from certwatchd.errors import ConfigError, PairError
from certwatchd.pem import MAX_FILE_BYTES, read_small_file, split_pem
from certwatchd.sandbox import Authority

NOW = datetime.now(UTC).replace(microsecond=0)


def pem(key, encryption=None, form=serialization.PrivateFormat.PKCS8):
    return key.private_bytes(
        serialization.Encoding.PEM,
        form,
        encryption or serialization.NoEncryption(),
    )


def write(directory, name, data):
    path = directory / name
    path.write_bytes(data)
    return path


def pair_files(tmp_path, issued, cert=None, key=None):
    cert_path = write(tmp_path, "fullchain.pem", cert or issued.fullchain_pem)
    key_path = write(tmp_path, "privkey.pem", key or issued.key_pem)
    return cert_path, key_path


@pytest.fixture(scope="module")
def trust(authority, tmp_path_factory):
    roots = tmp_path_factory.mktemp("roots") / "roots.pem"
    return TrustStore.from_setting(str(authority.write_roots(roots)))


@pytest.fixture(scope="module")
def issued(authority):
    return authority.issue(["example.com", "www.example.com"])


@pytest.fixture(scope="module")
def issued_pem(issued):
    return issued.fullchain_pem


@pytest.fixture(scope="module")
def stranger():
    return Authority.create("certwatchd stranger CA")


def refusal(call, *args):
    with pytest.raises(PairError) as caught:
        call(*args)
    return caught.value


def test_reads_a_regular_file_through_a_symlink(tmp_path):
    """A link to a regular file is followed and read."""
    target = write(tmp_path, "target", b"data")
    link = tmp_path / "link"
    link.symlink_to(target)

    assert read_small_file(link) == b"data"


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_without_blocking(tmp_path):
    """A FIFO with no writer is refused at once, not waited on."""
    fifo = tmp_path / "privkey.pem"
    os.mkfifo(fifo)

    error = refusal(read_small_file, fifo)

    assert error.path == str(fifo)
    assert "FIFO" in error.reason


@pytest.mark.timeout(10)
def test_dev_zero_is_refused_without_reading(tmp_path):
    """A link to /dev/zero is refused as a device, not read forever."""
    link = tmp_path / "privkey.pem"
    link.symlink_to("/dev/zero")

    assert "device" in refusal(read_small_file, link).reason


def test_a_directory_is_refused(tmp_path):
    """A directory in place of a file is refused."""
    assert "directory" in refusal(read_small_file, tmp_path).reason


def test_a_dangling_link_is_refused(tmp_path):
    """A link whose target is gone is refused, not an exception."""
    link = tmp_path / "privkey.pem"
    link.symlink_to(tmp_path / "gone")

    assert "does not exist" in refusal(read_small_file, link).reason


def test_a_link_loop_is_refused(tmp_path):
    """A symlink loop is refused."""
    link = tmp_path / "loop.pem"
    link.symlink_to(link)

    assert "loop" in refusal(read_small_file, link).reason


def test_one_mebibyte_is_read_and_one_byte_more_is_refused(tmp_path):
    """Files up to exactly 1 MiB are read; larger ones are refused."""
    fits = write(tmp_path, "fits", b"a" * MAX_FILE_BYTES)
    too_big = write(tmp_path, "big", b"a" * (MAX_FILE_BYTES + 1))

    assert len(read_small_file(fits)) == MAX_FILE_BYTES
    assert "1 MiB" in refusal(read_small_file, too_big).reason


def test_a_sparse_huge_file_is_refused_before_reading(tmp_path):
    """A file whose size is huge is refused by its size alone."""
    huge = tmp_path / "huge"
    with huge.open("wb") as handle:
        handle.truncate(1 << 40)

    assert "1 MiB" in refusal(read_small_file, huge).reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"hello", "not PEM"),
        (b"\x30\x82\x01\x0a", "DER"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n", "truncated"),
    ],
)
def test_split_pem_refuses_what_is_not_pem(tmp_path, data, reason):
    """Empty, plain, binary and truncated data are refused with a reason."""
    error = refusal(split_pem, data, tmp_path / "x.pem")

    assert reason in error.reason


def test_split_pem_refuses_trailing_junk(issued_pem, tmp_path):
    """Text after the last block is refused, not ignored."""
    error = refusal(split_pem, issued_pem + b"junk\n", tmp_path / "x.pem")

    assert "not PEM" in error.reason


def test_parse_certificates_keeps_leaf_first(issued, tmp_path):
    """The first block is the leaf and the rest its chain."""
    parsed = parse_certificates(issued.fullchain_pem, tmp_path / "x")

    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert parsed.leaf == leaf
    assert len(parsed.chain) == 1
    assert parsed.pem == issued.fullchain_pem


def test_parse_certificates_refuses_a_key_block(issued, tmp_path):
    """A private key inside the certificate file is refused."""
    data = issued.fullchain_pem + issued.key_pem

    assert "private key" in refusal(parse_certificates, data, tmp_path).reason


KEYS = {
    "rsa-2048": lambda: rsa.generate_private_key(
        public_exponent=65537, key_size=2048
    ),
    "rsa-1024": lambda: rsa.generate_private_key(
        public_exponent=65537,
        key_size=1024,  # noqa: S505 - a key that must be refused
    ),
    "p-256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p-384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "dsa": lambda: dsa.generate_private_key(
        key_size=1024,  # noqa: S505 - a key that must be refused
    ),
}


@pytest.mark.parametrize("kind", ["rsa-2048", "p-256", "p-384", "ed25519"])
def test_accepted_key_types(tmp_path, kind):
    """Unencrypted RSA of 2048 bits, EC and Ed25519 keys are accepted."""
    key = KEYS[kind]()
    parsed = parse_private_key(pem(key), tmp_path / "k")

    assert parsed.public_key() == key.public_key()


def test_traditional_rsa_and_ec_encodings_are_accepted(tmp_path):
    """BEGIN RSA PRIVATE KEY and BEGIN EC PRIVATE KEY load as well."""
    traditional = serialization.PrivateFormat.TraditionalOpenSSL
    for key in (KEYS["rsa-2048"](), KEYS["p-256"]()):
        parse_private_key(pem(key, form=traditional), tmp_path / "k")


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("rsa-1024", "1024-bit RSA"),
        ("secp256k1", "secp256k1"),
        ("dsa", "expected an RSA, EC or Ed25519 key"),
    ],
)
def test_refused_key_types(tmp_path, kind, reason):
    """Short RSA, unusual curves and DSA keys are refused."""
    error = refusal(parse_private_key, pem(KEYS[kind]()), tmp_path / "k")

    assert reason in error.reason


@pytest.mark.parametrize(
    "form",
    [
        serialization.PrivateFormat.PKCS8,
        serialization.PrivateFormat.TraditionalOpenSSL,
    ],
    ids=["pkcs8", "traditional"],
)
def test_encrypted_keys_are_refused(tmp_path, form):
    """A key protected by a passphrase is refused as encrypted."""
    key = ec.generate_private_key(ec.SECP256R1())
    data = pem(key, serialization.BestAvailableEncryption(b"pw"), form)

    error = refusal(parse_private_key, data, tmp_path / "k")

    assert "encrypted" in error.reason


def test_two_keys_in_one_file_are_refused(tmp_path):
    """A key file holds exactly one key."""
    data = pem(ec.generate_private_key(ec.SECP256R1())) * 2

    assert "2 PEM blocks" in refusal(parse_private_key, data, tmp_path).reason


def test_a_certificate_in_the_key_file_is_refused(issued, tmp_path):
    """A certificate where the key belongs is refused."""
    error = refusal(parse_private_key, issued.cert_pem, tmp_path)

    assert "certificate" in error.reason


def test_a_valid_pair_loads_with_its_names(issued, trust, tmp_path):
    """A matching, current, verifying pair loads with its DNS names."""
    pair = load_pair(*pair_files(tmp_path, issued), trust)

    assert pair.names == ("example.com", "www.example.com")
    assert pair.key_pem == issued.key_pem
    assert pair.cert_pem == issued.fullchain_pem


def test_a_key_that_does_not_match_is_refused(
    issued, authority, trust, tmp_path
):
    """The key must be the private half of the leaf's public key."""
    other = authority.issue(["example.com"]).key_pem
    cert, key = pair_files(tmp_path, issued, key=other)

    error = refusal(load_pair, cert, key, trust)

    assert error.path == str(key)
    assert "does not match" in error.reason


def test_an_ec_key_whose_scalar_is_not_the_leafs_is_refused(
    issued, trust, tmp_path
):
    """A stored public point that matches cannot hide a foreign scalar.

    Only the public halves are compared: this holds because the key is
    refused when loaded, which is what this test pins down.
    """
    key = serialization.load_pem_private_key(issued.key_pem, None)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    other = ec.generate_private_key(key.curve)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    foreign = other.private_numbers().private_value.to_bytes(32, "big")
    assert der.count(scalar) == 1
    damaged = der.replace(scalar, foreign)
    body = base64.encodebytes(damaged).decode().replace("\n", "")
    lines = textwrap.wrap(body, 64)
    key_pem = "\n".join(
        [
            "-----BEGIN EC PRIVATE KEY-----",
            *lines,
            "-----END EC PRIVATE KEY-----",
            "",
        ]
    ).encode()
    cert, key_path = pair_files(tmp_path, issued, key=key_pem)

    error = refusal(load_pair, cert, key_path, trust)

    assert error.path == str(key_path)
    assert "cannot be parsed" in error.reason


def test_the_leaf_must_come_first(issued, trust, tmp_path):
    """A certificate file that starts with the intermediate is refused."""
    cert, key = pair_files(
        tmp_path, issued, cert=issued.chain_pem + issued.cert_pem
    )

    error = refusal(load_pair, cert, key, trust)

    assert error.path == str(cert)
    assert "leaf" in error.reason


@pytest.mark.parametrize(
    ("window", "reason"),
    [
        ((NOW + timedelta(hours=1), NOW + timedelta(days=90)), "not valid"),
        ((NOW - timedelta(days=90), NOW - timedelta(seconds=1)), "expired"),
    ],
    ids=["not-yet-valid", "expired"],
)
def test_validity_window_is_enforced(
    authority, trust, tmp_path, window, reason
):
    """A certificate outside notBefore..notAfter is refused."""
    start, end = window
    issued = authority.issue(["example.com"], not_before=start, not_after=end)

    error = refusal(load_pair, *pair_files(tmp_path, issued), trust)

    assert reason in error.reason


def test_now_is_taken_from_the_caller(authority, trust, tmp_path):
    """The validity check uses the time it is given."""
    issued = authority.issue(["example.com"])
    files = pair_files(tmp_path, issued)

    refusal(load_pair, *files, trust, NOW + timedelta(days=365))
    load_pair(*files, trust, NOW + timedelta(days=30))


def test_a_leaf_without_dns_names_is_refused(authority, trust, tmp_path):
    """A certificate with only a common name is refused."""
    issued = authority.issue([], common_name="example.com")

    error = refusal(load_pair, *pair_files(tmp_path, issued), trust)

    assert "no DNS name" in error.reason


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd.example",
        "a/b.example",
        "example..com",
        ".example.com",
        "example.com.",
        "Example.com",
        "exa mple.com",
        "*.*.example.com",
        "*",
        "-bad.example.com",
        "localhost",
    ],
)
def test_unsafe_names_refuse_the_pair(authority, trust, tmp_path, name):
    """Any SAN that is not a safe lower-case DNS name refuses the pair."""
    issued = authority.issue(["example.com", name])

    error = refusal(load_pair, *pair_files(tmp_path, issued), trust)

    assert "not a lower-case DNS name" in error.reason


def test_a_wildcard_name_is_accepted(authority, trust, tmp_path):
    """A one-label wildcard SAN is a valid name for a pair."""
    issued = authority.issue(["*.example.com"])

    pair = load_pair(*pair_files(tmp_path, issued), trust)

    assert pair.names == ("*.example.com",)


@pytest.mark.parametrize("key_type", ["ec", "rsa", "ed25519"])
def test_chain_verifies_for_every_key_type(
    authority, trust, tmp_path, key_type
):
    """The server-auth policy accepts each supported leaf key type."""
    issued = authority.issue(["example.com"], key_type=key_type)

    load_pair(*pair_files(tmp_path, issued), trust)


def test_untrusted_root_is_refused(stranger, trust, tmp_path):
    """A chain to a root outside the trusted roots is refused."""
    issued = stranger.issue(["example.com"])

    error = refusal(load_pair, *pair_files(tmp_path, issued), trust)

    assert "does not verify" in error.reason


def test_missing_intermediate_is_refused(issued, trust, tmp_path):
    """A leaf alone does not verify without its intermediate."""
    cert, key = pair_files(tmp_path, issued, cert=issued.cert_pem)

    assert "does not verify" in refusal(load_pair, cert, key, trust).reason


def test_trust_none_skips_verification(stranger, tmp_path):
    """With trust "none", an unknown root does not refuse the pair."""
    issued = stranger.issue(["example.com"])
    trust = TrustStore.from_setting("none")

    assert not trust.verifies
    load_pair(*pair_files(tmp_path, issued), trust)


def test_system_trust_refuses_a_private_root(issued, tmp_path):
    """The OS trust store does not contain the throwaway root."""
    trust = TrustStore.from_setting("system")

    error = refusal(load_pair, *pair_files(tmp_path, issued), trust)

    assert "does not verify" in error.reason


def test_unreadable_roots_file_is_a_config_error(tmp_path):
    """A roots file that holds no certificates is a configuration error."""
    roots = write(tmp_path, "roots.pem", b"not a certificate\n")

    with pytest.raises(ConfigError, match=r"validation\.trust"):
        TrustStore.from_setting(str(roots))


def test_pair_facts_describe_the_leaf(issued, trust, tmp_path):
    """A loaded pair exposes serial, issuer, dates and fingerprint."""
    pair = load_pair(*pair_files(tmp_path, issued), trust)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)

    assert pair.serial == f"{leaf.serial_number:x}"
    assert pair.not_after == leaf.not_valid_after_utc
    assert pair.not_before == leaf.not_valid_before_utc
    assert "intermediate" in pair.issuer
    assert len(pair.fingerprint) == 64
    assert "PRIVATE KEY" not in repr(pair)


@pytest.mark.timeout(10)
def test_many_unfinished_blocks_are_refused_in_one_pass(tmp_path):
    """A mebibyte of BEGIN lines with no END is refused at once."""
    data = b"-----BEGIN CERTIFICATE-----\n" * (MAX_FILE_BYTES // 28)

    started = time.monotonic()
    error = refusal(split_pem, data, tmp_path / "x.pem")

    assert time.monotonic() - started < 1.0
    assert "truncated" in error.reason


def to_pem(der: bytes) -> bytes:
    text = base64.b64encode(der).decode()
    body = "\n".join(textwrap.wrap(text, 64))
    armoured = f"-----BEGIN CERTIFICATE-----\n{body}\n"
    return (armoured + "-----END CERTIFICATE-----\n").encode()


def patched(pem_bytes: bytes, old: bytes, new: bytes) -> bytes:
    """Replace ``old`` by ``new`` once in a certificate's DER."""
    cert = x509.load_pem_x509_certificate(pem_bytes)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    return to_pem(der.replace(old, new))


def negative_serial(pem_bytes: bytes) -> bytes:
    """Make the certificate's serial number negative, in minimal DER."""
    serial = x509.load_pem_x509_certificate(pem_bytes).serial_number
    content = serial.to_bytes((serial.bit_length() + 8) // 8, "big")
    encoded = bytes([2, len(content)]) + content
    return patched(pem_bytes, encoded, encoded[:2] + b"\x80" + content[1:])


# Each spoils the leaf (or, for the serial, the intermediate) so that
# cryptography loads it but fails, or warns, when a field is read.
SPOILED = {
    "invalid version": (
        lambda i: (
            patched(
                i.cert_pem, b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x05"
            )
            + i.chain_pem
        ),
        "block 0): it claims X.509 version 6",
        False,
    ),
    "duplicate extension": (
        # Key usage becomes a second basic constraints extension.
        lambda i: (
            patched(
                i.cert_pem, b"\x06\x03\x55\x1d\x0f", b"\x06\x03\x55\x1d\x13"
            )
            + i.chain_pem
        ),
        "block 0): it has the 2.5.29.19 extension twice",
        True,
    ),
    "malformed subject": (
        lambda i: (
            patched(
                i.cert_pem, b"\x0c\x0bexample.com", b"\x0c\x0bexample\xffcom"
            )
            + i.chain_pem
        ),
        "block 0): error parsing",
        True,
    ),
    "negative serial in the chain": (
        lambda i: i.cert_pem + negative_serial(i.chain_pem),
        "block 1): its serial number is not positive",
        False,
    ),
}


@pytest.mark.parametrize("case", SPOILED)
def test_a_certificate_that_cannot_be_read_through_is_refused(
    issued, trust, tmp_path, case
):
    """A field cryptography fails or warns on refuses the pair by name."""
    spoil, reason, breaks_tls = SPOILED[case]
    cert, key = pair_files(tmp_path, issued, cert=spoil(issued))

    error = refusal(load_pair, cert, key, trust)

    assert error.path == str(cert)
    assert reason in error.reason
    assert error.breaks_tls is breaks_tls
