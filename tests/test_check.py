import grp
import json
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

NOW = datetime.now(UTC).replace(microsecond=0)


def gid():
    return grp.getgrnam("prosody").gr_gid


def sync(cli, setup):
    return cli("sync", "--config", str(setup.config))


def check(cli, setup, *extra):
    return cli("check", "--config", str(setup.config), *extra)


def document(result):
    """Parse stdout as exactly one JSON document."""
    return json.loads(result.out)


def place(setup, host, issued, *, key_pem=None):
    """Install a pair by hand with the configured owner and modes."""
    cert = setup.certs / f"{host}.crt"
    key = setup.certs / f"{host}.key"
    cert.write_bytes(issued.fullchain_pem)
    key.write_bytes(key_pem or issued.key_pem)
    for path, mode in ((cert, 0o644), (key, 0o640)):
        os.chown(path, 0, gid())
        os.chmod(path, mode)
    return cert, key


def snapshot(directory):
    return {
        str(p): (p.lstat().st_ino, p.lstat().st_mtime_ns, p.lstat().st_mode)
        for p in directory.rglob("*")
    }


@pytest.fixture
def installed(setup, authority, cli):
    """Give a tree with one lineage, synced once."""
    issued = authority.issue(["example.com", "chat.example.com"])
    setup.tree.create_lineage("example.com", issued)
    assert sync(cli, setup).code == 0
    return issued


@pytest.mark.usefixtures("installed")
def test_fresh_installation_is_ok(setup, cli):
    """Pairs installed by sync and far from expiry give exit 0."""
    result = check(cli, setup)

    assert result.code == 0
    assert result.out.startswith("CERTWATCHD OK")
    assert "example.com" in result.out


def test_json_report_is_one_document_with_the_facts(setup, installed, cli):
    """--json prints one document naming each pair's facts."""
    result = check(cli, setup, "--json")

    report = document(result)
    assert result.code == 0
    assert report["status"] == "OK"
    assert report["exit_code"] == 0
    pairs = {p["host"]: p for p in report["pairs"]}
    assert set(pairs) == {"example.com", "chat.example.com"}
    pair = pairs["chat.example.com"]
    leaf = x509.load_pem_x509_certificate(installed.cert_pem)
    assert pair["names"] == ["example.com", "chat.example.com"]
    assert pair["serial"] == f"{leaf.serial_number:x}"
    assert "intermediate" in pair["issuer"]
    assert pair["not_after"] == leaf.not_valid_after_utc.isoformat()
    assert 85 <= pair["days_left"] <= 90
    assert pair["key_matches"] is True
    assert pair["cert_owner"] == "root:prosody"
    assert pair["key_owner"] == "root:prosody"
    assert pair["cert_mode"] == "0o644"
    assert pair["key_mode"] == "0o640"
    assert pair["replaced_by"] is None
    assert pair["status"] == "OK"


def test_check_changes_nothing(setup, installed, cli):
    """Checking is read-only: no file changes and no reload."""
    os.chmod(setup.certs / "example.com.key", 0o600)
    setup.tree.renew("example.com", installed)
    config = setup.config
    before = snapshot(setup.root)

    cli("check", "--config", str(config))

    assert snapshot(setup.root) == before
    assert setup.reloads() == 1


@pytest.mark.usefixtures("installed")
def test_world_readable_key_is_a_warning(setup, cli):
    """A key readable by every user gives exit 1 and says so."""
    os.chmod(setup.certs / "example.com.key", 0o644)

    result = check(cli, setup, "--json")

    assert result.code == 1
    pairs = {p["host"]: p for p in document(result)["pairs"]}
    problems = " ".join(pairs["example.com"]["problems"])
    assert "readable by every user" in problems
    assert pairs["example.com"]["status"] == "WARNING"
    assert pairs["chat.example.com"]["status"] == "OK"


@pytest.mark.usefixtures("installed")
def test_wrong_group_is_a_warning(setup, cli):
    """A file owned by the wrong group gives exit 1."""
    os.chown(setup.certs / "example.com.crt", 0, 0)

    assert check(cli, setup).code == 1


@pytest.mark.usefixtures("installed")
def test_mismatched_key_is_critical(setup, authority, cli):
    """A key that does not match its certificate gives exit 2."""
    key = setup.certs / "example.com.key"
    key.write_bytes(authority.issue(["example.com"]).key_pem)

    result = check(cli, setup, "--json")

    assert result.code == 2
    pairs = {p["host"]: p for p in document(result)["pairs"]}
    assert pairs["example.com"]["key_matches"] is False
    assert pairs["example.com"]["status"] == "CRITICAL"


def test_expired_certificate_is_critical(setup, authority, cli):
    """An installed certificate past notAfter gives exit 2."""
    expired = authority.issue(
        ["old.example"],
        not_before=NOW - timedelta(days=90),
        not_after=NOW - timedelta(days=1),
    )
    place(setup, "old.example", expired)

    result = check(cli, setup, "--json")

    assert result.code == 2
    (pair,) = document(result)["pairs"]
    assert any("expired" in p for p in pair["problems"])


@pytest.mark.parametrize(
    ("days", "code"),
    [(3, 2), (20, 1), (45, 0)],
    ids=["critical", "warning", "ok"],
)
def test_expiry_thresholds(setup, authority, cli, days, code):
    """Days left under critical_days give 2, under warn_days give 1."""
    issued = authority.issue(
        ["soon.example"],
        not_before=NOW - timedelta(days=60),
        not_after=NOW + timedelta(days=days, hours=1),
    )
    place(setup, "soon.example", issued)
    setup.settings["expiry"] = {"warn_days": 30, "critical_days": 7}

    result = check(cli, setup, "--json")

    assert result.code == code
    (pair,) = document(result)["pairs"]
    assert pair["days_left"] == days


def test_configured_thresholds_are_used(setup, authority, cli):
    """warn_days and critical_days come from the configuration."""
    issued = authority.issue(["soon.example"])
    place(setup, "soon.example", issued)
    setup.settings["expiry"] = {"warn_days": 100, "critical_days": 95}

    assert check(cli, setup).code == 2


@pytest.mark.usefixtures("installed")
def test_unparsable_certificate_is_critical(setup, cli):
    """A certificate file that is not PEM gives exit 2."""
    (setup.certs / "example.com.crt").write_bytes(b"garbage\n")

    assert check(cli, setup).code == 2


@pytest.mark.usefixtures("installed")
def test_worst_pair_decides_the_status(setup, authority, cli):
    """One critical pair among good ones makes the whole check critical."""
    place(
        setup,
        "bad.example",
        authority.issue(["bad.example"]),
        key_pem=authority.issue(["bad.example"]).key_pem,
    )

    result = check(cli, setup)

    assert result.code == 2
    assert result.out.startswith("CERTWATCHD CRITICAL")


@pytest.mark.usefixtures("installed")
def test_report_names_the_source_that_would_replace(setup, authority, cli):
    """A pending renewal shows which source would replace the pair."""
    setup.tree.renew("example.com", authority.issue(["example.com"]))

    result = check(cli, setup, "--json")

    pairs = {p["host"]: p for p in document(result)["pairs"]}
    assert pairs["example.com"]["replaced_by"] == str(
        setup.tree.live / "example.com"
    )
    assert pairs["chat.example.com"]["replaced_by"] is None


def test_directory_layout_is_checked(setup, authority, cli):
    """Pairs in <host>/ directories are reported like flat ones."""
    setup.tree.create_lineage("example.com", authority.issue(["example.com"]))
    setup.settings["install"]["layout"] = "directory"
    sync(cli, setup)

    result = check(cli, setup, "--json")

    assert result.code == 0
    (pair,) = document(result)["pairs"]
    assert pair["cert_path"].endswith("example.com/fullchain.pem")


def test_configuration_error_is_unknown(setup, cli):
    """A configuration check cannot get past gives exit 3."""
    setup.settings["install"]["group"] = "no-such-group-certwatchd"

    result = check(cli, setup)

    assert result.code == 3
    assert result.out.startswith("CERTWATCHD UNKNOWN")
    assert "no-such-group-certwatchd" in result.out


def test_configuration_error_with_json_is_one_document(setup, cli):
    """Even an UNKNOWN result is exactly one JSON document on stdout."""
    setup.settings["install"]["layot"] = "flat"

    result = check(cli, setup, "--json")

    assert result.code == 3
    report = document(result)
    assert report["status"] == "UNKNOWN"
    assert report["exit_code"] == 3
    assert "layot" in report["error"]


def test_missing_config_file_is_unknown(setup, cli):
    """A --config that does not exist gives exit 3, not 78."""
    result = cli("check", "--config", str(setup.root / "missing.toml"))

    assert result.code == 3


def test_json_output_never_holds_key_material(setup, installed, cli):
    """The report describes keys without quoting them."""
    result = check(cli, setup, "--json")

    body = installed.key_pem.decode().splitlines()[1]
    assert "PRIVATE KEY" not in result.out + result.err
    assert body not in result.out + result.err


@pytest.mark.usefixtures("installed")
def test_key_modes_in_report_are_octal(setup, cli):
    """Modes are shown as octal strings an operator can read."""
    key = setup.certs / "example.com.key"
    os.chmod(key, 0o600)

    result = check(cli, setup, "--json")

    pairs = {p["host"]: p for p in document(result)["pairs"]}
    assert pairs["example.com"]["key_mode"] == oct(
        stat.S_IMODE(key.stat().st_mode)
    )
    assert result.code == 1
