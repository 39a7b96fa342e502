"""Finding candidate pairs in certbot's live tree and Prosody's directory.

Scanning only looks at names and links; reading and judging the files is
:mod:`certwatchd.certificate`'s job.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

LINKS = ("cert", "chain", "fullchain", "privkey")
_ARCHIVE_FILE = re.compile(r"(?:cert|chain|fullchain|privkey)(\d+)\.pem")

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
    """Name every directory directly under ``live``, sorted."""
    try:
        entries = list(os.scandir(live))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        entry.name
        for entry in entries
        if entry.is_dir(follow_symlinks=False)
        and not entry.name.startswith(".")
    )


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
    except (FileNotFoundError, NotADirectoryError):
        return None

    if not settled:
        reason = _renewal_in_progress(directory, names)
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
        cert_path=_through_link(directory / "fullchain.pem"),
        key_path=_through_link(directory / "privkey.pem"),
        shown=directory,
    )


def _renewal_in_progress(directory: Path, names: set[str]) -> str | None:
    previous = sorted(n for n in names if n.startswith("previous_"))
    if previous:
        return f"certbot is swapping links ({previous[0]} present)"

    versions = {}
    for link in LINKS:
        try:
            target = os.readlink(directory / f"{link}.pem")
        except FileNotFoundError:
            continue
        except OSError:
            continue
        match = _ARCHIVE_FILE.fullmatch(os.path.basename(target))
        versions[link] = (os.path.dirname(target), match and match.group(1))

    if len(set(versions.values())) > 1:
        shown = ", ".join(
            f"{link}={version[1]}" for link, version in versions.items()
        )
        return f"links point at different archive versions ({shown})"
    return None


def _through_link(path: Path) -> Path:
    """Pin a link to the file it names now, so a later swap cannot tear us.

    certbot never rewrites an archive file, so reading the target found
    here gives one consistent generation even if the link moves on.
    """
    try:
        target = os.readlink(path)
    except OSError:
        return path
    return path.parent / target


def hand_placed(
    certs_dir: Path, is_ours: Callable[[Path], bool]
) -> Iterator[Source]:
    """Yield pairs placed in Prosody's directory by someone else.

    Prosody's own names count: ``<name>.crt`` beside ``<name>.key``, and
    ``<name>/fullchain.pem`` beside ``<name>/privkey.pem``. Dot-names are
    skipped, as Prosody skips them.
    """
    try:
        entries = sorted(os.scandir(certs_dir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return

    names = {entry.name for entry in entries}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.name.endswith(".crt"):
            stem = entry.name.removesuffix(".crt")
            key = certs_dir / f"{stem}.key"
            if f"{stem}.key" in names and not is_ours(path):
                yield Source("prosody", entry.name, path, key, path)
        elif entry.is_dir() and not is_ours(path):
            cert = path / "fullchain.pem"
            key = path / "privkey.pem"
            if os.path.lexists(cert) and os.path.lexists(key):
                yield Source("prosody", f"{entry.name}/", cert, key, cert)
