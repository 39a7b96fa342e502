"""Throwaway directories and settings for both tools on one tree.

Each tool gets its own empty certificate directory; certwatchd also gets
a state directory and a reload command that only appends the time to a
file, so no Prosody is ever signalled.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from trees import COMPONENTS, Tree

CERTS_DIR_MODE = 0o750

RELOAD_SCRIPT = """\
#!/bin/sh
# Stands in for `prosodyctl reload`: record when it ran, nothing else.
date +%s.%N >> "$1"
"""


@dataclass(frozen=True)
class World:
    """Where one tool's run on one tree reads and writes."""

    root: Path
    config: Path
    certs: Path
    state: Path
    reloads: Path
    keeps_state: bool = False

    def empty(self) -> None:
        """Remove every installed file and all state, as before a cold run."""
        shutil.rmtree(self.certs, ignore_errors=True)
        if not self.keeps_state:
            shutil.rmtree(self.state, ignore_errors=True)
        self.certs.mkdir(mode=CERTS_DIR_MODE)
        self.certs.chmod(CERTS_DIR_MODE)
        self.reloads.unlink(missing_ok=True)

    def installed(self) -> int:
        """Count the certificate files in the certificate directory."""
        return sum(1 for path in self.certs.iterdir() if path.suffix == ".crt")

    def reload_times(self) -> list[float]:
        """Return the wall-clock time of every reload so far."""
        try:
            return [float(word) for word in self.reloads.read_text().split()]
        except FileNotFoundError:
            return []


def certwatchd_world(
    root: Path,
    tree: Tree,
    *,
    debounce: float = 2.0,
    reconcile: float = 300.0,
) -> World:
    """Lay out a certwatchd run on ``tree`` under ``root``.

    Settings are the shipped defaults except the paths, the bench root
    as the only trust anchor, the reload command and JSON logs.
    """
    root.mkdir(parents=True)
    script = root / "reload.sh"
    script.write_text(RELOAD_SCRIPT)
    script.chmod(0o755)
    world = World(
        root=root,
        config=root / "config.toml",
        certs=root / "certs",
        state=root / "state",
        reloads=root / "reloads.log",
    )
    settings = {
        "sources": {
            "letsencrypt_live": str(tree.live),
            "prosody_certs": str(world.certs),
        },
        "install": {"certs_dir": str(world.certs)},
        "validation": {"trust": str(tree.roots)},
        "reload": {
            "command": [str(script), str(world.reloads)],
            "debounce_seconds": debounce,
        },
        "daemon": {"reconcile_interval_seconds": reconcile},
        "state": {"dir": str(world.state)},
        "log": {"format": "json", "level": "info"},
    }
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
    world.config.write_text("\n".join(lines) + "\n")
    world.empty()
    return world


def prosody_world(root: Path, tree: Tree) -> World:
    """Lay out a Prosody config naming every host of ``tree``.

    Hosts of multi-name certificates are declared as components, the way
    a MUC or upload service would be.
    """
    root.mkdir(parents=True)
    world = World(
        root=root,
        config=root / "prosody.cfg.lua",
        certs=root / "certs",
        state=root / "data",
        reloads=root / "reloads.log",
        keeps_state=True,
    )
    lines = [
        f'pidfile = "{root / "prosody.pid"}"',
        f'data_path = "{world.state}"',
        'certificates = "certs"',
        "log = { }",
    ]
    for host in tree.hosts:
        if host.split(".", 1)[0] in COMPONENTS:
            lines.append(f'Component "{host}" "muc"')
        else:
            lines.append(f'VirtualHost "{host}"')
    world.config.write_text("\n".join(lines) + "\n")
    world.state.mkdir()
    world.empty()
    return world


def certwatchd_command(world: World, command: str) -> list[str]:
    """Return the argv of ``certwatchd COMMAND --config`` from this venv."""
    script = Path(sys.executable).with_name("certwatchd")
    program = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-m", "certwatchd"]
    )
    return [*program, command, "--config", str(world.config)]


def prosodyctl_command(world: World, tree: Tree) -> list[str]:
    """Return the argv of ``prosodyctl --root cert import`` on ``tree``."""
    return [
        "prosodyctl",
        "--root",
        "--config",
        str(world.config),
        "cert",
        "import",
        str(tree.live),
    ]
