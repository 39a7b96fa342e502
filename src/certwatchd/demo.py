"""``certwatchd demo``: the real daemon on a throwaway tree, for a look.

It makes a certbot-shaped tree signed by a throwaway CA, starts the
daemon on it with the current user as owner and group and a harmless
reload command, renews the lineage the way certbot does, waits until the
renewal is installed and reloaded, then lists the installed files.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog

from certwatchd.daemon import Daemon
from certwatchd.sandbox import Authority, LetsEncryptTree

log = structlog.get_logger()

LINEAGE = "demo.example"
NAMES = ("demo.example", "conference.demo.example")
DEADLINE_SECONDS = 12.0


def run_demo() -> int:
    """Run the demo; return 0 when the renewal reached the certs dir."""
    with tempfile.TemporaryDirectory(prefix="certwatchd-demo-") as name:
        root = Path(name)
        authority = Authority.create("certwatchd demo CA")
        tree = LetsEncryptTree(root / "letsencrypt")
        tree.create_lineage(LINEAGE, authority.issue(NAMES))
        certs = root / "prosody" / "certs"
        certs.mkdir(parents=True)
        config = _write_config(root, tree, certs, authority)

        daemon = Daemon(config)
        outcome: list[bool] = []
        driver = threading.Thread(
            target=_drive,
            args=(daemon, tree, authority, certs, outcome),
            name="certwatchd-demo",
            daemon=True,
        )
        driver.start()
        daemon.serve()
        driver.join(timeout=DEADLINE_SECONDS)

        print(f"\nInstalled in {certs}:")
        for line in _listing(certs):
            print(f"  {line}")
        return 0 if outcome == [True] else 1


def _write_config(
    root: Path,
    tree: LetsEncryptTree,
    certs: Path,
    authority: Authority,
) -> Path:
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    roots = authority.write_roots(root / "demo-ca.pem")
    script = root / "reload-prosody.py"
    script.write_text("print('prosodyctl reload would run here')\n")
    config = root / "config.toml"
    config.write_text(
        f"""\
[sources]
letsencrypt_live = "{tree.live}"
prosody_certs = "{certs}"
[install]
certs_dir = "{certs}"
owner = "{user}"
group = "{group}"
[validation]
trust = "{roots}"
[reload]
command = ["{sys.executable}", "{script}"]
debounce_seconds = 1.0
[state]
dir = "{root / "state"}"
[log]
format = "console"
"""
    )
    return config


def _drive(
    daemon: Daemon,
    tree: LetsEncryptTree,
    authority: Authority,
    certs: Path,
    outcome: list[bool],
) -> None:
    """Renew once the first pair is installed and reloaded, then stop."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    cert = certs / f"{LINEAGE}.crt"
    try:
        if not _wait(lambda: daemon.reloads_finished >= 1, deadline):
            return
        first = cert.read_bytes()
        log.info("demo.renewing", lineage=LINEAGE, how="as certbot does")
        tree.renew(LINEAGE, authority.issue(NAMES), pause=0.2)
        renewed = _wait(
            lambda: cert.read_bytes() != first and daemon.reloads_finished > 1,
            deadline,
        )
        outcome.append(renewed)
        if not renewed:
            log.error("demo.timed_out", waited_seconds=DEADLINE_SECONDS)
    finally:
        daemon.stop()


def _wait(condition: object, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.05)
    return False


def _listing(directory: Path) -> list[str]:
    lines = []
    for path in sorted(directory.iterdir()):
        info = path.lstat()
        owner = pwd.getpwuid(info.st_uid).pw_name
        group = grp.getgrgid(info.st_gid).gr_name
        mode = stat.filemode(info.st_mode)
        lines.append(f"{mode} {owner}:{group} {info.st_size:>5} {path.name}")
    return lines
