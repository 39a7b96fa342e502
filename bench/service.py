"""``certwatchd run``: start-up, idle footprint, latency and bursts.

The daemon runs as a child with ``$NOTIFY_SOCKET`` naming a datagram
socket this process reads, so readiness is timed from the very message
systemd would act on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from oneshot import BenchError, clean_env
from trees import Tree
from worlds import World, certwatchd_command

from certwatchd.sandbox import Authority, LetsEncryptTree

POLL_SECONDS = 0.0005
READY_TIMEOUT = 900.0
WAIT_SECONDS = 60.0
STOP_TIMEOUT = 30.0
SAMPLE_SECONDS = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Running:
    """A started daemon and how long it took to say READY=1."""

    process: subprocess.Popen[bytes]
    ready_seconds: float
    log: Path


@dataclass
class Idle:
    """What an idle daemon used over a window."""

    seconds: float
    cpu_seconds: float
    rss_kib: int
    rss_max_kib: int
    peak_kib: int
    watches: int
    threads: int

    @property
    def cpu_percent(self) -> float:
        """CPU time over wall time, in percent of one core."""
        return 100 * self.cpu_seconds / self.seconds


@dataclass
class Latency:
    """Event-to-install and event-to-reload, one entry per renewal."""

    installs: list[float] = field(default_factory=list)
    reloads: list[float] = field(default_factory=list)


@dataclass
class Burst:
    """One burst of back-to-back renewals and what followed."""

    renewals: int
    burst_seconds: float
    all_installed_seconds: float
    reloads: int


@contextlib.contextmanager
def daemon(world: World) -> Iterator[Running]:
    """Start ``certwatchd run`` on ``world`` and stop it on leaving.

    Notifications are read for as long as the daemon runs, as systemd
    does: an unread datagram socket soon blocks the sender.
    """
    address = world.root / "notify.sock"
    address.unlink(missing_ok=True)
    log = world.root / "daemon.log"
    env = clean_env()
    env["NOTIFY_SOCKET"] = str(address)

    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        log.open("wb") as output,
    ):
        notify.bind(str(address))
        notify.settimeout(0.5)
        started = time.perf_counter()
        process = subprocess.Popen(
            certwatchd_command(world, "run"),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
        done = threading.Event()
        drain = threading.Thread(target=_drain, args=(notify, done))
        try:
            _await_ready(notify, process, log)
            running = Running(process, time.perf_counter() - started, log)
            drain.start()
            yield running
        finally:
            _stop(process)
            done.set()
            if drain.is_alive():
                drain.join()


def errors(log: Path) -> list[str]:
    """Return the error events in a daemon's JSON log."""
    return [
        line
        for line in log.read_text().splitlines()
        if line.startswith("{") and json.loads(line).get("level") == "error"
    ]


def idle(pid: int, settle: float, window: float) -> Idle:
    """Measure CPU, memory and inotify watches of ``pid`` at rest."""
    time.sleep(settle)
    started = time.monotonic()
    cpu_before = _cpu_seconds(pid)
    rss_max = 0
    while time.monotonic() - started < window:
        time.sleep(min(SAMPLE_SECONDS, window))
        rss_max = max(rss_max, _status(pid)["VmRSS"])
    cpu_after = _cpu_seconds(pid)
    seconds = time.monotonic() - started
    status = _status(pid)
    return Idle(
        seconds=seconds,
        cpu_seconds=cpu_after - cpu_before,
        rss_kib=status["VmRSS"],
        rss_max_kib=rss_max,
        peak_kib=status["VmHWM"],
        watches=_inotify_watches(pid),
        threads=status["Threads"],
    )


def renew_one_by_one(
    tree: Tree,
    authority: Authority,
    world: World,
    renewals: int,
    gap: float,
) -> Latency:
    """Renew lineages one at a time, timing install and reload of each.

    Both are timed from the return of certbot's renewal, whose last step
    is removing the previous_*.pem links.
    """
    letsencrypt = LetsEncryptTree(tree.config_dir)
    names = list(tree.lineages)
    result = Latency()
    for index in range(renewals):
        name = names[index % len(names)]
        issued = authority.issue(tree.lineages[name], key_type=tree.kind)
        before = len(world.reload_times())

        letsencrypt.renew(name, issued, pause=0)
        changed_wall = time.time()
        changed = time.perf_counter()

        crt = world.certs / f"{name}.crt"
        _wait(partial(_holds, crt, issued.cert_pem), f"install of {name}")
        result.installs.append(time.perf_counter() - changed)
        _wait(partial(_reloaded, world, before), f"reload for {name}")
        result.reloads.append(world.reload_times()[before] - changed_wall)
        time.sleep(gap)
    return result


def renew_burst(
    tree: Tree,
    authority: Authority,
    world: World,
    names: list[str],
    quiet: float,
) -> Burst:
    """Renew ``names`` back to back, then count the reloads that follow.

    Keys are issued first, so the burst itself is only certbot's file
    work. Reloads are counted until none has come for ``quiet`` seconds
    after every host was installed.
    """
    letsencrypt = LetsEncryptTree(tree.config_dir)
    issued = {
        name: authority.issue(tree.lineages[name], key_type=tree.kind)
        for name in names
    }
    before = len(world.reload_times())

    started = time.perf_counter()
    for name in names:
        letsencrypt.renew(name, issued[name], pause=0)
    burst = time.perf_counter() - started

    for name in names:
        crt = world.certs / f"{name}.crt"
        _wait(partial(_holds, crt, issued[name].cert_pem), f"install {name}")
    installed = time.perf_counter() - started - burst
    _wait(partial(_reloaded, world, before), "the burst's reload")
    while time.time() - world.reload_times()[-1] < quiet:
        time.sleep(quiet / 10)
    return Burst(
        renewals=len(names),
        burst_seconds=burst,
        all_installed_seconds=installed,
        reloads=len(world.reload_times()) - before,
    )


def percentile(values: list[float], percent: float) -> float:
    """Return the nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(math.ceil(percent / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def wait_for_reloads(world: World, count: int) -> None:
    """Wait until the reload command has run ``count`` times in all."""
    _wait(partial(_reloaded, world, count - 1), f"{count} reloads")


def _await_ready(
    notify: socket.socket, process: subprocess.Popen[bytes], log: Path
) -> None:
    """Read notifications until READY=1; fail if the daemon dies first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            message = notify.recv(65536)
        except TimeoutError:
            if process.poll() is not None:
                tail = log.read_text()[-2000:]
                msg = f"certwatchd run exited {process.returncode}:\n{tail}"
                raise BenchError(msg) from None
            continue
        if b"READY=1" in message.split(b"\n"):
            return
    msg = f"no READY=1 from certwatchd run within {READY_TIMEOUT:g} s"
    raise BenchError(msg)


def _drain(notify: socket.socket, done: threading.Event) -> None:
    """Read and drop notifications until ``done`` is set."""
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            notify.recv(65536)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the daemon we started with SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _holds(path: Path, pem: bytes) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(len(pem)) == pem
    except OSError:
        return False


def _reloaded(world: World, before: int) -> bool:
    return len(world.reload_times()) > before


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            msg = f"gave up waiting for {what} after {WAIT_SECONDS:g} s"
            raise BenchError(msg)
        time.sleep(POLL_SECONDS)


def _cpu_seconds(pid: int) -> float:
    """Return user plus system CPU seconds of ``pid`` so far."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5); the split starts at field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status(pid: int) -> dict[str, int]:
    """Return the numeric fields of /proc/<pid>/status we read (kB)."""
    wanted = {"VmRSS", "VmHWM", "Threads"}
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            found[key] = int(value.split()[0])
    return found


def _inotify_watches(pid: int) -> int:
    """Count the inotify watches held through all of ``pid``'s fds."""
    count = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            text = info.read_text()
            count += sum(
                1
                for line in text.splitlines()
                if line.startswith("inotify wd:")
            )
    return count
