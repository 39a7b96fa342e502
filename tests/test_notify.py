from __future__ import annotations

import gc
import os
import socket
import warnings

import pytest

from certwatchd.notify import Notifier, watchdog_interval
from daemon_process import monotonic_usec


def release(notifier):
    """Close the socket sdnotify opened; the notifier has no close()."""
    opened = notifier._notifier.socket  # noqa: SLF001 - see the xfail below
    if opened is not None:
        opened.close()


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """Bind a notify socket and name it in NOTIFY_SOCKET, as systemd does."""
    path = tmp_path / "notify"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listening.bind(str(path))
    listening.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield listening
    listening.close()


@pytest.fixture
def notifier(manager):
    """Build a notifier on the bound socket; release it afterwards."""
    del manager
    notifier = Notifier()
    yield notifier
    release(notifier)


def received(listening):
    """Return the next datagram as its lines."""
    return listening.recv(65536).decode().splitlines()


def is_empty(listening):
    """Say whether no datagram is waiting."""
    listening.settimeout(0.05)
    try:
        listening.recv(65536)
    except TimeoutError:
        return True
    return False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch):
    """Pings are due every WATCHDOG_USEC/2, in seconds."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    assert watchdog_interval() == 0.5


def test_watchdog_interval_without_watchdog_usec(monkeypatch):
    """Without WATCHDOG_USEC there is nothing to ping."""
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    assert watchdog_interval() is None


def test_watchdog_interval_for_this_pid(monkeypatch):
    """WATCHDOG_PID naming this process keeps the watchdog on."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    assert watchdog_interval() == 15.0


def test_watchdog_interval_for_another_pid(monkeypatch):
    """WATCHDOG_PID naming another process means this one must not ping."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))

    assert watchdog_interval() is None


def test_watchdog_interval_ignores_garbage(monkeypatch):
    """A WATCHDOG_USEC that is not a number turns the watchdog off."""
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    assert watchdog_interval() is None


def test_ready_carries_status(notifier, manager):
    """READY=1 and the status line arrive in one datagram."""
    notifier.ready("2 hosts, last reload none yet")

    assert received(manager) == [
        "READY=1",
        "STATUS=2 hosts, last reload none yet",
    ]


def test_status_sent_only_when_it_changes(notifier, manager):
    """A status equal to the last one sent is not sent again."""
    notifier.ready("1 hosts")
    received(manager)

    notifier.status("1 hosts")
    assert is_empty(manager)
    notifier.status("2 hosts")

    assert received(manager) == ["STATUS=2 hosts"]


def test_watchdog_ping(notifier, manager):
    """A ping is the single line WATCHDOG=1."""
    notifier.watchdog()

    assert received(manager) == ["WATCHDOG=1"]


def test_reloading_carries_monotonic_time(notifier, manager):
    """RELOADING=1 comes with MONOTONIC_USEC read when it was sent."""
    before = monotonic_usec()
    notifier.reloading()
    after = monotonic_usec()

    reloading, stamp = received(manager)
    assert reloading == "RELOADING=1"
    name, usec = stamp.split("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_stopping(notifier, manager):
    """Shutting down says STOPPING=1."""
    notifier.stopping()

    assert received(manager) == ["STOPPING=1"]


def test_abstract_notify_socket(monkeypatch):
    """An abstract socket name (@...) is reached as systemd offers it."""
    name = f"certwatchd-test-{os.getpid()}"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listening.bind("\0" + name)
    listening.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    notifier = Notifier()

    try:
        notifier.watchdog()
        assert received(listening) == ["WATCHDOG=1"]
    finally:
        release(notifier)
        listening.close()


def test_without_notify_socket_nothing_happens(monkeypatch):
    """Without NOTIFY_SOCKET every call returns quietly."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with warnings.catch_warnings():
        # sdnotify drops a socket it could not connect; see the xfail below.
        warnings.simplefilter("ignore", ResourceWarning)
        notifier = Notifier()

    notifier.ready("0 hosts")
    notifier.status("1 hosts")
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()


def test_notify_socket_gone_is_not_fatal(manager):
    """A manager that went away costs messages, never an exception."""
    notifier = Notifier()
    manager.close()

    try:
        notifier.ready("0 hosts")
        notifier.watchdog()
    finally:
        release(notifier)


@pytest.mark.parametrize("with_socket", [True, False])
def test_notifier_leaves_no_unclosed_socket(
    tmp_path, monkeypatch, with_socket
):
    """A notifier used, closed and dropped leaves no socket open."""
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listening.bind(str(tmp_path / "notify"))
    if with_socket:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    else:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            notifier = Notifier()
            notifier.ready("0 hosts")
            notifier.stopping()
            notifier.close()
            notifier.close()
            notifier.watchdog()
            del notifier
            gc.collect()
    finally:
        listening.close()

    leaks = [str(w.message) for w in caught if w.category is ResourceWarning]
    assert leaks == []
