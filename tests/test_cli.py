import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from certwatchd import __version__

VENV_SCRIPT = Path(sys.executable).parent / "certwatchd"


def run(*argv, env=None):
    """Run the installed console script as a real process."""
    return subprocess.run(
        [str(VENV_SCRIPT), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.fixture
def lineage(setup, authority):
    issued = authority.issue(["example.com", "chat.example.com"])
    setup.tree.create_lineage("example.com", issued)
    return issued


def test_version_is_printed(cli):
    """--version prints the program name and version and exits 0."""
    result = cli("--version")

    assert result.code == 0
    assert result.out.strip() == f"certwatchd {__version__}"


def test_module_entry_point_runs():
    """Running the module is the same command line as the script."""
    finished = subprocess.run(
        [sys.executable, "-m", "certwatchd", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 0
    assert finished.stdout.strip() == f"certwatchd {__version__}"


def test_a_command_is_required(cli):
    """Without a command, usage is printed and the exit status is 2."""
    result = cli()

    assert result.code == 2
    assert "usage" in result.err


@pytest.mark.usefixtures("lineage")
def test_console_script_syncs_once_then_does_nothing(setup):
    """The installed script installs, reloads once, then rewrites nothing."""
    config = str(setup.config)

    first = run("sync", "--config", config)
    inode = (setup.certs / "example.com.key").stat().st_ino
    second = run("sync", "--config", config)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout == ""
    assert (setup.certs / "example.com.key").stat().st_ino == inode
    assert setup.reloads() == 1


@pytest.mark.usefixtures("lineage")
def test_console_script_check_prints_one_json_document(setup):
    """A real check --json process prints one JSON document on stdout."""
    config = str(setup.config)
    run("sync", "--config", config)

    finished = run("check", "--config", config, "--json")

    assert finished.returncode == 0
    report = json.loads(finished.stdout)
    assert report["status"] == "OK"
    assert len(report["pairs"]) == 2


def test_console_script_config_error_is_78(setup):
    """A configuration error from a real process exits 78 with one line."""
    setup.settings["install"]["key_mode"] = 0o644

    finished = run("sync", "--config", str(setup.config))

    assert finished.returncode == 78
    assert finished.stdout == ""
    assert len(finished.stderr.splitlines()) == 1
    assert "install.key_mode" in finished.stderr


@pytest.mark.usefixtures("lineage")
def test_config_is_found_through_the_environment(setup):
    """Without --config, CERTWATCHD_CONFIG names the file to use."""
    env = dict(os.environ, CERTWATCHD_CONFIG=str(setup.config))

    finished = run("sync", env=env)

    assert finished.returncode == 0, finished.stderr
    assert (setup.certs / "example.com.crt").exists()


@pytest.mark.usefixtures("lineage")
def test_sync_exit_code_is_zero_when_all_is_well(setup, cli):
    """A pass with nothing refused and a good reload exits 0."""
    assert cli("sync", "--config", str(setup.config)).code == 0


def test_sync_exit_code_is_one_when_something_is_refused(
    setup, authority, cli
):
    """A pass that refuses a pair exits 1."""
    setup.tree.create_lineage("example.com", authority.issue([]))

    assert cli("sync", "--config", str(setup.config)).code == 1


@pytest.mark.usefixtures("lineage")
def test_sync_exit_code_is_one_when_the_reload_fails(setup, cli):
    """A pass whose reload command fails exits 1."""
    setup.settings["reload"]["command"] = ["/bin/false"]

    assert cli("sync", "--config", str(setup.config)).code == 1


@pytest.mark.usefixtures("lineage")
@pytest.mark.timeout(30)
def test_sync_exit_code_is_one_when_the_reload_hangs(setup, cli):
    """A reload command killed at its timeout makes the pass exit 1."""
    setup.settings["reload"]["command"] = ["/bin/sleep", "60"]
    setup.settings["reload"]["timeout_seconds"] = 0.5

    result = cli("sync", "--config", str(setup.config))

    assert result.code == 1
    (failed,) = result.named("reload.failed")
    assert "timeout" in str(failed["error"])


@pytest.mark.usefixtures("lineage")
def test_dry_run_exits_zero_without_reloading(setup, cli):
    """--dry-run succeeds, installs nothing and never reloads."""
    result = cli("sync", "--config", str(setup.config), "--dry-run")

    assert result.code == 0
    assert os.listdir(setup.certs) == []
    assert setup.reloads() == 0
    assert {e["host"] for e in result.named("cert.would_install")} == {
        "example.com",
        "chat.example.com",
    }


def test_check_without_pairs_is_not_ok(setup, cli):
    """An empty certs directory is not reported as healthy."""
    result = cli("check", "--config", str(setup.config))

    assert result.code != 0
    assert "no certificate pairs" in result.out
