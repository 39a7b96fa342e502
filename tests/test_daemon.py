"""``certwatchd run`` as a real process, driven the way certbot drives it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from statistics import median

import pytest

from certwatchd.install import host_paths
from certwatchd.sandbox import Issued, LetsEncryptTree
from daemon_process import (
    DaemonProcess,
    NotifyListener,
    PairSampler,
    cpu_seconds,
    daemon_env,
    is_alive,
    kill_pid,
    leaf,
    monotonic_usec,
    run_argv,
    serial_of,
    wait_until,
)

LINEAGE = "example.com"
NAMES = ("example.com", "xmpp.example.com")
DEBOUNCE = 0.3
WATCHDOG_USEC = 1_000_000
# Long enough that no test sees a timer-driven reconcile by accident.
RECONCILE_SECONDS = 3600
QUEUE_LIMIT = Path("/proc/sys/fs/inotify/max_queued_events")
# How long a test waits for an install it expects promptly; generous, so
# a busy machine does not fail it. The one-second promise is tested once.
SOON = 3.0

# A reload command that notes the wall-clock time of each call in a log,
# counts its calls in a file, fails on the calls numbered in its fourth
# argument and hangs, with a child of its own, on those in its fifth,
# after writing both pids down.
RELOAD_SCRIPT = """\
import os, subprocess, sys, time
from pathlib import Path

counter, log, pids = (Path(p) for p in sys.argv[1:4])
fail = {int(n) for n in sys.argv[4].split(",") if n}
hang = {int(n) for n in sys.argv[5].split(",") if n}
call = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(call))
with log.open("a") as handle:
    handle.write(f"{time.time()}\\n")
if call in hang:
    child = subprocess.Popen(["sleep", "60"])
    pids.write_text(f"{child.pid} {os.getpid()}\\n")
    time.sleep(60)
sys.exit(1 if call in fail else 0)
"""

# Runs the daemon with one injected failure: an event for a file named
# stop-the-observer raises on watchdog's observer thread, which ends it.
# Nothing else can kill that thread on demand.
DYING_OBSERVER = """\
import sys
from pathlib import Path

from certwatchd import daemon

record = daemon.Daemon._on_change


def fail_on_marker(self, root, path):
    if path.endswith("stop-the-observer"):
        raise RuntimeError("injected failure on the observer thread")
    record(self, root, path)


daemon.Daemon._on_change = fail_on_marker
sys.exit(daemon.serve(Path(sys.argv[1])))
"""


@pytest.fixture
def listener(tmp_path):
    """Bind a notify socket as systemd would; close it afterwards."""
    listener = NotifyListener(tmp_path / "notify")
    yield listener
    listener.close()


@pytest.fixture
def daemon(setup, listener):
    """Start ``certwatchd run`` on the setup; kill it by pid afterwards."""
    setup.settings["reload"].update(
        debounce_seconds=DEBOUNCE, timeout_seconds=10
    )
    setup.settings["daemon"] = {
        "reconcile_interval_seconds": RECONCILE_SECONDS
    }
    started: list[DaemonProcess] = []

    def start(
        *,
        notify=True,
        watchdog_usec=WATCHDOG_USEC,
        argv=None,
        ready=True,
    ):
        env = daemon_env(listener if notify else None, watchdog_usec)
        log = setup.root / f"daemon-{len(started)}.log"
        process = DaemonProcess(argv or run_argv(setup.config), log, env)
        started.append(process)
        if ready:
            process.wait_for_event("daemon.ready")
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def reload_script(setup):
    """Make the reload command fail or hang on chosen calls."""
    script = setup.root / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    pids = setup.root / "reload.pids"

    def configure(*, fail=(), hang=()):
        setup.settings["reload"]["command"] = [
            sys.executable,
            str(script),
            str(setup.root / "reload.count"),
            str(setup.reload_log),
            str(pids),
            ",".join(str(n) for n in fail),
            ",".join(str(n) for n in hang),
        ]
        return pids

    yield configure
    if pids.exists():
        for pid in pids.read_text().split():
            kill_pid(int(pid), ("sleep", str(script)))


def installed_serial(path):
    """Return the serial installed at ``path``, or None while unreadable."""
    try:
        return serial_of(path)
    except (OSError, ValueError):
        return None


def is_installed(certs, issued, hosts=NAMES, layout="flat"):
    """Say whether every host's certificate is the leaf of ``issued``."""
    serial = leaf(issued.cert_pem).serial_number
    return all(
        installed_serial(host_paths(certs, layout, host)[0]) == serial
        for host in hosts
    )


def wait_installed(setup, issued, timeout, hosts=NAMES, layout="flat"):
    """Wait until ``issued`` is installed; return the seconds it took."""
    started = time.monotonic()
    assert wait_until(
        lambda: is_installed(setup.certs, issued, hosts, layout), timeout
    ), f"{hosts} did not get the new certificate within {timeout} s"
    return time.monotonic() - started


def wait_reloads(setup, count, timeout=5.0):
    """Wait until the reload command has run ``count`` times."""
    assert wait_until(lambda: setup.reloads() >= count, timeout), (
        f"{setup.reloads()} reloads, expected {count}"
    )


def event_names(process):
    return [event["event"] for event in process.events()]


def test_ready_after_first_reconcile(setup, authority, daemon, listener):
    """READY=1 comes once the first reconcile has installed every pair."""
    issued = authority.issue(NAMES)
    setup.tree.create_lineage(LINEAGE, issued)

    process = daemon(ready=False)
    ready = listener.wait_for("READY")

    assert is_installed(setup.certs, issued)
    process.wait_for_event("daemon.ready")
    names = event_names(process)
    assert names.index("reconcile.started") < names.index("cert.installed")
    assert names.index("daemon.ready") > max(
        i for i, name in enumerate(names) if name == "cert.installed"
    )
    assert ready.fields["READY"] == "1"


def test_status_names_hosts_expiry_and_reload(
    setup, authority, daemon, listener
):
    """STATUS= counts hosts, names the soonest expiry and the last reload."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))

    daemon()
    ready = listener.wait_for("READY")
    wait_reloads(setup, 1)

    pattern = (
        r"2 hosts, soonest expiry (xmpp\.)?example\.com in 89 days,"
        r" last reload {}"
    )
    assert re.fullmatch(pattern.format("none yet"), ready.fields["STATUS"])
    assert wait_until(
        lambda: any(
            re.fullmatch(
                pattern.format(r"ok at \d\d:\d\d:\d\dZ"), m.fields["STATUS"]
            )
            for m in listener.messages("STATUS")
        ),
        2,
    ), listener.messages("STATUS")


def test_watchdog_pings_every_half_interval(
    setup, authority, daemon, listener
):
    """WATCHDOG=1 arrives every WATCHDOG_USEC/2 while the daemon is idle."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    daemon()
    start = time.monotonic()

    time.sleep(3.0)

    pings = [m.at for m in listener.messages("WATCHDOG", since=start)]
    gaps = [b - a for a, b in pairwise(pings)]
    assert 4 <= len(pings) <= 7, pings
    assert 0.45 <= median(gaps) <= 0.7, gaps
    assert max(gaps) < 1.0, gaps


def test_no_watchdog_pings_without_watchdog_usec(
    setup, authority, daemon, listener
):
    """Without WATCHDOG_USEC the daemon is ready but never pings."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    daemon(watchdog_usec=None)
    listener.wait_for("READY")

    time.sleep(1.2)

    assert listener.messages("WATCHDOG") == []


def test_sighup_rereads_settings(setup, authority, daemon, listener):
    """SIGHUP sends RELOADING=1, applies the new hosts, then READY=1."""
    issued = authority.issue(NAMES)
    setup.tree.create_lineage(LINEAGE, issued)
    setup.settings["install"]["hosts"] = ["example.com"]
    process = daemon()
    wait_reloads(setup, 1)
    assert not (setup.certs / "xmpp.example.com.crt").exists()
    unchanged = time.monotonic()
    process.send(signal.SIGHUP)
    listener.wait_for("READY", since=unchanged)
    time.sleep(DEBOUNCE + 0.2)
    assert setup.reloads() == 1

    setup.settings["install"]["hosts"] = list(NAMES)
    assert setup.config.is_file()
    before = time.monotonic()
    before_usec = monotonic_usec()
    process.send(signal.SIGHUP)
    ready = listener.wait_for("READY", since=before)
    after_usec = monotonic_usec()

    assert is_installed(setup.certs, issued)
    keys = [
        key
        for message in listener.messages(since=before)
        for key in message.fields
        if key in {"RELOADING", "READY"}
    ]
    assert keys[:2] == ["RELOADING", "READY"]
    reloading = listener.messages("RELOADING", since=before)[0]
    usec = int(reloading.fields["MONOTONIC_USEC"])
    assert before_usec <= usec <= after_usec
    assert ready.fields["STATUS"].startswith("2 hosts,")
    wait_reloads(setup, 2)
    assert process.named("reconcile.started", reason="settings re-read")
    renewed = authority.issue(NAMES)
    setup.tree.renew(LINEAGE, renewed)
    wait_installed(setup, renewed, SOON)


def test_sighup_with_broken_settings_keeps_the_old(
    setup, authority, daemon, listener
):
    """A SIGHUP with a bad key is an error event; the old settings go on."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    wait_reloads(setup, 1)

    setup.settings["install"]["hostz"] = ["xmpp.example.com"]
    assert setup.config.is_file()
    before = time.monotonic()
    process.send(signal.SIGHUP)
    listener.wait_for("READY", since=before)

    rejected = process.wait_for_event("daemon.settings_rejected")
    assert rejected[0]["level"] == "error"
    assert "hostz" in str(rejected[0]["error"])
    renewed = authority.issue(NAMES)
    setup.tree.renew(LINEAGE, renewed)
    wait_installed(setup, renewed, SOON)
    wait_reloads(setup, 2)
    assert process.is_running()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_ends_cleanly(setup, authority, daemon, listener, signum):
    """SIGTERM or SIGINT sends STOPPING=1 and exits 0 within 5 s."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    wait_reloads(setup, 1)

    before = time.monotonic()
    process.send(signum)
    code = process.wait(timeout=5)

    assert code == 0
    assert time.monotonic() - before < 5
    assert listener.messages("STOPPING", since=before)
    assert process.named("daemon.stopping")


def test_runs_without_notify_socket(setup, authority, daemon, listener):
    """Without NOTIFY_SOCKET it installs, renews, reloads and stops alike."""
    issued = authority.issue(NAMES)
    setup.tree.create_lineage(LINEAGE, issued)
    process = daemon(notify=False)
    assert is_installed(setup.certs, issued)
    wait_reloads(setup, 1)

    renewed = authority.issue(NAMES)
    setup.tree.renew(LINEAGE, renewed)
    wait_installed(setup, renewed, SOON)
    wait_reloads(setup, 2)
    process.send(signal.SIGTERM)

    assert process.wait(timeout=5) == 0
    assert listener.messages() == []
    assert process.errors() == []


def test_sampler_sees_a_pair_torn_by_hand(tmp_path, authority):
    """The sampler catches a key copied 50 ms before its certificate."""
    old, new = authority.issue(NAMES), authority.issue(NAMES)
    cert, key = tmp_path / "example.com.crt", tmp_path / "example.com.key"
    cert.write_bytes(old.fullchain_pem)
    key.write_bytes(old.key_pem)

    with PairSampler({"example.com": (cert, key)}) as sampler:
        time.sleep(0.05)
        key.write_bytes(new.key_pem)
        time.sleep(0.05)
        cert.write_bytes(new.fullchain_pem)
        time.sleep(0.05)

    assert sampler.torn
    assert max(sampler.windows()) > 0.03


@pytest.mark.parametrize("layout", ["flat", "directory"])
def test_slow_renewal_never_tears_a_pair(setup, authority, daemon, layout):
    """Sampled every few ms through a slow renewal, no pair is torn.

    In the flat layout the key and the certificate are two renames, and
    a sample may land between them; that gap lasts milliseconds, while a
    pair copied from a torn certbot renewal would stay torn for the half
    second between two link swaps.
    """
    setup.settings["install"]["layout"] = layout
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    daemon()
    wait_reloads(setup, 1)
    pairs = {host: host_paths(setup.certs, layout, host) for host in NAMES}

    renewed = authority.issue(NAMES)
    with PairSampler(pairs) as sampler:
        setup.tree.renew(LINEAGE, renewed, pause=0.5)
        wait_installed(setup, renewed, SOON, layout=layout)
        time.sleep(0.1)

    assert sampler.samples > 300, sampler
    assert sampler.inconclusive < sampler.samples / 100
    if layout == "directory":
        assert sampler.torn == []
    else:
        assert max(sampler.windows(), default=0.0) < 0.25, sampler.torn


def test_renewal_installed_soon_after_last_link_change(
    setup, authority, daemon
):
    """A slow renewal is in the certs dir within a second of its end."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    daemon()
    wait_reloads(setup, 1)

    renewed = authority.issue(NAMES)
    setup.tree.renew(LINEAGE, renewed, pause=0.5)
    wait_installed(setup, renewed, 1.0)

    wait_reloads(setup, 2, timeout=DEBOUNCE + 1.5)


def test_swaps_slower_than_quiet_period_install_once(setup, authority, daemon):
    """Link swaps slower than the quiet period give one clean install.

    Halfway through certbot's swaps the key is new and the fullchain
    old; that is a renewal in progress, not a broken pair to report.
    """
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    wait_reloads(setup, 1)

    renewed = authority.issue(NAMES)
    setup.tree.renew(LINEAGE, renewed, pause=0.5)
    wait_installed(setup, renewed, SOON)
    wait_reloads(setup, 2)

    process.wait_for_event("cert.installed", count=2 * len(NAMES))
    time.sleep(DEBOUNCE)
    assert len(process.named("cert.installed")) == 2 * len(NAMES)
    assert process.errors() == []
    assert process.named("lineage.changed", links="consistent")


def test_burst_of_fifty_renewals_reloads_once(setup, authority, daemon):
    """Fifty lineages renewed back to back are installed with one reload."""
    names = [f"host{index:02}.example.org" for index in range(50)]
    for name in names:
        setup.tree.create_lineage(name, authority.issue([name]))
    process = daemon()
    wait_reloads(setup, 1)
    renewals = {name: authority.issue([name]) for name in names}

    for name, issued in renewals.items():
        setup.tree.renew(name, issued)
    for name, issued in renewals.items():
        wait_installed(setup, issued, 10, hosts=[name])
    time.sleep(3 * DEBOUNCE + 0.5)

    assert setup.reloads() == 2
    assert len(process.named("reload.finished")) == 2
    assert len(process.named("cert.installed")) == 100


def test_steady_renewals_reload_by_max_delay(setup, authority, daemon):
    """Installs closer than the quiet period still reload by max_delay."""
    names = [f"host{index:02}.example.org" for index in range(14)]
    for name in names:
        setup.tree.create_lineage(name, authority.issue([name]))
    setup.settings["reload"]["max_delay_seconds"] = 1.0
    daemon()
    wait_reloads(setup, 1)
    renewals = [(name, authority.issue([name])) for name in names]

    first = time.time()
    for name, issued in renewals:
        setup.tree.renew(name, issued)
        time.sleep(0.15)
    last = time.time()

    calls = [float(t) for t in setup.reload_log.read_text().split()]
    during = [t for t in calls if first < t < last]
    assert during, (first, last, calls)
    assert during[0] - first < 1.8


@pytest.mark.parametrize("layout", ["flat", "directory"])
def test_own_writes_do_not_loop(setup, authority, daemon, layout):
    """After an install and its reload, nothing more happens by itself."""
    setup.settings["install"]["layout"] = layout
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    wait_reloads(setup, 1)
    time.sleep(3 * DEBOUNCE + 0.2)
    assert setup.reloads() == 1
    assert len(process.named("cert.installed")) == 2

    renewed = authority.issue(NAMES)
    setup.tree.renew(LINEAGE, renewed)
    wait_installed(setup, renewed, SOON, layout=layout)
    wait_reloads(setup, 2)
    time.sleep(3 * DEBOUNCE + 0.2)

    assert setup.reloads() == 2
    assert len(process.named("cert.installed")) == 4
    assert process.named("cert.corrected") == []
    assert len(process.named("reconcile.started")) == 1
    assert process.errors() == []


def test_removed_installed_files_are_put_back(setup, authority, daemon):
    """Deleting an installed pair by hand gets it reinstalled and reloaded."""
    issued = authority.issue(NAMES)
    setup.tree.create_lineage(LINEAGE, issued)
    daemon()
    wait_reloads(setup, 1)

    (setup.certs / "example.com.crt").unlink()
    (setup.certs / "example.com.key").unlink()

    wait_installed(setup, issued, DEBOUNCE + 1.5)
    wait_reloads(setup, 2)


def test_failing_reload_retried_with_backoff(
    setup, authority, daemon, listener, reload_script
):
    """A reload failing thrice is retried at doubling, capped delays."""
    reload_script(fail=(1, 2, 3))
    setup.settings["reload"].update(retry_seconds=0.4, retry_max_seconds=0.6)
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    process.wait_for_event("reload.failed")

    renewed = authority.issue(NAMES)
    setup.tree.renew(LINEAGE, renewed)
    wait_installed(setup, renewed, SOON)
    process.wait_for_event("reload.finished", timeout=10)
    time.sleep(3 * DEBOUNCE)

    failures = process.named("reload.failed")
    assert [e["level"] for e in failures] == ["error"] * 3
    assert {e["error"] for e in failures} == {"exited with status 1"}
    retries = process.named("reload.retry_scheduled")
    assert [e["level"] for e in retries] == ["error"] * 3
    assert [e["in_seconds"] for e in retries] == [0.4, 0.6, 0.6]
    calls = [float(t) for t in setup.reload_log.read_text().split()]
    assert len(calls) == 4
    gaps = [b - a for a, b in pairwise(calls)]
    for gap, delay in zip(gaps, [0.4, 0.6, 0.6], strict=True):
        assert delay - 0.05 <= gap <= delay + 1.0, gaps
    statuses = [m.fields["STATUS"] for m in listener.messages("STATUS")]
    assert any("last reload failed at" in s for s in statuses)
    assert "last reload ok at" in statuses[-1]


def test_missing_reload_command_is_retried(setup, authority, daemon):
    """A reload command that does not exist is an error, and retried."""
    setup.settings["reload"].update(
        command=[str(setup.root / "no-such-prosodyctl"), "reload"],
        retry_seconds=0.2,
        retry_max_seconds=0.2,
    )
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()

    failures = process.wait_for_event("reload.failed", count=2, timeout=6)

    assert all(e["level"] == "error" for e in failures)
    assert all("cannot run" in str(e["error"]) for e in failures)
    assert process.is_running()


def test_hanging_reload_is_killed_at_its_timeout(
    setup, authority, daemon, listener, reload_script
):
    """A hanging reload and its child are killed; pings never pause."""
    pids = reload_script(hang=(1,))
    setup.settings["reload"].update(timeout_seconds=1.0, retry_seconds=0.2)
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon(watchdog_usec=400_000)
    assert wait_until(pids.exists, 3)
    hung = time.monotonic()

    killed = process.wait_for_event("reload.failed", timeout=3)[0]
    ended = time.monotonic()
    process.wait_for_event("reload.finished", timeout=3)

    assert killed["level"] == "error"
    assert killed["error"] == "killed after 1 s timeout"
    assert 0.95 <= float(killed["seconds"]) < 2.0
    hung_pids = [int(pid) for pid in pids.read_text().split()]
    assert wait_until(lambda: not any(map(is_alive, hung_pids)), 2)
    pings = listener.messages("WATCHDOG", since=hung)
    assert len([m for m in pings if m.at <= ended]) >= 2
    assert setup.reloads() == 2


def test_stop_while_reload_hangs(
    setup, authority, daemon, listener, reload_script
):
    """SIGTERM during a hanging reload still exits 0 within 5 s."""
    pids = reload_script(hang=(1,))
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    assert wait_until(pids.exists, 3)

    before = time.monotonic()
    process.send(signal.SIGTERM)

    assert process.wait(timeout=5) == 0
    assert time.monotonic() - before < 5
    assert listener.messages("STOPPING", since=before)


def test_stop_leaves_no_reload_running(
    setup, authority, daemon, reload_script
):
    """A reload command still running when the daemon stops is ended too."""
    pids = reload_script(hang=(1,))
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    assert wait_until(pids.exists, 3)

    process.send(signal.SIGTERM)
    process.wait(timeout=5)

    hung_pids = [int(pid) for pid in pids.read_text().split()]
    assert wait_until(lambda: not any(map(is_alive, hung_pids)), 1)


@pytest.mark.parametrize("gap", [0.0, 1.2])
def test_source_deleted_and_recreated(setup, authority, daemon, gap):
    """A certbot tree deleted and made again is watched and used again."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    wait_reloads(setup, 1)

    shutil.rmtree(setup.tree.live)
    shutil.rmtree(setup.tree.archive)
    time.sleep(gap)
    tree = LetsEncryptTree(setup.tree.config_dir)
    first = authority.issue(["new.example.net"])
    tree.create_lineage("new.example.net", first)

    wait_installed(setup, first, SOON, hosts=["new.example.net"])
    renewed = authority.issue(["new.example.net"])
    tree.renew("new.example.net", renewed)
    wait_installed(setup, renewed, SOON, hosts=["new.example.net"])
    assert process.named("watch.started", root="letsencrypt")[1:]
    assert process.is_running()


def test_missing_source_logged_once_then_used(setup, authority, daemon):
    """A live dir absent at start is logged once and used once it exists."""
    later = setup.root / "later"
    setup.settings["sources"]["letsencrypt_live"] = str(later / "live")
    process = daemon()
    time.sleep(1.5)

    missing = process.named("watch.root_missing", root="letsencrypt")
    assert len(missing) == 1
    assert missing[0]["level"] == "warning"
    tree = LetsEncryptTree(later)
    issued = authority.issue(NAMES)
    tree.create_lineage(LINEAGE, issued)
    wait_installed(setup, issued, SOON)
    renewed = authority.issue(NAMES)
    tree.renew(LINEAGE, renewed)
    wait_installed(setup, renewed, SOON)

    assert len(process.named("watch.root_missing", root="letsencrypt")) == 1
    assert process.errors() == []


def test_dead_observer_stops_watchdog_pings(
    setup, authority, daemon, listener
):
    """Once watchdog's observer thread dies, WATCHDOG=1 pings stop."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    argv = [sys.executable, "-c", DYING_OBSERVER, str(setup.config)]
    process = daemon(argv=argv, watchdog_usec=400_000)
    alive = time.monotonic()
    assert wait_until(
        lambda: len(listener.messages("WATCHDOG", since=alive)) >= 2, 2
    )

    (setup.certs / "stop-the-observer").touch()
    assert wait_until(lambda: "injected failure" in process.text(), 3)
    time.sleep(0.3)
    quiet = time.monotonic()
    time.sleep(1.0)

    assert listener.messages("WATCHDOG", since=quiet) == []
    assert process.is_running()
    process.send(signal.SIGTERM)
    assert process.wait(timeout=5) == 0


def test_refused_lineage_is_an_error_and_daemon_goes_on(
    setup, authority, daemon
):
    """A lineage whose key does not match is refused; the rest goes on."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    wait_reloads(setup, 1)

    issued = authority.issue(["bad.example.net"])
    stranger = authority.issue(["bad.example.net"])
    setup.tree.create_lineage(
        "bad.example.net",
        Issued(stranger.key_pem, issued.cert_pem, issued.chain_pem),
    )
    refused = process.wait_for_event("cert.refused", timeout=3)
    time.sleep(3 * DEBOUNCE)

    assert refused[0]["level"] == "error"
    assert refused[0]["source"] == "letsencrypt:bad.example.net"
    assert str(refused[0]["path"]).endswith("privkey1.pem")
    assert "does not match" in str(refused[0]["reason"])
    assert not (setup.certs / "bad.example.net.crt").exists()
    assert setup.reloads() == 1
    renewed = authority.issue(NAMES)
    setup.tree.renew(LINEAGE, renewed)
    wait_installed(setup, renewed, SOON)
    wait_reloads(setup, 2)
    assert len(process.named("cert.refused")) == 1
    assert process.is_running()


def test_refused_hand_placed_pair_is_not_reloaded_for(
    setup, authority, daemon
):
    """A mismatched pair copied into certs_dir is an error, no reload."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    setup.settings["daemon"]["quarantine_after_seconds"] = 60
    process = daemon()
    wait_reloads(setup, 1)

    issued = authority.issue(["hand.example.net"])
    stranger = authority.issue(["hand.example.net"])
    (setup.certs / "hand.example.net.crt").write_bytes(issued.fullchain_pem)
    (setup.certs / "hand.example.net.key").write_bytes(stranger.key_pem)
    refused = process.wait_for_event("cert.refused", timeout=3)
    time.sleep(3 * DEBOUNCE)

    assert refused[0]["level"] == "error"
    assert "does not match" in str(refused[0]["reason"])
    assert setup.reloads() == 1
    assert process.is_running()


def test_expiry_reported_at_start(setup, authority, daemon, listener):
    """At start a host near expiry warns, one nearer still is an error."""
    now = datetime.now(UTC)
    for name, days in (("soon.example.net", 5), ("later.example.net", 20)):
        issued = authority.issue(
            [name],
            not_before=now - timedelta(days=80),
            not_after=now + timedelta(days=days, hours=1),
        )
        setup.tree.create_lineage(name, issued)
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()

    expiring = {e["host"]: e for e in process.named("cert.expiring")}
    assert set(expiring) == {"soon.example.net", "later.example.net"}
    assert expiring["soon.example.net"]["level"] == "error"
    assert expiring["soon.example.net"]["days_left"] == 5
    assert expiring["later.example.net"]["level"] == "warning"
    assert expiring["later.example.net"]["days_left"] == 20
    status = listener.wait_for("READY").fields["STATUS"]
    assert status.startswith("4 hosts, soonest expiry soon.example.net in 5")


def test_rolled_back_live_links_keep_the_newer_pair(setup, authority, daemon):
    """live/ pointed back at an older generation leaves the newer pair."""
    now = datetime.now(UTC)
    older = authority.issue(NAMES, not_before=now - timedelta(hours=3))
    setup.tree.create_lineage(LINEAGE, older)
    process = daemon()
    wait_reloads(setup, 1)
    renewed = authority.issue(NAMES)
    setup.tree.renew(LINEAGE, renewed)
    wait_installed(setup, renewed, SOON)
    wait_reloads(setup, 2)

    live = setup.tree.live / LINEAGE
    for kind in ("cert", "privkey", "chain", "fullchain"):
        (live / f"{kind}.pem").unlink()
        (live / f"{kind}.pem").symlink_to(
            f"../../archive/{LINEAGE}/{kind}1.pem"
        )
    process.wait_for_event("cert.kept_installed", timeout=3)
    time.sleep(3 * DEBOUNCE)

    assert is_installed(setup.certs, renewed)
    assert setup.reloads() == 2


def test_waiting_for_a_reload_retry_is_idle(
    setup, authority, daemon, reload_script
):
    """While a failed reload waits out its backoff, the daemon sleeps."""
    reload_script(fail=(1,))
    setup.settings["reload"]["retry_seconds"] = 5
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    process.wait_for_event("reload.retry_scheduled")
    time.sleep(DEBOUNCE + 0.1)

    before = cpu_seconds(process.pid)
    time.sleep(1.5)

    assert cpu_seconds(process.pid) - before < 0.1


def test_reload_due_during_a_running_reload_is_idle(
    setup, authority, daemon, reload_script
):
    """A renewal during a slow reload waits for it without spinning."""
    pids = reload_script(hang=(1,))
    setup.settings["reload"]["timeout_seconds"] = 5
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    assert wait_until(pids.exists, 3)
    setup.tree.renew(LINEAGE, authority.issue(NAMES))
    time.sleep(DEBOUNCE + 0.2)

    before = cpu_seconds(process.pid)
    time.sleep(1.5)

    assert cpu_seconds(process.pid) - before < 0.1


def test_renewal_lost_in_queue_overflow_is_installed(setup, authority, daemon):
    """A renewal whose events overflowed inotify's queue still lands.

    The daemon is stopped while other programs read its watched files
    often enough to fill the kernel's queue (fs.inotify.max_queued_events)
    and certbot renews; the renewal's events are dropped by the kernel.
    """
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    wait_reloads(setup, 1)
    # Let the events of its own writes settle, so no pass is pending.
    time.sleep(3 * DEBOUNCE)
    limit = int(QUEUE_LIMIT.read_text())
    renewed = authority.issue(NAMES)

    os.kill(process.pid, signal.SIGSTOP)
    try:
        readme = setup.tree.live / "README"
        for _ in range(limit // 2 + 100):
            with readme.open("rb"):
                pass
        setup.tree.renew(LINEAGE, renewed)
    finally:
        os.kill(process.pid, signal.SIGCONT)

    wait_installed(setup, renewed, SOON)


def test_renewal_stuck_between_swaps_is_waited_for_idly(
    setup, authority, daemon
):
    """A certbot run stopped between two link swaps is waited for idly."""
    setup.tree.create_lineage(LINEAGE, authority.issue(NAMES))
    process = daemon()
    wait_reloads(setup, 1)
    time.sleep(3 * DEBOUNCE)

    stop_after_first_swap(setup.tree, LINEAGE, authority.issue(NAMES))
    time.sleep(DEBOUNCE + 0.2)
    before = cpu_seconds(process.pid)
    time.sleep(1.5)

    assert cpu_seconds(process.pid) - before < 0.1


def stop_after_first_swap(tree, name, issued):
    """Do what certbot does for a renewal, up to its first link swap."""
    archive = tree.archive / name
    live = tree.live / name
    contents = {
        "privkey": issued.key_pem,
        "cert": issued.cert_pem,
        "chain": issued.chain_pem,
        "fullchain": issued.fullchain_pem,
    }
    for kind, data in contents.items():
        (archive / f"{kind}2.pem").write_bytes(data)
        (archive / f"{kind}2.pem").chmod(0o600 if kind == "privkey" else 0o644)
    for kind in ("cert", "privkey", "chain", "fullchain"):
        (live / f"previous_{kind}.pem").symlink_to(archive / f"{kind}1.pem")
    (live / "cert.pem").unlink()
    (live / "cert.pem").symlink_to(f"../../archive/{name}/cert2.pem")
