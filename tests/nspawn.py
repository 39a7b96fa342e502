"""A throwaway machine with a real systemd as PID 1, for tests.

`Machine` boots this machine's own ``/usr`` with ``systemd-nspawn
--volatile=yes``: the root, ``/etc`` and ``/var`` are an empty tmpfs that
systemd populates at boot and that vanishes at power-off, so a test may
create users, write units and start services without touching the host.
The machine has a network namespace of its own with nothing but loopback,
so services inside may listen on their default ports.

Visible inside: ``/usr`` (read-only, hence ``/usr/bin/python3`` and
Debian's packages), the paths given in ``binds`` and ``mounts``, and what
the test writes.  Not visible: the host's ``/etc`` (so no openssl.cnf, no
CA bundle, no resolv.conf until written), ``/opt``, ``/home``, ``/root``
and ``/tmp``, hence neither a pyenv Python nor a virtual environment living
there unless it is mounted in.  A unit with ``PrivateTmp=yes`` does not see
the machine's ``/tmp`` either, so mount what units need elsewhere.

A virtual environment for inside must be built with ``/usr/bin/python3``,
and its console scripts name their interpreter by absolute path in their
``#!`` line.  `build_venv` builds one on the host, where the package index
is reachable, for being mounted at ``/opt/certwatchd`` inside::

    build_venv(project, tmp_path / "venv")
    with Machine(name, mounts={tmp_path / "venv": PREFIX}) as machine:
        machine.run([f"{PREFIX}/bin/certwatchd", "--version"])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

import pytest

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

PREFIX = Path("/opt/certwatchd")
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
SYSTEMD = Path("/usr/lib/systemd/systemd")
# Read by the machine's systemd like a kernel command line.  With a network
# namespace but no device, systemd-networkd-wait-online would hold the boot
# for two minutes; the first-boot wizard fails for want of a terminal.
BOOT_ARGS = (
    "systemd.mask=systemd-networkd-wait-online.service",
    "systemd.mask=systemd-firstboot.service",
)
# States in which units can be started.  "degraded" is the usual one: the
# host's enabled services (Prosody among them) fail in the empty /etc.
READY_STATES = frozenset({"running", "degraded"})
POWER_OFF_TIMEOUT = 20.0
HALT_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
HANDLER_TIMEOUT = 10.0


class MachineError(Exception):
    """Raised when a machine does not boot or a command inside fails."""


def is_available() -> bool:
    """Return whether machines can be booted here: root and the tools."""
    tools = ("systemd-nspawn", "nsenter", "unshare")
    return os.geteuid() == 0 and all(map(shutil.which, tools))


def require_machines() -> None:
    """Skip unless machines can boot here; with CI=true, fail instead."""
    if is_available():
        return
    reason = "needs root, systemd-nspawn (systemd-container) and nsenter"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class Machine:
    """A booted container, powered off when the ``with`` block ends.

    ``name`` becomes the hostname; keep it unique among the machines
    running at the same time, as nspawn names its state on the host by it.
    Each path in ``binds`` is mounted read-only at the same path inside;
    ``mounts`` maps host paths to the path where they appear inside,
    read-only too.
    """

    def __init__(
        self,
        name: str,
        binds: Sequence[Path] = (),
        *,
        mounts: Mapping[Path, Path] | None = None,
        boot_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.binds = list(binds)
        self.mounts = dict(mounts or {})
        self.boot_timeout = boot_timeout
        self.boot_seconds = 0.0
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._console: Path | None = None
        self._leader = 0

    @property
    def leader(self) -> int:
        """The host pid of the machine's systemd."""
        if not self._leader:
            msg = f"machine {self.name!r} is not running"
            raise MachineError(msg)
        return self._leader

    def __enter__(self) -> Self:
        try:
            self._boot()
        except BaseException:
            self._power_off()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._power_off()

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside as root, in all of the machine's namespaces.

        The command starts in ``/`` with a minimal environment; it is not
        a unit, so the machine's systemd neither tracks nor sandboxes it.
        With ``check``, a non-zero exit raises `MachineError` carrying the
        command's output.
        """
        command = [
            "nsenter",
            f"--target={self.leader}",
            "--all",
            "--root",
            "--wd",
            "--",
            *argv,
        ]
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": INSIDE_PATH, "LANG": "C.UTF-8"},
            check=False,
        )

        if check and result.returncode != 0:
            msg = (
                f"{' '.join(argv)!r} exited {result.returncode} in machine "
                f"{self.name!r}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}"
            )
            raise MachineError(msg)
        return result

    def write_file(
        self, path: str | Path, text: str, mode: int = 0o644
    ) -> None:
        """Create or replace the file ``path`` inside, owned by root.

        Missing parent directories are created with mode 0755.  The path is
        resolved inside, so symbolic links in it cannot lead to the host.
        """
        script = (
            'mkdir -p -- "$(dirname -- "$1")" && umask 077'
            ' && cat > "$1" && chmod "$2" "$1"'
        )
        self.run(
            ["sh", "-c", script, "sh", str(path), f"{mode:o}"], stdin=text
        )

    def read_file(self, path: str | Path) -> str:
        """Return the text of the file ``path`` inside."""
        return self.run(["cat", "--", str(path)]).stdout

    def show(self, unit: str, prop: str) -> str:
        """Return one property of ``unit`` as ``systemctl show`` gives it."""
        result = self.run(["systemctl", "show", "--value", "-p", prop, unit])
        return result.stdout.strip()

    def wait_until_handled(
        self, pid: str, signum: int, timeout: float = HANDLER_TIMEOUT
    ) -> None:
        """Wait until process ``pid`` inside has a handler for ``signum``.

        A daemon that writes its pidfile before installing its handlers
        dies of a signal sent in between; Prosody does so with SIGHUP.
        """
        bit = 1 << (signum - 1)  # the bit masks of /proc/PID/status
        deadline = time.monotonic() + timeout

        while time.monotonic() < deadline:
            status = self.read_file(f"/proc/{pid}/status").splitlines()
            caught = next(s for s in status if s.startswith("SigCgt:"))
            if int(caught.split()[1], 16) & bit:
                return
            time.sleep(0.05)

        name = signal.Signals(signum).name
        msg = f"pid {pid} in machine {self.name!r} did not handle {name}"
        raise MachineError(msg)

    def console(self) -> str:
        """Return what the machine printed on its console so far."""
        if self._console is None:
            return ""
        return self._console.read_text(encoding="utf-8", errors="replace")

    def _command(self) -> list[str]:
        # --register=no and --keep-unit: nspawn then needs neither
        # systemd-machined nor a systemd on the host to create a scope.
        command = [
            "systemd-nspawn",
            "--directory=/",
            "--volatile=yes",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--console=pipe",
            f"--machine={self.name}",
        ]
        command += [f"--bind-ro={path}" for path in self.binds]
        command += [
            f"--bind-ro={source}:{target}"
            for source, target in self.mounts.items()
        ]
        return [*command, "--boot", "--", *BOOT_ARGS]

    def _boot(self) -> None:
        started = time.monotonic()
        deadline = started + self.boot_timeout
        handle, name = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        self._console = Path(name)

        with os.fdopen(handle, "wb") as console:
            self._nspawn = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        self._leader = self._wait_for_leader(self._nspawn, deadline)
        self._wait_until_up(self._nspawn, deadline)

        self.boot_seconds = time.monotonic() - started

    def _wait_for_leader(
        self, nspawn: subprocess.Popen[bytes], deadline: float
    ) -> int:
        """Return the pid of the child of nspawn that became systemd.

        nspawn forks the machine's PID 1 as its own child, which first runs
        nspawn's setup code and then executes systemd.
        """
        children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children")

        while time.monotonic() < deadline:
            self._check_running(nspawn)
            try:
                pids = children.read_text(encoding="ascii").split()
            except FileNotFoundError:  # nspawn just ended; checked above
                pids = []
            for pid in pids:
                try:
                    executable = Path(f"/proc/{pid}/exe").readlink()
                except OSError:  # gone, or not yet ours to inspect
                    continue
                if executable == SYSTEMD:
                    return int(pid)
            time.sleep(0.01)

        reason = "systemd did not start"
        raise self._boot_error(reason)

    def _wait_until_up(
        self, nspawn: subprocess.Popen[bytes], deadline: float
    ) -> None:
        """Wait until the boot is over and units can be started."""
        state = ""

        while time.monotonic() < deadline:
            self._check_running(nspawn)
            try:
                result = self.run(
                    ["systemctl", "is-system-running", "--wait"],
                    check=False,
                    timeout=max(deadline - time.monotonic(), 0.1),
                )
            except subprocess.TimeoutExpired:
                break
            state = result.stdout.strip()
            if state in READY_STATES:
                return
            # Before the manager listens, systemctl fails at once.
            time.sleep(0.02)

        reason = f"boot did not finish, last state {state!r}"
        raise self._boot_error(reason)

    def _check_running(self, nspawn: subprocess.Popen[bytes]) -> None:
        if nspawn.poll() is not None:
            reason = f"systemd-nspawn exited with status {nspawn.returncode}"
            raise self._boot_error(reason)

    def _boot_error(self, reason: str) -> MachineError:
        msg = (
            f"machine {self.name!r}: {reason} within {self.boot_timeout} s;"
            f" console:\n{self.console()}"
        )
        return MachineError(msg)

    def _power_off(self) -> None:
        """Power off from inside, and signal nspawn only if that hangs."""
        nspawn = self._nspawn
        if nspawn is None:
            return

        if self._leader and nspawn.poll() is None and self._ask_power_off():
            _wait(nspawn, POWER_OFF_TIMEOUT)
        # nspawn turns SIGTERM into an orderly halt of the machine.
        for signum, timeout in (
            (signal.SIGTERM, HALT_TIMEOUT),
            (signal.SIGKILL, KILL_TIMEOUT),
        ):
            if nspawn.poll() is not None:
                break
            nspawn.send_signal(signum)
            _wait(nspawn, timeout)

        self._nspawn = None
        self._leader = 0
        if self._console is not None:
            self._console.unlink(missing_ok=True)
            self._console = None

    def _ask_power_off(self) -> bool:
        """Return whether the machine's systemd took the power-off job."""
        try:
            result = self.run(
                ["systemctl", "poweroff", "--no-block"], check=False
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0


def _wait(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for ``process`` to end, for ``timeout`` seconds at most."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


def build_venv(
    project: Path, destination: Path, prefix: Path = PREFIX
) -> None:
    """Install ``project`` into a new virtual environment at ``destination``.

    The environment is made with ``/usr/bin/python3`` for being mounted at
    ``prefix`` inside a machine: the build runs in a private mount
    namespace in which ``destination`` is mounted at ``prefix`` over an
    overlay of its parent, so the ``#!`` lines of its scripts name
    ``prefix`` while the host's own ``prefix`` is neither created nor
    changed.  The project is built from a copy, leaving its tree as it is.
    Needs the package index, so call it on the host, never inside.
    """
    if not prefix.parent.is_dir():
        msg = f"{prefix.parent} does not exist on the host (prefix {prefix})"
        raise MachineError(msg)
    destination.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="venv-build-") as scratch:
        source = Path(scratch, "source")
        shutil.copytree(
            project,
            source,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "build", "*.egg-info", "__pycache__"
            ),
        )
        for layer in ("upper", "work"):
            Path(scratch, layer).mkdir()
        overlay = (
            f"lowerdir={prefix.parent},upperdir={scratch}/upper,"
            f"workdir={scratch}/work"
        )
        script = (
            'set -e; mount -t overlay -o "$1" overlay "$2";'
            ' mkdir -p "$3"; mount --bind "$4" "$3";'
            ' /usr/bin/python3 -m venv "$3";'
            ' "$3/bin/pip" install --quiet --no-cache-dir "$5"'
        )
        result = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation=private",
                "sh",
                "-c",
                script,
                "sh",
                overlay,
                str(prefix.parent),
                str(prefix),
                str(destination),
                str(source),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    if result.returncode != 0:
        msg = (
            f"building the environment for {prefix} from {project} exited "
            f"{result.returncode}: {result.stderr}"
        )
        raise MachineError(msg)
