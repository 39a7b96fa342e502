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
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD

log = structlog.get_logger()

# The events that can mean a change. Reads (open, close without writing)
# must not count: certwatchd reads the files it watches, and counting its
# own reads would make it loop. watchdog drops every other kind of event
# and leaves it out of the inotify mask, so a pass over thousands of
# files does not wake watchdog's threads thousands of times either.
_EVENT_FILTER = [
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
]

# Failing to watch a root for these reasons means a kernel limit.
_LIMITS = frozenset({errno.ENOSPC, errno.EMFILE})

OnChange = Callable[[str, str], None]


class _Handler(FileSystemEventHandler):
    def __init__(
        self,
        name: str,
        path: str,
        on_change: OnChange,
        on_deleted: Callable[[_Handler], None],
    ) -> None:
        self._name = name
        self._path = path
        self._on_change = on_change
        self._on_deleted = on_deleted

    def on_any_event(self, event: FileSystemEvent) -> None:
        if (
            isinstance(event, DirDeletedEvent)
            and os.fsdecode(event.src_path) == self._path
        ):
            # Noted before the change is reported, so that the check the
            # report leads to already knows this watch is dead.
            self._on_deleted(self)
        paths = [event.src_path, getattr(event, "dest_path", "")]
        for path in paths:
            if path:
                self._on_change(self._name, os.fsdecode(path))


class _InotifyFD(InotifyFD):
    """watchdog's inotify reader, which also says when events were lost."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow

    def handle_event(self, event: InotifyEvent) -> None:
        """Handle ``event`` as watchdog does; report a queue overflow."""
        super().handle_event(event)
        if event.is_queue_overflow:
            self._on_overflow()


class _Observer(BaseObserver):
    """watchdog's inotify observer, built on :class:`_InotifyFD`.

    When its queue overflows, the kernel drops events and says so once;
    watchdog then rebuilds its watches but tells the handlers nothing.
    """

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        inotify = _InotifyFD(on_overflow)
        inotify.start()
        super().__init__(InotifyEmitter, inotify_fd=inotify)
        self._inotify = inotify

    def on_thread_stop(self) -> None:
        """Stop the emitters, then the inotify reader."""
        super().on_thread_stop()
        self._inotify.stop()
        self._inotify.join()


class Watcher:
    """Watches named roots and reports which one saw a change, and where.

    ``on_change(root_name, path)`` is called on watchdog's thread for each
    relevant event; it must only record the event and return. When
    inotify's queue overflows, it is called with each root's own path.
    """

    def __init__(self, roots: dict[str, Path], on_change: OnChange) -> None:
        self._roots = roots
        self._on_change = on_change
        self._observer: BaseObserver = _Observer(self._on_overflow)
        self._watches: dict[str, ObservedWatch] = {}
        self._handlers: dict[str, _Handler] = {}
        # Handlers whose root was deleted; set on watchdog's thread.
        self._deleted: set[_Handler] = set()
        self._deleted_lock = threading.Lock()
        self._identity: dict[str, tuple[int, int]] = {}
        self._missing_reported: set[str] = set()
        self._was_watched: set[str] = set()
        # Root name -> errno of the failure to watch it, reported once.
        self._failed: dict[str, int] = {}
        self._overflowed = threading.Event()
        self._lock = threading.Lock()

    @property
    def limited(self) -> bool:
        """Say whether a root goes unwatched for want of inotify watches."""
        return any(code in _LIMITS for code in self._failed.values())

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
        with self._deleted_lock:
            deleted, self._deleted = self._deleted, set()
        if self._overflowed.is_set():
            # Cleared before the caller's reconcile reads anything, so an
            # overflow after this point is reported at the next call.
            self._overflowed.clear()
            log.warning(
                "watch.overflowed",
                consequence="events were lost; reconciling everything",
                fix="raise fs.inotify.max_queued_events (sysctl) if this "
                "recurs",
            )
            changed = True
        with self._lock:
            for name, root in self._roots.items():
                watch = self._watches.get(name)
                identity = _identity(root)
                present = identity is not None
                # A root made again at once can get its old inode back, and
                # watchdog's emitter stops only after reporting the deletion,
                # so the handler's own report is what settles it.
                if watch is not None and (
                    self._handlers[name] in deleted
                    or identity != self._identity.get(name)
                    or not self._emitter_alive(watch)
                ):
                    self._drop(name, watch, gone=not present)
                    changed = True
                    watch = None
                if watch is None and present:
                    changed |= self._add(name, root)
                elif not present:
                    self._failed.pop(name, None)
                    self._report_missing(name, root)
        return changed

    def _on_overflow(self) -> None:
        """Note that events were lost, and wake the caller (any thread)."""
        self._overflowed.set()
        for name, root in self._roots.items():
            self._on_change(name, str(root))

    def _on_root_deleted(self, handler: _Handler) -> None:
        with self._deleted_lock:
            self._deleted.add(handler)

    def _report_missing(self, name: str, root: Path) -> None:
        if name in self._missing_reported:
            return
        self._missing_reported.add(name)
        # A root that vanished is a missing source, which the next pass
        # reports; one never seen may be a mistake in the settings.
        level = log.info if name in self._was_watched else log.warning
        level(
            "watch.root_missing",
            root=name,
            path=str(root),
            consequence="picked up when it appears",
        )

    def _emitter_alive(self, watch: ObservedWatch) -> bool:
        for emitter in self._observer.emitters:
            if emitter.watch == watch:
                return emitter.is_alive()
        return False

    def _drop(self, name: str, watch: ObservedWatch, *, gone: bool) -> None:
        with contextlib.suppress(KeyError):
            self._observer.unschedule(watch)
        del self._watches[name]
        del self._handlers[name]
        # A deleted root is reported by the next pass as a missing source.
        level = log.info if gone else log.warning
        level("watch.lost", root=name, path=str(self._roots[name]))

    def _add(self, name: str, root: Path) -> bool:
        handler = _Handler(
            name, str(root), self._on_change, self._on_root_deleted
        )
        try:
            watch = self._observer.schedule(
                handler, str(root), recursive=True, event_filter=_EVENT_FILTER
            )
        except OSError as exc:
            self._report_schedule_failure(name, root, exc)
            return False
        self._watches[name] = watch
        self._handlers[name] = handler
        identity = _identity(root)
        if identity is not None:
            self._identity[name] = identity
        self._missing_reported.discard(name)
        self._failed.pop(name, None)
        self._was_watched.add(name)
        log.info("watch.started", root=name, path=str(root))
        return True

    def _report_schedule_failure(
        self, name: str, root: Path, exc: OSError
    ) -> None:
        # Scheduling is retried at every check; say so once per cause.
        code = exc.errno or 0
        if self._failed.get(name) == code:
            return
        self._failed[name] = code
        if code in _LIMITS:
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
