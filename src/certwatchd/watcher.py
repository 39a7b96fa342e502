"""inotify through watchdog: turns file events into "this source changed".

Callbacks run on watchdog's thread and only record what happened; the
daemon's main loop does the work. Events are hints, not a log: inotify
can overflow and watchdog stops watching a root that is deleted, so the
daemon also reconciles on a timer and whenever :meth:`Watcher.ensure`
reports trouble.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

log = structlog.get_logger()

# Reads (open, close without writing) must not count: certwatchd reads the
# files it watches, and counting its own reads would make it loop.
_RELEVANT = frozenset({"created", "deleted", "modified", "moved", "closed"})

OnChange = Callable[[str, str], None]


class _Handler(FileSystemEventHandler):
    def __init__(self, root: str, on_change: OnChange) -> None:
        self._root = root
        self._on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _RELEVANT:
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        for path in paths:
            if path:
                self._on_change(self._root, os.fsdecode(path))


class Watcher:
    """Watches named roots and reports which one saw a change, and where.

    ``on_change(root_name, path)`` is called on watchdog's thread for each
    relevant event; it must only record the event and return.
    """

    def __init__(self, roots: dict[str, Path], on_change: OnChange) -> None:
        self._roots = roots
        self._on_change = on_change
        self._observer: BaseObserver = Observer()
        self._watches: dict[str, ObservedWatch] = {}
        self._identity: dict[str, tuple[int, int]] = {}
        self._missing_reported: set[str] = set()
        self._lock = threading.Lock()
        self.limited = False

    def start(self) -> None:
        """Start the observer thread and watch every root that exists."""
        self._observer.start()
        self.ensure()

    def stop(self) -> None:
        """Stop the observer thread and wait for it."""
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join(timeout=5)

    def is_alive(self) -> bool:
        """Say whether the observer thread is running."""
        return self._observer.is_alive()

    def watched(self) -> set[str]:
        """Return the names of the roots watched now."""
        return set(self._watches)

    def ensure(self) -> bool:
        """Watch roots that appeared, drop those that vanished.

        Returns ``True`` when something changed, since events may have
        been missed meanwhile and a full reconcile is due.
        """
        changed = False
        with self._lock:
            for name, root in self._roots.items():
                watch = self._watches.get(name)
                identity = _identity(root)
                present = identity is not None
                if watch is not None and (
                    identity != self._identity.get(name)
                    or not self._emitter_alive(watch)
                ):
                    self._drop(name, watch)
                    changed = True
                    watch = None
                if watch is None and present:
                    changed |= self._add(name, root)
                elif not present and name not in self._missing_reported:
                    self._missing_reported.add(name)
                    log.warning(
                        "watch.root_missing",
                        root=name,
                        path=str(root),
                        consequence="picked up when it appears",
                    )
        return changed

    def _emitter_alive(self, watch: ObservedWatch) -> bool:
        for emitter in self._observer.emitters:
            if emitter.watch == watch:
                return emitter.is_alive()
        return False

    def _drop(self, name: str, watch: ObservedWatch) -> None:
        with contextlib.suppress(KeyError):
            self._observer.unschedule(watch)
        del self._watches[name]
        log.warning("watch.lost", root=name, path=str(self._roots[name]))

    def _add(self, name: str, root: Path) -> bool:
        handler = _Handler(name, self._on_change)
        try:
            watch = self._observer.schedule(handler, str(root), recursive=True)
        except OSError as exc:
            self._report_schedule_failure(name, root, exc)
            return False
        self._watches[name] = watch
        identity = _identity(root)
        if identity is not None:
            self._identity[name] = identity
        self._missing_reported.discard(name)
        log.info("watch.started", root=name, path=str(root))
        return True

    def _report_schedule_failure(
        self, name: str, root: Path, exc: OSError
    ) -> None:
        if exc.errno in {errno.ENOSPC, errno.EMFILE}:
            self.limited = True
            log.error(
                "watch.limit_reached",
                root=name,
                path=str(root),
                error=exc.strerror,
                fix="raise fs.inotify.max_user_watches (sysctl) or watch "
                "fewer directories; until then changes are picked up by "
                "the periodic reconcile only",
            )
            return
        log.error("watch.failed", root=name, path=str(root), error=str(exc))


def _identity(path: Path) -> tuple[int, int] | None:
    """Return the directory's device and inode, or ``None`` if absent.

    A root deleted and made again has a new inode: the old watch is then
    stale even though a directory of that name exists.
    """
    try:
        info = path.stat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        return None
    return info.st_dev, info.st_ino
