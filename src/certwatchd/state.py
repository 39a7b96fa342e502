"""certwatchd's own records: which files it wrote, and backups.

The record tells a file certwatchd installed from one an operator placed
by hand: only the latter is backed up before it is replaced. Losing the
record is harmless; every file then counts as hand-placed and is backed up
once more.

The record is written ahead: what is about to be renamed into place is
saved as expected before the first rename, so a daemon killed among its
renames finds its own files again at the next start instead of taking
them for an operator's.

Installed files are known by their stat signature as well as their
digest, so a pass that finds a file as it was last read does not read it
again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import structlog

from certwatchd.errors import InstallError, PairError
from certwatchd.pem import read_small_file

log = structlog.get_logger()

_RECORD = "installed.json"
# A stat signature stands for a file's contents only once the file has
# been left alone this long: a change within the same tick of the
# file system's clock as an earlier one need not change the signature.
_SETTLED_NS = 2_000_000_000


# A file's path, as the scan that found it had it: a string while
# thousands are looked at, to spare building a Path for each.
FilePath = str | Path


class Attributes(NamedTuple):
    """What a pass needs of a file's stat: mode, owner and group.

    Named as in :class:`os.stat_result`; a tenth of its size, which
    counts when a pass looks at tens of thousands of files.
    """

    st_mode: int
    st_uid: int
    st_gid: int


def digest(data: bytes) -> str:
    """SHA-256 of ``data``, hex."""
    return hashlib.sha256(data).hexdigest()


class StateDir:
    """The state directory: the record of written files and the backups."""

    def __init__(self, path: Path, certs_dir: Path) -> None:
        self.path = path
        self._certs_dir = certs_dir
        self._prefix = os.path.join(os.fspath(certs_dir), "")
        self._written: dict[str, str] = {}
        self._expected: dict[str, str] = {}
        self._rejected: dict[str, list[str]] = {}
        # Relative path -> "signature digest" of a file as last read.
        self._seen: dict[str, str] = {}
        # What digest_of found in this pass: relative path -> stat, digest.
        self._found: dict[str, tuple[Attributes | None, str | None]] = {}
        self._links: set[str] = set()
        self._loaded = False
        self._dirty = False

    def load(self) -> None:
        """Read the record, treating a missing or damaged one as empty."""
        self._loaded = True
        try:
            data = json.loads((self.path / _RECORD).read_bytes())
            written = data["written"]
            expected = data.get("expected", {})
            rejected = data.get("rejected", {})
            seen = data.get("seen", {})
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "state.unreadable",
                path=str(self.path / _RECORD),
                error=str(exc),
            )
            return
        if isinstance(written, dict):
            self._written = {str(k): str(v) for k, v in written.items()}
        if isinstance(expected, dict):
            self._expected = {str(k): str(v) for k, v in expected.items()}
        if isinstance(rejected, dict):
            self._rejected = {
                str(host): [str(f) for f in fingerprints]
                for host, fingerprints in rejected.items()
                if isinstance(fingerprints, list)
            }
        if isinstance(seen, dict):
            self._seen = {
                str(k): v for k, v in seen.items() if isinstance(v, str)
            }

    def _relative(self, path: FilePath) -> str:
        text = os.fspath(path)
        if text.startswith(self._prefix):
            rest = text[len(self._prefix) :]
            parts = rest.split("/")
            if "" not in parts and "." not in parts and ".." not in parts:
                return rest
        return os.path.relpath(path, self._certs_dir)

    def is_ours(self, path: FilePath, data: bytes | None = None) -> bool:
        """Say whether certwatchd wrote the file at ``path`` as it is now."""
        if not self._loaded:
            self.load()
        relative = self._relative(path)
        recorded = {self._written.get(relative), self._expected.get(relative)}
        recorded.discard(None)
        if not recorded:
            return False
        found = self.digest_of(path) if data is None else digest(data)
        return found in recorded

    def digest_of(self, path: FilePath) -> str | None:
        """Return the digest of what ``path`` holds, ``None`` if unreadable.

        A file whose stat signature is the one it had when it was last
        read, long enough after its last change, is not read again; and
        within a pass (until :meth:`forget`), a file is looked at once.
        """
        relative = self._relative(path)
        found = self._found.get(relative)
        if found is None:
            found = self._found[relative] = self._look_at(path, relative)
        return found[1]

    def stat_of(self, path: FilePath) -> Attributes | None:
        """Return the stat :meth:`digest_of` took of ``path`` in this pass."""
        found = self._found.get(self._relative(path))
        return found[0] if found is not None else None

    def forget(self) -> None:
        """Look at every file afresh from now on: a new pass, or a write."""
        self._found = {}
        self._links = set()

    def _look_at(
        self, path: FilePath, relative: str
    ) -> tuple[Attributes | None, str | None]:
        if not self._loaded:
            self.load()
        try:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                self._links.add(relative)
                info = os.stat(path)
        except OSError:
            return None, None
        attributes = Attributes(info.st_mode, info.st_uid, info.st_gid)
        signature = None
        if stat.S_ISREG(info.st_mode):
            signature = (
                f"{info.st_dev}:{info.st_ino}:{info.st_size}:"
                f"{info.st_mtime_ns}:{info.st_ctime_ns} "
            )
            known = self._seen.get(relative)
            if known is not None and known.startswith(signature):
                return attributes, known[len(signature) :]
        try:
            found = digest(read_small_file(path))
        except PairError:
            return attributes, None
        if signature is not None:
            settled = time.time_ns() - _SETTLED_NS
            if max(info.st_ctime_ns, info.st_mtime_ns) < settled:
                self._seen[relative] = signature + found
                self._dirty = True
        return attributes, found

    def is_link(self, path: FilePath) -> bool:
        """Say whether ``path`` was a symlink when looked at in this pass."""
        self.digest_of(path)
        return self._relative(path) in self._links

    @property
    def dirty(self) -> bool:
        """Say whether the record changed since it was last saved."""
        return self._dirty

    def release(self) -> None:
        """Drop the record from memory if it is saved.

        It is read again when next needed, so a daemon at rest holds
        none of it.
        """
        if self._dirty:
            return
        self._written = {}
        self._expected = {}
        self._rejected = {}
        self._seen = {}
        self._found = {}
        self._links = set()
        self._loaded = False

    def expect(self, path: Path, data: bytes) -> None:
        """Note that ``data`` is about to be renamed to ``path``."""
        self._expected[self._relative(path)] = digest(data)
        self._dirty = True
        self.forget()

    def remember(self, path: Path, data: bytes) -> None:
        """Note that certwatchd wrote ``data`` to ``path``."""
        relative = self._relative(path)
        self._written[relative] = digest(data)
        self._expected.pop(relative, None)
        self._dirty = True
        self._found.pop(relative, None)
        self._links.discard(relative)

    def settle(self) -> None:
        """Turn expected writes into records, or forget them.

        An expected file that is in place counts as written, whichever
        run put it there; one that is not was never renamed into place.
        """
        for relative, recorded in self._expected.items():
            try:
                data = read_small_file(self._certs_dir / relative)
            except PairError:
                continue
            if digest(data) == recorded:
                self._written[relative] = recorded
        if self._expected:
            self._dirty = True
        self._expected.clear()
        self.forget()

    def rejected(self, host: str) -> set[str]:
        """Fingerprints Prosody failed to serve for ``host`` after a reload."""
        if not self._loaded:
            self.load()
        return set(self._rejected.get(host, ()))

    def reject(self, host: str, fingerprint: str) -> None:
        """Never install the certificate ``fingerprint`` for ``host`` again."""
        if not self._loaded:
            self.load()
        known = self._rejected.setdefault(host, [])
        if fingerprint not in known:
            known.append(fingerprint)
            self._dirty = True

    @property
    def record_path(self) -> Path:
        """Where the record is kept."""
        return self.path / _RECORD

    def save(self, *, durable: bool = True) -> None:
        """Write the record atomically; a failure is logged, not raised.

        Without ``durable`` the caller makes it durable, or losing it to
        a crash is harmless.
        """
        if not self._loaded:
            self.load()
        ours = self._written.keys() | self._expected.keys()
        document = {
            "version": 1,
            "written": self._written,
            "expected": self._expected,
            "rejected": self._rejected,
            "seen": {k: v for k, v in self._seen.items() if k in ours},
        }
        try:
            self.write_private(
                _RECORD, json.dumps(document).encode(), durable=durable
            )
            self._dirty = False
        except OSError as exc:
            log.warning(
                "state.unwritable",
                path=str(self.path),
                error=exc.strerror,
                consequence="files certwatchd wrote will be backed up "
                "again before their next replacement",
            )

    def write_private(
        self, name: str | Path, data: bytes, *, durable: bool = True
    ) -> Path:
        """Write ``name`` (relative to the state directory) atomically.

        With ``durable`` the data is flushed to disk before the rename;
        otherwise the caller flushes it, or does not need to. Returns
        the path written.
        """
        target = self.path / name
        temporary = target.with_name(f".{target.name}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = os.open(temporary, flags | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(temporary, flags | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
        return target

    def keep_previous(
        self,
        host: str,
        cert_pem: bytes,
        key_pem: bytes,
        *,
        durable: bool = True,
    ) -> list[Path]:
        """Keep the pair being replaced, to restore if Prosody rejects it.

        Returns the files written, which the caller must flush unless
        ``durable``; raises ``OSError`` if they cannot be written.
        """
        cert_path, key_path = self.previous_paths(host)
        return [
            self.write_private(key_path, key_pem, durable=durable),
            self.write_private(cert_path, cert_pem, durable=durable),
        ]

    def previous_paths(self, host: str) -> tuple[Path, Path]:
        """Return where the kept previous pair of ``host`` lies."""
        directory = self.path / "previous" / host
        return directory / "fullchain.pem", directory / "privkey.pem"

    def record_verification(self, document: dict[str, object]) -> None:
        """Keep the last verification's outcome for ``certwatchd check``."""
        try:
            self.write_private(
                "verification.json", json.dumps(document).encode()
            )
        except OSError as exc:
            log.warning(
                "state.unwritable", path=str(self.path), error=exc.strerror
            )

    def last_verification(self) -> dict[str, object] | None:
        """Return the last verification's outcome, if one was recorded."""
        try:
            data = json.loads((self.path / "verification.json").read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def quarantine(self, paths: list[Path]) -> Path:
        """Move a broken hand-placed pair out of Prosody's reach.

        The files go under ``quarantine/`` in the state directory, keeping
        their names; nothing is deleted. Raises :class:`InstallError` if
        they cannot be moved.
        """
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        destination = self.path / "quarantine" / stamp
        try:
            destination.mkdir(mode=0o700, parents=True)
            for path in paths:
                shutil.move(path, destination / path.name)
        except OSError as exc:
            msg = f"cannot move {paths[0]} to {destination}: {exc.strerror}"
            raise InstallError(msg) from None
        return destination

    def back_up(self, path: Path) -> Path:
        """Copy a hand-placed file or directory under ``backups/``.

        Raises :class:`InstallError` if the copy cannot be made, so that
        the caller leaves the original in place.
        """
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        destination = self.path / "backups" / stamp / self._relative(path)
        try:
            destination.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.is_dir() and not path.is_symlink():
                shutil.copytree(path, destination, symlinks=True)
            else:
                shutil.copy2(path, destination, follow_symlinks=False)
        except OSError as exc:
            msg = (
                f"cannot back up {path} to {destination}:"
                f" {exc.strerror}; the original is left in place"
            )
            raise InstallError(msg) from None
        log.info("backup.saved", path=str(path), to=str(destination))
        return destination
