"""Shared fixtures: a throwaway CA, certbot-shaped trees, a config file."""

from __future__ import annotations

import grp
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog

from certwatchd.sandbox import Authority, LetsEncryptTree

TEST_GROUP = "prosody"


def require_root() -> None:
    """Skip when not root, but fail under CI, where root is promised."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs as root; this test needs root")
    pytest.skip("needs root to chown to another group")


def test_gid() -> int:
    """The group installed files get; CI's test command creates it."""
    try:
        return grp.getgrnam(TEST_GROUP).gr_gid
    except KeyError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"group {TEST_GROUP!r} is missing under CI")
        pytest.skip(f"group {TEST_GROUP!r} does not exist")


@pytest.fixture(scope="session")
def authority() -> Authority:
    """One throwaway root and intermediate for the whole run."""
    return Authority.create()


@dataclass
class Setup:
    """A certbot tree, a certs directory, a state directory and a config."""

    root: Path
    tree: LetsEncryptTree
    certs: Path
    state: Path
    roots: Path
    reload_log: Path
    settings: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        """Write the current settings as TOML and return the file."""
        path = self.root / "config.toml"
        path.write_text(to_toml(self.settings))
        return path

    def reloads(self) -> int:
        """Count how often the reload command ran."""
        if not self.reload_log.exists():
            return 0
        return len(self.reload_log.read_text().splitlines())


def to_toml(settings: dict[str, dict[str, object]]) -> str:
    """Render a two-level table as TOML (values as JSON literals)."""
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, int) and key.endswith("_mode"):
                lines.append(f"{key} = {value:#o}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    return textwrap.dedent("\n".join(lines)) + "\n"


def reload_command(log: Path, exit_code: int = 0) -> list[str]:
    """Return a real subprocess command that notes each run in ``log``."""
    script = (
        "import sys, time;"
        f"open({str(log)!r}, 'a').write(f'{{time.time()}}\\n');"
        f"sys.exit({exit_code})"
    )
    return [sys.executable, "-c", script]


@pytest.fixture
def setup(tmp_path: Path, authority: Authority) -> Setup:
    """Give a fresh certbot-shaped tree and an empty Prosody certs dir."""
    require_root()
    tree = LetsEncryptTree(tmp_path / "letsencrypt")
    certs = tmp_path / "prosody" / "certs"
    certs.mkdir(parents=True)
    roots = authority.write_roots(tmp_path / "roots.pem")
    reload_log = tmp_path / "reloads.log"
    result = Setup(
        root=tmp_path,
        tree=tree,
        certs=certs,
        state=tmp_path / "state",
        roots=roots,
        reload_log=reload_log,
    )
    result.settings = {
        "sources": {
            "letsencrypt_live": str(tree.live),
            "prosody_certs": str(certs),
        },
        "install": {
            "certs_dir": str(certs),
            "owner": "root",
            "group": TEST_GROUP,
        },
        "validation": {"trust": str(roots)},
        "reload": {"command": reload_command(reload_log)},
        "state": {"dir": str(result.state)},
        "log": {"format": "json", "level": "debug"},
    }
    test_gid()
    return result


@dataclass
class Outcome:
    """What one in-process run of the command line returned and printed."""

    code: int | str | None
    out: str
    err: str

    @property
    def events(self) -> list[dict[str, object]]:
        """Parse every JSON log line written to stderr."""
        return [
            json.loads(line)
            for line in self.err.splitlines()
            if line.startswith("{")
        ]

    def named(self, event: str) -> list[dict[str, object]]:
        """Return the log events called ``event``."""
        return [e for e in self.events if e.get("event") == event]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``certwatchd.cli.main`` in-process and capture what it printed."""
    # Imported here so a broken command line fails its own tests only.
    from certwatchd.cli import main  # noqa: PLC0415

    def run(*argv: str) -> Outcome:
        capsys.readouterr()
        try:
            code: int | str | None = main(list(argv))
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return Outcome(code, out, err)

    yield run
    structlog.reset_defaults()


@pytest.fixture
def daemons(setup: Setup):
    """Start ``certwatchd run`` processes on the setup; kill them after."""
    # Imported here so that only tests using real daemons need the helper.
    from daemon_process import (  # noqa: PLC0415
        DaemonProcess,
        daemon_env,
        run_argv,
    )

    started: list[DaemonProcess] = []

    def start(
        *,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        ready: bool = True,
        timeout: float = 15.0,
    ) -> DaemonProcess:
        log = setup.root / f"daemon-{len(started)}.log"
        process = DaemonProcess(
            argv or run_argv(setup.config), log, env or daemon_env()
        )
        started.append(process)
        if ready:
            process.wait_for_event("daemon.ready", timeout=timeout)
        return process

    yield start
    for process in started:
        process.kill()
