"""The long-running service: events in, passes and reloads out.

One thread does all the work. Signal handlers and watchdog's thread only
record what happened and wake it; the reload command runs on a helper
thread so that a slow Prosody never stops the watchdog pings.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import structlog

from certwatchd import __version__, logs
from certwatchd.certificate import TrustStore
from certwatchd.config import Settings, load_settings, resolve_ownership
from certwatchd.errors import ConfigError, PairError
from certwatchd.expiry import Expiries, days_left
from certwatchd.notify import Notifier, watchdog_interval
from certwatchd.queue import Backoff, Debounce, DirtySet
from certwatchd.reload import Supervisor
from certwatchd.sources import Pending, Source, read_lineage
from certwatchd.sync import Synchronizer
from certwatchd.verification import Verdict, reload_and_verify
from certwatchd.watcher import Watcher

log = structlog.get_logger()

PROSODY_KEY = "prosody:"
LINEAGE_PREFIX = "letsencrypt:"
EXPIRY_CHECK_SECONDS = 86400.0
# The longest the loop sleeps, so a source directory that appears is
# noticed within this many seconds even when no event arrives.
TICK_SECONDS = 1.0
# A reload still running at stop gets this long to finish, since a
# restarted daemon would not reload for pairs already installed; then it
# is killed, so the daemon exits well within systemd's stop timeout.
STOP_GRACE_SECONDS = 2.0
# How long a reload killed at stop gets to log its end.
STOP_REAP_SECONDS = 1.0


class Wakeup:
    """A self-pipe: any thread or signal handler can wake the main loop."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False

    def wake(self) -> None:
        """Wake the loop; safe in a signal handler, and once closed."""
        if self._closed:
            return
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, b"!")

    def wait(self, timeout: float) -> None:
        """Sleep until woken or ``timeout`` seconds pass."""
        ready, _, _ = select.select([self._read], [], [], max(timeout, 0))
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 4096):
                    pass

    def close(self) -> None:
        """Release the pipe."""
        self._closed = True
        os.close(self._read)
        os.close(self._write)


@dataclass
class _Runtime:
    """What is built from one reading of the settings."""

    settings: Settings
    synchronizer: Synchronizer
    watcher: Watcher
    reload: Debounce


class Daemon:
    """Watches the sources and keeps Prosody's directory in step."""

    def __init__(
        self,
        config: Path | None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._notifier = notifier or Notifier()
        self._clock = clock
        self._wakeup = Wakeup()
        self._events: list[tuple[str, str]] = []
        self._events_lock = threading.Lock()
        self._stop = False
        self._hup = False
        self._dirty = DirtySet()
        self._backoff = Backoff()
        self._reload_thread: threading.Thread | None = None
        self._reloads = Supervisor()
        self._verdict: Verdict | None = None
        self._last_verify = ""
        self._broken: dict[str, tuple[float, Source, PairError]] = {}
        self._last_reload = "none yet"
        self._expiries = Expiries()
        self._watchdog_every = watchdog_interval()
        self._last_ping = 0.0
        self._next_reconcile = 0.0
        self._next_expiry = 0.0
        self._next_expiry_wall = 0.0
        self._reconcile_reason: str | None = "start"
        self._runtime: _Runtime | None = None
        self.reloads_finished = 0
        """How many reload commands have finished, well or not."""

    def serve(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit status.

        The notifier is closed on return.
        """
        try:
            return self._serve()
        finally:
            self._notifier.close()

    def _serve(self) -> int:
        runtime = self._build(load_settings(self._config))
        self._runtime = runtime
        self._install_signal_handlers()
        log.info("daemon.started", version=__version__, pid=os.getpid())
        runtime.watcher.start()
        self._turn()
        self._notifier.ready(self._status())
        log.info("daemon.ready", hosts=len(self._expiries))

        try:
            while not self._stop:
                self._wakeup.wait(self._sleep_for())
                self._turn()
        finally:
            self._notifier.stopping()
            log.info("daemon.stopping")
            self._end_reload()
            self._runtime.watcher.stop()
            self._wakeup.close()
        return 0

    def _end_reload(self) -> None:
        """Give a running reload a moment, then kill its command.

        The command runs in a session of its own, so nothing else would
        end it when the daemon exits.
        """
        thread = self._reload_thread
        if thread is not None:
            thread.join(STOP_GRACE_SECONDS)
        if self._reloads.end() and thread is not None:
            thread.join(STOP_REAP_SECONDS)

    def stop(self) -> None:
        """Ask the loop to finish, from any thread."""
        self._stop = True
        self._wakeup.wake()

    def _build(self, settings: Settings) -> _Runtime:
        logs.configure(settings.log.level, settings.log.format)
        ownership = resolve_ownership(settings)
        trust = TrustStore.from_setting(settings.validation.trust)
        synchronizer = Synchronizer(settings, ownership, trust, self._ping)
        roots = {
            "letsencrypt": settings.sources.letsencrypt_live,
            "prosody": settings.sources.prosody_certs,
        }
        watcher = Watcher(roots, self._on_change)
        debounce = Debounce(
            settings.reload.debounce_seconds,
            settings.reload.max_delay_seconds,
        )
        synchronizer.installer.remove_stale()
        self._backoff.initial = settings.reload.retry_seconds
        self._backoff.ceiling = settings.reload.retry_max_seconds
        return _Runtime(settings, synchronizer, watcher, debounce)

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup_signal)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self._stop = True
        self._wakeup.wake()

    def _on_hup_signal(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self._hup = True
        self._wakeup.wake()

    def _on_change(self, root: str, path: str) -> None:
        """Record an event from watchdog's thread and wake the loop."""
        with self._events_lock:
            self._events.append((root, path))
        self._wakeup.wake()

    @property
    def runtime(self) -> _Runtime:
        """The current settings and what was built from them."""
        assert self._runtime is not None  # noqa: S101 - set by serve()
        return self._runtime

    def _turn(self) -> None:
        """One turn of the main loop: everything due now, in order."""
        if self._stop:
            return
        if self._hup:
            self._hup = False
            self._reread_settings()

        now = self._clock()
        self._collect_events(now)
        if self.runtime.watcher.ensure():
            self._reconcile_reason = self._reconcile_reason or "watch changed"
        if self._reload_thread is not None:
            # Hold installs back while Prosody is reloaded and probed: a
            # change now would blur what the probe compares against.
            pass
        elif self._reconcile_reason or now >= self._next_reconcile:
            self._reconcile(now, self._reconcile_reason or "timer")
        else:
            self._process_dirty(now)

        self._quarantine_broken(now)
        self._finish_reload(now)
        self._start_reload(now)
        self._check_expiry()
        self._ping()
        self._notifier.status(self._status())
        # Last: by now the pass's report and what was made from it (the
        # expiry check at start goes through every host) are gone.
        self.runtime.synchronizer.return_free_memory()

    def _collect_events(self, now: float) -> None:
        with self._events_lock:
            events, self._events = self._events, []
        live = str(self.runtime.settings.sources.letsencrypt_live)
        for root, path in events:
            if root == "prosody":
                self._dirty.mark(PROSODY_KEY, now)
                continue
            lineage = os.path.relpath(path, live).split(os.sep, 1)[0]
            if lineage not in {".", ".."}:
                self._dirty.mark(LINEAGE_PREFIX + lineage, now)

    def _process_dirty(self, now: float) -> None:
        """Run a pass if a touched source is ready.

        A lineage is ready as soon as its links are consistent, or once it
        has been quiet long enough to be read as it is; Prosody's
        directory once it has been quiet, so a file being copied in is not
        read half written.
        """
        quiet = self.runtime.settings.reload.debounce_seconds
        ready = False
        settled = set()
        for key in self._dirty.ordered():
            if key == PROSODY_KEY:
                if self._dirty.quiet_since(key, now) >= quiet:
                    ready = True
                    self._dirty.discard(key)
                continue
            name = key.removeprefix(LINEAGE_PREFIX)
            state = self._lineage_state(name, now)
            if state == "waiting":
                continue
            log.info("lineage.changed", lineage=name, links=state)
            ready = True
            self._dirty.discard(key)
            if state == "settled":
                settled.add(name)
        if ready:
            self._pass(now, settled)

    def _lineage_state(self, name: str, now: float) -> str:
        """Say whether a touched lineage is consistent, settled or waiting.

        A lineage caught mid-renewal is read as it is ("settled") after
        ``debounce_seconds`` of quiet; while certbot's ``previous_*``
        links show it is between swaps, after ``max_delay_seconds``. A
        waiting lineage is not looked at again before then, unless an
        event comes.
        """
        reload = self.runtime.settings.reload
        item = read_lineage(
            self.runtime.settings.sources.letsencrypt_live, name
        )
        if not isinstance(item, Pending):
            return "consistent"
        patience = reload.debounce_seconds
        if item.swapping:
            patience = max(patience, reload.max_delay_seconds)
        key = LINEAGE_PREFIX + name
        quiet = self._dirty.quiet_since(key, now)
        if quiet >= patience:
            return "settled"
        # Only an event (which ends the wait) or time can change that.
        self._dirty.wait(key, now - quiet + patience)
        return "waiting"

    def _reconcile(self, now: float, reason: str) -> None:
        log.info("reconcile.started", reason=reason)
        self._reconcile_reason = None
        interval = self.runtime.settings.daemon.reconcile_interval_seconds
        self._next_reconcile = now + interval
        settled = {
            key.removeprefix(LINEAGE_PREFIX)
            for key in self._dirty.touched
            if key.startswith(LINEAGE_PREFIX)
            and self._lineage_state(key.removeprefix(LINEAGE_PREFIX), now)
            == "settled"
        }
        self._pass(now, settled)
        for name in settled:
            self._dirty.discard(LINEAGE_PREFIX + name)
        self._dirty.discard(PROSODY_KEY)

    def _pass(self, now: float, settled: set[str]) -> None:
        report = self.runtime.synchronizer.run(settled=settled)
        if report.hosts:
            self._expiries.update(report.hosts)
        for name in report.pending:
            key = LINEAGE_PREFIX + name
            if key not in self._dirty.touched:
                self._dirty.mark(key, now)
        if report.changed:
            self.runtime.reload.request(now)
        seen = {}
        for source, error in report.broken:
            key = f"{source.key}:{error.reason}"
            first = self._broken.get(key, (now, source, error))[0]
            seen[key] = (first, source, error)
        self._broken = seen

    def _quarantine_broken(self, now: float) -> None:
        """Move broken hand-placed pairs out of Prosody's reach.

        After a grace period (the operator may still be copying files in),
        or at once when a reload is about to run, since that reload would
        load them.
        """
        grace = self.runtime.settings.daemon.quarantine_after_seconds
        reloading = self.runtime.reload.is_due(now)
        for key, (first, source, error) in list(self._broken.items()):
            if reloading or now - first >= grace:
                self.runtime.synchronizer.quarantine(source, error)
                del self._broken[key]

    def _start_reload(self, now: float) -> None:
        debounce = self.runtime.reload
        if self._reload_thread is not None or not debounce.is_due(now):
            return
        if self._backoff.is_waiting(now):
            return
        debounce.clear()
        thread = threading.Thread(
            target=self._reload_worker,
            args=(self.runtime.settings, self.runtime.synchronizer),
            name="certwatchd-reload",
            daemon=True,
        )
        self._reload_thread = thread
        thread.start()

    def _reload_worker(
        self, settings: Settings, synchronizer: Synchronizer
    ) -> None:
        with self._reloads.watching():
            self._verdict = reload_and_verify(settings, synchronizer)
        self._wakeup.wake()

    def _finish_reload(self, now: float) -> None:
        thread = self._reload_thread
        if thread is None or thread.is_alive():
            return
        thread.join()
        self._reload_thread = None
        verdict, self._verdict = self._verdict, None
        if verdict is None:
            return
        self.reloads_finished += 1
        self._note_verification(verdict)
        if verdict.reload.ok:
            self._backoff.succeeded()
            self._last_reload = f"ok at {_clock_time()}"
            return
        delay = self._backoff.failed(now)
        self._last_reload = f"failed at {_clock_time()}"
        self.runtime.reload.request(now)
        log.error(
            "reload.retry_scheduled",
            in_seconds=round(delay, 1),
            failures=self._backoff.failures,
        )

    def _note_verification(self, verdict: Verdict) -> None:
        if not verdict.outcomes:
            return
        if verdict.ok:
            self._last_verify = f", verified at {_clock_time()}"
        elif verdict.recovered:
            hosts = ",".join(verdict.rolled_back)
            self._last_verify = f", verify failed, rolled back {hosts}"
        else:
            self._last_verify = f", VERIFY FAILED at {_clock_time()}"

    def _check_expiry(self) -> None:
        """Report the hosts near expiry once a day, by either clock.

        The wall clock can jump (a clock set by hand, a machine resumed)
        while the monotonic one does not, and a jump forward can bring
        expiry days nearer at once.
        """
        now = self._clock()
        wall = time.time()
        if now < self._next_expiry and wall < self._next_expiry_wall:
            return
        self._next_expiry = now + EXPIRY_CHECK_SECONDS
        self._next_expiry_wall = wall + EXPIRY_CHECK_SECONDS
        expiry = self.runtime.settings.expiry
        for host, not_after in self._expiries:
            days = days_left(not_after, wall)
            if days < expiry.critical_days:
                log.error("cert.expiring", host=host, days_left=days)
            elif days < expiry.warn_days:
                log.warning("cert.expiring", host=host, days_left=days)

    def _ping(self) -> None:
        """Ping systemd's watchdog if due and the observer is alive."""
        if self._watchdog_every is None or self._runtime is None:
            return
        now = self._clock()
        if now - self._last_ping < self._watchdog_every:
            return
        if not self.runtime.watcher.is_alive():
            return
        self._last_ping = now
        self._notifier.watchdog()

    def _sleep_for(self) -> float:
        """Return how long the loop may sleep before something is due."""
        now = self._clock()
        candidates: list[float | None] = [now + TICK_SECONDS]
        if self._watchdog_every is not None:
            candidates.append(self._last_ping + self._watchdog_every)
        if self._reload_thread is None:
            # While a reload runs, _turn holds all of these back, and the
            # reload's end wakes the loop.
            quiet = self.runtime.settings.reload.debounce_seconds
            candidates += [
                now if self._reconcile_reason else self._next_reconcile,
                self._dirty.next_quiet(quiet),
                self._reload_due(),
            ]
        wake_at = min(c for c in candidates if c is not None)
        return max(wake_at - now, 0.0)

    def _reload_due(self) -> float | None:
        """Return when a requested reload may start: due, and no backoff."""
        due = self.runtime.reload.due_at()
        retry = self._backoff.retry_at
        if due is None or retry is None:
            return due
        return max(due, retry)

    def _reread_settings(self) -> None:
        self._notifier.reloading()
        log.info("daemon.reloading_settings")
        old = self.runtime
        try:
            runtime = self._build(load_settings(self._config))
        except ConfigError as exc:
            log.error(
                "daemon.settings_rejected",
                error=str(exc),
                consequence="keeping the previous settings",
            )
            logs.configure(old.settings.log.level, old.settings.log.format)
        else:
            old.watcher.stop()
            runtime.reload.first = old.reload.first
            runtime.reload.last = old.reload.last
            self._runtime = runtime
            runtime.watcher.start()
            self._expiries.clear()
        self._reconcile(self._clock(), "settings re-read")
        self._notifier.ready(self._status())

    def _status(self) -> str:
        if self._expiries.soonest is None:
            soonest = "no hosts installed"
        else:
            host, not_after = self._expiries.soonest
            days = days_left(not_after, time.time())
            soonest = f"soonest expiry {host} in {days} days"
        text = f"{len(self._expiries)} hosts, {soonest}, "
        text += f"last reload {self._last_reload}{self._last_verify}"
        if self._runtime is not None and self.runtime.watcher.limited:
            text += ", inotify limit reached"
        return text


def _clock_time() -> str:
    return datetime.now(UTC).strftime("%H:%M:%SZ")


def serve(config: Path | None) -> int:
    """Run the daemon with the settings at ``config``."""
    return Daemon(config).serve()
