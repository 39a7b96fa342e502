import errno
import grp
import os
import stat
import threading

import pytest

from certwatchd.certificate import (
    parse_certificates,
    parse_private_key,
    same_public_key,
)
from certwatchd.config import Ownership
from certwatchd.errors import InstallError
from certwatchd.install import (
    Content,
    Installer,
    Modes,
    host_paths,
    is_version_dir,
)
from certwatchd.state import StateDir


def gid():
    return grp.getgrnam("prosody").gr_gid


def installer(setup, layout="flat"):
    modes = Modes(Ownership(0, gid()), 0o644, 0o640)
    return Installer(
        setup.certs, layout, modes, StateDir(setup.state, setup.certs)
    )


def content(issued, host="example.com"):
    return Content(host, issued.fullchain_pem, issued.key_pem)


def attributes(path):
    info = os.stat(path)
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def matches(cert_path, key_path):
    certs = parse_certificates(cert_path.read_bytes(), cert_path)
    key = parse_private_key(key_path.read_bytes(), key_path)
    return same_public_key(key, certs.leaf)


@pytest.fixture(scope="module")
def issued(authority):
    return authority.issue(["example.com"])


def test_host_paths_follow_prosody_names(tmp_path):
    """Flat and directory layouts use the names Prosody looks up."""
    assert host_paths(tmp_path, "flat", "a.example") == (
        tmp_path / "a.example.crt",
        tmp_path / "a.example.key",
    )
    assert host_paths(tmp_path, "directory", "a.example") == (
        tmp_path / "a.example" / "fullchain.pem",
        tmp_path / "a.example" / "privkey.pem",
    )


def test_flat_install_writes_both_files_privately(setup, issued):
    """A flat install gives the key 0640 and the certificate 0644."""
    done = installer(setup).install([content(issued)])

    assert done == ["example.com"]
    cert = setup.certs / "example.com.crt"
    key = setup.certs / "example.com.key"
    assert cert.read_bytes() == issued.fullchain_pem
    assert key.read_bytes() == issued.key_pem
    assert attributes(cert) == (0, gid(), 0o644)
    assert attributes(key) == (0, gid(), 0o640)


def test_unchanged_content_needs_no_write(setup, issued):
    """After an install, the same content is recognised as in place."""
    subject = installer(setup)
    assert subject.needs_write(content(issued))
    subject.install([content(issued)])
    inode = (setup.certs / "example.com.key").stat().st_ino

    assert not subject.needs_write(content(issued))
    subject.install([content(issued)])

    assert (setup.certs / "example.com.key").stat().st_ino == inode


def test_modes_do_not_depend_on_the_umask(setup, issued):
    """Files get exactly the configured modes under any umask."""
    old = os.umask(0o077)
    try:
        installer(setup).install([content(issued)])
    finally:
        os.umask(old)

    assert attributes(setup.certs / "example.com.crt")[2] == 0o644
    assert attributes(setup.certs / "example.com.key")[2] == 0o640


def test_directory_layout_links_host_to_a_hidden_version(setup, issued):
    """<host> is a link to a dot-directory of mode 0750 holding the pair."""
    installer(setup, "directory").install([content(issued)])

    link = setup.certs / "example.com"
    target = setup.certs / os.readlink(link)
    assert target.name.startswith(".")
    assert is_version_dir(target)
    assert attributes(target) == (0, gid(), 0o750)
    assert attributes(link / "privkey.pem") == (0, gid(), 0o640)
    assert attributes(link / "fullchain.pem") == (0, gid(), 0o644)


def test_directory_reinstall_removes_the_previous_version(
    setup, authority, issued
):
    """Switching a host to a new version leaves one version behind."""
    subject = installer(setup, "directory")
    subject.install([content(issued)])
    renewed = authority.issue(["example.com"])

    subject.install([content(renewed)])

    hidden = [n for n in os.listdir(setup.certs) if n.startswith(".")]
    assert len(hidden) == 1
    privkey = setup.certs / "example.com" / "privkey.pem"
    assert privkey.read_bytes() == renewed.key_pem


def test_correct_sets_owner_and_mode_in_place(setup, issued):
    """correct() gives a file its configured owner and mode, same inode."""
    key = setup.certs / "example.com.key"
    key.write_bytes(issued.key_pem)
    os.chmod(key, 0o604)
    inode = key.stat().st_ino

    installer(setup).correct(key, 0o640)

    assert attributes(key) == (0, gid(), 0o640)
    assert key.stat().st_ino == inode


def test_correct_refuses_a_symlink(setup, issued):
    """correct() never follows a link out of the directory."""
    outside = setup.root / "outside.key"
    outside.write_bytes(issued.key_pem)
    os.chmod(outside, 0o600)
    link = setup.certs / "example.com.key"
    link.symlink_to(outside)

    with pytest.raises(InstallError):
        installer(setup).correct(link, 0o640)

    assert attributes(outside) == (0, 0, 0o600)


def test_install_replaces_a_planted_link_without_following_it(setup, issued):
    """A link at the target is replaced; the file it names is untouched."""
    outside = setup.root / "outside"
    outside.write_bytes(b"untouched")
    (setup.certs / "example.com.crt").symlink_to(outside)

    installer(setup).install([content(issued)])

    assert outside.read_bytes() == b"untouched"
    assert not (setup.certs / "example.com.crt").is_symlink()


def test_remove_stale_clears_crash_leftovers_only(setup, issued):
    """Temporaries and unused versions go; the live version stays."""
    subject = installer(setup, "directory")
    subject.install([content(issued)])
    live = setup.certs / os.readlink(setup.certs / "example.com")
    temporary = setup.certs / ".certwatchd-00112233aabbccdd.tmp"
    temporary.write_bytes(issued.key_pem)
    unused = setup.certs / ".certwatchd-example.com-001122334455"
    unused.mkdir()
    other = setup.certs / ".hidden"
    other.write_bytes(b"")

    removed = subject.remove_stale()

    assert set(removed) == {temporary, unused}
    assert live.is_dir()
    assert other.exists()
    assert (setup.certs / "example.com" / "privkey.pem").exists()


def test_remove_stale_clears_a_version_left_before_its_rename(setup, issued):
    """A crash between the temporary link and its rename leaves nothing."""
    version = setup.certs / ".certwatchd-example.com-001122334455"
    version.mkdir()
    (version / "privkey.pem").write_bytes(issued.key_pem)
    (setup.certs / ".certwatchd-00112233aabbccdd.tmp").symlink_to(version.name)

    installer(setup, "directory").remove_stale()

    assert os.listdir(setup.certs) == []


def observe(directory, stop, seen):
    """Read every file under ``directory`` until ``stop``, noting keys."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    while not stop.is_set():
        names = set(os.listdir(directory))
        seen["listings"].append(names)
        for root, _, files in os.walk(directory):
            for name in files:
                try:
                    fd = os.open(os.path.join(root, name), flags)
                except OSError:
                    continue
                try:
                    info = os.fstat(fd)
                    data = os.read(fd, 1 << 16)
                finally:
                    os.close(fd)
                if b"PRIVATE KEY" in data:
                    seen["keys"] += 1
                    mode = stat.S_IMODE(info.st_mode)
                    if mode & 0o007 or (mode & 0o070 and info.st_gid != gid()):
                        seen["exposed"].append((name, oct(mode)))


@pytest.mark.parametrize("layout", ["flat", "directory"])
def test_key_is_never_readable_beyond_owner_and_group(
    setup, authority, layout
):
    """While installing, no key is ever readable by other users."""
    first = authority.issue(["example.com"])
    second = authority.issue(["example.com"])
    hosts = [f"h{n}.example.com" for n in range(25)]
    subject = installer(setup, layout)
    seen = {"keys": 0, "exposed": [], "listings": []}
    stop = threading.Event()
    watcher = threading.Thread(
        target=observe, args=(setup.certs, stop, seen), daemon=True
    )
    old = os.umask(0)
    watcher.start()
    try:
        for round_ in range(4):
            issued = first if round_ % 2 else second
            subject.install([content(issued, host) for host in hosts])
    finally:
        stop.set()
        watcher.join()
        os.umask(old)

    assert seen["keys"] > 0
    assert seen["exposed"] == []


def test_certificate_never_appears_before_its_key(setup, authority):
    """On a first flat install, no <host>.crt is seen without <host>.key."""
    issued = authority.issue(["example.com"])
    subject = installer(setup)
    seen = {"keys": 0, "exposed": [], "listings": []}
    stop = threading.Event()
    watcher = threading.Thread(
        target=observe, args=(setup.certs, stop, seen), daemon=True
    )
    watcher.start()
    try:
        for round_ in range(6):
            hosts = [f"r{round_}-{n}.example.com" for n in range(20)]
            subject.install([content(issued, host) for host in hosts])
    finally:
        stop.set()
        watcher.join()

    assert seen["listings"]
    for names in seen["listings"]:
        for name in names:
            if name.endswith(".crt"):
                assert name.removesuffix(".crt") + ".key" in names


def test_no_temporary_file_remains_after_install(setup, authority):
    """An install leaves only the final names in the directory."""
    issued = authority.issue(["example.com"])
    hosts = [f"h{n}.example.com" for n in range(5)]

    installer(setup).install([content(issued, host) for host in hosts])

    assert sorted(os.listdir(setup.certs)) == sorted(
        f"{host}.{suffix}" for host in hosts for suffix in ("crt", "key")
    )


def test_failed_certificate_rename_leaves_the_old_pair_matching(
    setup, authority, monkeypatch
):
    """If the certificate cannot be renamed, the old pair stays usable."""
    subject = installer(setup)
    subject.install([content(authority.issue(["example.com"]))])
    real_rename = os.rename

    def failing_rename(source, target):
        if str(target).endswith(".crt"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", failing_rename)
    done = subject.install([content(authority.issue(["example.com"]))])
    monkeypatch.undo()

    assert done == []
    assert matches(
        setup.certs / "example.com.crt", setup.certs / "example.com.key"
    )


@pytest.mark.parametrize("layout", ["flat", "directory"])
def test_failed_flush_installs_nothing_and_leaves_no_temporary(
    setup, authority, monkeypatch, layout
):
    """A disk that cannot flush leaves the old files and no temporaries."""
    old = authority.issue(["example.com"])
    subject = installer(setup, layout)
    subject.install([content(old)])

    def failing_sync(_):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("certwatchd.install._syncfs", failing_sync)
    monkeypatch.setattr(os, "fsync", failing_sync)
    done = subject.install([content(authority.issue(["example.com"]))])
    monkeypatch.undo()

    assert done == []
    _, key = subject.paths("example.com")
    assert key.read_bytes() == old.key_pem
    hidden = [n for n in os.listdir(setup.certs) if n.startswith(".")]
    assert len(hidden) == {"flat": 0, "directory": 1}[layout]
    assert not [p for p in setup.certs.rglob("*") if ".tmp" in p.name]
