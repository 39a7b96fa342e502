"""certwatchd's own records: which files it wrote, and backups.

The record tells a file certwatchd installed from one an operator placed
by hand: only the latter is backed up before it is replaced. Losing the
record is harmless; every file then counts as hand-placed and is backed up
once more.

The record is written ahead: what is about to be renamed into place is
saved as expected before the first rename, so a daemon killed among its
renames finds its own files again at the next start instead of taking
them for an operator's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import structlog

from certwatchd.errors import InstallError, PairError
from certwatchd.pem import read_small_file

log = structlog.get_logger()

_RECORD = "installed.json"


def digest(data: bytes) -> str:
    """SHA-256 of ``data``, hex."""
    return hashlib.sha256(data).hexdigest()


class StateDir:
    """The state directory: the record of written files and the backups."""

    def __init__(self, path: Path, certs_dir: Path) -> None:
        self.path = path
        self._certs_dir = certs_dir
        self._written: dict[str, str] = {}
        self._expected: dict[str, str] = {}
        self._rejected: dict[str, list[str]] = {}
        self._loaded = False

    def load(self) -> None:
        """Read the record, treating a missing or damaged one as empty."""
        self._loaded = True
        try:
            data = json.loads((self.path / _RECORD).read_bytes())
            written = data["written"]
            expected = data.get("expected", {})
            rejected = data.get("rejected", {})
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

    def _relative(self, path: Path) -> str:
        return os.path.relpath(path, self._certs_dir)

    def is_ours(self, path: Path, data: bytes | None = None) -> bool:
        """Say whether certwatchd wrote the file at ``path`` as it is now."""
        if not self._loaded:
            self.load()
        relative = self._relative(path)
        recorded = {self._written.get(relative), self._expected.get(relative)}
        recorded.discard(None)
        if not recorded:
            return False
        if data is None:
            try:
                data = read_small_file(path)
            except PairError:
                return False
        return digest(data) in recorded

    def expect(self, path: Path, data: bytes) -> None:
        """Note that ``data`` is about to be renamed to ``path``."""
        self._expected[self._relative(path)] = digest(data)

    def remember(self, path: Path, data: bytes) -> None:
        """Note that certwatchd wrote ``data`` to ``path``."""
        relative = self._relative(path)
        self._written[relative] = digest(data)
        self._expected.pop(relative, None)

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
        self._expected.clear()

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

    def save(self) -> None:
        """Write the record atomically; a failure is logged, not raised."""
        document = {
            "version": 1,
            "written": self._written,
            "expected": self._expected,
            "rejected": self._rejected,
        }
        try:
            self.write_private(_RECORD, json.dumps(document).encode())
        except OSError as exc:
            log.warning(
                "state.unwritable",
                path=str(self.path),
                error=exc.strerror,
                consequence="files certwatchd wrote will be backed up "
                "again before their next replacement",
            )

    def write_private(self, name: str | Path, data: bytes) -> None:
        """Write ``name`` (relative to the state directory) atomically."""
        target = self.path / name
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = os.open(temporary, flags | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.replace(target)

    def keep_previous(
        self, host: str, cert_pem: bytes, key_pem: bytes
    ) -> None:
        """Keep the pair being replaced, to restore if Prosody rejects it."""
        try:
            cert_path, key_path = self.previous_paths(host)
            self.write_private(key_path, key_pem)
            self.write_private(cert_path, cert_pem)
        except OSError as exc:
            log.warning(
                "state.previous_not_kept",
                host=host,
                error=exc.strerror,
                consequence="no rollback possible for this host",
            )

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
