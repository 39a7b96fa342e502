"""The daemon as a real process, and what it tells its service manager.

`NotifyListener` binds the unix datagram socket systemd would offer in
``$NOTIFY_SOCKET`` and keeps every message with the instant it arrived;
`DaemonProcess` runs ``certwatchd run`` with JSON logs and reads them
back; `PairSampler` reads every host's pair in a certificate directory
every few milliseconds and remembers each instant at which a key did not
match its certificate, or one of the two files was missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import TracebackType

# Variables a service manager sets, and the daemon's own overrides: none
# may leak from the environment the tests run in.
_MANAGER_VARIABLES = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"}
)


def wait_until(
    condition: Callable[[], bool], timeout: float, interval: float = 0.01
) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def monotonic_usec() -> int:
    """Return CLOCK_MONOTONIC in microseconds, as sd_notify(3) counts it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@dataclass(frozen=True)
class Message:
    """One datagram that reached the notify socket, split into fields."""

    at: float
    fields: dict[str, str]


class NotifyListener:
    """A notify socket, read by a thread that keeps every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.02)
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._receive, name="notify-listener", daemon=True
        )
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            at = time.monotonic()
            lines = data.decode("utf-8", "replace").splitlines()
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            with self._lock:
                self._messages.append(Message(at, fields))

    def messages(
        self, key: str | None = None, since: float = 0.0
    ) -> list[Message]:
        """Return the messages since ``since`` holding ``key``, in order."""
        with self._lock:
            found = list(self._messages)
        return [
            message
            for message in found
            if message.at >= since and (key is None or key in message.fields)
        ]

    def wait_for(
        self, key: str, since: float = 0.0, timeout: float = 10.0
    ) -> Message:
        """Return the first message holding ``key`` since ``since``."""
        found: list[Message] = []

        def arrived() -> bool:
            found[:] = self.messages(key, since)
            return bool(found)

        if not wait_until(arrived, timeout):
            msg = f"no {key} within {timeout} s; got {self.messages()}"
            raise AssertionError(msg)
        return found[0]

    def close(self) -> None:
        """Stop reading and release the socket."""
        self._closing.set()
        self._thread.join(timeout=5)
        self._socket.close()


def daemon_env(
    notify: NotifyListener | None = None, watchdog_usec: int | None = None
) -> dict[str, str]:
    """Return this environment without a service manager's variables.

    ``notify`` and ``watchdog_usec`` put back the ones systemd would set
    for a ``Type=notify`` unit with ``WatchdogSec=``.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in _MANAGER_VARIABLES and not name.startswith("CERTWATCHD")
    }
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


def run_argv(config: Path) -> list[str]:
    """Return the command line that starts the daemon on ``config``."""
    return [sys.executable, "-m", "certwatchd", "run", "--config", str(config)]


class DaemonProcess:
    """A child process whose stdout and stderr go to ``log_path``."""

    def __init__(
        self, argv: list[str], log_path: Path, env: dict[str, str]
    ) -> None:
        self.log_path = log_path
        self.started = time.monotonic()
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def text(self) -> str:
        """Return everything the process has written so far."""
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        """Parse the JSON log lines written so far."""
        found = []
        for line in self.text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the last line, still being written
        return found

    def named(self, name: str, **fields: object) -> list[dict[str, object]]:
        """Return the events called ``name`` whose fields match."""
        return [
            event
            for event in self.events()
            if event.get("event") == name
            and all(event.get(k) == v for k, v in fields.items())
        ]

    def errors(self) -> list[dict[str, object]]:
        """Return the error-level events."""
        return [e for e in self.events() if e.get("level") == "error"]

    def wait_for_event(
        self,
        name: str,
        count: int = 1,
        timeout: float = 10.0,
        **fields: object,
    ) -> list[dict[str, object]]:
        """Wait for ``count`` events called ``name``; return all of them."""
        found: list[dict[str, object]] = []

        def arrived() -> bool:
            found[:] = self.named(name, **fields)
            return len(found) >= count

        if not wait_until(arrived, timeout, interval=0.02):
            msg = (
                f"{len(found)} of {count} {name} events in {timeout} s;"
                f" log:\n{self.text()[-4000:]}"
            )
            raise AssertionError(msg)
        return found

    def send(self, signum: int) -> None:
        """Send ``signum`` to the process."""
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to end and return its status."""
        return self.process.wait(timeout=timeout)

    def is_running(self) -> bool:
        """Say whether the process has not ended yet."""
        return self.process.poll() is None

    def kill(self) -> None:
        """End the process by its pid if it still runs, and reap it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def kill_pid(pid: int, commands: tuple[str, ...]) -> None:
    """Kill ``pid`` if it still runs one of ``commands``, started by a test.

    The command line is checked first, so a pid reused by an unrelated
    process since is left alone.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().decode(errors="replace").split("\0")
    except FileNotFoundError:
        return
    if not any(part in argv for part in commands):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def is_alive(pid: int) -> bool:
    """Say whether ``pid`` names a running process (zombies are dead)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in {"Z", "X"}


def cpu_seconds(pid: int) -> float:
    """Return the CPU time, user plus system, ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def leaf(pem: bytes) -> x509.Certificate:
    """Return the first certificate in ``pem``."""
    return x509.load_pem_x509_certificate(pem)


def serial_of(path: Path) -> int:
    """Return the serial number of the leaf in the file at ``path``."""
    return leaf(path.read_bytes()).serial_number


def is_matching_pair(cert_pem: bytes, key_pem: bytes) -> bool:
    """Say whether the key belongs to the leaf, by their public keys."""
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    key = serialization.load_pem_private_key(key_pem, password=None)
    return leaf(cert_pem).public_key().public_bytes(der, spki) == (
        key.public_key().public_bytes(der, spki)
    )


@dataclass(frozen=True)
class Torn:
    """One sampled instant at which a host's pair was not usable."""

    at: float
    round: int
    host: str
    problem: str


@dataclass
class PairSampler:
    """Reads each host's certificate and key every ``interval`` seconds.

    A sample reads the certificate, the key, then the certificate again;
    it counts only when both certificate reads agree, so the key read
    between them saw the directory as it was at one instant, and a
    mismatch is the directory's, not the reader's.
    """

    pairs: dict[str, tuple[Path, Path]]
    interval: float = 0.002
    samples: int = 0
    rounds: int = 0
    inconclusive: int = 0
    torn: list[Torn] = field(default_factory=list)
    _matches: dict[tuple[bytes, bytes], bool] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(
            target=self._run, name="pair-sampler", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def windows(self) -> list[float]:
        """Return how long each torn stretch lasted, in seconds.

        A stretch is one host torn in consecutive rounds, timed from its
        first torn sample to its last; a single torn sample lasts 0 s.
        """
        lasted = []
        for host in self.pairs:
            start: Torn | None = None
            last: Torn | None = None
            for torn in (t for t in self.torn if t.host == host):
                if last is None or torn.round != last.round + 1:
                    if start is not None and last is not None:
                        lasted.append(last.at - start.at)
                    start = torn
                last = torn
            if start is not None and last is not None:
                lasted.append(last.at - start.at)
        return lasted

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rounds += 1
            for host, (cert_path, key_path) in self.pairs.items():
                self._sample(host, cert_path, key_path)
            time.sleep(self.interval)

    def _sample(self, host: str, cert_path: Path, key_path: Path) -> None:
        for _ in range(5):
            cert = _read(cert_path)
            key = _read(key_path)
            if _read(cert_path) == cert:
                break
        else:
            self.inconclusive += 1
            return

        self.samples += 1
        problem = None
        if cert is None or key is None:
            problem = "certificate missing" if cert is None else "key missing"
        elif not self._is_match(cert, key):
            problem = "key does not match certificate"
        if problem is not None:
            self.torn.append(
                Torn(time.monotonic(), self.rounds, host, problem)
            )

    def _is_match(self, cert: bytes, key: bytes) -> bool:
        known = self._matches.get((cert, key))
        if known is None:
            try:
                known = is_matching_pair(cert, key)
            except ValueError:
                known = False
            self._matches[cert, key] = known
        return known


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
