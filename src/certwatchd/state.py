"""certwatchd's own records: which files it wrote, and backups.

The record tells a file certwatchd installed from one an operator placed
by hand: only the latter is backed up before it is replaced. Losing the
record is harmless; every file then counts as hand-placed and is backed up
once more.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import structlog

from certwatchd.errors import InstallError

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
        self._loaded = False

    def load(self) -> None:
        """Read the record, treating a missing or damaged one as empty."""
        self._loaded = True
        try:
            data = json.loads((self.path / _RECORD).read_bytes())
            written = data["written"]
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

    def _relative(self, path: Path) -> str:
        return os.path.relpath(path, self._certs_dir)

    def is_ours(self, path: Path, data: bytes | None = None) -> bool:
        """Say whether certwatchd wrote the file at ``path`` as it is now."""
        if not self._loaded:
            self.load()
        recorded = self._written.get(self._relative(path))
        if recorded is None:
            return False
        if data is None:
            try:
                data = path.read_bytes()
            except OSError:
                return False
        return recorded == digest(data)

    def remember(self, path: Path, data: bytes) -> None:
        """Note that certwatchd wrote ``data`` to ``path``."""
        self._written[self._relative(path)] = digest(data)

    def forget(self, path: Path) -> None:
        """Drop ``path`` from the record."""
        self._written.pop(self._relative(path), None)

    def save(self) -> None:
        """Write the record atomically; a failure is logged, not raised."""
        document = json.dumps({"version": 1, "written": self._written})
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            temporary = self.path / f".{_RECORD}.tmp"
            with temporary.open("w", encoding="utf-8") as handle:
                handle.write(document)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(self.path / _RECORD)
        except OSError as exc:
            log.warning(
                "state.unwritable",
                path=str(self.path),
                error=exc.strerror,
                consequence="files certwatchd wrote will be backed up "
                "again before their next replacement",
            )

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
