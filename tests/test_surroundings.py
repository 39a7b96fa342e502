"""``certwatchd run`` in a failing world: each cause comes and goes.

Every test starts a real daemon, breaks one thing around it, checks that
the daemon keeps running and names the problem in one log event, then
takes the cause away and checks that the daemon recovers by itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certwatchd.install import host_paths
from certwatchd.sandbox import LetsEncryptTree
from daemon_process import (
    NotifyListener,
    cpu_seconds,
    daemon_env,
    is_alive,
    is_matching_pair,
    kill_pid,
    leaf,
    run_argv,
    wait_until,
)

LINEAGE = "example.com"
NAMES = ("example.com", "xmpp.example.com")
DEBOUNCE = 0.1
RECONCILE = 1.0
FAKETIME_LIBRARY = next(
    Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"),
    Path("/usr/lib/faketime/libfaketimeMT.so.1"),
)

# The reload command: does what the file named first says ("ok", "fail",
# "hang", "spew"), and notes each run in the file named second.
RELOAD_SCRIPT = f"""\
#!{sys.executable}
import os, subprocess, sys, time
from pathlib import Path

mode_file, log, pids = (Path(p) for p in sys.argv[1:4])
mode = mode_file.read_text().strip()
with log.open("a") as handle:
    handle.write(f"{{time.time()}} {{mode}}\\n")
if mode == "fail":
    print("prosodyctl: Prosody is not running", file=sys.stderr)
    sys.exit(1)
if mode == "hang":
    child = subprocess.Popen(["sleep", "60"])
    with pids.open("a") as handle:
        handle.write(f"{{os.getpid()}} {{child.pid}}\\n")
    time.sleep(60)
if mode == "spew":
    line = b"x" * 1023 + b"\\n"
    for _ in range(8 * 1024):
        sys.stdout.buffer.write(line)
    sys.stdout.buffer.write(b"prosodyctl: the last line says why\\n")
    sys.exit(3)
"""

# Runs a command in a new user namespace whose inotify watch limit
# (/proc/sys/user/max_inotify_watches, per namespace) is the first
# argument; the rest of the system keeps its own limit. Identity maps
# keep every owner and group as it is outside.
LIMITED_WATCHES = """\
import ctypes, os, sys

libc = ctypes.CDLL(None, use_errno=True)
limit, argv = sys.argv[1], sys.argv[2:]
ready_read, ready_write = os.pipe()
done_read, done_write = os.pipe()
helper = os.fork()
if helper == 0:
    os.read(ready_read, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{os.getppid()}/{name}", "w") as handle:
            handle.write("0 0 65536\\n")
    os.write(done_write, b"!")
    os._exit(0)
if libc.unshare(0x10000000) != 0:
    sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
os.write(ready_write, b"!")
os.read(done_read, 1)
os.waitpid(helper, 0)
with open("/proc/sys/user/max_inotify_watches", "w") as handle:
    handle.write(limit)
os.execv(argv[0], argv)
"""


@pytest.fixture
def world(setup):
    """Set short timings for a daemon on the setup's tree."""
    setup.settings["reload"].update(
        debounce_seconds=DEBOUNCE, retry_seconds=0.3, retry_max_seconds=0.6
    )
    setup.settings["daemon"] = {"reconcile_interval_seconds": RECONCILE}
    return setup


@pytest.fixture
def reload_modes(world):
    """Point the reload command at a script told what to do by a file."""
    script = world.root / "prosodyctl"
    mode = world.root / "reload.mode"
    pids = world.root / "reload.pids"
    world.settings["reload"]["command"] = [
        str(script),
        str(mode),
        str(world.reload_log),
        str(pids),
    ]

    def switch(new_mode):
        """Make the next runs behave as ``new_mode``; "missing" deletes."""
        if new_mode == "missing":
            script.unlink(missing_ok=True)
            return
        mode.write_text(new_mode)
        if not script.exists():
            temporary = script.with_name(".prosodyctl.tmp")
            temporary.write_text(RELOAD_SCRIPT)
            temporary.chmod(0o755)
            temporary.rename(script)

    yield switch
    if pids.exists():
        for pid in pids.read_text().split():
            kill_pid(int(pid), ("sleep", str(script)))


@contextlib.contextmanager
def mounted(*argv):
    """Mount something for the duration of the block, then unmount it."""
    target = argv[-1]
    subprocess.run(["mount", *argv], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", target], check=True)


@contextlib.contextmanager
def read_only(path):
    """Make ``path`` a read-only bind mount of itself inside the block."""
    with mounted("--bind", str(path), str(path)):
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(path)], check=True
        )
        yield


def fill(path):
    """Write zeros to ``path`` until its filesystem has no space left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
    finally:
        os.close(fd)


def pair_bytes(certs, host):
    """Return the certificate and key installed for ``host``."""
    cert_path, key_path = host_paths(certs, "flat", host)
    return cert_path.read_bytes(), key_path.read_bytes()


def is_installed(certs, issued, hosts=NAMES):
    """Say whether every host holds the leaf of ``issued``, with its key."""
    for host in hosts:
        try:
            cert, key = pair_bytes(certs, host)
        except OSError:
            return False
        if not cert.startswith(issued.cert_pem) or key != issued.key_pem:
            return False
    return True


def wait_installed(certs, issued, timeout, hosts=NAMES):
    """Fail unless ``issued`` is installed for ``hosts`` within ``timeout``."""
    assert wait_until(lambda: is_installed(certs, issued, hosts), timeout), (
        f"{hosts} did not get the new pair within {timeout} s"
    )


def temporaries(certs):
    """Return certwatchd's temporary files in ``certs``."""
    return sorted(p.name for p in certs.iterdir() if p.suffix == ".tmp")


def problems(process, since=0):
    """Return the warning and error events logged after the first ``since``."""
    return [
        event
        for event in process.events()[since:]
        if event.get("level") in {"warning", "error"}
    ]


def start_with_lineage(world, authority, daemons, **start):
    """Create the lineage, start the daemon and wait for its first reload."""
    issued = authority.issue(NAMES)
    world.tree.create_lineage(LINEAGE, issued)
    process = daemons(**start)
    wait_installed(world.certs, issued, 5)
    return process, issued


def rss_kib(pid):
    """Return the resident set size of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    msg = f"no VmRSS in /proc/{pid}/status"
    raise AssertionError(msg)


@pytest.mark.parametrize("mode", ["missing", "fail", "hang", "spew"])
def test_broken_reload_command_is_reported_and_retried(
    world, authority, daemons, reload_modes, mode
):
    """A missing, failing, hanging or chatty reload is retried until fixed."""
    world.settings["reload"]["timeout_seconds"] = 0.5
    reload_modes(mode)
    process, _ = start_with_lineage(world, authority, daemons)
    rss = rss_kib(process.pid)

    failures = process.wait_for_event("reload.failed", count=2, timeout=5)
    reload_modes("ok")
    process.wait_for_event("reload.finished", timeout=5)

    expected = {
        "missing": "cannot run",
        "fail": "exited with status 1",
        "hang": "killed after 0.5 s timeout",
        "spew": "exited with status 3",
    }[mode]
    first = failures[0]
    assert first["level"] == "error"
    assert expected in str(first["error"])
    assert str(first["command"]).startswith(str(world.root / "prosodyctl"))
    if mode == "fail":
        assert "Prosody is not running" in str(first["output"])
    if mode == "spew":
        assert str(first["output"]).endswith("the last line says why")
        assert len(str(first["output"])) <= 1000
        assert process.log_path.stat().st_size < 256 * 1024
        assert rss_kib(process.pid) - rss < 4096
    if mode == "hang":
        pids = (world.root / "reload.pids").read_text().split()
        assert wait_until(lambda: not any(is_alive(int(p)) for p in pids), 2)
    if mode != "missing":
        runs = world.reload_log.read_text().splitlines()
        failed_runs = [line for line in runs if not line.endswith(" ok")]
        assert len(process.named("reload.failed")) == len(failed_runs)
    time.sleep(1.0)
    finished = len(process.named("reload.failed"))
    time.sleep(1.0)
    assert len(process.named("reload.failed")) == finished
    assert process.is_running()


def test_read_only_certs_dir_keeps_the_pair_and_retries(
    world, authority, daemons
):
    """A read-only certs dir fails the install; it lands once writable."""
    process, _ = start_with_lineage(world, authority, daemons)
    process.wait_for_event("reload.finished")
    before = pair_bytes(world.certs, NAMES[0])
    renewed = authority.issue(NAMES)

    with read_only(world.certs):
        world.tree.renew(LINEAGE, renewed)
        failed = process.wait_for_event("install.failed", timeout=5)
        time.sleep(RECONCILE)
        assert pair_bytes(world.certs, NAMES[0]) == before
        assert temporaries(world.certs) == []
        assert world.reloads() == 1

    wait_installed(world.certs, renewed, 2 * RECONCILE + 1)
    process.wait_for_event("reload.finished", count=2, timeout=3)

    assert failed[0]["level"] == "error"
    assert failed[0]["host"] in NAMES
    assert "Read-only file system" in str(failed[0]["error"])
    assert str(world.certs) in str(failed[0]["error"])
    assert process.is_running()


def test_full_certs_dir_keeps_the_pair_and_retries(world, authority, daemons):
    """ENOSPC in the certs dir fails the install; it lands once freed."""
    with mounted(
        "-t",
        "tmpfs",
        "-o",
        "size=64k,mode=0755",
        "certwatchd-full",
        str(world.certs),
    ):
        process, _ = start_with_lineage(world, authority, daemons)
        process.wait_for_event("reload.finished")
        before = pair_bytes(world.certs, NAMES[0])
        filler = world.certs / ".filler"
        fill(filler)
        renewed = authority.issue(NAMES)

        world.tree.renew(LINEAGE, renewed)
        failed = process.wait_for_event("install.failed", timeout=5)
        time.sleep(RECONCILE)
        assert pair_bytes(world.certs, NAMES[0]) == before
        assert is_matching_pair(*before)
        assert temporaries(world.certs) == []
        assert world.reloads() == 1
        filler.unlink()

        wait_installed(world.certs, renewed, 2 * RECONCILE + 1)
        process.wait_for_event("reload.finished", count=2, timeout=3)

    assert failed[0]["level"] == "error"
    assert "No space left on device" in str(failed[0]["error"])
    assert process.is_running()


def test_unwritable_state_dir_still_installs_renewals(
    world, authority, daemons
):
    """With its state dir read-only the daemon warns and keeps installing."""
    process, _ = start_with_lineage(world, authority, daemons)
    process.wait_for_event("reload.finished")
    seen = len(process.events())

    with read_only(world.state):
        for reloads in (2, 3):
            renewed = authority.issue(NAMES)
            world.tree.renew(LINEAGE, renewed)
            wait_installed(world.certs, renewed, 2 * RECONCILE + 1)
            process.wait_for_event("reload.finished", count=reloads)
        warned = problems(process, seen)

    renewed = authority.issue(NAMES)
    world.tree.renew(LINEAGE, renewed)
    wait_installed(world.certs, renewed, 2 * RECONCILE + 1)

    unwritable = [e for e in warned if e["event"] == "state.unwritable"]
    assert unwritable, warned
    assert unwritable[0]["path"] == str(world.state)
    assert "Read-only file system" in str(unwritable[0]["error"])
    assert [e for e in warned if e["level"] == "error"] == []
    assert process.is_running()


def remove_while_written(path):
    """Remove ``path`` although the daemon may be writing into it.

    The daemon reinstalls what it sees go, so ``rmtree`` can find the
    directory refilled before its last ``rmdir``; it is tried again.
    """
    for _ in range(20):
        try:
            shutil.rmtree(path)
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
        else:
            return
    pytest.fail(f"{path} kept being refilled")


@pytest.mark.parametrize("source", ["letsencrypt", "prosody"])
def test_source_dir_deleted_and_recreated(world, authority, daemons, source):
    """A source dir removed and made again is watched and synced again."""
    process, issued = start_with_lineage(world, authority, daemons)
    process.wait_for_event("reload.finished")
    seen = len(process.events())

    if source == "letsencrypt":
        path = world.tree.live
        shutil.rmtree(world.tree.config_dir)
        process.wait_for_event("source.missing", path=str(path), timeout=3)
        assert is_installed(world.certs, issued)
        tree = LetsEncryptTree(world.tree.config_dir)
        issued = authority.issue(NAMES)
        tree.create_lineage(LINEAGE, issued)
    else:
        path = world.certs
        remove_while_written(world.certs)
        process.wait_for_event("source.missing", path=str(path), timeout=3)
        world.certs.mkdir()

    wait_installed(world.certs, issued, 2 * RECONCILE + 1)
    process.wait_for_event("reload.finished", count=2, timeout=3)
    renewed = authority.issue(NAMES)
    world.tree.renew(LINEAGE, renewed)
    wait_installed(world.certs, renewed, RECONCILE / 2)

    missing = process.named("source.missing", path=str(path))
    assert len(missing) == 1
    assert missing[0]["level"] == "warning"
    assert "until it exists" in str(missing[0]["consequence"])
    assert process.named("watch.started", root=source)[1:]
    for event in process.errors()[seen:]:
        # Caught half deleted: links into a removed archive, or no
        # certs dir to install into. Either names what is missing.
        assert event["event"] in {"cert.refused", "install.failed"}, event
        assert "No such file" in str(event.get("error")) or (
            "does not exist" in str(event.get("reason"))
        ), event
    assert process.is_running()


def test_deleted_source_dir_is_reported_once(world, authority, daemons):
    """A deleted source dir is named by one warning, not several."""
    process, _ = start_with_lineage(world, authority, daemons)
    seen = len(process.events())

    shutil.rmtree(world.tree.config_dir)
    process.wait_for_event("source.missing", timeout=3)
    time.sleep(2 * RECONCILE)

    named = [
        event["event"]
        for event in problems(process, seen)
        if str(world.tree.live) in str(event.get("path"))
    ]
    assert len(named) == 1, named


def start_out_of_watches(world, authority, daemons, listener):
    """Start the daemon in a user namespace allowed no inotify watch."""
    wrapper = world.root / "limited_watches.py"
    wrapper.write_text(LIMITED_WATCHES)
    argv = [sys.executable, str(wrapper), "0", *run_argv(world.config)]
    env = daemon_env(listener)
    return start_with_lineage(world, authority, daemons, argv=argv, env=env)


def raise_watch_limit(pid):
    """Give the user namespace of ``pid`` room for a thousand watches."""
    subprocess.run(
        [
            "nsenter",
            f"--user=/proc/{pid}/ns/user",
            "sh",
            "-c",
            "echo 1000 > /proc/sys/user/max_inotify_watches",
        ],
        check=True,
    )


@pytest.fixture
def listener(tmp_path):
    """Bind a notify socket as systemd would; close it afterwards."""
    listener = NotifyListener(tmp_path / "notify")
    yield listener
    listener.close()


def test_inotify_watch_limit_reached_then_raised(
    world, authority, daemons, listener
):
    """Out of inotify watches, the daemon polls; once raised it watches."""
    process, _ = start_out_of_watches(world, authority, daemons, listener)

    limit = process.wait_for_event("watch.limit_reached", timeout=3)
    renewed = authority.issue(NAMES)
    world.tree.renew(LINEAGE, renewed)
    wait_installed(world.certs, renewed, RECONCILE + 1)
    assert process.named("lineage.changed") == []
    status = listener.messages("STATUS")[-1].fields["STATUS"]
    raise_watch_limit(process.pid)
    for root in ("letsencrypt", "prosody"):
        process.wait_for_event("watch.started", root=root, timeout=3)
    renewed = authority.issue(NAMES)
    world.tree.renew(LINEAGE, renewed)
    wait_installed(world.certs, renewed, RECONCILE + 1)

    assert process.wait_for_event("lineage.changed", timeout=1)
    assert limit[0]["level"] == "error"
    assert limit[0]["path"] in {str(world.tree.live), str(world.certs)}
    assert "max_user_watches" in str(limit[0]["fix"])
    assert "periodic reconcile" in str(limit[0]["fix"])
    assert status.endswith(", inotify limit reached")
    assert process.is_running()


def test_inotify_watch_limit_reported_once(
    world, authority, daemons, listener
):
    """Running out of inotify watches is one error per root, not a stream."""
    process, _ = start_out_of_watches(world, authority, daemons, listener)
    process.wait_for_event("watch.limit_reached", timeout=3)

    time.sleep(2.5)

    assert len(process.named("watch.limit_reached")) <= 2


def test_inotify_limit_leaves_status_once_raised(
    world, authority, daemons, listener
):
    """Once every root is watched again, STATUS= drops the limit notice."""
    process, _ = start_out_of_watches(world, authority, daemons, listener)
    process.wait_for_event("watch.limit_reached", timeout=3)

    # STATUS= is sent only when it changes, and the change can go out in
    # the same turn that logs watch.started: count from before the raise.
    since = time.monotonic()
    raise_watch_limit(process.pid)
    for root in ("letsencrypt", "prosody"):
        process.wait_for_event("watch.started", root=root, timeout=3)
    time.sleep(1.5)

    statuses = listener.messages("STATUS", since=since)
    assert statuses
    assert "inotify" not in statuses[-1].fields["STATUS"]


def test_sighup_storm_leaves_one_consistent_daemon(
    world, authority, daemons, listener
):
    """Fifty SIGHUPs in a second leave one watcher, READY, and no leaks."""
    process, _ = start_with_lineage(
        world, authority, daemons, env=daemon_env(listener)
    )
    process.wait_for_event("reload.finished")
    time.sleep(3 * DEBOUNCE)
    threads = len(os.listdir(f"/proc/{process.pid}/task"))
    fds = len(os.listdir(f"/proc/{process.pid}/fd"))

    for _ in range(50):
        last = time.monotonic()
        process.send(signal.SIGHUP)
        time.sleep(0.02)
    listener.wait_for("READY", since=last, timeout=5)
    time.sleep(RECONCILE)
    seen = len(process.events())
    renewed = authority.issue(NAMES)
    world.tree.renew(LINEAGE, renewed)
    wait_installed(world.certs, renewed, 1)
    process.wait_for_event("reload.finished", count=2)

    rereads = process.named("daemon.reloading_settings")
    assert 1 <= len(rereads) <= 50
    lifecycle = [
        m
        for m in listener.messages()
        if {"READY", "RELOADING"} & set(m.fields)
    ]
    assert "READY" in lifecycle[-1].fields
    assert len(os.listdir(f"/proc/{process.pid}/task")) == threads
    assert len(os.listdir(f"/proc/{process.pid}/fd")) == fds
    installed = [
        e for e in process.events()[seen:] if e["event"] == "cert.installed"
    ]
    assert sorted(e["host"] for e in installed) == sorted(NAMES)
    assert {int(str(e["serial"]), 16) for e in installed} == {
        leaf(renewed.cert_pem).serial_number
    }
    assert process.errors() == []
    assert process.is_running()


# With CLOCK_MONOTONIC left alone, Debian's libfaketime 0.9.10 fails
# every clock_nanosleep() on it with EINVAL, which is how Python's
# time.sleep() waits; watchdog's threads sleep and would die of it. The
# daemon under the fake clock gets a time.sleep() that waits in select()
# instead, which libfaketime leaves working.
SLEEP_SHIM = """\
import select
import time


def _sleep(seconds):
    select.select([], [], [], seconds)


time.sleep = _sleep
"""


def faketime_env(timestamp_file, listener):
    """Return an environment running the daemon on a clock we can move."""
    if not FAKETIME_LIBRARY.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI installs Debian's faketime package")
        pytest.skip("needs Debian's faketime package (libfaketime)")
    shim = timestamp_file.parent / "faketime-shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SLEEP_SHIM)
    env = daemon_env(listener)
    env.update(
        LD_PRELOAD=str(FAKETIME_LIBRARY),
        FAKETIME_TIMESTAMP_FILE=str(timestamp_file),
        # Read the clock file once a second, not at every clock call:
        # re-reading it at every call makes the daemon's threads fight
        # over the GIL and spin, which the idle checks would blame on it.
        FAKETIME_CACHE_DURATION="1",
        # A wall-clock jump leaves CLOCK_MONOTONIC alone.
        FAKETIME_DONT_FAKE_MONOTONIC="1",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(shim), env.get("PYTHONPATH")])
        ),
    )
    return env


def start_on_movable_clock(world, authority, daemons, listener):
    """Start the daemon under libfaketime; return it and its clock file."""
    clock = world.root / "faketime"
    clock.write_text("+0d\n")
    env = faketime_env(clock, listener)
    process, issued = start_with_lineage(world, authority, daemons, env=env)
    process.wait_for_event("reload.finished")
    return process, issued, clock


def move_clock(process, clock, days):
    """Move the daemon's wall clock by ``days``; return once it moved.

    libfaketime reads the clock file at most once a second, so the move
    shows first in the timestamp of a later log event.
    """
    clock.write_text(f"{days:+d}d\n")
    day = (datetime.now(UTC) + timedelta(days=days)).date().isoformat()

    def moved():
        events = process.named("reconcile.started")
        return any(str(e["timestamp"]).startswith(day) for e in events)

    assert wait_until(moved, 3 * RECONCILE + 1)


def soonest_expiry(listener):
    """Return the days to the soonest expiry in the last STATUS= sent."""
    status = listener.messages("STATUS")[-1].fields["STATUS"]
    return int(status.split(" in ", 1)[1].split(" days", 1)[0])


def test_wall_clock_jump_shows_in_status_without_spinning(
    world, authority, daemons, listener
):
    """A wall clock jumping ahead and back is followed by STATUS=, idly."""
    process, _, clock = start_on_movable_clock(
        world, authority, daemons, listener
    )
    assert soonest_expiry(listener) == 89

    clock.write_text("+85d\n")
    assert wait_until(lambda: soonest_expiry(listener) == 4, 3)
    before = cpu_seconds(process.pid)
    time.sleep(2)
    busy = cpu_seconds(process.pid) - before
    clock.write_text("+0d\n")

    assert wait_until(lambda: soonest_expiry(listener) == 89, 3)
    assert busy < 0.3
    assert process.is_running()


def test_wall_clock_jump_toward_expiry_is_reported(
    world, authority, daemons, listener
):
    """The wall clock jumping to within days of expiry logs an error."""
    process, _, clock = start_on_movable_clock(
        world, authority, daemons, listener
    )
    assert process.named("cert.expiring") == []

    clock.write_text("+85d\n")

    expiring = process.wait_for_event("cert.expiring", timeout=3)
    assert expiring[0]["level"] == "error"
    assert expiring[0]["days_left"] == 4


def test_wall_clock_jump_back_keeps_the_pair_and_recovers(
    world, authority, daemons, listener
):
    """A clock set back refuses new pairs, keeps the old, and idles."""
    process, issued, clock = start_on_movable_clock(
        world, authority, daemons, listener
    )

    move_clock(process, clock, -2)
    renewed = authority.issue(NAMES)
    world.tree.renew(LINEAGE, renewed)
    refused = process.wait_for_event("cert.refused", timeout=3)
    before = cpu_seconds(process.pid)
    time.sleep(2)
    assert cpu_seconds(process.pid) - before < 0.3
    assert is_installed(world.certs, issued)
    clock.write_text("+0d\n")

    wait_installed(world.certs, renewed, 2 * RECONCILE + 1)
    assert str(refused[0]["reason"]).startswith("is not valid before ")
    assert refused[0]["level"] == "error"
    assert process.named("cert.expiring") == []
    assert process.is_running()


def state_bytes(state):
    """Return the total size of the files in the state directory."""
    return sum(p.stat().st_size for p in state.rglob("*") if p.is_file())


def test_renewals_leave_the_state_dir_size_flat(world, authority, daemons):
    """A hundred more renewals of one lineage leave the state dir as big."""
    process, _ = start_with_lineage(world, authority, daemons)
    sizes = []

    for count in range(150):
        renewed = authority.issue(NAMES)
        world.tree.renew(LINEAGE, renewed)
        wait_installed(world.certs, renewed, 3)
        if count in {49, 149}:
            process.wait_for_event("reload.finished", count=1)
            sizes.append(state_bytes(world.state))

    assert sizes[1] <= sizes[0] * 1.2, sizes
