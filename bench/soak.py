"""Soak: thousands of certbot-style renewals through one ``certwatchd run``.

Starts the daemon on N certbot-shaped lineages in a throwaway directory
and renews them round-robin, exactly as certbot does (archive files,
``previous_*`` links, unlink and symlink of each live link, no pause
between swaps). Renewals go out in waves of one renewal per lineage; a
wave ends when every lineage's newest leaf is installed, so no renewal
is coalesced with the next one of its lineage and every renewal can be
counted as installed. The driver notices an install by ``stat`` alone and
reads a certificate only when its file changed, so it does not flood
Prosody's watched directory with open and close events of its own.

The daemon's resident memory, open file descriptors and threads (from
``/proc/<pid>/status``, ``/proc/<pid>/fd`` and ``/proc/<pid>/task``) are
sampled once it is ready, after every ``--sample-every`` renewals and at
the end, once the last reload has run and the daemon is quiet, together
with the size of its state directory. At the end every lineage's newest
leaf is read back from Prosody's directory. The exit status is 0 only if
every renewal was driven and installed, the newest leaves are in place,
no error was logged, nothing was left behind and the daemon stopped
cleanly.

    .venv/bin/python bench/soak.py --lineages 50 --renewals 10000
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import platform
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from certwatchd.sandbox import Authority, LetsEncryptTree

POLL_SECONDS = 0.005
WAVE_SECONDS = 60.0
SETTLE_SECONDS = 2.0
STOP_SECONDS = 60.0
DAEMON = (sys.executable, "-m", "certwatchd", "run")


@dataclass(frozen=True)
class Sample:
    """The daemon's footprint at one moment."""

    label: str
    renewals: int
    elapsed: float
    rss_kib: int
    hwm_kib: int
    state_kib: int
    written_mib: float
    fds: int
    threads: int
    cpu_seconds: float


def main() -> int:
    """Run the soak and print the footprint at start and end."""
    args = _arguments()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="certwatchd-soak-") as name:
        root = Path(name)
        authority = Authority.create("certwatchd soak CA")
        tree = LetsEncryptTree(root / "letsencrypt")
        hosts = [f"host{index:03}.soak.example" for index in range(args.n)]
        for host in hosts:
            tree.create_lineage(host, authority.issue([host]))
        certs = root / "certs"
        certs.mkdir()
        config = _write_config(root, tree, certs, authority, args)

        daemon_log = root / "daemon.log"
        with daemon_log.open("wb") as log:
            daemon = subprocess.Popen(
                [*DAEMON, "--config", config],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
            )
        try:
            _wait(
                lambda: (
                    _count_events(daemon_log, "reload.finished") > 0
                    or daemon.poll() is not None
                ),
                "the first reload",
                WAVE_SECONDS,
            )
            if daemon.poll() is not None:
                tail = daemon_log.read_text(errors="replace")[-2000:]
                msg = (
                    f"the daemon exited with status {daemon.returncode}:"
                    f"\n{tail}"
                )
                raise SystemExit(msg)
            time.sleep(SETTLE_SECONDS)
            state = root / "state"
            samples = [_sample(daemon.pid, "start", 0, started, state)]
            drive_started = time.monotonic()
            driven, newest = _drive(
                tree,
                authority,
                certs,
                hosts,
                args,
                (daemon.pid, started, state),
                samples,
            )
            drove_for = time.monotonic() - drive_started
            _wait_quiet(daemon_log, args.debounce)
            samples.append(_sample(daemon.pid, "end", driven, started, state))
            leftovers = _leftovers(certs)
            in_place = sum(
                _installed(certs, host, pem, args.layout)
                for host, pem in newest.items()
            )
        finally:
            stopping = time.monotonic()
            if daemon.poll() is None:
                os.kill(daemon.pid, signal.SIGTERM)
            status = daemon.wait(timeout=STOP_SECONDS)
            stopped_in = time.monotonic() - stopping
        events = _read_events(daemon_log)

    duration = time.monotonic() - started
    result = Result(
        driven, drove_for, len(newest), in_place, leftovers, status, stopped_in
    )
    ok = _report(args, samples, result, events)
    print(f"  wall time {duration:.1f} s (setup and cleanup included)")
    return 0 if ok else 1


@dataclass(frozen=True)
class Result:
    """What the soak drove and found at the end."""

    driven: int
    drove_for: float
    lineages: int
    in_place: int
    leftovers: list[str]
    status: int
    stopped_in: float


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lineages", "-n", dest="n", type=int, default=50)
    parser.add_argument("--renewals", "-m", dest="m", type=int, default=10_000)
    parser.add_argument(
        "--debounce",
        type=float,
        default=0.05,
        help="reload.debounce_seconds (default: 0.05)",
    )
    parser.add_argument(
        "--layout", choices=["flat", "directory"], default="flat"
    )
    parser.add_argument(
        "--sample-every",
        type=int,
        default=1000,
        help="renewals between two footprint samples (default: 1000)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=1800.0,
        help="stop driving renewals after this long (default: 1800)",
    )
    return parser.parse_args()


def _write_config(
    root: Path,
    tree: LetsEncryptTree,
    certs: Path,
    authority: Authority,
    args: argparse.Namespace,
) -> str:
    roots = authority.write_roots(root / "roots.pem")
    try:
        group = grp.getgrnam("prosody").gr_name
    except KeyError:
        group = grp.getgrgid(os.getgid()).gr_name
    settings = {
        "sources": {
            "letsencrypt_live": str(tree.live),
            "prosody_certs": str(certs),
        },
        "install": {
            "certs_dir": str(certs),
            "layout": args.layout,
            "owner": pwd.getpwuid(os.geteuid()).pw_name,
            "group": group,
        },
        "validation": {"trust": str(roots)},
        "reload": {
            "command": ["/bin/true"],
            "debounce_seconds": args.debounce,
            "max_delay_seconds": 1.0,
        },
        "daemon": {"reconcile_interval_seconds": 60},
        "state": {"dir": str(root / "state")},
        "log": {"format": "json", "level": "info"},
    }
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
    config = root / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return str(config)


def _drive(  # noqa: PLR0917 - the whole world, once
    tree: LetsEncryptTree,
    authority: Authority,
    certs: Path,
    hosts: list[str],
    args: argparse.Namespace,
    clock: tuple[int, float, Path],
    samples: list[Sample],
) -> tuple[int, dict[str, bytes]]:
    """Renew in waves until ``--renewals`` or ``--max-seconds``."""
    pid, started, state = clock
    deadline = time.monotonic() + args.max_seconds
    newest: dict[str, bytes] = {}
    seen = _Seen(certs, args.layout)
    driven = 0
    while driven < args.m and time.monotonic() < deadline:
        wave = hosts[: args.m - driven]
        for host in wave:
            issued = authority.issue([host])
            tree.renew(host, issued)
            newest[host] = issued.cert_pem
        waiting = set(wave)

        def wave_installed(waiting: set[str] = waiting) -> bool:
            waiting.difference_update(
                [h for h in waiting if seen.holds(h, newest[h])]
            )
            return not waiting

        _wait(
            wave_installed,
            f"wave ending at renewal {driven + len(wave)}",
            WAVE_SECONDS,
        )
        before = driven
        driven += len(wave)
        if driven // args.sample_every > before // args.sample_every:
            samples.append(_sample(pid, "during", driven, started, state))
    return driven, newest


class _Seen:
    """Tells when a host's certificate file holds a leaf, reading rarely.

    Reading a file in Prosody's directory makes inotify events the daemon
    must sift, so the file is read only when ``stat`` shows it changed.
    """

    def __init__(self, certs: Path, layout: str) -> None:
        self._certs = certs
        self._layout = layout
        self._last: dict[str, tuple[int, ...]] = {}

    def holds(self, host: str, cert_pem: bytes) -> bool:
        path = _cert_path(self._certs, host, self._layout)
        try:
            info = os.stat(path)
        except OSError:
            return False
        signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        if self._last.get(host) == signature:
            return False
        self._last[host] = signature
        return _installed(self._certs, host, cert_pem, self._layout)


def _cert_path(certs: Path, host: str, layout: str) -> Path:
    return certs / (
        f"{host}/fullchain.pem" if layout == "directory" else f"{host}.crt"
    )


def _installed(certs: Path, host: str, cert_pem: bytes, layout: str) -> bool:
    path = _cert_path(certs, host, layout)
    try:
        return path.read_bytes().startswith(cert_pem)
    except OSError:
        return False


def _wait_quiet(log: Path, debounce: float) -> None:
    """Wait until no reload is due: the log stops growing for a while."""
    quiet = max(SETTLE_SECONDS, 20 * debounce)
    size = -1
    while True:
        current = log.stat().st_size
        if current == size:
            return
        size = current
        time.sleep(quiet)


def _sample(
    pid: int, label: str, renewals: int, started: float, state: Path
) -> Sample:
    status = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            status[key] = value.split()
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return Sample(
        label=label,
        renewals=renewals,
        elapsed=time.monotonic() - started,
        rss_kib=int(status["VmRSS"][0]),
        hwm_kib=int(status["VmHWM"][0]),
        state_kib=_disk_kib(state),
        written_mib=_written_bytes(pid) / (1 << 20),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        cpu_seconds=ticks / os.sysconf("SC_CLK_TCK"),
    )


def _written_bytes(pid: int) -> int:
    """Return the bytes ``pid`` has sent to storage so far."""
    with open(f"/proc/{pid}/io", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key == "write_bytes":
                return int(value)
    return 0


def _disk_kib(directory: Path) -> int:
    """Return the bytes of the regular files under ``directory``, in KiB."""
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                continue
    return total // 1024


def _leftovers(certs: Path) -> list[str]:
    """Return certwatchd's temporaries and versions no link points at."""
    live = {os.readlink(p) for p in certs.iterdir() if p.is_symlink()}
    return sorted(
        p.name
        for p in certs.iterdir()
        if p.name.startswith(".certwatchd-") and p.name not in live
    )


def _wait(condition: Callable[[], bool], what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            msg = f"gave up waiting for {what} after {seconds:g} s"
            raise SystemExit(msg)
        time.sleep(POLL_SECONDS)


def _read_events(log: Path) -> list[dict[str, object]]:
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _count_events(log: Path, name: str) -> int:
    needle = f'"event": "{name}"'
    return log.read_text(errors="replace").count(needle)


def _clean_env() -> dict[str, str]:
    hidden = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
    return {
        name: value
        for name, value in os.environ.items()
        if name not in hidden and not name.startswith("CERTWATCHD")
    }


def _report(
    args: argparse.Namespace,
    samples: list[Sample],
    result: Result,
    events: list[dict[str, object]],
) -> bool:
    """Print what the soak measured; say whether every check passed."""
    installed = [e for e in events if e.get("event") == "cert.installed"]
    serials = {str(e["serial"]) for e in installed}
    renewed = len(serials) - args.n
    reloads = sum(1 for e in events if e.get("event") == "reload.finished")
    errors = [e for e in events if e.get("level") == "error"]
    warnings = [e for e in events if e.get("level") == "warning"]
    print(
        f"soak {datetime.now(UTC):%Y-%m-%d %H:%M}Z: {args.n} lineages,"
        f" {result.driven} of {args.m} renewals driven in"
        f" {result.drove_for:.1f} s, layout {args.layout},"
        f" debounce {args.debounce:g} s"
    )
    print(
        f"  machine: {os.cpu_count()} cores, Python"
        f" {platform.python_version()}, kernel {platform.release()}"
    )
    print(
        f"  renewals installed {renewed} (distinct serials"
        f" in cert.installed, less the {args.n} initial),"
        f" {len(installed)} installs, {reloads} reloads,"
        f" {len(errors)} error and {len(warnings)} warning events"
    )
    print(
        f"  newest leaf in place for {result.in_place} of"
        f" {result.lineages} lineages"
    )
    print(f"  leftover temporaries or versions: {result.leftovers or 'none'}")
    print(
        f"  daemon exit status {result.status},"
        f" stopped {result.stopped_in:.1f} s after SIGTERM"
    )
    print(
        f"  {'sample':<7} {'renewals':>8} {'elapsed s':>9} {'RSS KiB':>8}"
        f" {'peak KiB':>8} {'state KiB':>9} {'written MiB':>11}"
        f" {'fds':>4} {'threads':>7} {'cpu s':>7}"
    )
    for s in samples:
        print(
            f"  {s.label:<7} {s.renewals:>8} {s.elapsed:>9.1f}"
            f" {s.rss_kib:>8} {s.hwm_kib:>8} {s.state_kib:>9}"
            f" {s.written_mib:>11.1f} {s.fds:>4} {s.threads:>7}"
            f" {s.cpu_seconds:>7.1f}"
        )
    for event in (errors + warnings)[:5]:
        print(f"  {event.get('level')}: {json.dumps(event)[:1000]}")
    return (
        result.driven == args.m
        and renewed == result.driven
        and result.in_place == result.lineages
        and not result.leftovers
        and not errors
        and result.status == 0
    )


if __name__ == "__main__":
    sys.exit(main())
