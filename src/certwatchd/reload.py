"""Running the reload command: bounded in time and in what it may print."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

log = structlog.get_logger()

OUTPUT_LIMIT = 4096


@dataclass(frozen=True)
class ReloadResult:
    """How one run of the reload command ended."""

    command: tuple[str, ...]
    returncode: int | None
    seconds: float
    output: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Say whether the command ran and exited 0."""
        return self.error is None and self.returncode == 0


class Supervisor:
    """Keeps track of the reload commands a daemon runs, to end them.

    Commands that :func:`run_reload` starts on a thread inside
    :meth:`watching` are known here until they exit; :meth:`end` kills
    those still running, each with its process group, and keeps any more
    from starting, so that none outlives the daemon.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._ended: set[subprocess.Popen[bytes]] = set()
        self._closed = False

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Track the commands this thread runs inside the block."""
        _current.supervisor = self
        try:
            yield
        finally:
            _current.supervisor = None

    def end(self) -> int:
        """Kill the commands still running; start no more.

        Returns how many were killed.
        """
        with self._lock:
            self._closed = True
            running = list(self._running)
            self._ended.update(running)
        for process in running:
            _kill_group(process)
        return len(running)

    def start(self, command: tuple[str, ...]) -> subprocess.Popen[bytes]:
        """Start ``command`` in a new session; refuse once ended.

        Raises :class:`EndedError` after :meth:`end`, and ``OSError`` when the
        command cannot be run.
        """
        # Under the lock, so that end() cannot miss a command starting.
        with self._lock:
            if self._closed:
                raise EndedError
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._running.add(process)
            return process

    def finished(self, process: subprocess.Popen[bytes]) -> bool:
        """Forget a reaped ``process``; say whether :meth:`end` killed it."""
        with self._lock:
            self._running.discard(process)
            killed = process in self._ended
            self._ended.discard(process)
            return killed


class EndedError(Exception):
    """The supervisor has ended its commands and starts no more."""


class _Current(threading.local):
    supervisor: Supervisor | None = None


_current = _Current()
# Commands run outside Supervisor.watching(): tracked, never ended.
_unsupervised = Supervisor()


def run_reload(command: tuple[str, ...], timeout: float) -> ReloadResult:
    """Run ``command`` (argv, no shell) and log how it ended.

    Output is read as it comes and only its last 4 KiB are kept, so a
    command printing megabytes costs no memory. A command still running
    at ``timeout`` is killed together with its process group, as is one
    running when the :class:`Supervisor` watching this thread ends.
    """
    supervisor = _current.supervisor or _unsupervised
    started = time.monotonic()
    try:
        process = supervisor.start(command)
    except EndedError:
        result = ReloadResult(
            command, None, 0.0, "", "not run: certwatchd is stopping"
        )
        _log(result)
        return result
    except OSError as exc:
        result = ReloadResult(
            command,
            None,
            time.monotonic() - started,
            "",
            f"cannot run {command[0]!r}: {exc.strerror}",
        )
        _log(result)
        return result

    try:
        output, timed_out = _collect(process, started + timeout)
        returncode = process.wait()
    finally:
        stopped = supervisor.finished(process)
    error = f"killed after {timeout:g} s timeout" if timed_out else None
    if error is None and returncode != 0:
        error = (
            "killed as certwatchd stopped"
            if stopped
            else f"exited with status {returncode}"
        )
    result = ReloadResult(
        command,
        returncode,
        time.monotonic() - started,
        output.decode("utf-8", "replace").strip(),
        error,
    )
    _log(result)
    return result


def _collect(
    process: subprocess.Popen[bytes], deadline: float
) -> tuple[bytes, bool]:
    """Read the tail of the output until EOF or the deadline."""
    assert process.stdout is not None  # noqa: S101 - set by Popen above
    tail = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(process)
                process.stdout.close()
                return tail, True
            if not selector.select(remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            tail = (tail + chunk)[-OUTPUT_LIMIT:]

    process.stdout.close()
    if not _exits_by(process, deadline):
        _kill_group(process)
        return tail, True
    return tail, False


def _exits_by(process: subprocess.Popen[bytes], deadline: float) -> bool:
    """Wait until ``process`` exits or the deadline passes; say which.

    A pidfd becomes readable when the process exits, so the wait is one
    select. Popen.wait(timeout) instead polls with time.sleep, which also
    fails outright under libfaketime's clock_nanosleep.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(pidfd, selectors.EVENT_READ)
            while process.poll() is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                selector.select(remaining)
    finally:
        os.close(pidfd)
    return True


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _log(result: ReloadResult) -> None:
    fields = {
        "command": " ".join(result.command),
        "rc": result.returncode,
        "seconds": round(result.seconds, 3),
        "output": result.output[-1000:],
    }
    if result.ok:
        log.info("reload.finished", **fields)
    else:
        log.error("reload.failed", error=result.error, **fields)
