"""``certwatchd run`` killed with SIGKILL in the middle of installs.

Each round renews every lineage while the daemon is stopped (SIGSTOP),
lets it go on (SIGCONT) so that one pass installs every host, and kills
it at a random instant: either anywhere in that pass, or within its
renames, found by watching the first host's file being replaced. The
certificate directory is inspected right after the kill, then a new
daemon is started on it and must converge. The reload command notes, at
each run, whether every pair in the directory matched at that instant.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from certwatchd.install import host_paths
from daemon_process import (
    is_alive,
    is_matching_pair,
    leaf,
    wait_until,
)

HOSTS = [f"h{index:02}.crash.example" for index in range(24)]
ROUNDS = 40
DEBOUNCE = 0.05
TESTS = Path(__file__).parent

# The reload command: notes whether every host's pair matched while it
# ran. Each pair is read certificate, key, certificate again, so a pair
# counts as torn only if the directory held it so at one instant.
RECORDER = """\
import json, os, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from daemon_process import is_matching_pair

certs, log, running, layout = (Path(a) for a in sys.argv[2:6])
marker = running / str(os.getpid())
marker.touch()
torn = []
for host in sys.argv[6].split(","):
    if str(layout) == "flat":
        cert_path, key_path = certs / f"{host}.crt", certs / f"{host}.key"
    else:
        cert_path = certs / host / "fullchain.pem"
        key_path = certs / host / "privkey.pem"
    for _ in range(5):
        try:
            cert = cert_path.read_bytes()
            key = key_path.read_bytes()
            if cert_path.read_bytes() == cert:
                break
        except OSError:
            cert = key = None
            break
    try:
        matched = cert is not None and is_matching_pair(cert, key)
    except ValueError:
        matched = False
    if not matched:
        torn.append(host)
with open(log, "a") as handle:
    handle.write(json.dumps({"at": time.time(), "torn": torn}) + "\\n")
marker.unlink()
"""


def torn_hosts(certs, layout):
    """Return the hosts whose key does not match their certificate now."""
    torn = []
    for host in HOSTS:
        cert_path, key_path = host_paths(certs, layout, host)
        try:
            matched = is_matching_pair(
                cert_path.read_bytes(), key_path.read_bytes()
            )
        except (OSError, ValueError):
            matched = False
        if not matched:
            torn.append(host)
    return torn


def leftovers(certs):
    """Return certwatchd's temporaries and the versions no host uses."""
    live = {
        os.readlink(path)
        for path in certs.iterdir()
        if path.is_symlink() and not path.name.startswith(".")
    }
    return sorted(
        path.name
        for path in certs.iterdir()
        if path.name.startswith(".certwatchd-") and path.name not in live
    )


def installed_serials(certs, layout):
    """Return each host's installed serial, or None if unreadable."""
    serials = {}
    for host in HOSTS:
        try:
            pem = host_paths(certs, layout, host)[0].read_bytes()
            serials[host] = leaf(pem).serial_number
        except (OSError, ValueError):
            serials[host] = None
    return serials


def stage_of(serials, old, new):
    """Say where the kill landed: before, during or after the installs."""
    if all(serials[h] == old[h] for h in HOSTS):
        return "before"
    if all(serials[h] == new[h] for h in HOSTS):
        return "after"
    return "during"


def watched_paths(certs, layout):
    """Return the first and the last path the pass replaces."""
    if layout == "flat":
        return certs / f"{HOSTS[0]}.key", certs / f"{HOSTS[-1]}.crt"
    return certs / HOSTS[0], certs / HOSTS[-1]


def replaced(path, inode):
    """Say whether ``path`` names another inode than ``inode`` now."""
    try:
        return os.lstat(path).st_ino != inode
    except FileNotFoundError:
        return False


def spin_until_replaced(path, inode, timeout):
    """Busy-wait until ``path`` is renamed over; say whether it was."""
    deadline = time.monotonic() + timeout
    while not replaced(path, inode):
        if time.monotonic() > deadline:
            return False
    return True


def renew_all(setup, authority, process):
    """Renew every lineage while the daemon is stopped; return the serials.

    The daemon goes on as this returns, and finds every lineage renewed.
    """
    issued = {host: authority.issue([host]) for host in HOSTS}
    os.kill(process.pid, signal.SIGSTOP)
    try:
        for host in HOSTS:
            setup.tree.renew(host, issued[host])
    finally:
        os.kill(process.pid, signal.SIGCONT)
    return {h: leaf(i.cert_pem).serial_number for h, i in issued.items()}


def calibrate(setup, authority, process, layout):
    """Time one uninterrupted pass: to the first rename, and the renames."""
    first, last = watched_paths(setup.certs, layout)
    first_inode = os.lstat(first).st_ino
    last_inode = os.lstat(last).st_ino
    new = renew_all(setup, authority, process)
    started = time.monotonic()

    assert wait_until(lambda: replaced(first, first_inode), 10, 0.0001)
    began = time.monotonic()
    assert wait_until(lambda: replaced(last, last_inode), 10, 0.0001)
    ended = time.monotonic()
    assert wait_until(lambda: installed_serials(setup.certs, layout) == new, 5)
    return ended - started, ended - began


def wait_for_reloads_to_end(running):
    """Wait until no reload command started by a killed daemon still runs."""
    assert wait_until(
        lambda: not any(is_alive(int(p.name)) for p in running.iterdir()),
        10,
    )


@pytest.mark.parametrize("layout", ["flat", "directory"])
def test_killed_installs_converge(setup, authority, daemons, layout):
    """A daemon killed mid-install leaves a directory a restart repairs."""
    running = setup.root / "running"
    running.mkdir()
    reloads = setup.root / "reloads.jsonl"
    setup.settings["install"]["layout"] = layout
    setup.settings["reload"].update(
        command=[
            sys.executable,
            "-c",
            RECORDER,
            str(TESTS),
            str(setup.certs),
            str(reloads),
            str(running),
            layout,
            ",".join(HOSTS),
        ],
        debounce_seconds=DEBOUNCE,
    )
    setup.settings["daemon"] = {"reconcile_interval_seconds": 3600}
    for host in HOSTS:
        setup.tree.create_lineage(host, authority.issue([host]))
    process = daemons(timeout=30)
    pass_seconds, rename_seconds = calibrate(setup, authority, process, layout)
    # Kill instants, not secrets; CRASH_SEED replays one run's instants.
    seed = os.environ.get("CRASH_SEED", "certwatchd")
    rng = random.Random(seed)  # noqa: S311
    torn_after_kill = {"pass": 0, "renames": 0}
    stages: Counter[tuple[str, str]] = Counter()

    for round_number in range(ROUNDS):
        mode = "renames" if round_number % 2 else "pass"
        old = installed_serials(setup.certs, layout)
        first = watched_paths(setup.certs, layout)[0]
        first_inode = os.lstat(first).st_ino
        new = renew_all(setup, authority, process)
        continued = time.monotonic()
        if mode == "pass":
            time.sleep(rng.uniform(0, pass_seconds * 1.1))
        else:
            assert spin_until_replaced(first, first_inode, 10)
            # A fresh daemon's pass can be slower than the first one.
            took = time.monotonic() - continued + rename_seconds
            pass_seconds = max(pass_seconds, took)
            time.sleep(rng.uniform(0, rename_seconds))
        process.kill()

        serials = installed_serials(setup.certs, layout)
        stages[mode, stage_of(serials, old, new)] += 1
        if torn_hosts(setup.certs, layout):
            torn_after_kill[mode] += 1
        wait_for_reloads_to_end(running)

        process = daemons(timeout=30)
        assert wait_until(
            lambda new=new: installed_serials(setup.certs, layout) == new, 5
        ), f"round {round_number}: not converged"
        assert torn_hosts(setup.certs, layout) == []
        assert leftovers(setup.certs) == []
        assert process.errors() == [], process.errors()

    if process.named("cert.installed"):
        process.wait_for_event("reload.finished", timeout=10)

    records = [json.loads(line) for line in reloads.read_text().splitlines()]
    half = ROUNDS // 2
    print(  # noqa: T201 - the measured rates are the point
        f"\n{layout}: torn pair right after the kill in"
        f" {torn_after_kill['pass']}/{half} kills anywhere in a pass and"
        f" {torn_after_kill['renames']}/{half} kills within its renames"
        f" (a pass took {pass_seconds * 1000:.0f} ms, its renames"
        f" {rename_seconds * 1000:.1f} ms); where the kills landed:"
        f" {dict(sorted(stages.items()))}; {len(records)} reloads"
    )
    assert records
    assert [r for r in records if r["torn"]] == []
    if layout == "directory":
        assert torn_after_kill == {"pass": 0, "renames": 0}
