"""Event-to-install and event-to-reload latency of ``certwatchd run``.

Starts the daemon on N certbot-shaped lineages in a throwaway directory,
then renews M of them, one at a time and exactly as certbot does, waiting
for each renewal to be installed and reloaded before the next. Both
latencies are measured from the instant certbot's last change to live/
(removing the previous_*.pem links) returns:

- install: until the new leaf is readable in the certs directory, found
  by polling the host's certificate file about every half millisecond;
- reload: until the reload command starts, by the wall-clock time the
  command itself writes down.

The reload latency is dominated by ``--debounce`` (the quiet period
before a reload); its default is the shipped ``reload.debounce_seconds``.

    .venv/bin/python bench/latency.py --lineages 20 --renewals 30
"""

from __future__ import annotations

import argparse
import grp
import json
import math
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from certwatchd.sandbox import Authority, Issued, LetsEncryptTree

POLL_SECONDS = 0.0005
WAIT_SECONDS = 30.0

RELOAD_SCRIPT = """\
import sys, time
with open(sys.argv[1], "a") as log:
    log.write(f"{time.time()}\\n")
"""


def main() -> int:
    """Run the benchmark and print the percentiles."""
    args = _arguments()
    with tempfile.TemporaryDirectory(prefix="certwatchd-bench-") as name:
        root = Path(name)
        authority = Authority.create("certwatchd bench CA")
        tree = LetsEncryptTree(root / "letsencrypt")
        hosts = [f"host{index:03}.bench.example" for index in range(args.n)]
        for host in hosts:
            tree.create_lineage(host, authority.issue([host]))
        certs = root / "certs"
        certs.mkdir()
        reloads = root / "reloads.log"
        config = _write_config(root, tree, certs, authority, reloads, args)

        daemon_log = root / "daemon.log"
        with daemon_log.open("wb") as log:
            daemon = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "certwatchd",
                    "run",
                    "--config",
                    config,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
            )
        try:
            _wait(partial(_more_than, reloads, 0), "the first reload")
            installs, reloads_after = _renew_all(
                tree, authority, certs, reloads, hosts, args
            )
        finally:
            os.kill(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=10)
        errors = _errors(daemon_log)

    _report(args, installs, reloads_after, errors)
    return 0 if not errors else 1


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lineages", "-n", dest="n", type=int, default=20)
    parser.add_argument("--renewals", "-m", dest="m", type=int, default=30)
    parser.add_argument(
        "--debounce",
        type=float,
        default=2.0,
        help="reload.debounce_seconds (default: 2.0, the shipped value)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds between certbot's link swaps (default: 0)",
    )
    parser.add_argument(
        "--gap",
        type=float,
        default=0.2,
        help="seconds between a reload and the next renewal",
    )
    parser.add_argument(
        "--layout", choices=["flat", "directory"], default="flat"
    )
    return parser.parse_args()


def _write_config(  # noqa: PLR0917 - the whole world, once
    root: Path,
    tree: LetsEncryptTree,
    certs: Path,
    authority: Authority,
    reloads: Path,
    args: argparse.Namespace,
) -> str:
    script = root / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    roots = authority.write_roots(root / "roots.pem")
    settings = {
        "sources": {
            "letsencrypt_live": str(tree.live),
            "prosody_certs": str(certs),
        },
        "install": {
            "certs_dir": str(certs),
            "layout": args.layout,
            "owner": pwd.getpwuid(os.getuid()).pw_name,
            "group": grp.getgrgid(os.getgid()).gr_name,
        },
        "validation": {"trust": str(roots)},
        "reload": {
            "command": [sys.executable, str(script), str(reloads)],
            "debounce_seconds": args.debounce,
        },
        "daemon": {"reconcile_interval_seconds": 3600},
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


def _renew_all(  # noqa: PLR0917 - the whole world, once
    tree: LetsEncryptTree,
    authority: Authority,
    certs: Path,
    reloads: Path,
    hosts: list[str],
    args: argparse.Namespace,
) -> tuple[list[float], list[float]]:
    installs: list[float] = []
    reloads_after: list[float] = []
    for index in range(args.m):
        host = hosts[index % len(hosts)]
        issued = authority.issue([host])
        before = _count(reloads)

        tree.renew(host, issued, pause=args.pause)
        changed_wall = time.time()
        changed = time.monotonic()

        _wait(partial(_is_installed, certs, host, issued, args), host)
        installs.append(time.monotonic() - changed)
        _wait(partial(_more_than, reloads, before), f"the reload for {host}")
        reloads_after.append(_last(reloads) - changed_wall)
        time.sleep(args.gap)
    return installs, reloads_after


def _is_installed(
    certs: Path, host: str, issued: Issued, args: argparse.Namespace
) -> bool:
    path = certs / (
        f"{host}/fullchain.pem"
        if args.layout == "directory"
        else f"{host}.crt"
    )
    try:
        return path.read_bytes().startswith(issued.cert_pem)
    except OSError:
        return False


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            msg = f"gave up waiting for {what} after {WAIT_SECONDS} s"
            raise SystemExit(msg)
        time.sleep(POLL_SECONDS)


def _count(path: Path) -> int:
    try:
        return len(path.read_text().split())
    except FileNotFoundError:
        return 0


def _more_than(path: Path, count: int) -> bool:
    return _count(path) > count


def _last(path: Path) -> float:
    return float(path.read_text().split()[-1])


def _errors(log: Path) -> list[str]:
    return [
        line
        for line in log.read_text().splitlines()
        if line.startswith("{") and json.loads(line).get("level") == "error"
    ]


def _clean_env() -> dict[str, str]:
    hidden = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
    return {
        name: value
        for name, value in os.environ.items()
        if name not in hidden and not name.startswith("CERTWATCHD")
    }


def _percentile(values: list[float], percent: float) -> float:
    """Return the nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(math.ceil(percent / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def _report(
    args: argparse.Namespace,
    installs: list[float],
    reloads: list[float],
    errors: list[str],
) -> None:
    print(
        f"{args.n} lineages, {args.m} renewals, layout {args.layout},"
        f" debounce {args.debounce:g} s, pause between swaps {args.pause:g} s"
    )
    for label, values in (
        ("event to install", installs),
        ("event to reload", reloads),
    ):
        p50 = _percentile(values, 50) * 1000
        p99 = _percentile(values, 99) * 1000
        worst = max(values) * 1000
        print(
            f"  {label:<17} p50 {p50:8.1f} ms  p99 {p99:8.1f} ms"
            f"  max {worst:8.1f} ms"
        )
    if errors:
        print(f"  {len(errors)} error events in the daemon's log:")
        for line in errors[:5]:
            print(f"    {line}")


if __name__ == "__main__":
    sys.exit(main())
