import os
import re
import stat
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import DNSName, PolicyBuilder, Store

from certwatchd.sandbox import Authority, Issued, LetsEncryptTree

KINDS = ("cert", "privkey", "chain", "fullchain")
KEY_TYPES = ("ec", "rsa", "ed25519")


@pytest.fixture(scope="module")
def authority():
    return Authority.create()


@pytest.fixture(scope="module")
def issued(authority):
    return authority.issue(["example.com", "www.example.com"])


def load(pem):
    return x509.load_pem_x509_certificate(pem)


def link_version(link):
    """Return N of the fileN.pem `link` points at, or None if it is gone."""
    try:
        target = str(link.readlink())
    except FileNotFoundError:
        return None

    match = re.search(r"(\d+)\.pem$", target)
    assert match is not None, target
    return int(match.group(1))


def extension(cert, kind):
    return cert.extensions.get_extension_for_class(kind).value


def mode(path):
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_issued_chain_verifies(authority, key_type):
    """A leaf verifies for each of its names against the root."""
    issued = authority.issue(
        ["example.com", "chat.example.com"], key_type=key_type
    )
    root = load(authority.root_pem)
    intermediate = load(issued.chain_pem)

    for name in ("example.com", "chat.example.com"):
        verifier = (
            PolicyBuilder()
            .store(Store([root]))
            .build_server_verifier(DNSName(name))
        )
        chain = verifier.verify(load(issued.cert_pem), [intermediate])
        assert chain[-1] == root


def test_issued_chain_rejects_other_names(authority, issued):
    """A leaf does not verify for a name outside its SANs."""
    verifier = (
        PolicyBuilder()
        .store(Store([load(authority.root_pem)]))
        .build_server_verifier(DNSName("example.org"))
    )

    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(load(issued.cert_pem), [load(issued.chain_pem)])


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_key_matches_leaf(authority, key_type):
    """The issued private key is the one the leaf certifies."""
    issued = authority.issue(["example.com"], key_type=key_type)
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    public = serialization.PublicFormat.SubjectPublicKeyInfo

    assert issued.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ) == load(issued.cert_pem).public_key().public_bytes(
        serialization.Encoding.PEM, public
    )


def test_rsa_key_size_and_exponent(authority):
    """RSA leaves have the requested size, e=65537 and key encipherment."""
    issued = authority.issue(["example.com"], key_type="rsa", rsa_bits=3072)
    leaf = load(issued.cert_pem)
    key = leaf.public_key()

    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 3072
    assert key.public_numbers().e == 65537
    assert extension(leaf, x509.KeyUsage).key_encipherment


def test_fullchain_concatenates_cert_and_chain():
    """fullchain_pem is cert_pem followed by chain_pem."""
    issued = Issued(key_pem=b"K\n", cert_pem=b"C\n", chain_pem=b"I\n")

    assert issued.fullchain_pem == b"C\nI\n"


def test_fullchain_is_leaf_then_intermediate(authority, issued):
    """fullchain_pem is the leaf followed by the intermediate."""
    certs = x509.load_pem_x509_certificates(issued.fullchain_pem)

    assert certs == [load(issued.cert_pem), load(authority.intermediate_pem)]
    assert issued.chain_pem == authority.intermediate_pem


def test_authority_certificates_are_cas(authority):
    """Root and intermediate are CAs that may sign certificates."""
    root = load(authority.root_pem)
    intermediate = load(authority.intermediate_pem)

    for cert in (root, intermediate):
        assert extension(cert, x509.BasicConstraints).ca
        assert extension(cert, x509.KeyUsage).key_cert_sign
        assert extension(cert, x509.SubjectKeyIdentifier)
        assert extension(cert, x509.AuthorityKeyIdentifier)
    assert intermediate.issuer == root.subject


def test_leaf_extensions(issued):
    """A leaf is a server certificate, not a CA, named by its SANs."""
    leaf = load(issued.cert_pem)
    san = extension(leaf, x509.SubjectAlternativeName)
    common_name = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)

    assert not extension(leaf, x509.BasicConstraints).ca
    assert extension(leaf, x509.KeyUsage).digital_signature
    assert ExtendedKeyUsageOID.SERVER_AUTH in extension(
        leaf, x509.ExtendedKeyUsage
    )
    assert san.get_values_for_type(x509.DNSName) == [
        "example.com",
        "www.example.com",
    ]
    assert [attribute.value for attribute in common_name] == ["example.com"]


def test_leaf_keeps_hostile_names_verbatim(authority):
    """Malformed names go into the SAN unchanged."""
    names = ["EXAMPLE.com", "a/b", "", "*.*.example.com", "x" * 300]
    leaf = load(authority.issue(names).cert_pem)

    san = extension(leaf, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == names


def test_leaf_without_names(authority):
    """No names means no SAN extension and an empty subject."""
    leaf = load(authority.issue([]).cert_pem)

    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert len(leaf.subject) == 0


def test_long_first_name_leaves_subject_empty(authority):
    """A first name too long for a CN leaves the subject empty."""
    leaf = load(authority.issue(["x" * 65 + ".example.com"]).cert_pem)

    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).critical


def test_common_name_can_be_chosen(authority):
    """An explicit common name replaces the first SAN in the subject."""
    leaf = load(
        authority.issue(["example.com"], common_name="other.test").cert_pem
    )

    assert leaf.subject.rfc4514_string() == "CN=other.test"


def test_default_validity(authority):
    """Leaves are valid from an hour ago for 90 days, in UTC."""
    before = datetime.now(UTC)
    leaf = load(authority.issue(["example.com"]).cert_pem)
    after = datetime.now(UTC)

    start = leaf.not_valid_before_utc
    assert (
        before - timedelta(hours=1, seconds=1)
        <= start
        <= after - timedelta(hours=1)
    )
    assert leaf.not_valid_after_utc - start == timedelta(days=90)


def test_explicit_validity(authority):
    """Explicit bounds are used as given, even for an expired leaf."""
    start = datetime(2020, 1, 1, tzinfo=UTC)
    end = datetime(2020, 2, 1, tzinfo=UTC)
    leaf = load(
        authority.issue(
            ["example.com"], not_before=start, not_after=end
        ).cert_pem
    )

    assert leaf.not_valid_before_utc == start
    assert leaf.not_valid_after_utc == end


def test_write_roots(authority, tmp_path):
    """write_roots writes the root PEM and returns the path."""
    path = tmp_path / "roots.pem"

    assert authority.write_roots(path) == path
    assert path.read_bytes() == authority.root_pem
    assert mode(path) == 0o644


def test_tree_layout(tmp_path, issued):
    """A new lineage has certbot's directories, modes, links and READMEs."""
    tree = LetsEncryptTree(tmp_path / "letsencrypt")
    live_dir = tree.create_lineage("example.com-0001", issued)
    archive_dir = tree.archive / "example.com-0001"

    assert live_dir == tree.live / "example.com-0001"
    assert mode(tree.live) == 0o700
    assert mode(tree.archive) == 0o700
    assert (tree.live / "README").is_file()
    assert (live_dir / "README").is_file()
    assert sorted(p.name for p in archive_dir.iterdir()) == [
        "cert1.pem",
        "chain1.pem",
        "fullchain1.pem",
        "privkey1.pem",
    ]
    assert mode(archive_dir / "privkey1.pem") == 0o600
    for kind in ("cert", "chain", "fullchain"):
        assert mode(archive_dir / f"{kind}1.pem") == 0o644
    for kind in KINDS:
        link = live_dir / f"{kind}.pem"
        assert link.is_symlink()
        assert str(link.readlink()) == (
            f"../../archive/example.com-0001/{kind}1.pem"
        )
    assert (live_dir / "privkey.pem").read_bytes() == issued.key_pem
    assert (live_dir / "fullchain.pem").read_bytes() == issued.fullchain_pem


def test_tree_modes_ignore_umask(tmp_path, issued):
    """Modes are exact whatever the umask is."""
    old = os.umask(0o077)
    try:
        tree = LetsEncryptTree(tmp_path / "letsencrypt")
        tree.create_lineage("example.com", issued)
    finally:
        os.umask(old)

    archive_dir = tree.archive / "example.com"
    assert mode(archive_dir / "cert1.pem") == 0o644
    assert mode(archive_dir / "privkey1.pem") == 0o600
    assert mode(tree.live / "README") == 0o644


def test_create_lineage_twice_fails(tmp_path, issued):
    """A lineage name that is taken cannot be created again."""
    tree = LetsEncryptTree(tmp_path)
    tree.create_lineage("example.com", issued)

    with pytest.raises(FileExistsError):
        tree.create_lineage("example.com", issued)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_lineage_name_must_be_a_directory_name(tmp_path, issued, name):
    """Names that are not a single directory name are refused."""
    tree = LetsEncryptTree(tmp_path)

    with pytest.raises(ValueError, match="lineage name"):
        tree.create_lineage(name, issued)


def test_version_goes_from_1_to_2(tmp_path, authority, issued):
    """version() follows the links from 1 to 2 across a renewal."""
    tree = LetsEncryptTree(tmp_path)
    tree.create_lineage("example.com", issued)

    assert tree.version("example.com") == 1
    tree.renew("example.com", authority.issue(["example.com"]))
    assert tree.version("example.com") == 2


def test_renew_final_state(tmp_path, authority, issued):
    """After renewal every link points at version 2 and previous_* are gone."""
    tree = LetsEncryptTree(tmp_path)
    live_dir = tree.create_lineage("example.com", issued)
    renewed = authority.issue(["example.com"])

    tree.renew("example.com", renewed)

    archive_dir = tree.archive / "example.com"
    assert sorted(p.name for p in live_dir.iterdir()) == [
        "README",
        "cert.pem",
        "chain.pem",
        "fullchain.pem",
        "privkey.pem",
    ]
    for kind in KINDS:
        assert str((live_dir / f"{kind}.pem").readlink()) == (
            f"../../archive/example.com/{kind}2.pem"
        )
        assert (archive_dir / f"{kind}1.pem").exists()
    assert mode(archive_dir / "privkey2.pem") == 0o600
    assert mode(archive_dir / "cert2.pem") == 0o644
    assert (live_dir / "privkey.pem").read_bytes() == renewed.key_pem
    assert (live_dir / "cert.pem").read_bytes() == renewed.cert_pem


def test_renew_swaps_links_in_certbot_order(tmp_path, authority, issued):
    """Renewal swaps cert, privkey, chain, fullchain one at a time."""
    tree = LetsEncryptTree(tmp_path)
    live_dir = tree.create_lineage("example.com", issued)
    renewed = authority.issue(["example.com"])
    errors = []

    def renew():
        try:
            tree.renew("example.com", renewed, pause=0.2)
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    def observe():
        versions = tuple(link_version(live_dir / f"{k}.pem") for k in KINDS)
        previous = tuple(
            (live_dir / f"previous_{k}.pem").is_symlink() for k in KINDS
        )
        return versions, previous

    thread = threading.Thread(target=renew)
    states = [observe()]
    thread.start()
    while thread.is_alive():
        states.append(observe())
    thread.join(timeout=10)
    states.append(observe())

    assert errors == []
    seen = []
    for versions, previous in states:
        if None in versions or (seen and seen[-1][0] == versions):
            continue
        seen.append((versions, previous))
    assert [versions for versions, _ in seen] == [
        (1, 1, 1, 1),
        (2, 1, 1, 1),
        (2, 2, 1, 1),
        (2, 2, 2, 1),
        (2, 2, 2, 2),
    ]
    # Mid-renewal, the old targets are kept as previous_* links.
    for _, previous in seen[1:4]:
        assert previous == (True, True, True, True)
    assert states[-1] == ((2, 2, 2, 2), (False, False, False, False))


def test_renew_links_point_at_old_targets_meanwhile(
    tmp_path, authority, issued
):
    """The previous_* links resolve to the version 1 files during renewal."""
    tree = LetsEncryptTree(tmp_path)
    live_dir = tree.create_lineage("example.com", issued)
    thread = threading.Thread(
        target=tree.renew,
        args=("example.com", authority.issue(["example.com"])),
        kwargs={"pause": 0.3},
    )

    thread.start()
    try:
        deadline = time.monotonic() + 5
        while link_version(live_dir / "cert.pem") != 2:
            assert time.monotonic() < deadline
        cert_version = link_version(live_dir / "cert.pem")
        fullchain_version = link_version(live_dir / "fullchain.pem")
        previous = (live_dir / "previous_fullchain.pem").read_bytes()
    finally:
        thread.join(timeout=10)

    assert cert_version == 2
    assert fullchain_version == 1
    assert previous == issued.fullchain_pem
