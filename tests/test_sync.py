import grp
import os
import resource
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certwatchd.certificate import TrustStore, load_pair
from certwatchd.sandbox import Authority

KINDS = ("cert", "privkey", "chain", "fullchain")
NOW = datetime.now(UTC).replace(microsecond=0)


def gid():
    return grp.getgrnam("prosody").gr_gid


def sync(cli, setup, *extra):
    return cli("sync", "--config", str(setup.config), *extra)


def lineage(setup, authority, name, names, **options):
    issued = authority.issue(list(names), **options)
    setup.tree.create_lineage(name, issued)
    return issued


def archived(setup, name, kind, version=1):
    return setup.tree.archive / name / f"{kind}{version}.pem"


def replace(path, data):
    path.unlink()
    path.write_bytes(data)


def serial(path):
    pem = path.read_bytes()
    return x509.load_pem_x509_certificates(pem)[0].serial_number


def serial_of(issued):
    return x509.load_pem_x509_certificate(issued.cert_pem).serial_number


def attributes(path):
    info = os.stat(path)
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def snapshot(directory):
    """Map every path under ``directory`` to what a rewrite would change."""
    result = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        result[str(path.relative_to(directory))] = (
            info.st_ino,
            info.st_mtime_ns,
            info.st_ctime_ns,
            info.st_mode,
            info.st_uid,
            info.st_gid,
        )
    return result


def place(directory, stem, issued, *, cert_mode=0o644, key_mode=0o640):
    """Put a pair into Prosody's directory the way an operator would."""
    cert = directory / f"{stem}.crt"
    key = directory / f"{stem}.key"
    cert.write_bytes(issued.fullchain_pem)
    key.write_bytes(issued.key_pem)
    os.chmod(cert, cert_mode)
    os.chmod(key, key_mode)
    return cert, key


def relink(setup, name, version, kinds=KINDS):
    """Point live links of ``name`` at archive ``version``, as certbot does."""
    live = setup.tree.live / name
    for kind in kinds:
        link = live / f"{kind}.pem"
        link.unlink()
        link.symlink_to(f"../../archive/{name}/{kind}{version}.pem")


def interrupt_renewal(setup, name, issued, swapped):
    """Leave ``name`` as certbot does after ``swapped`` of its four swaps."""
    live = setup.tree.live / name
    old = setup.tree.version(name)
    setup.tree.renew(name, issued)
    relink(setup, name, old, KINDS[swapped:])
    for kind in KINDS:
        previous = live / f"previous_{kind}.pem"
        previous.symlink_to(archived(setup, name, kind, old))


def test_installs_every_name_with_owner_and_modes(setup, authority, cli):
    """Each SAN of each lineage gets its pair as root:prosody 0644/0640."""
    first = lineage(
        setup,
        authority,
        "example.com",
        ["example.com", "conference.example.com"],
    )
    second = lineage(setup, authority, "example.org", ["example.org"])

    result = sync(cli, setup)

    assert result.code == 0
    hosts = {
        "example.com": first,
        "conference.example.com": first,
        "example.org": second,
    }
    expected = {f"{h}.{s}" for h in hosts for s in ("crt", "key")}
    assert set(os.listdir(setup.certs)) == expected
    for host, issued in hosts.items():
        cert = setup.certs / f"{host}.crt"
        key = setup.certs / f"{host}.key"
        assert cert.read_bytes() == issued.fullchain_pem
        assert key.read_bytes() == issued.key_pem
        assert attributes(cert) == (0, gid(), 0o644)
        assert attributes(key) == (0, gid(), 0o640)
    assert setup.reloads() == 1


def test_installed_events_name_host_source_serial_and_expiry(
    setup, authority, cli
):
    """Every installed host is one cert.installed event with its facts."""
    issued = lineage(setup, authority, "example.com", ["example.com"])

    result = sync(cli, setup)

    (event,) = result.named("cert.installed")
    assert event["host"] == "example.com"
    assert event["source"] == str(setup.tree.live / "example.com")
    assert int(str(event["serial"]), 16) == serial_of(issued)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert event["not_after"] == leaf.not_valid_after_utc.date().isoformat()


@pytest.mark.parametrize("key_type", ["ec", "rsa", "ed25519"])
def test_each_accepted_key_type_is_installed(setup, authority, cli, key_type):
    """EC, RSA of 2048 bits and Ed25519 pairs are all installed."""
    issued = lineage(
        setup, authority, "example.com", ["example.com"], key_type=key_type
    )

    result = sync(cli, setup)

    assert result.code == 0
    assert (setup.certs / "example.com.key").read_bytes() == issued.key_pem


def test_second_sync_rewrites_nothing_and_does_not_reload(
    setup, authority, cli
):
    """A pass over an unchanged tree touches no file and reloads nothing."""
    lineage(
        setup, authority, "example.com", ["example.com", "www.example.com"]
    )
    assert sync(cli, setup).code == 0
    before = snapshot(setup.certs)

    result = sync(cli, setup)

    assert result.code == 0
    assert snapshot(setup.certs) == before
    assert result.named("cert.installed") == []
    assert setup.reloads() == 1


def test_renewal_installs_the_new_generation_and_reloads(
    setup, authority, cli
):
    """After certbot renews, the next pass installs the new pair."""
    lineage(setup, authority, "example.com", ["example.com"])
    sync(cli, setup)
    renewed = authority.issue(["example.com"])
    setup.tree.renew("example.com", renewed)

    result = sync(cli, setup)

    assert result.code == 0
    assert serial(setup.certs / "example.com.crt") == serial_of(renewed)
    assert (setup.certs / "example.com.key").read_bytes() == renewed.key_pem
    assert setup.reloads() == 2


def test_installed_pair_matches_and_verifies(setup, authority, cli):
    """What lands in the certs directory passes validation itself."""
    lineage(setup, authority, "example.com", ["example.com"])
    sync(cli, setup)

    pair = load_pair(
        setup.certs / "example.com.crt",
        setup.certs / "example.com.key",
        TrustStore.from_setting(str(setup.roots)),
    )

    assert pair.names == ("example.com",)


def test_suffixed_lineage_with_later_start_wins(setup, authority, cli):
    """An -0001 lineage issued later supplies the host, not the old one."""
    lineage(
        setup,
        authority,
        "example.com",
        ["example.com"],
        not_before=NOW - timedelta(days=10),
    )
    newer = lineage(
        setup,
        authority,
        "example.com-0001",
        ["example.com", "chat.example.com"],
    )

    result = sync(cli, setup)

    assert result.code == 0
    for host in ("example.com", "chat.example.com"):
        assert serial(setup.certs / f"{host}.crt") == serial_of(newer)
    sources = {e["host"]: e["source"] for e in result.named("cert.installed")}
    assert sources["example.com"].endswith("live/example.com-0001")


def test_multi_name_lineages_pick_per_host(setup, authority, cli):
    """Each host takes the newest pair covering it, pair by pair."""
    old = lineage(
        setup,
        authority,
        "example.com",
        ["example.com", "upload.example.com"],
        not_before=NOW - timedelta(days=5),
    )
    new = lineage(setup, authority, "chat", ["example.com"])

    sync(cli, setup)

    assert serial(setup.certs / "example.com.crt") == serial_of(new)
    assert serial(setup.certs / "upload.example.com.crt") == serial_of(old)


def test_equal_start_goes_to_later_expiry(setup, authority, cli):
    """With the same notBefore, the pair that expires later wins."""
    start = NOW - timedelta(hours=2)
    lineage(
        setup,
        authority,
        "b",
        ["example.com"],
        not_before=start,
        not_after=start + timedelta(days=30),
    )
    longer = lineage(
        setup,
        authority,
        "a",
        ["example.com"],
        not_before=start,
        not_after=start + timedelta(days=60),
    )

    sync(cli, setup)

    assert serial(setup.certs / "example.com.crt") == serial_of(longer)


def test_full_tie_is_decided_the_same_way_every_pass(setup, authority, cli):
    """Two pairs with equal dates never flip between passes."""
    start = NOW - timedelta(hours=2)
    for name in ("example.com", "example.com-0001"):
        lineage(setup, authority, name, ["example.com"], not_before=start)
    sync(cli, setup)
    before = snapshot(setup.certs)

    for _ in range(2):
        assert sync(cli, setup).named("cert.installed") == []
        dry = sync(cli, setup, "--dry-run")
        assert dry.named("cert.would_install") == []

    assert snapshot(setup.certs) == before
    assert setup.reloads() == 1


@pytest.mark.parametrize("layout", ["flat", "directory"])
def test_older_generation_never_replaces_later_expiring_one(
    setup, authority, cli, layout
):
    """live/ pointed back at an older generation keeps the installed pair."""
    setup.settings["install"]["layout"] = layout
    lineage(
        setup,
        authority,
        "example.com",
        ["example.com"],
        not_before=NOW - timedelta(days=40),
    )
    sync(cli, setup)
    renewed = authority.issue(["example.com"])
    setup.tree.renew("example.com", renewed)
    sync(cli, setup)
    relink(setup, "example.com", 1)
    before = snapshot(setup.certs)

    result = sync(cli, setup)

    assert result.code == 0
    assert snapshot(setup.certs) == before
    cert = {
        "flat": setup.certs / "example.com.crt",
        "directory": setup.certs / "example.com" / "fullchain.pem",
    }[layout]
    assert serial(cert) == serial_of(renewed)
    (kept,) = result.named("cert.kept_installed")
    assert kept["host"] == "example.com"
    assert setup.reloads() == 2


def test_invalid_installed_pair_is_replaced_even_by_earlier_expiry(
    setup, authority, cli
):
    """An installed pair whose key no longer matches is not protected."""
    lineage(
        setup,
        authority,
        "example.com",
        ["example.com"],
        not_before=NOW - timedelta(days=40),
    )
    first = authority.issue(["example.com"])
    setup.tree.renew("example.com", first)
    sync(cli, setup)
    key = setup.certs / "example.com.key"
    replace(key, authority.issue(["example.com"]).key_pem)
    os.chmod(key, 0o640)
    relink(setup, "example.com", 1)

    result = sync(cli, setup)

    assert result.code == 0
    assert serial(setup.certs / "example.com.crt") != serial_of(first)
    load_pair(
        setup.certs / "example.com.crt",
        key,
        TrustStore.from_setting(str(setup.roots)),
    )


def test_wildcard_serves_configured_hosts_only(setup, authority, cli):
    """With install.hosts, a wildcard covers exactly one extra label."""
    issued = lineage(
        setup, authority, "example.com", ["example.com", "*.example.com"]
    )
    setup.settings["install"]["hosts"] = [
        "example.com",
        "chat.example.com",
        "a.b.example.com",
    ]

    result = sync(cli, setup)

    assert result.code == 0
    assert set(os.listdir(setup.certs)) == {
        "example.com.crt",
        "example.com.key",
        "chat.example.com.crt",
        "chat.example.com.key",
    }
    assert serial(setup.certs / "chat.example.com.crt") == serial_of(issued)
    (uncovered,) = result.named("host.uncovered")
    assert uncovered["host"] == "a.b.example.com"


def test_wildcard_alone_installs_nothing_without_hosts(setup, authority, cli):
    """A wildcard name never becomes a file name of its own."""
    lineage(setup, authority, "example.com", ["*.example.com"])

    result = sync(cli, setup)

    assert result.code == 0
    assert os.listdir(setup.certs) == []
    assert setup.reloads() == 0


def test_configured_hosts_limit_what_is_installed(setup, authority, cli):
    """Names outside install.hosts are not installed."""
    lineage(
        setup, authority, "example.com", ["example.com", "www.example.com"]
    )
    setup.settings["install"]["hosts"] = ["example.com"]

    sync(cli, setup)

    assert sorted(os.listdir(setup.certs)) == [
        "example.com.crt",
        "example.com.key",
    ]


def test_replaced_hand_placed_files_are_backed_up_under_state(
    setup, authority, cli
):
    """A file certwatchd did not write is copied to state/backups first."""
    old = authority.issue(["example.com"], not_before=NOW - timedelta(days=9))
    place(setup.certs, "example.com", old, key_mode=0o600)
    lineage(setup, authority, "example.com", ["example.com"])

    result = sync(cli, setup)

    assert result.code == 0
    assert sorted(os.listdir(setup.certs)) == [
        "example.com.crt",
        "example.com.key",
    ]
    backups = {p.name: p for p in (setup.state / "backups").rglob("*.*")}
    assert backups["example.com.crt"].read_bytes() == old.fullchain_pem
    assert backups["example.com.key"].read_bytes() == old.key_pem
    assert len(result.named("backup.saved")) == 2


def test_keys_kept_under_state_are_not_readable_by_others(
    setup, authority, cli
):
    """Backed-up and kept keys cannot be reached by other users."""
    old = authority.issue(["example.com"], not_before=NOW - timedelta(days=9))
    place(setup.certs, "example.com", old)
    lineage(setup, authority, "example.com", ["example.com"])
    sync(cli, setup)
    setup.tree.renew("example.com", authority.issue(["example.com"]))
    sync(cli, setup)

    keys = [
        path
        for path in setup.state.rglob("*")
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes()
    ]
    assert keys
    for key in keys:
        parents = [p for p in key.parents if p.is_relative_to(setup.state)]
        assert stat.S_IMODE(key.stat().st_mode) & 0o004 == 0 or any(
            stat.S_IMODE(p.stat().st_mode) & 0o001 == 0 for p in parents
        ), key


def test_our_own_files_are_not_backed_up_again(setup, authority, cli):
    """Replacing a file certwatchd wrote itself makes no backup."""
    lineage(setup, authority, "example.com", ["example.com"])
    sync(cli, setup)
    setup.tree.renew("example.com", authority.issue(["example.com"]))

    result = sync(cli, setup)

    assert result.named("backup.saved") == []
    assert not (setup.state / "backups").exists()


def test_valid_hand_placed_pair_is_corrected_and_kept(setup, authority, cli):
    """A valid pair an operator placed gets owner and modes, then stays."""
    issued = authority.issue(["xmpp.example.net"])
    cert, key = place(setup.certs, "xmpp.example.net", issued, cert_mode=0o600)
    os.chown(key, 0, 0)
    os.chmod(key, 0o644)

    result = sync(cli, setup)

    assert result.code == 0
    assert cert.read_bytes() == issued.fullchain_pem
    assert key.read_bytes() == issued.key_pem
    assert attributes(cert) == (0, gid(), 0o644)
    assert attributes(key) == (0, gid(), 0o640)
    assert {e["path"] for e in result.named("cert.corrected")} == {
        str(cert),
        str(key),
    }
    assert setup.reloads() == 1

    assert sync(cli, setup).code == 0
    assert setup.reloads() == 1


def test_hand_placed_pair_takes_part_in_selection(setup, authority, cli):
    """A newer hand-placed pair beats an older lineage for its host."""
    lineage(
        setup,
        authority,
        "example.com",
        ["example.com", "chat.example.com"],
        not_before=NOW - timedelta(days=5),
    )
    newer = authority.issue(["example.com"])
    cert, _ = place(setup.certs, "example.com", newer)
    inode = cert.stat().st_ino

    result = sync(cli, setup)

    assert result.code == 0
    assert cert.stat().st_ino == inode
    assert serial(cert) == serial_of(newer)
    assert (setup.certs / "chat.example.com.crt").exists()
    assert not (setup.state / "backups").exists()


def test_hand_placed_pair_under_another_name_supplies_its_hosts(
    setup, authority, cli
):
    """A valid legacy.crt covering example.net installs example.net.crt."""
    issued = authority.issue(["example.net"])
    place(setup.certs, "legacy", issued)

    result = sync(cli, setup)

    assert result.code == 0
    assert serial(setup.certs / "example.net.crt") == serial_of(issued)
    assert (setup.certs / "legacy.crt").read_bytes() == issued.fullchain_pem


def test_invalid_hand_placed_pair_is_refused_kept_and_not_reloaded_for(
    setup, authority, cli
):
    """A broken pair an operator placed is reported, left alone, no reload."""
    cert_pem = authority.issue(["bad.example"]).fullchain_pem
    key_pem = authority.issue(["bad.example"]).key_pem
    cert = setup.certs / "bad.example.crt"
    key = setup.certs / "bad.example.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    os.chmod(cert, 0o600)
    os.chmod(key, 0o604)
    before = snapshot(setup.certs)

    result = sync(cli, setup)

    assert result.code == 1
    (refused,) = result.named("cert.refused")
    assert refused["path"] == str(key)
    assert "does not match" in str(refused["reason"])
    assert snapshot(setup.certs) == before
    assert cert.read_bytes() == cert_pem
    assert key.read_bytes() == key_pem
    assert setup.reloads() == 0


def test_directory_layout_installs_private_directories(setup, authority, cli):
    """The directory layout gives each host a 0750 directory of two files."""
    issued = lineage(
        setup, authority, "example.com", ["example.com", "muc.example.com"]
    )
    setup.settings["install"]["layout"] = "directory"

    result = sync(cli, setup)

    assert result.code == 0
    visible = {n for n in os.listdir(setup.certs) if not n.startswith(".")}
    assert visible == {"example.com", "muc.example.com"}
    for host in visible:
        directory = setup.certs / host
        assert directory.is_dir()
        assert attributes(directory) == (0, gid(), 0o750)
        fullchain = directory / "fullchain.pem"
        privkey = directory / "privkey.pem"
        assert sorted(os.listdir(directory)) == [
            "fullchain.pem",
            "privkey.pem",
        ]
        assert fullchain.read_bytes() == issued.fullchain_pem
        assert privkey.read_bytes() == issued.key_pem
        assert attributes(fullchain) == (0, gid(), 0o644)
        assert attributes(privkey) == (0, gid(), 0o640)
    assert setup.reloads() == 1


def test_directory_layout_is_idempotent_and_renews(setup, authority, cli):
    """The directory layout rewrites nothing twice and follows a renewal."""
    lineage(setup, authority, "example.com", ["example.com"])
    setup.settings["install"]["layout"] = "directory"
    sync(cli, setup)
    before = snapshot(setup.certs)

    assert sync(cli, setup).code == 0
    assert snapshot(setup.certs) == before
    assert setup.reloads() == 1

    renewed = authority.issue(["example.com"])
    setup.tree.renew("example.com", renewed)
    assert sync(cli, setup).code == 0
    privkey = setup.certs / "example.com" / "privkey.pem"
    assert privkey.read_bytes() == renewed.key_pem
    hidden = [n for n in os.listdir(setup.certs) if n.startswith(".")]
    assert len(hidden) <= 1
    assert setup.reloads() == 2


def test_directory_layout_backs_up_a_hand_placed_directory(
    setup, authority, cli
):
    """A hand-made <host>/ directory is backed up before it is replaced."""
    old = authority.issue(["example.com"], not_before=NOW - timedelta(days=9))
    directory = setup.certs / "example.com"
    directory.mkdir()
    (directory / "fullchain.pem").write_bytes(old.fullchain_pem)
    (directory / "privkey.pem").write_bytes(old.key_pem)
    issued = lineage(setup, authority, "example.com", ["example.com"])
    setup.settings["install"]["layout"] = "directory"

    result = sync(cli, setup)

    assert result.code == 0
    privkey = setup.certs / "example.com" / "privkey.pem"
    assert privkey.read_bytes() == issued.key_pem
    (saved,) = (setup.state / "backups").rglob("privkey.pem")
    assert saved.read_bytes() == old.key_pem
    assert not list(setup.certs.rglob("*backup*"))


def test_switching_layout_leaves_no_stale_flat_pair(setup, authority, cli):
    """After a switch to directories, Prosody finds only the new pair."""
    lineage(setup, authority, "example.com", ["example.com"])
    sync(cli, setup)
    setup.settings["install"]["layout"] = "directory"
    renewed = authority.issue(["example.com"])
    setup.tree.renew("example.com", renewed)

    sync(cli, setup)

    flat = setup.certs / "example.com.crt"
    assert not flat.exists() or serial(flat) == serial_of(renewed)


def test_hand_placed_directory_gets_the_directory_mode(setup, authority, cli):
    """A valid hand-made <host>/ directory is corrected to 0750."""
    setup.settings["install"]["layout"] = "directory"
    issued = authority.issue(["example.com"])
    directory = setup.certs / "example.com"
    directory.mkdir()
    os.chmod(directory, 0o755)  # noqa: S103 - the mode to be corrected
    (directory / "fullchain.pem").write_bytes(issued.fullchain_pem)
    (directory / "privkey.pem").write_bytes(issued.key_pem)

    assert sync(cli, setup).code == 0

    assert attributes(directory) == (0, gid(), 0o750)


@pytest.mark.parametrize("layout", ["flat", "directory"])
def test_no_temporary_file_is_left_behind(setup, authority, cli, layout):
    """After a pass, only the installed names remain."""
    lineage(setup, authority, "example.com", ["example.com", "a.example.com"])
    setup.settings["install"]["layout"] = layout

    sync(cli, setup)
    setup.tree.renew("example.com", authority.issue(["example.com"]))
    sync(cli, setup)

    leftovers = [
        p
        for directory in (setup.certs, setup.state)
        for p in directory.rglob("*")
        if p.name.endswith((".tmp", "~")) or ".tmp" in p.name
    ]
    assert leftovers == []


def test_stale_temporary_files_are_removed_at_start(setup, authority, cli):
    """Temporaries and unused versions left by a crash are removed."""
    stale_file = setup.certs / ".certwatchd-0123456789abcdef.tmp"
    stale_file.write_bytes(authority.issue(["example.com"]).key_pem)
    stale_version = setup.certs / ".certwatchd-example.com-0123456789ab"
    stale_version.mkdir()
    (stale_version / "privkey.pem").write_bytes(b"")
    unrelated = setup.certs / ".keep"
    unrelated.write_bytes(b"")

    result = sync(cli, setup)

    assert result.code == 0
    assert not stale_file.exists()
    assert not stale_version.exists()
    assert unrelated.exists()
    removed = {e["path"] for e in result.named("install.stale_removed")}
    assert removed == {str(stale_file), str(stale_version)}


def test_dry_run_changes_nothing_and_names_what_it_would_do(
    setup, authority, cli
):
    """--dry-run reports the hosts it would install and touches nothing."""
    lineage(setup, authority, "example.com", ["example.com", "a.example.com"])
    issued = authority.issue(["example.net"])
    place(setup.certs, "example.net", issued, cert_mode=0o600)
    stale = setup.certs / ".certwatchd-0123456789abcdef.tmp"
    stale.write_bytes(b"")
    config = setup.config
    before = snapshot(setup.root)

    result = cli("sync", "--config", str(config), "--dry-run")

    assert result.code == 0
    would = {e["host"] for e in result.named("cert.would_install")}
    assert would == {"example.com", "a.example.com"}
    corrections = {e["path"] for e in result.named("cert.would_correct")}
    assert str(setup.certs / "example.net.crt") in corrections
    assert snapshot(setup.root) == before
    assert not setup.state.exists()
    assert setup.reloads() == 0


def test_refused_lineage_fails_the_pass_but_others_install(
    setup, authority, cli
):
    """One bad lineage makes sync exit 1 while good ones still install."""
    lineage(setup, authority, "example.com", ["example.com"])
    lineage(setup, authority, "example.org", ["example.org"])
    replace(
        archived(setup, "example.org", "privkey"),
        authority.issue(["example.org"]).key_pem,
    )

    result = sync(cli, setup)

    assert result.code == 1
    assert sorted(os.listdir(setup.certs)) == [
        "example.com.crt",
        "example.com.key",
    ]
    assert setup.reloads() == 1


def test_failing_reload_command_fails_the_pass(setup, authority, cli):
    """A reload command exiting non-zero makes sync exit 1."""
    script = "import sys; print('no pidfile'); sys.exit(3)"
    setup.settings["reload"]["command"] = [sys.executable, "-c", script]
    lineage(setup, authority, "example.com", ["example.com"])

    result = sync(cli, setup)

    assert result.code == 1
    (failed,) = result.named("reload.failed")
    assert failed["rc"] == 3
    assert failed["output"] == "no pidfile"
    assert (setup.certs / "example.com.crt").exists()


def test_missing_reload_binary_fails_the_pass(setup, authority, cli):
    """A reload command that does not exist is an error, not a crash."""
    missing = str(setup.root / "no-such-prosodyctl")
    setup.settings["reload"]["command"] = [missing, "reload"]
    lineage(setup, authority, "example.com", ["example.com"])

    result = sync(cli, setup)

    assert result.code == 1
    (failed,) = result.named("reload.failed")
    assert missing in str(failed["error"])
    assert "No such file" in str(failed["error"])


def test_mid_renewal_lineage_is_skipped_without_error(setup, authority, cli):
    """A lineage caught between certbot's swaps keeps its installed pair."""
    old = lineage(setup, authority, "example.com", ["example.com"])
    lineage(setup, authority, "example.org", ["example.org"])
    sync(cli, setup)
    renewed = authority.issue(["example.com"])
    interrupt_renewal(setup, "example.com", renewed, swapped=2)
    setup.tree.renew("example.org", authority.issue(["example.org"]))

    result = sync(cli, setup)

    assert result.code == 0
    assert result.named("cert.refused") == []
    (pending,) = result.named("lineage.pending")
    assert pending["lineage"] == "example.com"
    assert serial(setup.certs / "example.com.crt") == serial_of(old)
    assert (setup.certs / "example.com.key").read_bytes() == old.key_pem
    assert [e["host"] for e in result.named("cert.installed")] == [
        "example.org"
    ]


@pytest.mark.parametrize("swapped", [0, 1, 2, 3, 4])
def test_no_part_of_an_interrupted_renewal_is_installed(
    setup, authority, cli, swapped
):
    """At every step of certbot's swap order, nothing of it is installed."""
    lineage(setup, authority, "example.com", ["example.com"])
    interrupt_renewal(
        setup, "example.com", authority.issue(["example.com"]), swapped
    )

    result = sync(cli, setup)

    assert result.code == 0
    assert os.listdir(setup.certs) == []
    assert len(result.named("lineage.pending")) == 1
    assert setup.reloads() == 0


def test_lineage_with_a_missing_link_is_pending(setup, authority, cli):
    """Between certbot's unlink and symlink a lineage is skipped."""
    lineage(setup, authority, "example.com", ["example.com"])
    (setup.tree.live / "example.com" / "privkey.pem").unlink()

    result = sync(cli, setup)

    assert result.code == 0
    assert os.listdir(setup.certs) == []
    assert result.named("cert.refused") == []


def make_fifo(path):
    path.unlink()
    os.mkfifo(path)


def make_device_link(path):
    path.unlink()
    path.symlink_to("/dev/zero")


def make_directory(path):
    path.unlink()
    path.mkdir()


SPECIAL = {
    "fifo": make_fifo,
    "device": make_device_link,
    "directory": make_directory,
    "missing": os.unlink,
}


def encrypted(key_pem, *, traditional):
    key = serialization.load_pem_private_key(key_pem, None)
    form = serialization.PrivateFormat
    return key.private_bytes(
        serialization.Encoding.PEM,
        form.TraditionalOpenSSL if traditional else form.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


def der(cert_pem):
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.public_bytes(serialization.Encoding.DER)


def other_key(_):
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# case: (Authority.issue options, archive file replaced, new content, reason)
BREAKAGES = {
    "key of another pair": ({}, "privkey", other_key, "does not match"),
    "expired": (
        {
            "not_before": NOW - timedelta(days=100),
            "not_after": NOW - timedelta(days=1),
        },
        "fullchain",
        None,
        "expired",
    ),
    "not yet valid": (
        {"not_before": NOW + timedelta(days=1)},
        "fullchain",
        None,
        "not valid before",
    ),
    "no DNS name": (
        {"names": [], "common_name": "example.com"},
        "fullchain",
        None,
        "no DNS name",
    ),
    "path traversal in a name": (
        {"names": ["example.com", "../../etc/example.com"]},
        "fullchain",
        None,
        "not a lower-case DNS name",
    ),
    "slash in a name": (
        {"names": ["example.com", "evil/example.com"]},
        "fullchain",
        None,
        "not a lower-case DNS name",
    ),
    "empty label": (
        {"names": ["example..com"]},
        "fullchain",
        None,
        "not a lower-case DNS name",
    ),
    "upper-case name": (
        {"names": ["Example.COM"]},
        "fullchain",
        None,
        "not a lower-case DNS name",
    ),
    "RSA key of 1024 bits": (
        {"key_type": "rsa", "rsa_bits": 1024},
        "privkey",
        None,
        "1024-bit",
    ),
    "PKCS8 encrypted key": (
        {},
        "privkey",
        lambda i: encrypted(i.key_pem, traditional=False),
        "encrypted",
    ),
    "traditional encrypted key": (
        {},
        "privkey",
        lambda i: encrypted(i.key_pem, traditional=True),
        "encrypted",
    ),
    "chain before the leaf": (
        {},
        "fullchain",
        lambda i: i.chain_pem + i.cert_pem,
        "leaf",
    ),
    "DER certificate": (
        {},
        "fullchain",
        lambda i: der(i.cert_pem),
        "DER",
    ),
    "key in the certificate file": (
        {},
        "fullchain",
        lambda i: i.key_pem,
        "private key",
    ),
    "file over 1 MiB": (
        {},
        "fullchain",
        lambda i: i.fullchain_pem + b"\n" * (1 << 20),
        "1 MiB",
    ),
    "empty key": ({}, "privkey", lambda _: b"", "empty"),
    "FIFO as key": ({}, "privkey", "fifo", "FIFO"),
    "/dev/zero as key": ({}, "privkey", "device", "device"),
    "directory as certificate": ({}, "fullchain", "directory", "directory"),
    "dangling link": ({}, "privkey", "missing", "does not exist"),
    "chain from an untrusted root": (
        {"authority": "other"},
        "fullchain",
        None,
        "does not verify",
    ),
    "missing intermediate": (
        {},
        "fullchain",
        lambda i: i.cert_pem,
        "does not verify",
    ),
}


@pytest.fixture(scope="module")
def stranger():
    return Authority.create("certwatchd stranger CA")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", BREAKAGES, ids=list(BREAKAGES))
def test_broken_lineage_is_refused_with_path_and_reason(
    setup, authority, stranger, cli, case
):
    """Each validation rule refuses the pair, names it and installs none."""
    options, kind, content, reason = BREAKAGES[case]
    options = dict(options)
    names = options.pop("names", ["example.com"])
    issuer = stranger if options.pop("authority", None) else authority
    issued = issuer.issue(names, **options)
    setup.tree.create_lineage("example.com", issued)
    target = archived(setup, "example.com", kind)
    if isinstance(content, str):
        SPECIAL[content](target)
    elif content is not None:
        replace(target, content(issued))
    file_name = target.name

    result = sync(cli, setup)

    assert result.code == 1
    (refused,) = result.named("cert.refused")
    assert str(refused["path"]).endswith(file_name)
    assert "example.com" in str(refused["path"])
    assert reason in str(refused["reason"])
    assert os.listdir(setup.certs) == []
    assert setup.reloads() == 0


def test_trust_none_skips_chain_verification(setup, stranger, cli):
    """With trust = "none", a chain from an unknown root is accepted."""
    issued = stranger.issue(["example.com"])
    setup.tree.create_lineage("example.com", issued)
    setup.settings["validation"]["trust"] = "none"

    result = sync(cli, setup)

    assert result.code == 0
    assert (setup.certs / "example.com.crt").exists()


def test_trust_system_refuses_a_private_root(setup, authority, cli):
    """With trust = "system", the throwaway CA is not trusted."""
    lineage(setup, authority, "example.com", ["example.com"])
    setup.settings["validation"]["trust"] = "system"

    result = sync(cli, setup)

    assert result.code == 1
    (refused,) = result.named("cert.refused")
    assert "does not verify" in str(refused["reason"])


def test_wrong_roots_file_refuses(setup, authority, stranger, cli):
    """Trusting another root refuses chains from ours."""
    lineage(setup, authority, "example.com", ["example.com"])
    other = stranger.write_roots(setup.root / "other-roots.pem")
    setup.settings["validation"]["trust"] = str(other)

    result = sync(cli, setup)

    assert result.code == 1
    assert os.listdir(setup.certs) == []


def test_symlink_at_target_is_replaced_not_written_through(
    setup, authority, cli
):
    """A link planted at <host>.key cannot make certwatchd write elsewhere."""
    outside = setup.root / "outside"
    outside.write_bytes(b"untouched")
    (setup.certs / "example.com.key").symlink_to(outside)
    issued = lineage(setup, authority, "example.com", ["example.com"])

    assert sync(cli, setup).code == 0

    assert outside.read_bytes() == b"untouched"
    key = setup.certs / "example.com.key"
    assert not key.is_symlink()
    assert key.read_bytes() == issued.key_pem


def test_broken_hand_placed_pair_is_never_deleted(setup, authority, cli):
    """A refused pair keeps its bytes even when a reload happens anyway."""
    cert_pem = authority.issue(["bad.example"]).fullchain_pem
    key_pem = authority.issue(["bad.example"]).key_pem
    (setup.certs / "bad.example.crt").write_bytes(cert_pem)
    (setup.certs / "bad.example.key").write_bytes(key_pem)
    lineage(setup, authority, "example.com", ["example.com"])

    result = sync(cli, setup)

    assert result.code == 1
    assert setup.reloads() == 1
    kept = {
        p.read_bytes()
        for directory in (setup.certs, setup.state)
        for p in directory.rglob("bad.example.*")
    }
    assert {cert_pem, key_pem} <= kept


def test_pair_installed_over_a_broken_one_stays_installed(
    setup, authority, cli
):
    """A valid pair replacing a broken hand-placed one at its path stays."""
    cert = setup.certs / "example.com.crt"
    key = setup.certs / "example.com.key"
    cert.write_bytes(authority.issue(["example.com"]).fullchain_pem)
    key.write_bytes(authority.issue(["example.com"]).key_pem)
    issued = lineage(setup, authority, "example.com", ["example.com"])

    sync(cli, setup)

    assert key.exists()
    assert key.read_bytes() == issued.key_pem
    assert cert.read_bytes() == issued.fullchain_pem


def test_fifo_in_place_of_an_installed_file_does_not_hang(setup, authority):
    """A FIFO planted where certwatchd installed a file cannot stall sync."""
    lineage(setup, authority, "example.com", ["example.com"])
    command = [sys.executable, "-m", "certwatchd", "sync"]
    command += ["--config", str(setup.config)]
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    make_fifo(setup.certs / "example.com.crt")

    # A hang never ends; the timeout only leaves room for a loaded
    # machine to start Python and run the pass.
    try:
        finished = subprocess.run(
            command, capture_output=True, timeout=15, check=False
        )
    except subprocess.TimeoutExpired:
        finished = None

    assert finished is not None


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))


def test_device_link_in_place_of_an_installed_key_is_bounded(setup, authority):
    """A link to /dev/zero where a key was installed is read boundedly."""
    lineage(setup, authority, "example.com", ["example.com"])
    command = [sys.executable, "-m", "certwatchd", "sync"]
    command += ["--config", str(setup.config)]
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    make_device_link(setup.certs / "example.com.key")

    finished = subprocess.run(
        command,
        capture_output=True,
        timeout=30,
        preexec_fn=limit_memory,
        check=False,
    )

    assert b"MemoryError" not in finished.stderr
    assert finished.returncode in {0, 1}


def test_validation_spread_over_processes_installs_and_refuses(
    setup, authority, cli, monkeypatch
):
    """Pairs validated in child processes install, or are refused, alike."""
    import certwatchd.checker  # noqa: PLC0415

    forked = []
    fork = certwatchd.checker.fork_validation

    def counting_fork(*args):
        forked.append(len(args[0]))
        return fork(*args)

    monkeypatch.setattr(certwatchd.checker, "_PER_WORKER", 2)
    monkeypatch.setattr(certwatchd.checker, "fork_validation", counting_fork)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2})
    issued = {
        f"host{index}.example": lineage(
            setup, authority, f"host{index}.example", [f"host{index}.example"]
        )
        for index in range(8)
    }
    broken = archived(setup, "host3.example", "privkey")
    replace(broken, other_key(None))

    result = sync(cli, setup)

    assert forked == [3, 2]
    assert result.code == 1
    (refused,) = result.named("cert.refused")
    assert str(refused["path"]).endswith("host3.example/privkey1.pem")
    assert "does not match" in str(refused["reason"])
    for host, pair in issued.items():
        cert = setup.certs / f"{host}.crt"
        if host == "host3.example":
            assert not cert.exists()
        else:
            assert cert.read_bytes() == pair.fullchain_pem
            assert (setup.certs / f"{host}.key").read_bytes() == pair.key_pem
    assert len(result.named("cert.validated")) == 7


def test_pairs_recalled_by_stat_signature_install_whole_files(
    setup, authority, cli, monkeypatch
):
    """Unchanged files are recalled unread; what changes is still seen."""
    import certwatchd.cache  # noqa: PLC0415
    import certwatchd.checker  # noqa: PLC0415
    import certwatchd.state  # noqa: PLC0415
    import certwatchd.sync  # noqa: PLC0415

    # Recall from disk as with thousands of hosts, and trust stat
    # signatures at once instead of after two seconds of quiet.
    monkeypatch.setattr(certwatchd.sync, "_KEPT_IN_MEMORY", 0)
    for module in (certwatchd.checker, certwatchd.cache, certwatchd.state):
        monkeypatch.setattr(module, "_SETTLED_NS", 0)
    recalled = []
    recall = certwatchd.checker.Checker._recall_unread  # noqa: SLF001

    def counting_recall(self, *args):
        pair = recall(self, *args)
        recalled.append(pair is not None)
        return pair

    monkeypatch.setattr(
        certwatchd.checker.Checker, "_recall_unread", counting_recall
    )
    names = ["example.com", "conference.example.com", "upload.example.com"]
    lineage(setup, authority, "example.com", names)
    other = lineage(setup, authority, "example.org", ["example.org"])
    assert sync(cli, setup).code == 0
    assert sync(cli, setup).code == 0
    before = snapshot(setup.certs)

    recalled.clear()
    unchanged = sync(cli, setup)
    after = snapshot(setup.certs)
    assert recalled == [True, True]
    renewed = authority.issue(names)
    setup.tree.renew("example.com", renewed)
    replace(setup.certs / "example.org.crt", b"not what was installed\n")
    changed = sync(cli, setup)

    assert unchanged.code == 0
    assert unchanged.named("cert.installed") == []
    assert after == before
    # The file put in place of ours is refused as a source, and replaced.
    assert changed.code == 1
    (refused,) = changed.named("cert.refused")
    assert str(refused["path"]) == str(setup.certs / "example.org.crt")
    installed = {event["host"] for event in changed.named("cert.installed")}
    assert installed == {*names, "example.org"}
    for host in names:
        cert = setup.certs / f"{host}.crt"
        assert cert.read_bytes() == renewed.fullchain_pem
        assert (setup.certs / f"{host}.key").read_bytes() == renewed.key_pem
    org = setup.certs / "example.org.crt"
    assert org.read_bytes() == other.fullchain_pem
