"""Finding candidate pairs in certbot's live tree and Prosody's directory.

Scanning only looks at names and links; reading and judging the files is
:mod:`certwatchd.certificate`'s job.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from certwatchd.errors import PairError

LINKS = ("cert", "chain", "fullchain", "privkey")
# The archive file certbot points each live link at: cert3.pem for cert.
_ARCHIVE_FILES = {
    link: re.compile(rf"{link}([0-9]+)\.pem", re.ASCII) for link in LINKS
}
# What os.listdir says about a name under live/ that is no lineage.
_NO_LINEAGE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}

Origin = Literal["letsencrypt", "prosody"]


@dataclass(frozen=True)
class Source:
    """One place a pair can come from, with the files to read for it."""

    origin: Origin
    name: str
    cert_path: Path
    key_path: Path
    shown: Path

    @property
    def key(self) -> str:
        """A stable identity, such as ``letsencrypt:example.com-0001``."""
        return f"{self.origin}:{self.name}"


@dataclass(frozen=True)
class Pending:
    """A lineage caught in the middle of a renewal; retried later."""

    name: str
    shown: Path
    reason: str
    swapping: bool = False

    @property
    def key(self) -> str:
        """The identity the lineage has once it settles."""
        return f"letsencrypt:{self.name}"


def list_lineages(live: Path) -> list[str]:
    """Name every directory directly under ``live``, sorted.

    A missing ``live`` has no lineages; one that cannot be listed raises
    :class:`PairError`.
    """
    return sorted(
        entry.name
        for entry in _entries(live)
        if _is_dir(entry, follow_symlinks=False)
        and not entry.name.startswith(".")
    )


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    """List ``directory``; nothing if it is missing or not a directory."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        msg = f"cannot be listed: {exc.strerror}"
        raise PairError(str(directory), msg) from None
    except ValueError:
        raise PairError(str(directory), "has a NUL byte in its name") from None


def _is_dir(entry: os.DirEntry[str], *, follow_symlinks: bool) -> bool:
    """Say whether ``entry`` is a directory; a symlink loop is not."""
    try:
        return entry.is_dir(follow_symlinks=follow_symlinks)
    except OSError:
        return False


def read_lineage(
    live: Path, name: str, *, settled: bool = False
) -> Source | Pending | None:
    """Describe one lineage, or ``None`` when it holds no pair at all.

    A lineage is pending while certbot's ``previous_*`` links exist or its
    four links point at different archive versions. With ``settled`` (no
    event for a while) the links are taken as they are and validation
    decides.
    """
    directory = live / name
    try:
        names = set(os.listdir(directory))
    except ValueError:
        return None
    except OSError as exc:
        if exc.errno in _NO_LINEAGE:
            return None
        # A lineage that cannot be listed (permission denied, an I/O
        # error) is taken as it is: reading its pair names the problem.
        names, settled = {"fullchain.pem", "privkey.pem"}, True

    # The links are read once: the consistency check and the pinned
    # paths come from the same reads. Four reads that name one version
    # name one generation whatever certbot swapped meanwhile, since it
    # swaps each link once per renewal and never rewrites an archive file.
    targets = _read_links(directory, names)
    if not settled:
        archive = live.parent / "archive" / name
        reason = _renewal_in_progress(directory, names, archive, targets)
        if reason:
            swapping = any(n.startswith("previous_") for n in names)
            return Pending(name, directory, reason, swapping=swapping)
    if "fullchain.pem" not in names or "privkey.pem" not in names:
        if not settled and names & {f"{link}.pem" for link in LINKS}:
            return Pending(
                name, directory, "fullchain.pem or privkey.pem missing"
            )
        return None

    return Source(
        origin="letsencrypt",
        name=name,
        cert_path=_pinned(directory, "fullchain", targets),
        key_path=_pinned(directory, "privkey", targets),
        shown=directory,
    )


def _read_links(directory: Path, names: set[str]) -> dict[str, str | None]:
    """Read each of certbot's links the listing showed.

    A link's value is ``None`` when it vanished since the listing, as it
    does between certbot's unlink and symlink. Links that cannot be read
    for another reason (not a symlink, say) are left out.
    """
    targets: dict[str, str | None] = {}
    for link in LINKS:
        if f"{link}.pem" not in names:
            continue
        try:
            targets[link] = os.readlink(directory / f"{link}.pem")
        except FileNotFoundError:
            targets[link] = None
        except (OSError, ValueError):
            continue
    return targets


def _renewal_in_progress(
    directory: Path,
    names: set[str],
    archive: Path,
    targets: dict[str, str | None],
) -> str | None:
    """Say why the lineage looks mid-renewal, or ``None`` if it does not.

    certbot only ever points a live link at its own kind of file in the
    lineage's archive directory. A link that leads anywhere else is no
    renewal in progress, however long one waits: the lineage is read as
    it is and validation refuses what the link leads to.
    """
    versions = {}
    for link, target in targets.items():
        if target is None:
            return f"certbot is swapping links ({link}.pem missing)"
        version = _archive_version(directory, target, link, archive)
        if version is None:
            return None
        versions[link] = version

    previous = sorted(n for n in names if n.startswith("previous_"))
    if previous:
        return f"certbot is swapping links ({previous[0]} present)"
    if len(set(versions.values())) > 1:
        shown = ", ".join(
            f"{link}={version}" for link, version in versions.items()
        )
        return f"links point at different archive versions ({shown})"
    return None


def _archive_version(
    directory: Path, target: str, link: str, archive: Path
) -> str | None:
    """Return the version a live link names, if certbot could have made it.

    That is ``<link><N>.pem`` in ``archive``, reached from ``directory``
    by the link's own path or, should ``live`` sit behind a symlink, by
    the real path.
    """
    match = _ARCHIVE_FILES[link].fullmatch(os.path.basename(target))
    if match is None:
        return None
    parent = os.path.join(directory, os.path.dirname(target))
    if os.path.normpath(parent) == os.path.normpath(archive):
        return match.group(1)
    if os.path.realpath(parent) == os.path.realpath(archive):
        return match.group(1)
    return None


def _pinned(
    directory: Path, link: str, targets: dict[str, str | None]
) -> Path:
    """Return the archive file ``link`` named when it was read.

    Reading that file later still gives the generation the link named,
    even if certbot has moved the link on since. A link that was not a
    symlink is read as it is.
    """
    target = targets.get(link)
    if target is None:
        return directory / f"{link}.pem"
    return directory / target


def hand_placed(
    certs_dir: Path, is_ours: Callable[[str], bool]
) -> Iterator[Source]:
    """Yield pairs placed in Prosody's directory by someone else.

    Prosody's own names count: ``<name>.crt`` beside ``<name>.key``, and
    ``<name>/fullchain.pem`` beside ``<name>/privkey.pem``. Dot-names are
    skipped, as Prosody skips them. ``is_ours`` is asked about each
    candidate's path before anything else is made of it.
    """
    entries = sorted(_entries(certs_dir), key=lambda e: e.name)
    names = {entry.name for entry in entries}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.name.endswith(".crt"):
            stem = entry.name.removesuffix(".crt")
            if f"{stem}.key" in names and not is_ours(entry.path):
                path = Path(entry.path)
                key = certs_dir / f"{stem}.key"
                yield Source("prosody", entry.name, path, key, path)
        elif _is_dir(entry, follow_symlinks=True) and not is_ours(entry.path):
            path = Path(entry.path)
            cert = path / "fullchain.pem"
            key = path / "privkey.pem"
            if os.path.lexists(cert) and os.path.lexists(key):
                yield Source("prosody", f"{entry.name}/", cert, key, cert)
