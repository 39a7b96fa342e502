"""certwatchd end to end: real pebble, certbot and Prosody on loopback.

certbot issues one lineage for example.test and its MUC component from a
pebble started for this module; Prosody runs as the prosody user from a
private config whose certificate directory is the one certwatchd installs
into; `certwatchd run` runs as a subprocess with JSON logs. The tests then
look at what Prosody actually serves over STARTTLS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certwatchd.verify import Mode, VerifyError, fetch_served_leaf
from peers import (
    Certbot,
    Pebble,
    PeerError,
    Prosody,
    install_pair,
    prosody_certs_dir,
    require_binaries,
    require_root,
    self_signed,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

HOST = "example.test"
COMPONENT = "conference.example.test"
DEBOUNCE = 0.5
VERIFY_TIMEOUT = 4.0
QUARANTINE_AFTER = 1.0
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# The promise: a renewal is served within the debounce plus five seconds.
RENEWAL_BUDGET = DEBOUNCE + 5.0
# Seconds without a new event after which certwatchd counts as idle.
SETTLE = 2.0
# What Prosody 0.12 logs when a SIGHUP makes it reload its config.
PROSODY_RELOADED = "Reloading configuration file"


def fingerprint(der: bytes) -> str:
    """Return the SHA-256 of a DER certificate, as certwatchd logs it."""
    return hashlib.sha256(der).hexdigest()[:16]


def der_of(pem: bytes) -> bytes:
    """Return the DER of the first certificate in `pem`."""
    cert = x509.load_pem_x509_certificate(pem)
    return cert.public_bytes(serialization.Encoding.DER)


def served(port: int, host: str, mode: Mode = "xmpp-client") -> bytes:
    """Return the leaf the local Prosody serves for `host` after STARTTLS."""
    return fetch_served_leaf(host, "127.0.0.1", port, mode, 5)


def serves(port: int, host: str, leaf: bytes, mode: Mode) -> bool:
    """Say whether `leaf` is served for `host`; False while none is."""
    try:
        return served(port, host, mode) == leaf
    except VerifyError:
        return False


def show(
    what: str, seconds: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """Print a measured time to the terminal, even under output capture."""
    with capsys.disabled():
        print(f"\n  {what}: {seconds:.2f} s", flush=True)  # noqa: T201


class Certwatchd:
    """`certwatchd run` as a subprocess, its JSON log kept in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
        }
        argv = [sys.executable, "-m", "certwatchd", "run"]
        argv += ["--config", str(self.config)]
        with self.log.open("ab") as output:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=env,
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> int | None:
        """End the daemon by its pid with SIGTERM; return its exit status."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)
        return process.returncode

    def events(self) -> list[dict[str, object]]:
        """Parse every JSON event logged so far, in order."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def named(self, event: str, **fields: object) -> list[dict[str, object]]:
        """Return the events called `event` whose fields match `fields`."""
        return [
            e
            for e in self.events()
            if e.get("event") == event
            and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_event(
        self, event: str, timeout: float, **fields: object
    ) -> dict[str, object]:
        """Wait for an event called `event` with `fields`; return the first.

        Raises PeerError with the log's tail if the daemon exits first or
        the event does not come in time.
        """

        def is_logged() -> bool:
            if self._process is not None and self._process.poll() is not None:
                msg = f"certwatchd exited early:\n{self.tail()}"
                raise PeerError(msg)
            return bool(self.named(event, **fields))

        try:
            wait_for(is_logged, timeout, f"{event} {fields}")
        except PeerError as exc:
            msg = f"{exc}\n{self.tail()}"
            raise PeerError(msg) from None
        return self.named(event, **fields)[0]

    def wait_quiet(self, quiet: float, timeout: float) -> None:
        """Wait until nothing has been logged for `quiet` seconds."""
        last = (-1, time.monotonic())

        def is_quiet() -> bool:
            nonlocal last
            size = self.log.stat().st_size
            if size != last[0]:
                last = (size, time.monotonic())
            return time.monotonic() - last[1] >= quiet

        wait_for(is_quiet, timeout, f"certwatchd idle for {quiet} s")

    def tail(self, lines: int = 40) -> str:
        """Return the last lines of the log, for failure messages."""
        text = self.log.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """One lineage, one Prosody and one certwatchd pointed at both."""

    certbot: Certbot
    certs: Path
    state: Path
    config: Path
    prosody: Prosody
    daemon: Certwatchd

    @property
    def live(self) -> Path:
        """The live directory certbot keeps for the lineage."""
        return self.certbot.config_dir / "live" / HOST

    def issued_leaf(self) -> bytes:
        """Return the DER of the certificate the lineage holds now."""
        return der_of((self.live / "cert.pem").read_bytes())

    def endpoints(self) -> list[tuple[int, str, Mode]]:
        """Return (port, host, mode): c2s for the host, s2s for the MUC."""
        return [
            (self.prosody.c2s_port, HOST, "xmpp-client"),
            (self.prosody.s2s_port, COMPONENT, "xmpp-server"),
        ]

    def served_now(self) -> dict[str, str]:
        """Return the fingerprint of the leaf served now for each name."""
        return {
            host: fingerprint(served(port, host, mode))
            for port, host, mode in self.endpoints()
        }

    def wait_until_served(self, leaf: bytes, timeout: float) -> float:
        """Wait until both names serve `leaf`; return the seconds it took."""
        return wait_for(
            lambda: all(
                serves(port, host, leaf, mode)
                for port, host, mode in self.endpoints()
            ),
            timeout,
            "both names serving the expected leaf",
        )

    def reload_prosody(self) -> None:
        """SIGHUP Prosody as logrotate would; return once it has reloaded."""
        before = self.prosody.log_text().count(PROSODY_RELOADED)
        self.prosody.reload()
        wait_for(
            lambda: self.prosody.log_text().count(PROSODY_RELOADED) > before,
            5,
            "prosody reloading its config",
        )
        # New TLS contexts are in place about 0.2 s after the log line.
        time.sleep(0.5)

    def installed(self, host: str) -> str:
        """Return the fingerprint of the leaf in `<host>.crt`."""
        return fingerprint(der_of((self.certs / f"{host}.crt").read_bytes()))

    def check_json(self) -> tuple[int, dict[str, object]]:
        """Run `certwatchd check --json`; return its status and document."""
        argv = [sys.executable, "-m", "certwatchd", "check", "--json"]
        argv += ["--config", str(self.config)]
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.returncode, json.loads(done.stdout)


class Saboteur:
    """A reload command that, once armed, swaps pairs behind our back.

    The next reload after `arm` first installs another valid pair, made
    here and self-signed for both names, over both pairs certwatchd
    installs, example.test's and the component's, so that Prosody's index,
    which picks any file covering a name, cannot keep serving certwatchd's
    pair from the other one. Every reload then signals Prosody as usual.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.trigger = directory / "armed"
        cert, key = self_signed([HOST, COMPONENT])
        (directory / "other.crt").write_bytes(cert)
        (directory / "other.key").write_bytes(key)
        (directory / "other.key").chmod(0o600)
        self.leaf = der_of(cert)

    def arm(self) -> None:
        """Make the next reload, and only that one, replace the pairs."""
        self.trigger.touch()

    def command(self, prosody: Prosody, certs: Path) -> list[str]:
        """Write the reload script for `prosody`; return its argv."""
        q = shlex.quote
        trigger = q(str(self.trigger))
        lines = ["#!/bin/sh", "set -e", f"if [ -e {trigger} ]; then"]
        lines.append(f"    rm -f {trigger}")
        for host in (HOST, COMPONENT):
            for suffix, mode in (("key", "0640"), ("crt", "0644")):
                source = q(str(self.directory / f"other.{suffix}"))
                target = q(str(certs / f"{host}.{suffix}"))
                lines.append(
                    f"    install -o root -g prosody -m {mode}"
                    f" {source} {target}"
                )
        lines += ["fi", f"exec {shlex.join(prosodyctl_reload(prosody))}"]

        script = self.directory / "reload.sh"
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)
        return [str(script)]


def prosodyctl_reload(prosody: Prosody) -> list[str]:
    """Return the reload command an operator would configure."""
    return ["prosodyctl", "--config", str(prosody.config_path), "reload"]


def write_config(
    path: Path,
    *,
    directories: tuple[Path, Path, Path],
    trust: Path,
    reload_command: list[str],
    prosody: Prosody,
    quarantine_after: float,
) -> None:
    """Write certwatchd's TOML: live, certs and state dirs, and endpoints."""
    live, certs, state = directories
    quote = json.dumps
    path.write_text(
        f"""\
[sources]
letsencrypt_live = {quote(str(live))}
prosody_certs = {quote(str(certs))}

[install]
certs_dir = {quote(str(certs))}
owner = "root"
group = "prosody"

[validation]
trust = {quote(str(trust))}

[reload]
command = {quote(reload_command)}
debounce_seconds = {DEBOUNCE}
max_delay_seconds = 5.0
timeout_seconds = 20.0

[state]
dir = {quote(str(state))}

[log]
format = "json"
level = "info"

[daemon]
quarantine_after_seconds = {quarantine_after}

[verify]
timeout_seconds = {VERIFY_TIMEOUT}

[[verify.endpoints]]
host = "{HOST}"
address = "127.0.0.1"
port = {prosody.c2s_port}
mode = "xmpp-client"

[[verify.endpoints]]
host = "{COMPONENT}"
address = "127.0.0.1"
port = {prosody.s2s_port}
mode = "xmpp-server"
"""
    )


@pytest.fixture(scope="module")
def pebble() -> Iterator[Pebble]:
    """Run one pebble for the whole module, once every peer is present."""
    require_binaries(
        "pebble", "certbot", "prosody", "prosodyctl", "setpriv", "install"
    )
    require_root()
    with Pebble() as server:
        yield server


@pytest.fixture(scope="module")
def trust(pebble: Pebble, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write the root pebble signs with in this run, for validation.trust."""
    path = tmp_path_factory.mktemp("trust") / "pebble-root.pem"
    path.write_text(pebble.issuing_roots_pem())
    return path


def start_stack(
    exit_stack: contextlib.ExitStack,
    pebble: Pebble,
    trust: Path,
    directory: Path,
    *,
    reload: Callable[[Prosody, Path], list[str]] | None = None,
    quarantine_after: float = QUARANTINE_AFTER,
) -> Stack:
    """Issue a lineage, start Prosody and certwatchd; stop them on exit.

    Returns once certwatchd has installed certbot's pair and verified
    that Prosody serves it for both names. `reload` builds the reload
    command from the Prosody and its certs directory.
    """
    certbot = exit_stack.enter_context(Certbot(pebble))
    live = certbot.certonly([HOST, COMPONENT], cert_name=HOST)
    certs = exit_stack.enter_context(prosody_certs_dir())
    prosody = exit_stack.enter_context(Prosody(certs))
    command = (
        prosodyctl_reload(prosody)
        if reload is None
        else reload(prosody, certs)
    )

    state = directory / "state"
    config = directory / "certwatchd.toml"
    write_config(
        config,
        directories=(live.parent, certs, state),
        trust=trust,
        reload_command=command,
        prosody=prosody,
        quarantine_after=quarantine_after,
    )
    daemon = exit_stack.enter_context(
        Certwatchd(config, directory / "certwatchd.log")
    )
    stack = Stack(certbot, certs, state, config, prosody, daemon)

    issued = fingerprint(stack.issued_leaf())
    for host in (HOST, COMPONENT):
        daemon.wait_event(
            "verify.ok", STARTUP_TIMEOUT, host=host, served=issued
        )
    return stack


@pytest.fixture
def launch(
    pebble: Pebble, trust: Path, tmp_path: Path
) -> Iterator[Callable[..., Stack]]:
    """Start a stack on demand; stop every process of it, by pid, after."""
    with contextlib.ExitStack() as exit_stack:
        yield lambda **options: start_stack(
            exit_stack, pebble, trust, tmp_path, **options
        )


@dataclass(frozen=True)
class Rollback:
    """A renewal whose reload served another pair, once it has settled."""

    stack: Stack
    saboteur: Saboteur
    previous: bytes
    renewed: bytes
    seconds: float


@pytest.fixture(scope="module")
def rollback(
    pebble: Pebble, trust: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rollback]:
    """Renew behind an armed saboteur and let certwatchd settle, once.

    Several tests read the outcome; none of them changes anything.
    """
    directory = tmp_path_factory.mktemp("rollback")
    spoiler = Saboteur(directory)

    with contextlib.ExitStack() as exit_stack:
        stack = start_stack(
            exit_stack, pebble, trust, directory, reload=spoiler.command
        )
        previous = stack.issued_leaf()
        spoiler.arm()
        started = time.monotonic()
        stack.certbot.renew(force=True)
        renewed = stack.issued_leaf()

        wait_for(
            lambda: bool(
                stack.daemon.named("rollback.verified")
                or stack.daemon.named("rollback.failed")
            ),
            DEBOUNCE + 2 * VERIFY_TIMEOUT + 20,
            "the rollback to be verified or to fail",
        )
        seconds = time.monotonic() - started
        stack.daemon.wait_quiet(SETTLE, STARTUP_TIMEOUT)
        yield Rollback(stack, spoiler, previous, renewed, seconds)


@pytest.mark.peers
@pytest.mark.root
def test_prosody_serves_the_issued_certificate(launch, capsys):
    """Prosody serves certbot's certificate on c2s and s2s once installed."""
    started = time.monotonic()
    stack = launch()
    show("issue, start, install, verify", time.monotonic() - started, capsys)

    issued = stack.issued_leaf()

    assert stack.served_now() == {
        HOST: fingerprint(issued),
        COMPONENT: fingerprint(issued),
    }
    assert stack.installed(HOST) == fingerprint(issued)
    assert stack.installed(COMPONENT) == fingerprint(issued)


@pytest.mark.peers
@pytest.mark.root
def test_installed_pairs_pass_prosodyctl_check_certs(launch):
    """`prosodyctl check certs` finds nothing wrong with what was installed."""
    stack = launch()

    rc, output = stack.prosody.check_certs()

    assert rc == 0, output
    assert "All checks passed" in output, output


@pytest.mark.peers
@pytest.mark.root
def test_every_endpoint_is_verified_after_the_reload(launch):
    """Both endpoints log verify.ok and `check` records a good verification."""
    stack = launch()
    issued = fingerprint(stack.issued_leaf())

    ok = stack.daemon.named("verify.ok")
    reloads = stack.daemon.named("reload.finished")
    code, report = stack.check_json()

    assert {(e["host"], e["mode"]) for e in ok} == {
        (HOST, "xmpp-client"),
        (COMPONENT, "xmpp-server"),
    }
    assert all(e["expected"] == e["served"] == issued for e in ok)
    assert [e["rc"] for e in reloads] == [0]
    assert not stack.daemon.named("verify.failed")
    verification = report["last_verification"]
    assert isinstance(verification, dict)
    assert verification["ok"] is True
    assert (code, report["status"]) == (0, "OK"), report


@pytest.mark.peers
@pytest.mark.root
def test_renewal_is_served_within_debounce_plus_five_seconds(launch, capsys):
    """A forced renewal is served for both names within the promised time."""
    stack = launch()
    old = stack.issued_leaf()

    started = time.time()
    stack.certbot.renew(force=True)
    certbot_done = time.time()
    new = stack.issued_leaf()
    stack.wait_until_served(new, RENEWAL_BUDGET + 5)
    served_at = time.time()

    # certbot swaps fullchain.pem, the last of its links, before it exits:
    # from then on the renewal is visible to certwatchd.
    linked_at = os.lstat(stack.live / "fullchain.pem").st_mtime
    show("certbot renew", certbot_done - started, capsys)
    show("last link swapped to served", served_at - linked_at, capsys)
    show("certbot exit to served", served_at - certbot_done, capsys)
    assert new != old
    assert served_at - linked_at <= RENEWAL_BUDGET
    stack.daemon.wait_event(
        "verify.ok", VERIFY_TIMEOUT, host=COMPONENT, served=fingerprint(new)
    )
    assert stack.daemon.named("verify.ok", host=HOST, served=fingerprint(new))
    rc, output = stack.prosody.check_certs()
    assert rc == 0, output


@pytest.mark.peers
@pytest.mark.root
def test_dropped_mismatched_pair_is_quarantined(launch, capsys):
    """A mismatched pair dropped in Prosody's directory is moved aside."""
    stack = launch()
    issued = stack.issued_leaf()
    reloads = len(stack.daemon.named("reload.finished"))
    _, stranger = self_signed([HOST])
    fullchain = (stack.live / "fullchain.pem").read_bytes()

    dropped = time.monotonic()
    install_pair(stack.certs, "rogue", fullchain, stranger)
    event = stack.daemon.wait_event(
        "cert.quarantined", QUARANTINE_AFTER + DEBOUNCE + 10
    )
    show(
        "mismatched pair dropped to moved", time.monotonic() - dropped, capsys
    )

    moved_to = Path(str(event["moved_to"]))
    assert event["level"] == "error"
    assert event["path"] == str(stack.certs / "rogue.crt")
    assert moved_to.parent == stack.state / "quarantine"
    assert sorted(p.name for p in moved_to.iterdir()) == [
        "rogue.crt",
        "rogue.key",
    ]
    assert sorted(p.name for p in stack.certs.iterdir()) == [
        f"{COMPONENT}.crt",
        f"{COMPONENT}.key",
        f"{HOST}.crt",
        f"{HOST}.key",
    ]
    assert len(stack.daemon.named("reload.finished")) == reloads

    stack.reload_prosody()
    assert stack.served_now() == {
        HOST: fingerprint(issued),
        COMPONENT: fingerprint(issued),
    }
    assert "does not match" not in stack.prosody.log_text()


@pytest.mark.peers
@pytest.mark.root
def test_mismatched_pair_is_quarantined_before_a_reload(launch):
    """A reload due within the grace period moves a broken pair aside first."""
    stack = launch(quarantine_after=300.0)
    _, stranger = self_signed([HOST])
    fullchain = (stack.live / "fullchain.pem").read_bytes()
    install_pair(stack.certs, "rogue", fullchain, stranger)
    stack.daemon.wait_event(
        "cert.refused", DEBOUNCE + 10, source="prosody:rogue.crt"
    )
    assert (stack.certs / "rogue.crt").exists()

    stack.certbot.renew(force=True)
    new = stack.issued_leaf()
    stack.wait_until_served(new, RENEWAL_BUDGET + 5)
    stack.daemon.wait_event(
        "verify.ok", VERIFY_TIMEOUT, host=COMPONENT, served=fingerprint(new)
    )

    names = [e["event"] for e in stack.daemon.events()]
    last_reload = len(names) - 1 - names[::-1].index("reload.finished")
    assert names.count("cert.quarantined") == 1
    assert names.index("cert.quarantined") < last_reload
    assert not (stack.certs / "rogue.crt").exists()
    assert not stack.daemon.named("verify.failed")


@pytest.mark.peers
@pytest.mark.root
def test_pair_swapped_behind_our_back_fails_verification(rollback, capsys):
    """A reload that serves another pair fails verification and is undone."""
    daemon = rollback.stack.daemon
    show("renewal to rollback verified", rollback.seconds, capsys)

    failed = daemon.named("verify.failed", host=HOST)

    assert [(e["expected"], e["served"]) for e in failed] == [
        (fingerprint(rollback.renewed), fingerprint(rollback.saboteur.leaf))
    ]
    assert daemon.named("rollback.installed", host=HOST)
    assert daemon.named("rollback.verified")
    assert not daemon.named("rollback.failed")


@pytest.mark.peers
@pytest.mark.root
def test_rollback_restores_the_previous_good_pair(rollback):
    """After the rollback Prosody serves the pair certwatchd had installed."""
    stack = rollback.stack
    known = {
        fingerprint(rollback.previous): "previous",
        fingerprint(rollback.renewed): "renewed",
        fingerprint(rollback.saboteur.leaf): "swapped in",
    }

    now = {host: known.get(f, f) for host, f in stack.served_now().items()}
    installed = known.get(stack.installed(HOST))

    assert now == {HOST: "previous", COMPONENT: "previous"}
    assert installed == "previous"


@pytest.mark.peers
@pytest.mark.root
def test_check_reports_the_failed_then_recovered_verification(rollback):
    """`certwatchd check --json` shows the failure and the recovery."""
    code, report = rollback.stack.check_json()

    verification = report["last_verification"]
    assert isinstance(verification, dict)
    assert verification["ok"] is False
    assert verification["recovered"] is True
    assert HOST in verification["rolled_back"]
    assert (code, report["status"]) == (1, "WARNING"), report
