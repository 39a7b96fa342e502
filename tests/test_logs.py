import io
import json
import os
import re
import subprocess
import sys

import pytest
import structlog

from certwatchd import logs

EVENT_NAME = re.compile(r"[a-z]+(?:\.[a-z_]+)+")
JOURNAL_LINE = re.compile(r"<([0-7])>([a-z]+(?:\.[a-z_]+)+)(?: |$)")
ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


@pytest.fixture
def reset():
    yield
    structlog.reset_defaults()


def sync(cli, setup, *extra):
    return cli("sync", "--config", str(setup.config), *extra)


def key_fragments(*key_pems):
    """Return the header and every base64 line of the given keys."""
    fragments = {"PRIVATE KEY"}
    for pem in key_pems:
        for line in pem.decode().splitlines():
            if not line.startswith("-----") and len(line) >= 16:
                fragments.add(line)
    return fragments


def eventful_tree(setup, authority):
    """Build a tree whose pass installs, refuses, backs up and warns.

    Returns every key that is on disk somewhere in the tree.
    """
    good = authority.issue(["example.com"])
    setup.tree.create_lineage("example.com", good)

    wrong = authority.issue(["example.org"])
    setup.tree.create_lineage("example.org", wrong)
    stray = authority.issue(["example.org"])
    privkey = setup.tree.archive / "example.org" / "privkey1.pem"
    privkey.unlink()
    privkey.write_bytes(stray.key_pem)

    swapped = authority.issue(["example.net"])
    setup.tree.create_lineage("example.net", swapped)
    fullchain = setup.tree.archive / "example.net" / "fullchain1.pem"
    fullchain.unlink()
    fullchain.write_bytes(swapped.key_pem)

    old = authority.issue(["example.com"], rsa_bits=2048, key_type="rsa")
    (setup.certs / "hand.crt").write_bytes(old.fullchain_pem)
    (setup.certs / "hand.key").write_bytes(stray.key_pem)

    setup.settings["install"]["hosts"] = ["example.com", "missing.example"]
    key_file = setup.certs / "example.com.key"
    setup.settings["reload"]["command"] = ["/bin/cat", str(key_file)]
    return [good.key_pem, wrong.key_pem, stray.key_pem, swapped.key_pem]


@pytest.mark.parametrize("fmt", ["json", "journal", "console"])
def test_key_material_never_reaches_the_log(setup, authority, cli, fmt):
    """No log line quotes a key, whatever the format and the events."""
    keys = eventful_tree(setup, authority)
    setup.settings["log"] = {"format": fmt, "level": "debug"}

    first = sync(cli, setup)
    second = cli("check", "--config", str(setup.config), "--json")

    text = first.out + first.err + second.out + second.err
    assert "cert.refused" in text
    assert "reload." in text
    for fragment in key_fragments(*keys):
        assert fragment not in text


def test_json_lines_are_structured_events(setup, authority, cli):
    """In json format every stderr line is an object with a dotted event."""
    eventful_tree(setup, authority)

    result = sync(cli, setup)

    lines = result.err.splitlines()
    assert lines
    for line in lines:
        event = json.loads(line)
        assert EVENT_NAME.fullmatch(event["event"])
        assert event["level"] in {"debug", "info", "warning", "error"}
        assert "timestamp" in event


def test_refusals_name_path_and_reason(setup, authority, cli):
    """Each cert.refused event carries the file's path and a reason."""
    eventful_tree(setup, authority)

    result = sync(cli, setup)

    refused = {e["path"]: e for e in result.named("cert.refused")}
    assert {os.path.basename(p) for p in refused} == {
        "privkey1.pem",
        "fullchain1.pem",
        "hand.key",
    }
    for event in refused.values():
        assert event["level"] == "error"
        assert event["reason"]
        assert "\n" not in event["reason"]


def test_refusal_is_one_event_per_pair(setup, authority, cli):
    """A refused pair produces exactly one cert.refused event."""
    setup.tree.create_lineage("example.com", authority.issue([]))

    result = sync(cli, setup)

    assert len(result.named("cert.refused")) == 1


def test_reload_event_carries_status_duration_and_output(
    setup, authority, cli
):
    """reload.finished names rc, seconds and the command's output."""
    setup.tree.create_lineage("example.com", authority.issue(["example.com"]))

    result = sync(cli, setup)

    (event,) = result.named("reload.finished")
    assert event["rc"] == 0
    assert isinstance(event["seconds"], float)
    assert "output" in event


def test_journal_lines_carry_priority_and_no_timestamp(setup, authority, cli):
    """Journal lines start with <3>, <4> or <6> and hold no time."""
    eventful_tree(setup, authority)
    setup.settings["log"] = {"format": "journal", "level": "info"}

    result = sync(cli, setup)

    priorities = {}
    for line in result.err.splitlines():
        match = JOURNAL_LINE.match(line)
        assert match, line
        assert "timestamp" not in line
        assert not ISO_TIME.search(line.split(" ", 1)[0])
        priorities.setdefault(match.group(2), set()).add(match.group(1))
    assert priorities["cert.refused"] == {"3"}
    assert priorities["host.uncovered"] == {"4"}
    assert priorities["cert.installed"] == {"6"}


@pytest.mark.usefixtures("reset")
def test_journal_debug_lines_have_priority_seven():
    """Debug events are written with syslog priority 7."""
    stream = io.StringIO()
    logs.configure("debug", "journal", stream)

    structlog.get_logger().debug("probe.debug", value="a b")

    assert stream.getvalue() == '<7>probe.debug value="a b"\n'


@pytest.mark.usefixtures("reset")
def test_level_hides_lower_events():
    """With level warning, info and debug events are dropped."""
    stream = io.StringIO()
    logs.configure("warning", "json", stream)
    log = structlog.get_logger()

    log.info("probe.info")
    log.debug("probe.debug")
    log.warning("probe.warning")

    events = [
        json.loads(line)["event"] for line in stream.getvalue().splitlines()
    ]
    assert events == ["probe.warning"]


def test_auto_picks_journal_when_journal_stream_matches(tmp_path, monkeypatch):
    """JOURNAL_STREAM naming the stream's device and inode means journal."""
    with (tmp_path / "stderr").open("w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")

        assert logs.choose_format("auto", stream) == "journal"


def test_auto_picks_json_when_journal_stream_is_another_file(
    tmp_path, monkeypatch
):
    """A JOURNAL_STREAM inherited from elsewhere does not mean journal."""
    other = os.stat(tmp_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    with (tmp_path / "stderr").open("w") as stream:
        assert logs.choose_format("auto", stream) == "json"


def test_auto_picks_console_on_a_terminal(monkeypatch):
    """On a terminal without the journal, auto means console."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as stream:
            assert logs.choose_format("auto", stream) == "console"
    finally:
        os.close(leader)
        os.close(follower)


def test_explicit_format_is_kept(monkeypatch):
    """A format other than auto is used as configured."""
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")

    assert logs.choose_format("json", sys.stderr) == "json"


def test_auto_format_reaches_the_journal_end_to_end(setup, authority):
    """A real process whose stderr is the JOURNAL_STREAM writes <N> lines."""
    setup.tree.create_lineage("example.com", authority.issue(["example.com"]))
    setup.settings["log"] = {"format": "auto", "level": "info"}
    config = setup.config
    stderr_path = setup.root / "stderr"

    with stderr_path.open("wb") as stderr:
        info = os.fstat(stderr.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        subprocess.run(
            [sys.executable, "-m", "certwatchd", "sync", "--config", config],
            stderr=stderr,
            stdout=subprocess.DEVNULL,
            env=env,
            check=True,
            timeout=60,
        )

    lines = stderr_path.read_text().splitlines()
    assert lines
    assert all(JOURNAL_LINE.match(line) for line in lines)
    assert any(line.startswith("<6>cert.installed ") for line in lines)


def test_auto_format_is_json_when_piped(setup, authority):
    """A real process writing to a pipe without the journal logs JSON."""
    setup.tree.create_lineage("example.com", authority.issue(["example.com"]))
    setup.settings["log"] = {"format": "auto", "level": "info"}
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}

    command = [sys.executable, "-m", "certwatchd", "sync"]
    finished = subprocess.run(
        [*command, "--config", str(setup.config)],
        capture_output=True,
        env=env,
        check=True,
        timeout=60,
    )

    events = [json.loads(line) for line in finished.stderr.splitlines()]
    assert "cert.installed" in {e["event"] for e in events}


@pytest.mark.usefixtures("reset")
def test_accidental_key_in_a_field_is_redacted():
    """A field holding key material is replaced before rendering."""
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    leaked = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n"

    structlog.get_logger().info("probe.leak", detail=leaked)

    (event,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert "PRIVATE KEY" not in stream.getvalue()
    assert "MIGHAgEAMBMGByqGSM49" not in stream.getvalue()
    assert event["detail"] != leaked
