"""Running the reload command: bounded in time and in what it may print."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
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


def run_reload(command: tuple[str, ...], timeout: float) -> ReloadResult:
    """Run ``command`` (argv, no shell) and log how it ended.

    Output is read as it comes and only its last 4 KiB are kept, so a
    command printing megabytes costs no memory. A command still running
    at ``timeout`` is killed together with its process group.
    """
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
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

    output, timed_out = _collect(process, started + timeout)
    returncode = process.wait()
    error = f"killed after {timeout:g} s timeout" if timed_out else None
    if error is None and returncode != 0:
        error = f"exited with status {returncode}"
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
    remaining = deadline - time.monotonic()
    try:
        process.wait(timeout=max(remaining, 0))
    except subprocess.TimeoutExpired:
        _kill_group(process)
        return tail, True
    return tail, False


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
