import errno
import os
from pathlib import Path

import pytest

from certwatchd.errors import PairError
from certwatchd.sandbox import LetsEncryptTree
from certwatchd.sources import (
    Pending,
    Source,
    hand_placed,
    list_lineages,
    read_lineage,
)

KINDS = ("cert", "privkey", "chain", "fullchain")


@pytest.fixture
def tree(tmp_path):
    return LetsEncryptTree(tmp_path / "letsencrypt")


@pytest.fixture(scope="module")
def issued(authority):
    return authority.issue(["example.com"])


def relink(tree, name, version, kinds):
    live = tree.live / name
    for kind in kinds:
        link = live / f"{kind}.pem"
        link.unlink()
        link.symlink_to(f"../../archive/{name}/{kind}{version}.pem")


def interrupt(tree, name, issued, swapped, *, gap=False):
    """Leave ``name`` as certbot does after ``swapped`` of its swaps.

    With ``gap`` the next link is unlinked but not yet re-created.
    """
    live = tree.live / name
    old = tree.version(name)
    tree.renew(name, issued)
    relink(tree, name, old, KINDS[swapped:])
    for kind in KINDS:
        target = tree.archive / name / f"{kind}{old}.pem"
        (live / f"previous_{kind}.pem").symlink_to(target)
    if gap:
        (live / f"{KINDS[swapped]}.pem").unlink()


def test_lineages_are_the_directories_under_live(tree, issued):
    """README, stray files, dot-names and links to directories are skipped."""
    for name in ("example.com", "example.com-0001", "b.example"):
        tree.create_lineage(name, issued)
    (tree.live / "notes.txt").write_text("x")
    (tree.live / ".hidden").mkdir()
    (tree.live / "alias").symlink_to(tree.live / "b.example")

    assert list_lineages(tree.live) == [
        "b.example",
        "example.com",
        "example.com-0001",
    ]


def test_missing_live_directory_has_no_lineages(tmp_path):
    """A missing live directory is simply empty."""
    assert list_lineages(tmp_path / "nowhere") == []


def test_settled_lineage_reads_through_to_the_archive(tree, issued):
    """A settled lineage names the archive files its links point at now."""
    tree.create_lineage("example.com-0001", issued)

    source = read_lineage(tree.live, "example.com-0001")

    assert isinstance(source, Source)
    assert source.key == "letsencrypt:example.com-0001"
    assert source.shown == tree.live / "example.com-0001"
    assert os.path.realpath(source.cert_path) == str(
        tree.archive / "example.com-0001" / "fullchain1.pem"
    )
    assert os.path.realpath(source.key_path) == str(
        tree.archive / "example.com-0001" / "privkey1.pem"
    )


def test_renewed_lineage_reads_the_new_generation(tree, authority, issued):
    """After a complete renewal the next version is read."""
    tree.create_lineage("example.com", issued)
    tree.renew("example.com", authority.issue(["example.com"]))

    source = read_lineage(tree.live, "example.com")

    assert isinstance(source, Source)
    assert source.cert_path.name == "fullchain2.pem"
    assert source.key_path.name == "privkey2.pem"


def test_pinned_paths_survive_a_later_swap(tree, authority, issued):
    """The paths read stay one generation even if certbot moves on."""
    tree.create_lineage("example.com", issued)
    source = read_lineage(tree.live, "example.com")

    tree.renew("example.com", authority.issue(["example.com"]))

    assert source.cert_path.read_bytes() == issued.fullchain_pem
    assert source.key_path.read_bytes() == issued.key_pem


@pytest.mark.parametrize("reads", [1, 2, 3, 4, 5, 6])
def test_a_renewal_between_link_reads_never_tears_the_pair(
    tree, authority, issued, monkeypatch, reads
):
    """A renewal landing while the links are read gives one generation.

    The race cannot be timed for real, so the renewal is run from inside
    the ``reads``-th readlink of the lineage, before it answers.
    """
    import certwatchd.sources  # noqa: PLC0415

    tree.create_lineage("example.com", issued)
    renewed = authority.issue(["example.com"])
    real_readlink = os.readlink
    calls = []

    def readlink_with_a_renewal(path):
        calls.append(path)
        if len(calls) == reads:
            tree.renew("example.com", renewed)
        return real_readlink(path)

    monkeypatch.setattr(
        certwatchd.sources.os, "readlink", readlink_with_a_renewal
    )
    item = read_lineage(tree.live, "example.com")
    monkeypatch.undo()

    if isinstance(item, Pending):
        return
    pairs = {
        (issued.fullchain_pem, issued.key_pem),
        (renewed.fullchain_pem, renewed.key_pem),
    }
    read = (item.cert_path.read_bytes(), item.key_path.read_bytes())
    assert read in pairs


@pytest.mark.parametrize("swapped", [0, 1, 2, 3, 4])
def test_every_step_of_a_renewal_is_pending(tree, authority, issued, swapped):
    """While previous_* links exist, the lineage is pending."""
    tree.create_lineage("example.com", issued)
    interrupt(tree, "example.com", authority.issue(["example.com"]), swapped)

    item = read_lineage(tree.live, "example.com")

    assert isinstance(item, Pending)
    assert item.key == "letsencrypt:example.com"


@pytest.mark.parametrize("swapped", [0, 1, 2, 3])
def test_a_link_caught_between_unlink_and_symlink_is_pending(
    tree, authority, issued, swapped
):
    """A lineage with one link missing mid-swap is pending."""
    tree.create_lineage("example.com", issued)
    interrupt(
        tree,
        "example.com",
        authority.issue(["example.com"]),
        swapped,
        gap=True,
    )

    assert isinstance(read_lineage(tree.live, "example.com"), Pending)


@pytest.mark.parametrize("swapped", [1, 2, 3])
def test_mixed_versions_without_previous_links_are_pending(
    tree, authority, issued, swapped
):
    """Links at different archive versions mean the lineage is unsettled."""
    tree.create_lineage("example.com", issued)
    tree.renew("example.com", authority.issue(["example.com"]))
    relink(tree, "example.com", 1, KINDS[swapped:])

    item = read_lineage(tree.live, "example.com")

    assert isinstance(item, Pending)
    assert "different archive versions" in item.reason


def test_settled_flag_takes_links_as_they_are(tree, authority, issued):
    """With settled, a mixed lineage is read and left to validation."""
    tree.create_lineage("example.com", issued)
    tree.renew("example.com", authority.issue(["example.com"]))
    relink(tree, "example.com", 1, ["fullchain"])

    assert isinstance(
        read_lineage(tree.live, "example.com", settled=True), Source
    )


def test_rolled_back_lineage_is_settled(tree, authority, issued):
    """All four links back on an older version is a settled lineage."""
    tree.create_lineage("example.com", issued)
    tree.renew("example.com", authority.issue(["example.com"]))
    relink(tree, "example.com", 1, KINDS)

    source = read_lineage(tree.live, "example.com")

    assert isinstance(source, Source)
    assert source.cert_path.name == "fullchain1.pem"


def test_a_live_link_out_of_the_archive_is_no_renewal(tree, authority, issued):
    """A link certbot never makes is read through at once, not waited on."""
    tree.create_lineage("example.com", issued)
    tree.renew("example.com", authority.issue(["example.com"]))
    link = tree.live / "example.com" / "privkey.pem"
    link.unlink()
    link.symlink_to("/dev/zero")

    source = read_lineage(tree.live, "example.com")

    assert isinstance(source, Source)
    assert source.key_path == Path("/dev/zero")


def test_a_live_link_to_another_kind_of_file_is_no_renewal(
    tree, authority, issued
):
    """privkey.pem pointing at a certificate is left to validation."""
    tree.create_lineage("example.com", issued)
    tree.renew("example.com", authority.issue(["example.com"]))
    link = tree.live / "example.com" / "privkey.pem"
    link.unlink()
    link.symlink_to("../../archive/example.com/cert1.pem")

    source = read_lineage(tree.live, "example.com")

    assert isinstance(source, Source)
    assert source.key_path.name == "cert1.pem"


def test_absolute_links_behind_a_symlinked_tree_still_wait(
    tmp_path, authority, issued
):
    """Links into the real archive path count when live is reached by a link.

    certbot's tree may sit behind a symlink (``/etc/letsencrypt`` on
    another disk) while its links name the real path.
    """
    tree = LetsEncryptTree(tmp_path / "real")
    tree.create_lineage("example.com", issued)
    tree.renew("example.com", authority.issue(["example.com"]))
    live = tree.live / "example.com"
    for kind in KINDS:
        version = 1 if kind == "privkey" else 2
        (live / f"{kind}.pem").unlink()
        target = tree.archive / "example.com" / f"{kind}{version}.pem"
        (live / f"{kind}.pem").symlink_to(target)
    alias = tmp_path / "alias"
    alias.symlink_to(tree.live.parent)

    item = read_lineage(alias / "live", "example.com")

    assert isinstance(item, Pending)
    assert "different archive versions" in item.reason


def test_a_symlink_loop_in_live_is_no_lineage(tree):
    """A name under live/ that loops is neither a lineage nor an error."""
    (tree.live / "loop.example").symlink_to("loop.example")

    assert read_lineage(tree.live, "loop.example") is None


def test_a_lineage_that_cannot_be_listed_is_read_as_it_is(
    tree, issued, monkeypatch
):
    """Without a listing the links are read; the files name any problem."""
    tree.create_lineage("example.com", issued)
    locked = tree.live / "example.com"
    listdir = os.listdir

    def refuse(path):
        if path == locked:
            raise PermissionError(errno.EACCES, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refuse)

    source = read_lineage(tree.live, "example.com")

    assert isinstance(source, Source)
    assert source.cert_path.name == "fullchain1.pem"


def test_a_live_directory_that_cannot_be_listed_is_refused(tree, monkeypatch):
    """An unlistable live/ raises PairError naming it, not OSError."""

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", refuse)

    with pytest.raises(PairError) as caught:
        list_lineages(tree.live)

    assert caught.value.path == str(tree.live)
    assert "cannot be listed" in caught.value.reason


def test_lineage_without_any_pair_is_ignored(tree):
    """A directory holding only a README is no lineage."""
    (tree.live / "empty").mkdir()
    (tree.live / "empty" / "README").write_text("x")

    assert read_lineage(tree.live, "empty") is None


def hand(certs, *names):
    for name in names:
        path = certs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_hand_placed_pairs_use_prosody_names(tmp_path):
    """<name>.crt with <name>.key and <name>/ with both files are found."""
    certs = tmp_path / "certs"
    hand(
        certs,
        "a.example.crt",
        "a.example.key",
        "b.example/fullchain.pem",
        "b.example/privkey.pem",
        "lonely.crt",
        "c.example/fullchain.pem",
        ".hidden.crt",
        ".hidden.key",
        "notes.txt",
    )

    found = {s.name: s for s in hand_placed(certs, lambda _: False)}

    assert set(found) == {"a.example.crt", "b.example/"}
    assert found["a.example.crt"].key_path == certs / "a.example.key"
    assert found["b.example/"].cert_path == certs / "b.example/fullchain.pem"
    assert all(s.origin == "prosody" for s in found.values())


def test_files_certwatchd_wrote_are_not_hand_placed(tmp_path):
    """Pairs the predicate claims as ours are skipped."""
    certs = tmp_path / "certs"
    hand(certs, "a.example.crt", "a.example.key", "b.crt", "b.key")

    found = hand_placed(
        certs, lambda path: os.path.basename(path) == "a.example.crt"
    )

    assert [s.name for s in found] == ["b.crt"]


def test_a_symlink_loop_among_hand_placed_pairs_is_skipped(tmp_path):
    """A looping link in the certs directory is no pair and no error."""
    certs = tmp_path / "certs"
    hand(certs, "a.example.crt", "a.example.key")
    (certs / "loop").symlink_to("loop")

    found = hand_placed(certs, lambda _: False)

    assert [s.name for s in found] == ["a.example.crt"]


def test_missing_certs_directory_has_no_hand_placed_pairs(tmp_path):
    """A certs directory that does not exist yields nothing."""
    assert list(hand_placed(tmp_path / "none", lambda _: False)) == []
