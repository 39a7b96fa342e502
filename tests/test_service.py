"""The real daemon as a systemd service beside Debian's Prosody, in a machine.

Each test boots a throwaway machine, installs the package and the shipped
unit unchanged, lays out a certbot tree with one lineage, starts Prosody
and certwatchd as services and watches them through systemctl, journalctl
and what Prosody serves over STARTTLS.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

import nspawn
from certwatchd.sandbox import Authority, Issued

if TYPE_CHECKING:
    from collections.abc import Iterator

PROJECT = Path(__file__).parent.parent
UNIT = PROJECT / "systemd" / "certwatchd.service"
UNIT_NAME = UNIT.name
PYTHON = str(nspawn.PREFIX / "bin" / "python")
HOST = "example.test"
BROKEN = "broken.test"
CERT = f"/etc/prosody/certs/{HOST}.crt"
KEY = f"/etc/prosody/certs/{HOST}.key"
DEBOUNCE = 1.0
# How long after a change Prosody must serve it: the debounce, the reload
# and a margin for a slow machine.
SERVE_WITHIN = DEBOUNCE + 5.0
# Shorter than the debounce, as certbot's swaps are: the daemon waits for
# the lineage to become consistent instead of reading it half swapped.
RENEWAL_PAUSE = 0.2
_names = itertools.count()

# Debian's prosody.cfg.lua, cut down to what a c2s STARTTLS needs, with
# its services on loopback inside the machine's own network namespace.
PROSODY_CONFIG = f"""\
admins = {{ }}
modules_enabled = {{
    "disco"; "roster"; "saslauth"; "tls"; "dialback"; "ping"; "posix";
}}
pidfile = "/run/prosody/prosody.pid"
authentication = "internal_hashed"
log = {{
    info = "/var/log/prosody/prosody.log";
    error = "/var/log/prosody/prosody.err";
}}
certificates = "certs"
c2s_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ 5222 }}
s2s_interfaces = {{ "127.0.0.1" }}
VirtualHost "{HOST}"
"""
CONFIG = f"""\
[install]
owner = "root"
group = "prosody"

[validation]
trust = "/etc/certwatchd/roots.pem"

[reload]
debounce_seconds = {DEBOUNCE}
max_delay_seconds = 5.0

[[verify.endpoints]]
host = "{HOST}"
address = "127.0.0.1"
port = 5222
mode = "xmpp-client"
"""
SYSUSERS = 'u prosody - "Prosody XMPP Server" /var/lib/prosody\n'
# Owners and modes as Debian's prosody package leaves them.
TMPFILES = """\
z /etc/shadow 0640 root shadow -
z /etc/prosody/prosody.cfg.lua 0640 root prosody -
d /etc/prosody/certs 0750 root prosody -
d /var/lib/prosody 0750 prosody prosody -
d /var/log/prosody 0750 prosody prosody -
"""
# Run inside by the package's Python: lays out or renews a lineage with
# certbot's files, modes, links and link-swap order.
LINEAGE_SCRIPT = """\
import json, sys
from pathlib import Path
from certwatchd.sandbox import Issued, LetsEncryptTree

order = json.load(sys.stdin)
issued = Issued(**{k: v.encode() for k, v in order["issued"].items()})
tree = LetsEncryptTree(Path("/etc/letsencrypt"))
if order["renew"]:
    tree.renew(order["name"], issued, pause=order["pause"])
else:
    tree.create_lineage(order["name"], issued)
"""
# Prints the SHA-256 of the leaf Prosody serves over c2s STARTTLS.
SERVED_SCRIPT = """\
import hashlib, sys
from certwatchd.verify import VerifyError, fetch_served_leaf

try:
    der = fetch_served_leaf(sys.argv[1], "127.0.0.1", 5222, "xmpp-client", 5)
except VerifyError as exc:
    print(exc)
else:
    print(hashlib.sha256(der).hexdigest())
"""


@pytest.fixture(scope="session")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the package into a venv for /opt/certwatchd, once per run."""
    nspawn.require_machines()
    destination = tmp_path_factory.mktemp("venv")
    nspawn.build_venv(PROJECT, destination)
    return destination


@pytest.fixture
def machine(venv: Path, authority: Authority) -> Iterator[nspawn.Machine]:
    """Boot a machine where certwatchd installed the pair and verified it."""
    name = f"certwatchd-service-{os.getpid()}-{next(_names)}"
    mounts = {venv: nspawn.PREFIX}

    with nspawn.Machine(name, mounts=mounts) as booted:
        _prepare(booted, authority)
        _start(booted)
        yield booted


def _prepare(machine: nspawn.Machine, authority: Authority) -> None:
    """Give the machine Prosody's user and files, a lineage and the unit."""
    machine.write_file("/etc/sysusers.d/prosody.conf", SYSUSERS)
    machine.run(["systemd-sysusers"])
    machine.write_file("/etc/prosody/prosody.cfg.lua", PROSODY_CONFIG)
    # Prosody's resolver refuses to start without these.
    machine.write_file("/etc/resolv.conf", "nameserver 127.0.0.1\n")
    machine.write_file("/etc/hosts", "127.0.0.1 localhost\n")
    machine.write_file("/etc/tmpfiles.d/prosody-test.conf", TMPFILES)
    machine.run(
        ["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/prosody-test.conf"]
    )

    _lineage(machine, HOST, authority.issue([HOST]))
    machine.write_file(
        "/etc/certwatchd/roots.pem", authority.root_pem.decode()
    )
    machine.write_file("/etc/certwatchd/config.toml", CONFIG)

    machine.write_file(
        f"/etc/systemd/system/{UNIT_NAME}", UNIT.read_text(encoding="utf-8")
    )
    machine.run(["systemctl", "daemon-reload"])


def _start(machine: nspawn.Machine) -> None:
    """Start Prosody, then certwatchd; return after its first verification.

    Prosody writes its pidfile before it handles SIGHUP, and the daemon's
    first reload would end it in between.
    """
    machine.run(["systemctl", "reset-failed", "prosody.service"])
    machine.run(["systemctl", "start", "prosody.service"])
    pid = machine.show("prosody.service", "MainPID")
    machine.wait_until_handled(pid, signal.SIGHUP)

    started = machine.run(["systemctl", "start", UNIT_NAME], check=False)
    assert started.returncode == 0, _diagnostics(machine)
    _wait_for_event(machine, "verify.ok")


def _lineage(
    machine: nspawn.Machine,
    name: str,
    issued: Issued,
    *,
    renew: bool = False,
) -> None:
    """Create or renew lineage ``name`` in the machine, as certbot does."""
    order = {
        "name": name,
        "renew": renew,
        "pause": RENEWAL_PAUSE,
        "issued": {
            "key_pem": issued.key_pem.decode(),
            "cert_pem": issued.cert_pem.decode(),
            "chain_pem": issued.chain_pem.decode(),
        },
    }
    machine.run([PYTHON, "-c", LINEAGE_SCRIPT], stdin=json.dumps(order))


def _fingerprint(issued: Issued) -> str:
    """Return the SHA-256 of the leaf in ``issued``, as hex."""
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    return leaf.fingerprint(hashes.SHA256()).hex()


def _installed(machine: nspawn.Machine) -> str:
    """Return the fingerprint of the leaf installed for Prosody."""
    leaf = x509.load_pem_x509_certificate(machine.read_file(CERT).encode())
    return leaf.fingerprint(hashes.SHA256()).hex()


def _served(machine: nspawn.Machine) -> str:
    """Return the fingerprint Prosody serves now, or why there is none."""
    result = machine.run([PYTHON, "-c", SERVED_SCRIPT, HOST])
    return result.stdout.strip()


def _wait_until_served(machine: nspawn.Machine, fingerprint: str) -> str:
    """Return what Prosody serves once it is ``fingerprint`` or time is up."""
    deadline = time.monotonic() + SERVE_WITHIN
    served = _served(machine)

    while served != fingerprint and time.monotonic() < deadline:
        time.sleep(0.1)
        served = _served(machine)
    return served


def _journal(machine: nspawn.Machine) -> list[dict[str, str]]:
    """Return certwatchd's journal entries, oldest first."""
    result = machine.run(
        ["journalctl", "--no-pager", "-o", "json", "-u", UNIT_NAME]
    )
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    # journald stores a message that is not clean text as a byte array.
    return [e for e in entries if isinstance(e.get("MESSAGE"), str)]


def _wait_for_event(
    machine: nspawn.Machine, event: str, *fields: str, timeout: float = 10.0
) -> dict[str, str]:
    """Return the first journal entry for ``event`` with every field given.

    Fields are ``key=value`` words of the journal format.
    """
    deadline = time.monotonic() + timeout

    while True:
        for entry in _journal(machine):
            words = entry["MESSAGE"].split()
            if words[:1] == [event] and set(fields) <= set(words[1:]):
                return entry
        if time.monotonic() > deadline:
            msg = f"no {event} {' '.join(fields)}\n{_diagnostics(machine)}"
            raise AssertionError(msg)
        time.sleep(0.1)


def _diagnostics(machine: nspawn.Machine) -> str:
    """Return the journal of both services and Prosody's log, for reports."""
    journal = machine.run(
        ["journalctl", "--no-pager", "-u", UNIT_NAME, "-u", "prosody"],
        check=False,
    ).stdout
    prosody = machine.run(
        ["cat", "/var/log/prosody/prosody.log"], check=False
    ).stdout
    return f"journal:\n{journal}\nprosody.log:\n{prosody}"


def _states(machine: nspawn.Machine, *props: str) -> list[str]:
    """Return the properties of certwatchd.service named in ``props``."""
    return [machine.show(UNIT_NAME, prop) for prop in props]


def _cursor(machine: nspawn.Machine) -> str:
    """Return the journal cursor after the newest entry."""
    result = machine.run(["journalctl", "--no-pager", "-n", "1", "-o", "json"])
    return str(json.loads(result.stdout)["__CURSOR"])


def _wait_for_ready_again(machine: nspawn.Machine, cursor: str) -> list[str]:
    """Return the RELOADING=1 and READY=1 notifications after ``cursor``.

    Waits until a READY=1 follows a RELOADING=1, for ten seconds at most.
    """
    deadline = time.monotonic() + 10
    notified = _notifications(machine, cursor)

    while time.monotonic() < deadline:
        tags = [_tag(n) for n in notified]
        if (
            "RELOADING=1" in tags
            and "READY=1" in tags[tags.index("RELOADING=1") :]
        ):
            break
        time.sleep(0.1)
        notified = _notifications(machine, cursor)
    return [n for n in notified if _tag(n) in {"RELOADING=1", "READY=1"}]


def _tag(notification: str) -> str:
    """Return the first assignment of a logged notification."""
    return notification.split("(", 1)[1].split(",", 1)[0].rstrip(")")


def _notifications(machine: nspawn.Machine, cursor: str) -> list[str]:
    """Return what certwatchd told systemd after ``cursor``, as logged."""
    result = machine.run(
        [
            "journalctl",
            "--no-pager",
            "-o",
            "cat",
            "_PID=1",
            f"--after-cursor={cursor}",
        ]
    )
    prefix = f"{UNIT_NAME}: Got notification message"
    return [
        line for line in result.stdout.splitlines() if line.startswith(prefix)
    ]


@pytest.mark.peers
@pytest.mark.timeout(120)
def test_service_installs_the_pair_prosody_serves(
    machine: nspawn.Machine,
) -> None:
    """Started, the service installs the lineage and Prosody serves it."""
    fingerprint = _installed(machine)

    verified = _wait_for_event(
        machine, "verify.ok", f"host={HOST}", f"served={fingerprint[:16]}"
    )
    state, substate, status = _states(
        machine, "ActiveState", "SubState", "StatusText"
    )
    modes = machine.run(["stat", "--format=%U:%G %a", CERT, KEY]).stdout
    served = _served(machine)
    event = _wait_for_event(machine, "cert.installed", f"host={HOST}")

    report = _diagnostics(machine)
    assert (state, substate) == ("active", "running"), report
    assert status.startswith("1 hosts, soonest expiry example.test"), status
    assert modes.splitlines() == ["root:prosody 644", "root:prosody 640"]
    assert served == fingerprint, report
    assert event["PRIORITY"] == "6"
    assert verified["PRIORITY"] == "6"


@pytest.mark.peers
@pytest.mark.timeout(120)
def test_renewal_is_installed_served_and_verified(
    machine: nspawn.Machine, authority: Authority
) -> None:
    """A certbot-style renewal is served within seconds and verified."""
    renewed = authority.issue([HOST])
    new = _fingerprint(renewed)

    _lineage(machine, HOST, renewed, renew=True)
    renewed_at = time.monotonic()
    served = _wait_until_served(machine, new)
    serve_seconds = time.monotonic() - renewed_at
    installed = machine.read_file(CERT)
    verified = _wait_for_event(
        machine, "verify.ok", f"host={HOST}", f"served={new[:16]}"
    )
    status = machine.show(UNIT_NAME, "StatusText")
    refusals = [
        entry["MESSAGE"]
        for entry in _journal(machine)
        if entry["MESSAGE"].startswith("cert.refused ")
    ]

    assert served == new, _diagnostics(machine)
    assert serve_seconds < SERVE_WITHIN
    assert installed.startswith(renewed.cert_pem.decode())
    assert verified["PRIORITY"] == "6"
    assert "verified at" in status, status
    # Read only once consistent: the half-swapped lineage was never judged.
    assert refusals == []


@pytest.mark.peers
@pytest.mark.timeout(120)
def test_broken_lineage_is_refused_at_error_priority(
    machine: nspawn.Machine, authority: Authority
) -> None:
    """A lineage whose key does not match is refused as an error."""
    fingerprint = _installed(machine)
    issued = authority.issue([BROKEN])
    other = authority.issue([BROKEN])
    mismatched = Issued(other.key_pem, issued.cert_pem, issued.chain_pem)

    _lineage(machine, BROKEN, mismatched)
    refused = _wait_for_event(
        machine, "cert.refused", f"source=letsencrypt:{BROKEN}"
    )
    listing = machine.run(["ls", "-A", "/etc/prosody/certs"]).stdout
    served = _served(machine)
    state = _states(machine, "ActiveState", "SubState")

    assert BROKEN in refused["MESSAGE"], refused["MESSAGE"]
    assert refused["PRIORITY"] == "3"
    assert BROKEN not in listing, listing
    assert served == fingerprint, _diagnostics(machine)
    assert state == ["active", "running"]


@pytest.mark.peers
@pytest.mark.timeout(120)
def test_reload_rereads_settings_and_stop_ends_cleanly(
    machine: nspawn.Machine,
) -> None:
    """A reload passes through RELOADING back to running; stop is quick."""
    # At debug level systemd logs every notification it receives.
    machine.run(["systemctl", "log-level", "debug"])
    cursor = _cursor(machine)

    machine.run(["systemctl", "reload", UNIT_NAME])
    notified = _wait_for_ready_again(machine, cursor)
    after_reload = _states(machine, "ActiveState", "SubState")

    stop_started = time.monotonic()
    machine.run(["systemctl", "stop", UNIT_NAME])
    stop_seconds = time.monotonic() - stop_started
    stopped = _states(machine, "ActiveState", "Result", "ExecMainStatus")
    stopping = _wait_for_event(machine, "daemon.stopping")

    assert [_tag(n) for n in notified] == ["RELOADING=1", "READY=1"]
    assert after_reload == ["active", "running"]
    assert stopped == ["inactive", "success", "0"], _diagnostics(machine)
    assert stop_seconds < 5
    assert stopping["PRIORITY"] == "6"
