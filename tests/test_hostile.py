"""Hostile input: every file certbot's tree could hold, fed to real passes.

Each case is a certbot-shaped generation that something spoiled. It is
refused by name, nothing is installed from it, the pair installed before
for the same host keeps its bytes, and a good lineage beside it is still
installed, both by ``certwatchd sync`` and by a running daemon.

Passes that must meet an unreadable file run with the capabilities the
shipped unit grants (no CAP_DAC_OVERRIDE), so root meets permissions the
way the service does.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from certwatchd.sandbox import Authority, Issued, LetsEncryptTree
from conftest import Outcome
from daemon_process import daemon_env, run_argv, wait_until

NOW = datetime.now(UTC).replace(microsecond=0)
HOST = "example.com"
GOOD = "good.example"
BIG_FILE = 50 << 20
# The capability bounding set of systemd/certwatchd.service.
SERVICE_CAPS = [
    "setpriv",
    "--bounding-set=-all,+chown,+setuid,+setgid",
    "--inh-caps=-all",
    "--",
]


@dataclass(frozen=True)
class Generation:
    """The files of one lineage generation that a case may spoil."""

    live: Path
    cert: Path
    key: Path
    issued: Issued


Spoiler = Callable[[Generation], Path]


def as_issued(kind: str) -> Spoiler:
    """Spoil nothing; the issued pair is hostile itself, in ``kind``."""
    return lambda generation: getattr(generation, kind)


def rewrite(kind: str, make: Callable[[Issued], bytes]) -> Spoiler:
    """Replace the archive file of ``kind`` with ``make(issued)``."""

    def spoil(generation: Generation) -> Path:
        path = getattr(generation, kind)
        path.unlink()
        path.write_bytes(make(generation.issued))
        return path

    return spoil


def link_to(kind: str, target: str) -> Spoiler:
    """Replace the archive file of ``kind`` with a link to ``target``."""

    def spoil(generation: Generation) -> Path:
        path = getattr(generation, kind)
        path.unlink()
        path.symlink_to(target)
        return path

    return spoil


def loop(generation: Generation) -> Path:
    """Make the certificate a link to itself."""
    generation.cert.unlink()
    generation.cert.symlink_to(generation.cert.name)
    return generation.cert


def dangling(generation: Generation) -> Path:
    """Remove the key the live link points at."""
    generation.key.unlink()
    return generation.key


def in_place_of_live_link(make: Callable[[Path], None]) -> Spoiler:
    """Put what ``make`` creates where live/.../fullchain.pem was."""

    def spoil(generation: Generation) -> Path:
        path = generation.live / "fullchain.pem"
        path.unlink()
        make(path)
        return path

    return spoil


def live_key_link_to(target: str) -> Spoiler:
    """Point live/.../privkey.pem itself at ``target``.

    A live link is read through its target, so the target is the file
    the refusal names; the source field names the lineage.
    """

    def spoil(generation: Generation) -> Path:
        path = generation.live / "privkey.pem"
        path.unlink()
        path.symlink_to(target)
        return Path(target)

    return spoil


def unreadable(generation: Generation) -> Path:
    """Take every permission bit off the key."""
    generation.key.chmod(0)
    return generation.key


def huge(generation: Generation) -> Path:
    """Make the certificate file 50 MiB of real, repeated PEM text."""
    block = generation.issued.fullchain_pem
    with generation.cert.open("wb") as handle:
        for _ in range(BIG_FILE // len(block) + 1):
            handle.write(block)
    return generation.cert


def swap(generation: Generation) -> Path:
    """Put the key where the certificate belongs, and the reverse."""
    cert = generation.cert.read_bytes()
    generation.cert.write_bytes(generation.key.read_bytes())
    generation.key.write_bytes(cert)
    return generation.cert


def der(issued: Issued) -> bytes:
    """Return the leaf as DER."""
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    return leaf.public_bytes(serialization.Encoding.DER)


def encrypted(issued: Issued) -> bytes:
    """Return the key under a passphrase."""
    key = serialization.load_pem_private_key(issued.key_pem, None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


def to_pem(der_bytes: bytes) -> bytes:
    """Wrap DER certificate bytes in PEM armour, 64 columns."""
    text = base64.b64encode(der_bytes).decode()
    body = "\n".join(textwrap.wrap(text, 64))
    armoured = f"-----BEGIN CERTIFICATE-----\n{body}\n"
    return (armoured + "-----END CERTIFICATE-----\n").encode()


def der_length(size: int) -> bytes:
    """Encode a DER length."""
    if size < 0x80:
        return bytes([size])
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def raw_dns_names(*names: bytes) -> x509.UnrecognizedExtension:
    """Build a SAN of dNSName entries holding ``names`` byte for byte."""
    entries = b"".join(b"\x82" + der_length(len(n)) + n for n in names)
    value = b"\x30" + der_length(len(entries)) + entries
    return x509.UnrecognizedExtension(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME, value
    )


@cache
def forger() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a CA of its own, for leaves the sandbox cannot issue."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forger")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def forge(
    extensions: list[x509.ExtensionType],
    *,
    subject: x509.Name | None = None,
    issuer: x509.Name | None = None,
) -> Issued:
    """Issue a leaf with exactly ``extensions``, signed by the forger."""
    ca_key, ca_cert = forger()
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or x509.Name([]))
        .issuer_name(issuer or ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=90))
        .add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
    )
    for extension in extensions:
        # RFC 5280 wants the SAN critical when the subject is empty.
        builder = builder.add_extension(extension, critical=subject is None)
    cert = builder.sign(ca_key, hashes.SHA256())
    encoding = serialization.Encoding.PEM
    return Issued(
        key_pem=key.private_bytes(
            encoding,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert_pem=cert.public_bytes(encoding),
        chain_pem=ca_cert.public_bytes(encoding),
    )


def san(*names: x509.GeneralName) -> list[x509.ExtensionType]:
    """Return a SAN extension of ``names``, as a list for :func:`forge`."""
    return [x509.SubjectAlternativeName(list(names))]


def issue(*names: str, **options: object) -> Callable[[Authority], Issued]:
    """Issue from the test authority, as a deferred call."""
    return lambda authority: authority.issue(list(names), **options)


def issue_for_host(authority: Authority) -> Issued:
    """Issue a plain pair for example.com."""
    return authority.issue([HOST])


def truncated(issued: Issued) -> bytes:
    """Cut the certificate file in the middle of the leaf's base64."""
    return issued.fullchain_pem[: len(issued.cert_pem) // 2]


@dataclass(frozen=True)
class Case:
    """One hostile generation: how it is made and what refuses it."""

    reason: str
    spoil: Spoiler
    make: Callable[[Authority], Issued] = issue_for_host
    # Needs the service's capabilities, so that root meets file modes.
    as_service: bool = False


CASES = {
    "empty certificate": Case("is empty", rewrite("cert", lambda _: b"")),
    "empty key": Case("is empty", rewrite("key", lambda _: b"")),
    "text that is not PEM": Case(
        "is not PEM",
        rewrite("cert", lambda _: b"Certificates are on their way.\n"),
    ),
    "DER instead of PEM": Case("DER", rewrite("cert", der)),
    "truncated PEM": Case("truncated", rewrite("cert", truncated)),
    "key and certificate swapped": Case("private key", swap),
    "trailing junk": Case(
        "not PEM after byte",
        rewrite("cert", lambda i: i.fullchain_pem + b"junk\n"),
    ),
    "50 MiB certificate": Case("1 MiB", huge),
    "FIFO named fullchain.pem": Case("FIFO", in_place_of_live_link(os.mkfifo)),
    "link to /dev/zero": Case("device", link_to("key", "/dev/zero")),
    "link to /dev/urandom": Case("device", link_to("cert", "/dev/urandom")),
    "live link to /dev/zero": Case("device", live_key_link_to("/dev/zero")),
    "symlink loop": Case("loop", loop),
    "dangling link": Case("does not exist", dangling),
    "directory named fullchain.pem": Case(
        "directory", in_place_of_live_link(Path.mkdir)
    ),
    "unreadable key": Case("not readable", unreadable, as_service=True),
    "encrypted key": Case("encrypted", rewrite("key", encrypted)),
    "RSA key of 1024 bits": Case(
        "1024-bit",
        as_issued("key"),
        issue(HOST, key_type="rsa", rsa_bits=1024),
    ),
    "no subjectAltName": Case(
        "no DNS name", as_issued("cert"), issue(common_name=HOST)
    ),
    "IP address as the only SAN": Case(
        "no DNS name",
        as_issued("cert"),
        lambda _: forge(san(x509.IPAddress(ipaddress.ip_address("1.2.3.4")))),
    ),
    "email address as the only SAN": Case(
        "no DNS name",
        as_issued("cert"),
        lambda _: forge(san(x509.RFC822Name("xmpp@example.com"))),
    ),
    "upper-case name": Case(
        "lower-case DNS name",
        as_issued("cert"),
        issue(HOST, "XMPP.example.com"),
    ),
    "slash in a name": Case(
        "lower-case DNS name",
        as_issued("cert"),
        issue(HOST, "a/b.example.com"),
    ),
    "dot-dot in a name": Case(
        "lower-case DNS name", as_issued("cert"), issue(HOST, "../example.com")
    ),
    "NUL in a name": Case(
        "lower-case DNS name",
        as_issued("cert"),
        issue(HOST, "a\0.example.com"),
    ),
    "newline in a name": Case(
        "lower-case DNS name",
        as_issued("cert"),
        issue(HOST, "a\n.example.com"),
    ),
    "non-ASCII name": Case(
        "lower-case DNS name",
        as_issued("cert"),
        lambda _: forge(
            [raw_dns_names(HOST.encode(), "ü.example.com".encode())]
        ),
    ),
    "not yet valid": Case(
        "not valid before",
        as_issued("cert"),
        issue(HOST, not_before=NOW + timedelta(days=1)),
    ),
    "expired": Case(
        "expired",
        as_issued("cert"),
        issue(
            HOST,
            not_before=NOW - timedelta(days=90),
            not_after=NOW - timedelta(days=1),
        ),
    ),
    "chain from another CA": Case(
        "does not verify",
        as_issued("cert"),
        lambda _: forge(san(x509.DNSName(HOST))),
    ),
}


def generation(tree: LetsEncryptTree, name: str) -> Generation:
    """Return the files ``name``'s live links point at now."""
    version = tree.version(name)
    archive = tree.archive / name
    issued = Issued(
        key_pem=(archive / f"privkey{version}.pem").read_bytes(),
        cert_pem=(archive / f"cert{version}.pem").read_bytes(),
        chain_pem=(archive / f"chain{version}.pem").read_bytes(),
    )
    return Generation(
        live=tree.live / name,
        cert=archive / f"fullchain{version}.pem",
        key=archive / f"privkey{version}.pem",
        issued=issued,
    )


def contents(directory: Path) -> dict[str, bytes]:
    """Map everything under ``directory`` but directories to its bytes.

    A link maps to its target and any other non-regular file to its kind,
    so nothing planted there goes unnoticed.
    """
    found = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            found[name] = b"link to " + os.fsencode(os.readlink(path))
        elif path.is_file():
            found[name] = path.read_bytes()
        elif not path.is_dir():
            found[name] = b"special file"
    return found


def installed(issued: Issued, host: str) -> dict[str, bytes]:
    """Return what the flat layout holds for ``host`` from ``issued``."""
    return {f"{host}.crt": issued.fullchain_pem, f"{host}.key": issued.key_pem}


def run_sync(setup, cli, *, as_service: bool = False) -> Outcome:
    """Run one ``certwatchd sync`` pass, as the service runs if asked."""
    if not as_service:
        return cli("sync", "--config", str(setup.config))
    argv = [*SERVICE_CAPS, sys.executable, "-m", "certwatchd", "sync"]
    finished = subprocess.run(
        [*argv, "--config", str(setup.config)],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=30,
        check=False,
    )
    return Outcome(finished.returncode, finished.stdout, finished.stderr)


def assert_every_line_is_json(text: str) -> None:
    """Fail unless each line of a JSON log is one whole event."""
    for line in text.splitlines():
        assert line.startswith("{"), f"not a JSON event: {line!r}"
        assert line.endswith("}"), f"not a whole JSON event: {line!r}"


def refused_for(events, lineage: str) -> dict[str, object]:
    """Return the one refusal of ``lineage`` among ``events``."""
    (event,) = [
        e for e in events if e.get("source") == f"letsencrypt:{lineage}"
    ]
    assert event["level"] == "error"
    return event


def peak_rss_kib(pid: int) -> int:
    """Return the highest resident set size ``pid`` has had, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1])


@pytest.fixture
def installed_before(setup, authority, cli):
    """Install a good lineage and one for example.com, then renew the first.

    Returns what the certificate directory must hold after the next
    pass: the good lineage's renewal and example.com's pair unchanged.
    """
    setup.tree.create_lineage(GOOD, authority.issue([GOOD]))
    setup.tree.create_lineage(HOST, authority.issue([HOST]))
    assert run_sync(setup, cli).code == 0
    renewed = authority.issue([GOOD])
    setup.tree.renew(GOOD, renewed)
    return {**contents(setup.certs), **installed(renewed, GOOD)}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", CASES)
def test_sync_refuses_a_hostile_renewal_and_keeps_the_rest(
    setup, authority, cli, installed_before, case
):
    """The hostile generation is refused by name; nothing else changes."""
    hostile = CASES[case]
    setup.tree.renew(HOST, hostile.make(authority))
    named = hostile.spoil(generation(setup.tree, HOST))

    started = time.monotonic()
    result = run_sync(setup, cli, as_service=hostile.as_service)
    elapsed = time.monotonic() - started

    assert result.code == 1
    refused = refused_for(result.named("cert.refused"), HOST)
    assert os.path.normpath(str(refused["path"])) == str(named)
    assert hostile.reason in str(refused["reason"])
    assert contents(setup.certs) == installed_before
    assert setup.reloads() == 2
    if not hostile.as_service:
        assert elapsed < 2.0
    assert_every_line_is_json(result.err)


@pytest.mark.parametrize(
    "case",
    [
        "empty key",
        "text that is not PEM",
        "truncated PEM",
        "key and certificate swapped",
        "trailing junk",
        "encrypted key",
        "expired",
    ],
)
def test_sync_refuses_a_hostile_hand_placed_pair_and_loses_no_byte(
    setup, authority, cli, installed_before, case
):
    """A spoiled pair copied into certs_dir is refused and kept somewhere."""
    hostile = CASES[case]
    issued = hostile.make(authority)
    cert = setup.certs / "legacy.crt"
    key = setup.certs / "legacy.key"
    cert.write_bytes(issued.fullchain_pem)
    key.write_bytes(issued.key_pem)
    named = hostile.spoil(Generation(setup.certs, cert, key, issued))
    placed = {path.name: path.read_bytes() for path in (cert, key)}

    result = run_sync(setup, cli)

    assert result.code == 1
    (refused,) = result.named("cert.refused")
    assert refused["path"] == str(named)
    assert hostile.reason in str(refused["reason"])
    kept = {
        path.name: path.read_bytes()
        for directory in (setup.certs, setup.state)
        for path in directory.rglob("legacy.*")
        if path.is_file()
    }
    assert placed.items() <= kept.items()
    everything = contents(setup.certs)
    assert {k: everything.get(k) for k in installed_before} == installed_before


def test_wildcard_only_lineage_needs_install_hosts(setup, authority, cli):
    """A wildcard-only lineage installs nothing until a host is listed."""
    setup.tree.create_lineage(GOOD, authority.issue([GOOD]))
    wildcard = authority.issue(["*.example.com"])
    setup.tree.create_lineage("wildcard", wildcard)

    unlisted = run_sync(setup, cli)
    setup.settings["install"]["hosts"] = [GOOD, "chat.example.com"]
    listed = run_sync(setup, cli)

    (warning,) = unlisted.named("cert.wildcard_only")
    assert warning["source"] == str(setup.tree.live / "wildcard")
    assert "install.hosts" in str(warning["fix"])
    assert unlisted.code == 0
    assert listed.code == 0
    assert set(contents(setup.certs)) == {
        f"{host}.{suffix}"
        for host in (GOOD, "chat.example.com")
        for suffix in ("crt", "key")
    }
    chat = setup.certs / "chat.example.com.crt"
    assert chat.read_bytes() == wildcard.fullchain_pem


ODD_NAMES = {
    "spaces": "my example certificate",
    "newline": "first line\nsecond line",
    "non-ASCII": "zertifikat-für-übung",
    "byte that is not UTF-8": os.fsdecode(b"latin-\xe9"),
}


@pytest.mark.parametrize("name", ODD_NAMES.values(), ids=list(ODD_NAMES))
def test_odd_lineage_names_install_and_log_escaped(
    setup, authority, cli, name
):
    """Spaces, newlines and non-ASCII in a lineage name change nothing."""
    issued = authority.issue(["odd.example"])
    setup.tree.create_lineage(name, issued)

    result = run_sync(setup, cli)

    assert result.code == 0
    assert contents(setup.certs) == installed(issued, "odd.example")
    (event,) = result.named("cert.installed")
    assert event["source"] == str(setup.tree.live / name)
    assert_every_line_is_json(result.err)


def move_in(staging: LetsEncryptTree, tree: LetsEncryptTree, name: str):
    """Move a finished lineage into ``tree``, archive first, in two renames."""
    os.rename(staging.archive / name, tree.archive / name)
    os.rename(staging.live / name, tree.live / name)


@pytest.fixture
def service(setup, authority, daemons):
    """Run the daemon with the service's capabilities on two lineages."""
    setup.settings["reload"].update(debounce_seconds=0.2, timeout_seconds=10)
    setup.settings["daemon"] = {"reconcile_interval_seconds": 3600}
    setup.tree.create_lineage(GOOD, authority.issue([GOOD]))
    setup.tree.create_lineage(HOST, authority.issue([HOST]))
    process = daemons(argv=[*SERVICE_CAPS, *run_argv(setup.config)])
    assert wait_until(lambda: setup.reloads() == 1, 10)
    return process


@pytest.mark.timeout(120)
def test_daemon_refuses_the_whole_corpus_and_keeps_serving(
    setup, authority, service
):
    """A running daemon refuses each hostile lineage and goes on working."""
    before = contents(setup.certs)
    rss_before = peak_rss_kib(service.pid)
    staging = LetsEncryptTree(setup.root / "staging")

    for index, (case, hostile) in enumerate(CASES.items(), start=1):
        name = f"{HOST}-{index:04}"
        staging.create_lineage(name, hostile.make(authority))
        named = hostile.spoil(generation(staging, name))
        move_in(staging, setup.tree, name)
        expected = named
        if named.is_relative_to(staging.config_dir):
            moved = named.relative_to(staging.config_dir)
            expected = setup.tree.config_dir / moved

        service.wait_for_event("cert.refused", source=f"letsencrypt:{name}")
        refused = refused_for(service.named("cert.refused"), name)
        assert os.path.normpath(str(refused["path"])) == str(expected), case
        assert hostile.reason in str(refused["reason"]), case
    odd = "odd name\nwith ü"
    renewed, fresh = authority.issue([GOOD]), authority.issue(["odd.example"])
    setup.tree.renew(GOOD, renewed)
    setup.tree.create_lineage(odd, fresh)

    assert wait_until(
        lambda: (
            contents(setup.certs).get(f"{GOOD}.crt") == renewed.fullchain_pem
            and "odd.example.crt" in contents(setup.certs)
        ),
        10,
    )
    assert service.is_running()
    assert contents(setup.certs) == {
        **before,
        **installed(renewed, GOOD),
        **installed(fresh, "odd.example"),
    }
    assert peak_rss_kib(service.pid) - rss_before < 20 << 10
    # The file is in place a moment before the install is logged.
    (event,) = service.wait_for_event("cert.installed", host="odd.example")
    assert event["source"] == str(setup.tree.live / odd)
    complete = service.text().rsplit("\n", 1)[0]
    assert_every_line_is_json(complete)


def patched(issued: Issued, old: bytes, new: bytes) -> Issued:
    """Replace ``old`` by ``new`` once in the leaf's DER; keep the key.

    The signature no longer matches, which no check before chain
    verification notices.
    """
    leaf = der(issued)
    assert leaf.count(old) == 1, f"{old!r} is not in the leaf exactly once"
    cert_pem = to_pem(leaf.replace(old, new))
    return Issued(issued.key_pem, cert_pem, issued.chain_pem)


def common_name(value: str) -> x509.Name:
    """Return a name of one common name, encoded as UTF8String."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def malformed_name(role: str) -> Issued:
    """Issue a leaf whose issuer or subject is not UTF-8 inside.

    The common name is a UTF8String holding the byte 0xff: the
    certificate parses, and the name fails only when it is decoded.
    """
    names = {role: common_name("mal-formed")}
    issued = forge(san(x509.DNSName(HOST)), **names)
    return patched(issued, b"mal-formed", b"mal\xffformed")


def invalid_version() -> Issued:
    """Issue a leaf whose version field says 6, which X.509 lacks."""
    issued = forge(san(x509.DNSName(HOST)))
    return patched(issued, b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x05")


def duplicate_extension() -> Issued:
    """Issue a leaf that carries the subjectAltName extension twice."""
    placeholder = x509.UnrecognizedExtension(
        x509.ObjectIdentifier("2.5.29.99"), b"\x05\x00"
    )
    issued = forge([*san(x509.DNSName(HOST)), placeholder])
    return patched(issued, b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11")


# cryptography fails on these when the field is read, not when loading.
UNPARSEABLE: dict[str, Callable[[], Issued]] = {
    "invalid X.509 version": invalid_version,
    "duplicate extension": duplicate_extension,
    "malformed issuer name": lambda: malformed_name("issuer"),
    "malformed subject name": lambda: malformed_name("subject"),
}


@pytest.mark.parametrize("case", UNPARSEABLE)
def test_sync_refuses_a_certificate_cryptography_cannot_read(
    setup, cli, installed_before, case
):
    """A leaf that parses but cannot be read through is refused by name."""
    setup.tree.renew(HOST, UNPARSEABLE[case]())
    named = generation(setup.tree, HOST).cert

    result = run_sync(setup, cli)

    assert result.code == 1
    refused = refused_for(result.named("cert.refused"), HOST)
    assert os.path.normpath(str(refused["path"])) == str(named)
    assert "cannot be parsed (block 0)" in str(refused["reason"])
    assert contents(setup.certs) == installed_before
    assert_every_line_is_json(result.err)


@pytest.mark.timeout(60)
def test_daemon_survives_a_certificate_with_a_malformed_issuer(setup, service):
    """An unreadable issuer name is refused and the daemon goes on."""
    setup.tree.create_lineage(f"{HOST}-0001", malformed_name("issuer"))
    time.sleep(1)

    assert service.is_running(), service.text()[-2000:]
    assert service.named("cert.refused", source=f"letsencrypt:{HOST}-0001")


@pytest.mark.timeout(60)
def test_daemon_survives_a_lineage_that_is_a_symlink_loop(
    setup, authority, service
):
    """A symlink loop in live/ is ignored and the daemon goes on."""
    (setup.tree.live / "loop.example").symlink_to("loop.example")
    renewed = authority.issue([GOOD])
    setup.tree.renew(GOOD, renewed)

    assert wait_until(
        lambda: (
            contents(setup.certs).get(f"{GOOD}.crt") == renewed.fullchain_pem
        ),
        5,
    ), service.text()[-2000:]
    assert service.is_running()


def test_sync_reports_a_lineage_directory_it_cannot_list(
    setup, cli, installed_before
):
    """An unlistable lineage is reported and the good lineage installs."""
    directory = setup.tree.live / "locked.example"
    directory.mkdir(mode=0)

    result = run_sync(setup, cli, as_service=True)

    assert "Traceback" not in result.err, result.err[-2000:]
    assert result.code == 1
    refused = refused_for(result.named("cert.refused"), "locked.example")
    assert refused["path"] == str(directory / "fullchain.pem")
    assert "permission denied" in str(refused["reason"])
    assert contents(setup.certs) == installed_before
