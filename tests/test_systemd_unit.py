"""The shipped systemd unit: static checks, and its sandbox under systemd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import nspawn

UNIT = Path(__file__).parent.parent / "systemd" / "certwatchd.service"
UNIT_NAME = UNIT.name
EXEC_START = nspawn.PREFIX / "bin" / "certwatchd"
MAX_EXPOSURE = 2.0
STAND_IN = nspawn.PREFIX / "stand-in.py"
RESULTS = Path("/var/lib/certwatchd/stand-in.json")
INSTALLED = Path("/etc/prosody/certs/x.key")
PROSODY_LOG = Path("/var/log/prosody/prosody.log")
HUP_LOGGED = "Received SIGHUP"

# What the daemon does under the unit's sandbox, with the standard library
# only.  Each step's outcome is recorded in the state directory before
# READY=1, so that `systemctl start` returning means the record is there.
STAND_IN_SOURCE = """\
import errno, grp, json, os, signal, socket, subprocess

STATE = os.environ["STATE_DIRECTORY"]
DENIED = [
    ("/etc/certwatchd/written", "w"),
    ("/run/written", "w"),
    ("/etc/shadow", "r"),
]


def notify(message):
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def read_key():
    with open("/etc/letsencrypt/live/x/privkey.pem", "rb") as key:
        return len(key.read())


def install_key():
    temporary = "/etc/prosody/certs/.x.key.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"key\\n")
        os.fchown(fd, 0, grp.getgrnam("prosody").gr_gid)
        os.fchmod(fd, 0o640)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, "/etc/prosody/certs/x.key")
    return sorted(os.listdir("/etc/prosody/certs"))


def write_state():
    with open(os.path.join(STATE, "state"), "w") as state:
        state.write("installed x\\n")
    return oct(os.stat(STATE).st_mode & 0o7777)


def denied():
    outcomes = {}
    for path, mode in DENIED:
        try:
            with open(path, mode):
                outcomes[path] = "allowed"
        except OSError as error:
            outcomes[path] = errno.errorcode[error.errno]
    return outcomes


def reload_prosody():
    done = subprocess.run(
        ["prosodyctl", "reload"], capture_output=True, text=True
    )
    return [done.returncode, done.stdout + done.stderr]


signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
results = {}
for step in (read_key, install_key, write_state, denied, reload_prosody):
    try:
        results[step.__name__] = [True, step()]
    except OSError as error:
        results[step.__name__] = [False, repr(error)]
with open(os.path.join(STATE, "stand-in.json"), "w") as record:
    json.dump(results, record)

notify("READY=1")
interval = int(os.environ["WATCHDOG_USEC"]) / 2e6
while signal.sigtimedwait({signal.SIGTERM}, interval) is None:
    notify("WATCHDOG=1")
notify("STOPPING=1")
"""
# Replaces the command only: the sandbox under test is the unit file's.
DROP_IN = f"""\
[Service]
ExecStart=
ExecStart=/usr/bin/python3 {STAND_IN}
"""
PROSODY_CONFIG = """\
pidfile = "/run/prosody/prosody.pid"
log = { info = "/var/log/prosody/prosody.log" }
certificates = "certs"
modules_enabled = { "posix" }
VirtualHost "localhost"
"""
SYSUSERS = 'u prosody - "Prosody XMPP Server" /var/lib/prosody\n'
# Owners and modes as Debian and its prosody and certbot packages leave
# them; systemd-sysusers alone would leave /etc/shadow at 0000.
TMPFILES = """\
z /etc/shadow 0640 root shadow -
z /etc/prosody/prosody.cfg.lua 0640 root prosody -
d /etc/prosody/certs 0750 root prosody -
d /var/lib/prosody 0750 prosody prosody -
d /var/log/prosody 0750 prosody prosody -
d /etc/letsencrypt/live 0700 root root -
d /etc/letsencrypt/archive 0700 root root -
z /etc/letsencrypt/archive/x/privkey1.pem 0600 root root -
L /etc/letsencrypt/live/x/privkey.pem - - - - ../../archive/x/privkey1.pem
"""


def test_unit_verifies_cleanly() -> None:
    """systemd-analyze verify reports nothing about the unit."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )

    # verify also checks that ExecStart's program exists on this host.
    absent = (
        f"{UNIT_NAME}: Command {EXEC_START} is not executable:"
        " No such file or directory"
    )
    output = (result.stdout + result.stderr).splitlines()
    if not EXEC_START.exists():
        output = [line for line in output if line != absent]
    assert output == []
    assert result.returncode == 0 or not EXEC_START.exists()


def test_unit_exposure_is_at_most_two() -> None:
    """The offline security review rates the unit's exposure 2.0 or less."""
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            # On a 0-100 scale: 20 is an exposure of 2.0.
            f"--threshold={round(MAX_EXPOSURE * 10)}",
            str(UNIT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    overall = result.stdout.rsplit("Overall exposure level", 1)[1]
    assert float(overall.split(":")[1].split()[0]) <= MAX_EXPOSURE


def _prepare(machine: nspawn.Machine) -> None:
    """Give the machine Prosody's user and files, a lineage and the unit."""
    machine.write_file("/etc/sysusers.d/prosody.conf", SYSUSERS)
    machine.run(["systemd-sysusers"])
    machine.write_file("/etc/prosody/prosody.cfg.lua", PROSODY_CONFIG)
    # Prosody's resolver refuses to start without these.
    machine.write_file("/etc/resolv.conf", "nameserver 127.0.0.1\n")
    machine.write_file("/etc/hosts", "127.0.0.1 localhost\n")
    machine.write_file(
        "/etc/letsencrypt/archive/x/privkey1.pem", "not a key\n", 0o600
    )
    machine.write_file("/etc/certwatchd/config.toml", "")
    machine.write_file("/etc/tmpfiles.d/certwatchd-test.conf", TMPFILES)
    machine.run(
        [
            "systemd-tmpfiles",
            "--create",
            "/etc/tmpfiles.d/certwatchd-test.conf",
        ]
    )

    machine.write_file(STAND_IN, STAND_IN_SOURCE)
    machine.write_file(
        f"/etc/systemd/system/{UNIT_NAME}", UNIT.read_text(encoding="utf-8")
    )
    machine.write_file(
        f"/etc/systemd/system/{UNIT_NAME}.d/stand-in.conf", DROP_IN
    )
    machine.run(["systemctl", "daemon-reload"])


def _start_prosody(machine: nspawn.Machine) -> str:
    """Start Debian's prosody.service; return its pid once it takes SIGHUP.

    Prosody writes its pidfile before it handles SIGHUP, and a SIGHUP in
    between ends it.
    """
    machine.run(["systemctl", "reset-failed", "prosody.service"])
    machine.run(["systemctl", "start", "prosody.service"])
    pid = machine.show("prosody.service", "MainPID")
    machine.wait_until_handled(pid, signal.SIGHUP)
    return pid


def _journal(machine: nspawn.Machine) -> str:
    """Return the journal of the unit and of Prosody."""
    command = ["journalctl", "--no-pager", "-u", UNIT_NAME, "-u", "prosody"]
    return machine.run(command, check=False).stdout


def _count_hups(machine: nspawn.Machine, at_least: int = 0) -> int:
    """Return how often Prosody logged a SIGHUP, waiting for ``at_least``."""
    deadline = time.monotonic() + 5

    while True:
        log = machine.run(["cat", str(PROSODY_LOG)], check=False).stdout
        count = log.count(HUP_LOGGED)
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


@pytest.mark.peers
@pytest.mark.timeout(60)
def test_sandbox_lets_the_daemon_install_and_reload() -> None:
    """Under the unit's sandbox a pair installs and prosodyctl reload works."""
    nspawn.require_machines()

    with nspawn.Machine(f"certwatchd-unit-{os.getpid()}") as machine:
        _prepare(machine)
        prosody = _start_prosody(machine)
        hups_before = _count_hups(machine)

        started = machine.run(["systemctl", "start", UNIT_NAME], check=False)
        assert started.returncode == 0, _journal(machine)
        running = [
            machine.show(UNIT_NAME, p) for p in ("ActiveState", "SubState")
        ]
        results = json.loads(machine.read_file(RESULTS))
        installed = machine.run(
            ["stat", "--format=%U:%G %a", str(INSTALLED)], check=False
        ).stdout.split()
        hups_after = _count_hups(machine, at_least=hups_before + 1)
        prosody_after = machine.show("prosody.service", "MainPID")

        stop_started = time.monotonic()
        machine.run(["systemctl", "stop", UNIT_NAME])
        stop_seconds = time.monotonic() - stop_started
        stopped = [
            machine.show(UNIT_NAME, p)
            for p in ("ActiveState", "Result", "ExecMainStatus")
        ]
        journal = _journal(machine)

    report = f"results: {results}\njournal:\n{journal}"
    assert running == ["active", "running"], report
    assert all(ok for ok, _ in results.values()), report
    assert results["install_key"][1] == [INSTALLED.name], report
    assert installed == ["root:prosody", "640"], report
    assert results["write_state"][1] == "0o700", report
    assert results["denied"][1] == {
        "/etc/certwatchd/written": "EROFS",
        "/run/written": "EROFS",
        "/etc/shadow": "EACCES",
    }, report
    assert results["reload_prosody"][1][0] == 0, report
    assert (hups_before, hups_after, prosody_after) == (0, 1, prosody), report
    assert stopped == ["inactive", "success", "0"], report
    assert stop_seconds < 5, report
