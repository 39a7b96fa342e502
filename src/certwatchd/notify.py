"""Talking to systemd: readiness, status, watchdog pings, reload, stop.

Without ``$NOTIFY_SOCKET`` every call does nothing, so the daemon runs
the same under systemd, in a terminal and in tests.
"""

from __future__ import annotations

import os
import time

import sdnotify


def watchdog_interval() -> float | None:
    """Return how often to ping systemd's watchdog, or ``None``.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, and
    only when ``$WATCHDOG_PID`` is unset or names this process.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


class Notifier:
    """Sends sd_notify messages to the service manager.

    Holds a socket while ``$NOTIFY_SOCKET`` names one; :meth:`close`
    releases it.
    """

    def __init__(self) -> None:
        # Without a socket to name, sdnotify would open one and drop it
        # unclosed; so it is not asked to.
        self._notifier = (
            sdnotify.SystemdNotifier()
            if os.environ.get("NOTIFY_SOCKET")
            else None
        )
        self._status = ""

    def _send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def close(self) -> None:
        """Close the socket; later messages go nowhere."""
        notifier, self._notifier = self._notifier, None
        if notifier is not None and notifier.socket is not None:
            notifier.socket.close()

    def ready(self, status: str) -> None:
        """Say start-up (or a reload of the settings) is complete."""
        self._status = status
        self._send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Update the one-line status ``systemctl status`` shows."""
        if status != self._status:
            self._status = status
            self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        """Tell the watchdog the daemon is alive."""
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        """Say the settings are being re-read."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Say the daemon is shutting down."""
        self._send("STOPPING=1")
