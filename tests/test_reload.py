import io
import json
import os
import sys
import time
from pathlib import Path

import pytest
import structlog

from certwatchd import logs
from certwatchd.reload import OUTPUT_LIMIT, run_reload


@pytest.fixture
def events():
    """Collect JSON log events in memory for one test."""
    stream = io.StringIO()
    logs.configure("debug", "json", stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    structlog.reset_defaults()


def python(code):
    return (sys.executable, "-c", code)


def test_successful_command_is_logged_with_rc_and_duration(events):
    """A command exiting 0 is ok and logged as reload.finished."""
    result = run_reload(python("print('reloaded')"), timeout=10)

    assert result.ok
    assert result.returncode == 0
    assert result.output == "reloaded"
    (event,) = events()
    assert event["event"] == "reload.finished"
    assert event["rc"] == 0
    assert event["output"] == "reloaded"
    assert 0 <= event["seconds"] < 10


def test_non_zero_exit_is_a_failure(events):
    """A command exiting non-zero fails with its status."""
    result = run_reload(python("import sys; sys.exit(3)"), timeout=10)

    assert not result.ok
    assert result.returncode == 3
    assert result.error == "exited with status 3"
    (event,) = events()
    assert event["event"] == "reload.failed"
    assert event["level"] == "error"
    assert event["rc"] == 3


def test_missing_binary_is_a_clear_failure(tmp_path, events):
    """A command that does not exist fails with a message naming it."""
    missing = str(tmp_path / "prosodyctl")

    result = run_reload((missing, "reload"), timeout=10)

    assert not result.ok
    assert result.returncode is None
    assert missing in str(result.error)
    assert "No such file or directory" in str(result.error)
    (event,) = events()
    assert event["event"] == "reload.failed"


def test_non_executable_file_is_a_clear_failure(tmp_path):
    """A command file without execute permission fails, not crashes."""
    script = tmp_path / "reload.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)

    result = run_reload((str(script),), timeout=10)

    assert not result.ok
    assert "Permission denied" in str(result.error)


@pytest.mark.timeout(20)
def test_hanging_command_is_killed_at_its_timeout():
    """A command still running at the timeout is killed promptly."""
    started = time.monotonic()

    result = run_reload(python("import time; time.sleep(60)"), timeout=0.5)

    assert time.monotonic() - started < 5
    assert not result.ok
    assert "timeout" in str(result.error)


@pytest.mark.timeout(20)
def test_children_of_a_hanging_command_are_killed(tmp_path):
    """The whole process group of a timed-out command is killed."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c',"
        " 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )

    result = run_reload(python(code), timeout=1)

    assert not result.ok
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and is_running(child):
        time.sleep(0.05)
    assert not is_running(child)


def is_running(pid):
    try:
        status = Path(f"/proc/{pid}/status").read_bytes()
    except FileNotFoundError:
        return False
    return b"State:\tZ" not in status


@pytest.mark.timeout(20)
def test_command_that_closes_output_but_keeps_running_is_killed():
    """Closing stdout early does not escape the timeout."""
    code = "import os, time; os.close(1); time.sleep(60)"
    started = time.monotonic()

    result = run_reload(python(code), timeout=0.5)

    assert time.monotonic() - started < 5
    assert not result.ok


@pytest.mark.timeout(30)
def test_megabytes_of_output_are_bounded(events):
    """A command printing megabytes keeps only a bounded tail."""
    code = (
        "import sys\n"
        "sys.stdout.write('x' * (16 << 20))\n"
        "sys.stdout.write('THE END')\n"
    )

    result = run_reload(python(code), timeout=20)

    assert result.ok
    assert len(result.output) <= OUTPUT_LIMIT
    assert result.output.endswith("THE END")
    (event,) = events()
    assert len(event["output"]) <= OUTPUT_LIMIT


def test_output_that_is_not_utf8_does_not_break_the_log(events):
    """Binary output is logged with replacement characters."""
    code = "import sys; sys.stdout.buffer.write(b'\\xff\\xfe ok')"

    result = run_reload(python(code), timeout=10)

    assert result.ok
    assert result.output.endswith("ok")
    assert events()[0]["event"] == "reload.finished"


def test_stderr_is_captured_with_stdout():
    """What the command prints on stderr is part of its output."""
    code = "import sys; print('no pidfile', file=sys.stderr); sys.exit(1)"

    result = run_reload(python(code), timeout=10)

    assert "no pidfile" in result.output


def test_command_runs_without_a_shell(tmp_path):
    """Arguments reach the command verbatim, never through a shell."""
    marker = tmp_path / "marker"
    code = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"

    run_reload((*python(code), str(marker), "$(id) ; *"), timeout=10)

    assert marker.read_text() == "$(id) ; *"


def test_stdin_is_not_inherited():
    """The command reads end-of-file on stdin instead of waiting."""
    code = "import sys; print(repr(sys.stdin.read()))"

    result = run_reload(python(code), timeout=10)

    assert result.ok
    assert result.output == "''"


def test_reload_does_not_leave_file_descriptors_open():
    """Running the command many times leaks no descriptor."""
    before = len(os.listdir("/proc/self/fd"))

    for _ in range(5):
        run_reload(python("pass"), timeout=10)

    assert len(os.listdir("/proc/self/fd")) == before
