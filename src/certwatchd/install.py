"""Writing pairs into Prosody's directory: atomically, privately, durably.

Every file is written to a temporary file in its final directory, created
with mode 0600 and given its final owner and mode before it is renamed
into place, so no instant exists at which a key is readable beyond its
owner and group. One durability barrier covers a whole batch of files
instead of an fsync per file.

Layouts:

- ``flat``: ``<host>.crt`` and ``<host>.key``. The key is renamed into
  place before the certificate; between those two renames the pair does
  not match, and nothing reloads Prosody in between.
- ``directory``: ``<host>`` is a symlink to a hidden versioned directory
  holding ``fullchain.pem`` and ``privkey.pem``; one rename switches both.
  Prosody's index skips dot-directories, so only the live version counts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from certwatchd.config import Ownership
from certwatchd.errors import InstallError, PairError
from certwatchd.pem import read_small_file
from certwatchd.state import Attributes, FilePath, StateDir, digest

log = structlog.get_logger()

Layout = Literal["flat", "directory"]
TEMP_PREFIX = ".certwatchd-"
TEMP_SUFFIX = ".tmp"
VERSION_PREFIX = ".certwatchd-"


@dataclass(frozen=True)
class Content:
    """What one host should hold: certificates, then the key."""

    host: str
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Modes:
    """Owner, group and permission bits for installed files."""

    ownership: Ownership
    cert_mode: int
    key_mode: int
    dir_mode: int = 0o750


def host_paths(
    certs_dir: Path, layout: Layout, host: str
) -> tuple[Path, Path]:
    """Return where Prosody looks for ``host``'s certificate and key."""
    cert, key = host_files(os.path.join(certs_dir, ""), layout, host)
    return Path(cert), Path(key)


def host_files(prefix: str, layout: Layout, host: str) -> tuple[str, str]:
    """Return :func:`host_paths` as strings, which are cheaper to make.

    ``prefix`` is the certificate directory with a trailing slash.
    """
    if layout == "flat":
        return f"{prefix}{host}.crt", f"{prefix}{host}.key"
    return f"{prefix}{host}/fullchain.pem", f"{prefix}{host}/privkey.pem"


def is_version_dir(path: Path) -> bool:
    """Say whether ``path`` names one of certwatchd's versioned directories."""
    return path.name.startswith(VERSION_PREFIX) and not path.name.endswith(
        TEMP_SUFFIX
    )


class Installer:
    """Applies host contents to the certificate directory."""

    def __init__(
        self,
        certs_dir: Path,
        layout: Layout,
        modes: Modes,
        state: StateDir,
    ) -> None:
        self.certs_dir = certs_dir
        self._prefix = os.path.join(certs_dir, "")
        self.layout = layout
        self.modes = modes
        self.state = state

    def paths(self, host: str) -> tuple[Path, Path]:
        """Return the certificate and key paths Prosody uses for ``host``."""
        cert, key = self.files(host)
        return Path(cert), Path(key)

    def files(self, host: str) -> tuple[str, str]:
        """Return :meth:`paths` as strings, for looking at many hosts."""
        return host_files(self._prefix, self.layout, host)

    def needs_write(
        self, content: Content, paths: tuple[FilePath, FilePath] | None = None
    ) -> bool:
        """Say whether the files on disk differ from ``content``.

        ``paths`` are the host's, when the caller has them already.
        """
        cert_path, key_path = paths or self.paths(content.host)
        return self.digest_of(cert_path) != digest(content.cert_pem) or (
            self.digest_of(key_path) != digest(content.key_pem)
        )

    def differs(
        self,
        paths: tuple[FilePath, FilePath],
        cert_digest: str,
        key_digest: str,
    ) -> bool:
        """Say whether the files at ``paths`` differ from these digests."""
        return self.digest_of(paths[0]) != cert_digest or (
            self.digest_of(paths[1]) != key_digest
        )

    def digest_of(self, path: FilePath) -> str | None:
        """Return the digest of what ``path`` holds, ``None`` if unreadable.

        A file unchanged since it was last read is not read again.
        """
        return self.state.digest_of(path)

    def read(self, path: FilePath) -> bytes | None:
        """Return what ``path`` holds now, or ``None`` if it cannot be read."""
        return _read_or_none(path)

    def mode_for(self, *, key: bool) -> int:
        """Return the configured mode of a key or a certificate."""
        return self.modes.key_mode if key else self.modes.cert_mode

    def wrong_attributes(
        self,
        path: FilePath,
        wanted: int,
        info: Attributes | os.stat_result | None = None,
    ) -> str | None:
        """Describe how ``path``'s owner or mode differ, or ``None``.

        ``info`` is the file's stat, when the caller has it already.
        """
        if info is None:
            try:
                info = os.stat(path)
            except OSError:
                return None
        problems = []
        if stat.S_IMODE(info.st_mode) != wanted:
            problems.append(
                f"mode {stat.S_IMODE(info.st_mode):#o}, expected {wanted:#o}"
            )
        if info.st_uid != self.modes.ownership.uid:
            problems.append(f"owner uid {info.st_uid}")
        if info.st_gid != self.modes.ownership.gid:
            problems.append(f"group gid {info.st_gid}")
        return "; ".join(problems) or None

    def correct(self, path: Path, wanted: int) -> None:
        """Give an existing file or directory its owner and mode in place.

        The mode is first narrowed to what both the old and new modes
        allow, so changing the group never widens access for an instant.
        A symlink is not followed: it may lead outside the directory.
        """
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            msg = f"cannot correct owner and mode of {path}: {exc.strerror}"
            raise InstallError(msg) from None
        try:
            current = stat.S_IMODE(os.fstat(fd).st_mode)
            os.fchmod(fd, current & wanted)
            os.fchown(fd, self.modes.ownership.uid, self.modes.ownership.gid)
            os.fchmod(fd, wanted)
        except OSError as exc:
            msg = f"cannot correct owner and mode of {path}: {exc.strerror}"
            raise InstallError(msg) from None
        finally:
            os.close(fd)

    def install(
        self, contents: Iterable[Content], *, keep_previous: bool = True
    ) -> list[str]:
        """Install each host's content; return the hosts now installed.

        A host that fails raises nothing: its old files stay as they were,
        the failure is logged, and the host is left out of the result.
        With ``keep_previous`` a matching pair being replaced is kept in
        the state directory, for a rollback.
        """
        batch = _Batch()
        staged = []
        for content in contents:
            if keep_previous:
                self._keep_previous(content.host, batch)
            try:
                staged.append(self._stage(content, batch))
            except InstallError as exc:
                log.error("install.failed", host=content.host, error=str(exc))
                log.debug("install.failed_detail", exc_info=True)

        if not self._flush(staged, batch):
            return []

        done = []
        for step in staged:
            try:
                step.commit()
            except OSError as exc:
                log.error("install.failed", host=step.host, error=exc.strerror)
                step.abort()
                continue
            done.append(step.host)
        batch.sync_directories()
        self.state.settle()
        return done

    def _flush(self, staged: list[_Step], batch: _Batch) -> bool:
        """Make the staged files and the record of them durable.

        The record of what is about to be renamed into place is flushed
        by the same barrier as the files. On failure nothing is renamed.
        """
        for step in staged:
            step.expect()
        if staged:
            self.state.save(durable=False)
        try:
            if staged:
                batch.track(self.state.record_path)
            batch.barrier()
        except OSError as exc:
            for step in staged:
                step.abort()
            log.error(
                "install.failed",
                hosts=len(staged),
                error=f"cannot flush to disk: {exc.strerror}",
            )
            return False
        return True

    def _keep_previous(self, host: str, batch: _Batch) -> None:
        """Keep the pair being replaced if certwatchd installed it.

        Only a pair certwatchd wrote (and so validated) is kept: a pair
        someone else put there is backed up, never restored by a rollback.
        The copies are flushed with the batch.
        """
        # Strings: on a first install there is nothing to keep, for
        # thousands of hosts at once.
        cert_path, key_path = self.files(host)
        if not os.path.lexists(cert_path):
            return
        cert_pem = self.read(cert_path)
        key_pem = self.read(key_path)
        if cert_pem is None or key_pem is None:
            return
        if not (
            self.state.is_ours(cert_path, cert_pem)
            and self.state.is_ours(key_path, key_pem)
        ):
            return
        try:
            kept = self.state.keep_previous(
                host, cert_pem, key_pem, durable=False
            )
            for path in kept:
                batch.track(path)
        except OSError as exc:
            log.warning(
                "state.previous_not_kept",
                host=host,
                error=exc.strerror,
                consequence="no rollback possible for this host",
            )

    def _stage(self, content: Content, batch: _Batch) -> _Step:
        if self.layout == "flat":
            return self._stage_flat(content, batch)
        return self._stage_directory(content, batch)

    def _stage_flat(self, content: Content, batch: _Batch) -> _Step:
        cert_path, key_path = self.paths(content.host)
        step = _Step(content.host, self.state)
        files = (
            (key_path, content.key_pem, self.modes.key_mode),
            (cert_path, content.cert_pem, self.modes.cert_mode),
        )
        try:
            for path, data, mode in files:
                if self.digest_of(path) == digest(data):
                    continue
                self._back_up_if_placed_by_hand(path)
                temporary = batch.write(path.parent, data, mode, self.modes)
                step.renames.append((temporary, path, data))
            link = self.certs_dir / content.host
            if _is_our_link(link):
                step.retired.append(link)
        except OSError as exc:
            step.abort()
            msg = f"cannot write into {self.certs_dir}: {exc.strerror}"
            raise InstallError(msg) from None
        except InstallError:
            step.abort()
            raise
        return step

    def _stage_directory(self, content: Content, batch: _Batch) -> _Step:
        link = self.certs_dir / content.host
        version = self.certs_dir / (
            f"{VERSION_PREFIX}{content.host}-{secrets.token_hex(6)}"
        )
        step = _Step(content.host, self.state)
        try:
            if os.path.lexists(link) and not _is_our_link(link):
                self._back_up_if_placed_by_hand(link)
                if link.is_dir() and not link.is_symlink():
                    step.displaced = link
            os.mkdir(version, 0o700)
            step.created = version
            files = (
                ("privkey.pem", content.key_pem, self.modes.key_mode),
                ("fullchain.pem", content.cert_pem, self.modes.cert_mode),
            )
            for name, data, mode in files:
                batch.write_final(version / name, data, mode, self.modes)
                step.records.append((link / name, data))
            os.chown(
                version, self.modes.ownership.uid, self.modes.ownership.gid
            )
            os.chmod(version, self.modes.dir_mode)
            temporary = self.certs_dir / (
                f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
            )
            os.symlink(version.name, temporary)
            step.renames.append((temporary, link, None))
            previous = _link_target(link)
            if previous and previous.startswith(VERSION_PREFIX):
                step.previous = self.certs_dir / previous
            batch.directories.add(self.certs_dir)
            step.retired.extend(
                path
                for path in host_paths(self.certs_dir, "flat", content.host)
                if self.state.is_ours(path)
            )
        except OSError as exc:
            step.abort()
            msg = f"cannot write into {self.certs_dir}: {exc.strerror}"
            raise InstallError(msg) from None
        except InstallError:
            step.abort()
            raise
        return step

    def _back_up_if_placed_by_hand(self, path: Path) -> None:
        if not os.path.lexists(path):
            return
        if path.is_dir() and not path.is_symlink():
            self.state.back_up(path)
            return
        if not self.state.is_ours(path):
            self.state.back_up(path)

    def remove_stale(self) -> list[Path]:
        """Remove temporary files and unused versions left by a crash."""
        removed: list[Path] = []
        try:
            entries = list(os.scandir(self.certs_dir))
        except OSError:
            return removed

        live_versions = {
            _link_target(Path(entry.path))
            for entry in entries
            if entry.is_symlink() and not entry.name.endswith(TEMP_SUFFIX)
        }
        for entry in entries:
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            path = Path(entry.path)
            if entry.name.endswith(TEMP_SUFFIX):
                path.unlink(missing_ok=True)
                removed.append(path)
            elif entry.is_dir(follow_symlinks=False) and (
                entry.name not in live_versions
            ):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        for path in removed:
            log.info("install.stale_removed", path=str(path))
        return removed


class _Step:
    """One host's staged files, committed by renames."""

    def __init__(self, host: str, state: StateDir) -> None:
        self.host = host
        self.state = state
        self.renames: list[tuple[Path, Path, bytes | None]] = []
        self.records: list[tuple[Path, bytes]] = []
        self.created: Path | None = None
        self.previous: Path | None = None
        self.displaced: Path | None = None
        self.retired: list[Path] = []

    def expect(self) -> None:
        """Note in the record what the renames are about to put in place."""
        for _, target, data in self.renames:
            if data is not None:
                self.state.expect(target, data)
        for path, data in self.records:
            self.state.expect(path, data)

    def commit(self) -> None:
        """Rename the staged files into place and record them."""
        if self.displaced is not None:
            shutil.rmtree(self.displaced)
        self._rename_all()

        for _, target, data in self.renames:
            if data is not None:
                self.state.remember(target, data)
        for path, data in self.records:
            self.state.remember(path, data)
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
        for path in self.retired:
            _remove(path)

    def _rename_all(self) -> None:
        """Rename every staged file, or put back what was replaced.

        If a later rename fails, the files an earlier one replaced are
        restored, so a new key never stays beside an old certificate.
        """
        saved: list[tuple[Path, Path]] = []
        try:
            for index, (temporary, target, _) in enumerate(self.renames):
                if index < len(self.renames) - 1 and os.path.lexists(target):
                    keep = target.with_name(
                        f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
                    )
                    os.link(target, keep, follow_symlinks=False)
                    saved.append((keep, target))
                os.rename(temporary, target)
        except OSError:
            for keep, target in reversed(saved):
                os.rename(keep, target)
            raise
        finally:
            for keep, _ in saved:
                keep.unlink(missing_ok=True)

    def abort(self) -> None:
        for temporary, _, _ in self.renames:
            Path(temporary).unlink(missing_ok=True)
        self.renames.clear()
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


class _Batch:
    """Temporary files written together and made durable together.

    With syncfs(2), one flush per file system covers every file, so only
    one descriptor per file system stays open until the barrier; without
    it, each file is flushed before it is closed.
    """

    def __init__(self) -> None:
        self.directories: set[Path] = set()
        self._anchors: dict[int, int] = {}
        self._devices: dict[Path, int] = {}

    def write(
        self, directory: Path, data: bytes, mode: int, modes: Modes
    ) -> Path:
        """Write ``data`` to a new temporary file in ``directory``."""
        path = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        self.write_final(path, data, mode, modes)
        return path

    def write_final(
        self, path: Path, data: bytes, mode: int, modes: Modes
    ) -> None:
        """Create ``path`` private, fill it, then give it owner and mode."""
        flags = (
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchown(fd, modes.ownership.uid, modes.ownership.gid)
            os.fchmod(fd, mode)
            fd = self._hold(fd, path.parent)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if fd >= 0:
            os.close(fd)
        self.directories.add(path.parent)

    def track(self, path: Path) -> None:
        """Make an already written file durable with the rest of the batch."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(path, flags)
        try:
            fd = self._hold(fd, path.parent)
        finally:
            if fd >= 0:
                os.close(fd)

    def _hold(self, fd: int, directory: Path) -> int:
        """Keep ``fd`` if the barrier needs it; else return it to close.

        Returns -1 when the batch kept the descriptor.
        """
        if not _HAS_SYNCFS:
            os.fsync(fd)
            return fd
        device = self._devices.get(directory)
        if device is None:
            device = self._devices[directory] = os.fstat(fd).st_dev
        if device in self._anchors:
            return fd
        self._anchors[device] = fd
        return -1

    def barrier(self) -> None:
        """Make every written file durable with as few flushes as possible."""
        try:
            for fd in self._anchors.values():
                if not _syncfs(fd):
                    os.fsync(fd)
        finally:
            for fd in self._anchors.values():
                os.close(fd)
            self._anchors.clear()

    def sync_directories(self) -> None:
        """Make the renames durable: one fsync per touched directory."""
        for directory in sorted(self.directories):
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError as exc:
                log.warning(
                    "install.fsync_failed",
                    path=str(directory),
                    error=exc.strerror,
                )
            finally:
                os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_HAS_SYNCFS = getattr(_libc, "syncfs", None) is not None


def _syncfs(fd: int) -> bool:
    """Flush the whole filesystem holding ``fd``; ``False`` if unsupported."""
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:
        return False
    if syncfs(fd) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return True


def _read_or_none(path: FilePath) -> bytes | None:
    try:
        return read_small_file(path)
    except PairError:
        return None


def _link_target(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _is_our_link(path: Path) -> bool:
    target = _link_target(path)
    return target is not None and target.startswith(VERSION_PREFIX)


def _remove(path: Path) -> None:
    """Remove a file, link or versioned directory certwatchd wrote."""
    target = _link_target(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    if target is not None and target.startswith(VERSION_PREFIX):
        shutil.rmtree(path.parent / target, ignore_errors=True)
    log.info("install.retired", path=str(path))
