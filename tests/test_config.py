import os
from pathlib import Path

import pytest

from certwatchd.config import (
    DEFAULT_CONFIG,
    Settings,
    load_settings,
    resolve_ownership,
)
from certwatchd.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


def sync(cli, path, *extra):
    return cli("sync", "--config", str(path), *extra)


def with_lines(setup, section, *lines):
    """Write the setup's config with raw TOML lines added to a section."""
    path = setup.config
    text = path.read_text()
    header = f"[{section}]\n"
    if header in text:
        text = text.replace(header, header + "\n".join(lines) + "\n")
    else:
        text += header + "\n".join(lines) + "\n"
    path.write_text(text)
    return path


def assert_one_line(result, *needles):
    """Exit 78, nothing on stdout, one stderr line naming every needle."""
    assert result.code == 78
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CERTWATCHD_"):
            monkeypatch.delenv(name)
    return monkeypatch


# case: (section, raw TOML line, words the error line must contain)
BAD_LINES = {
    "unknown section": ("instal", "layout = 'flat'", ["instal"]),
    "unknown key": ("install", "layot = 'flat'", ["install.layot"]),
    "decimal mode": (
        "install",
        "cert_mode = 644",
        ["install.cert_mode", "644"],
    ),
    "world-readable key": (
        "install",
        "key_mode = 0o644",
        ["install.key_mode", "0o644"],
    ),
    "world-readable key as text": (
        "install",
        "key_mode = '0644'",
        ["install.key_mode", "0644"],
    ),
    "mode with letters": ("install", "cert_mode = 'rw-r--r--'", ["rw-r--r--"]),
    "layout": ("install", "layout = 'tree'", ["install.layout", "tree"]),
    "host name": (
        "install",
        "hosts = ['../etc']",
        ["install.hosts", "../etc"],
    ),
    "trust file": (
        "validation",
        "trust = '/nonexistent/roots.pem'",
        ["validation.trust", "/nonexistent/roots.pem"],
    ),
    "timeout": ("reload", "timeout_seconds = 0", ["reload.timeout_seconds"]),
    "command as a string": (
        "reload",
        "command = 'prosodyctl reload'",
        ["reload.command", "prosodyctl reload"],
    ),
    "empty command": ("reload", "command = []", ["reload.command"]),
    "critical above warn": (
        "expiry",
        "warn_days = 3\ncritical_days = 7",
        ["critical_days", "warn_days"],
    ),
    "log format": ("log", "format = 'xml'", ["log.format", "xml"]),
    "log level": ("log", "level = 'loud'", ["log.level", "loud"]),
}


@pytest.mark.parametrize("case", BAD_LINES, ids=list(BAD_LINES))
@pytest.mark.usefixtures("clean_env")
def test_bad_values_are_one_line_config_errors(setup, cli, case):
    """Each bad setting exits 78 with one line naming key and value."""
    section, line, needles = BAD_LINES[case]
    if section in setup.settings:
        for key in list(setup.settings[section]):
            if line.startswith(key) or f"\n{key}" in line:
                del setup.settings[section][key]

    result = sync(cli, with_lines(setup, section, line))

    assert_one_line(result, *needles)
    assert os.listdir(setup.certs) == []


def test_unknown_group_is_a_config_error(setup, cli):
    """A group that does not exist exits 78 naming it."""
    setup.settings["install"]["group"] = "prosodyy"

    result = sync(cli, setup.config)

    assert_one_line(result, "prosodyy", "install.group")


def test_unknown_owner_is_a_config_error(setup, cli):
    """A user that does not exist exits 78 naming it."""
    setup.settings["install"]["owner"] = "certwatchd-nobody"

    result = sync(cli, setup.config)

    assert_one_line(result, "certwatchd-nobody", "install.owner")


def test_missing_named_file_is_a_config_error(tmp_path, cli):
    """A --config file that does not exist exits 78 naming the path."""
    missing = tmp_path / "missing.toml"

    assert_one_line(sync(cli, missing), str(missing))


def test_invalid_toml_is_a_config_error(tmp_path, cli):
    """A file that is not TOML exits 78 naming the file."""
    path = tmp_path / "config.toml"
    path.write_text("[install\nlayout = flat\n")

    assert_one_line(sync(cli, path), str(path), "TOML")


def test_unreadable_config_is_a_config_error(tmp_path, cli):
    """A config path that is a directory exits 78."""
    assert_one_line(sync(cli, tmp_path), str(tmp_path))


def test_env_override_changes_the_layout(setup, authority, cli, monkeypatch):
    """CERTWATCHD_INSTALL__LAYOUT overrides the file's layout."""
    setup.tree.create_lineage("example.com", authority.issue(["example.com"]))
    setup.settings["install"]["layout"] = "flat"
    monkeypatch.setenv("CERTWATCHD_INSTALL__LAYOUT", "directory")

    assert sync(cli, setup.config).code == 0

    assert (setup.certs / "example.com" / "privkey.pem").is_file()
    assert not (setup.certs / "example.com.key").exists()


def test_env_override_with_a_bad_value_names_the_variable(
    setup, cli, monkeypatch
):
    """A bad environment value exits 78 naming the variable and value."""
    monkeypatch.setenv("CERTWATCHD_INSTALL__LAYOUT", "tree")

    result = sync(cli, setup.config)

    assert_one_line(result, "CERTWATCHD_INSTALL__LAYOUT", "tree")


def test_env_key_typo_is_a_config_error(setup, cli, monkeypatch):
    """A misspelt key in an environment variable is not ignored."""
    monkeypatch.setenv("CERTWATCHD_INSTALL__LAYOTU", "directory")

    result = sync(cli, setup.config)

    assert_one_line(result, "CERTWATCHD_INSTALL__LAYOTU")


def test_env_section_typo_is_a_config_error(setup, cli, monkeypatch):
    """A misspelt section in an environment variable is not ignored."""
    monkeypatch.setenv("CERTWATCHD_INSTAL__LAYOUT", "directory")

    result = sync(cli, setup.config)

    assert_one_line(result, "CERTWATCHD_INSTAL__LAYOUT")


def test_boolean_mode_is_a_config_error(setup, cli):
    """A mode written as true is refused, not read as 0o001."""
    result = sync(cli, with_lines(setup, "install", "cert_mode = true"))

    assert_one_line(result, "install.cert_mode")


def test_env_wins_over_the_file(tmp_path, clean_env):
    """An environment variable overrides the same key in the file."""
    path = tmp_path / "config.toml"
    path.write_text("[expiry]\nwarn_days = 20\ncritical_days = 5\n")
    clean_env.setenv("CERTWATCHD_EXPIRY__WARN_DAYS", "40")

    settings = load_settings(path)

    assert settings.expiry.warn_days == 40
    assert settings.expiry.critical_days == 5


def test_config_path_comes_from_the_environment(tmp_path, clean_env):
    """Without --config, CERTWATCHD_CONFIG names the file."""
    path = tmp_path / "config.toml"
    path.write_text("[install]\nlayout = 'directory'\n")
    clean_env.setenv("CERTWATCHD_CONFIG", str(path))

    assert load_settings(None).install.layout == "directory"


def test_missing_file_named_in_the_environment_is_an_error(
    tmp_path, clean_env
):
    """A CERTWATCHD_CONFIG that does not exist is a configuration error."""
    clean_env.setenv("CERTWATCHD_CONFIG", str(tmp_path / "missing.toml"))

    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_settings(None)


@pytest.mark.usefixtures("clean_env")
def test_missing_default_file_means_defaults():
    """Without any file, the documented defaults apply."""
    if DEFAULT_CONFIG.exists():
        pytest.skip(f"{DEFAULT_CONFIG} exists on this machine")

    settings = load_settings(None)

    assert settings.sources.letsencrypt_live == Path("/etc/letsencrypt/live")
    assert settings.sources.prosody_certs == Path("/etc/prosody/certs")
    assert settings.install.certs_dir == Path("/etc/prosody/certs")
    assert settings.install.layout == "flat"
    assert settings.install.owner == "root"
    assert settings.install.group == "prosody"
    assert settings.install.cert_mode == 0o644
    assert settings.install.key_mode == 0o640
    assert settings.install.hosts == ()
    assert settings.validation.trust == "system"
    assert settings.reload.command == ("prosodyctl", "reload")
    assert settings.reload.timeout_seconds == 30
    assert settings.expiry.warn_days == 30
    assert settings.expiry.critical_days == 7
    assert settings.state.dir == Path("/var/lib/certwatchd")
    assert settings.log.level == "info"
    assert settings.log.format == "auto"


@pytest.mark.parametrize(
    ("text", "mode"),
    [("0o600", 0o600), ("'0640'", 0o640), ("'0o640'", 0o640), ("416", 0o640)],
)
@pytest.mark.usefixtures("clean_env")
def test_modes_are_read_as_octal(tmp_path, text, mode):
    """Modes are TOML octal integers or octal strings."""
    path = tmp_path / "config.toml"
    path.write_text(f"[install]\nkey_mode = {text}\n")

    assert load_settings(path).install.key_mode == mode


@pytest.mark.usefixtures("clean_env")
def test_owner_and_group_resolve_to_ids():
    """install.owner and install.group become numeric ids."""
    settings = Settings(install={"owner": "root", "group": "root"})

    ownership = resolve_ownership(settings)

    assert (ownership.uid, ownership.gid) == (0, 0)


def sections(text):
    """Split TOML text into its tables' lines, comments included."""
    found = {}
    current = found.setdefault("", [])
    for line in text.splitlines():
        if line.startswith("[") and not line.startswith("[["):
            current = found.setdefault(line.strip("[] "), [])
        else:
            current.append(line)
    return found


def is_commented(lines, index):
    """Say whether a comment heads the group of keys holding ``index``."""
    while index > 0 and lines[index - 1].strip() and "=" in lines[index - 1]:
        if lines[index - 1].lstrip().startswith("#"):
            return True
        index -= 1
    return index > 0 and lines[index - 1].lstrip().startswith("#")


@pytest.mark.usefixtures("clean_env")
def test_example_file_loads_and_shows_every_key():
    """config.example.toml is valid and names every key with a comment."""
    load_settings(EXAMPLE)
    tables = sections(EXAMPLE.read_text())

    for section, field in Settings.model_fields.items():
        lines = tables[section]
        for key in field.annotation.model_fields:
            shown = [
                i
                for i, line in enumerate(lines)
                if line.lstrip("# ").startswith(f"{key} =")
                or f"[[{section}.{key}]]" in line
            ]
            assert shown, f"{section}.{key} missing"
            assert is_commented(lines, shown[0]), f"{section}.{key}"
