"""Cold and warm one-shot syncs: certwatchd against prosodyctl.

Every run is a whole command, interpreter start-up included, timed by
wall clock. A run that fails or leaves a host without a certificate
stops the benchmark instead of producing a number.
"""

from __future__ import annotations

import compileall
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from trees import Tree
from worlds import (
    World,
    certwatchd_command,
    prosodyctl_command,
)

TAIL = 2000


class BenchError(Exception):
    """A measured command failed or did not do its job."""


@dataclass
class ColdSync:
    """Cold runs of both tools on one tree, in the order they ran."""

    certwatchd: list[float] = field(default_factory=list)
    prosodyctl: list[float] = field(default_factory=list)
    first: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        """Each round's certwatchd time over prosodyctl's."""
        return [
            mine / theirs
            for mine, theirs in zip(
                self.certwatchd, self.prosodyctl, strict=False
            )
        ]

    @property
    def ratio(self) -> float | None:
        """The median of the per-round ratios, if prosodyctl ran."""
        return statistics.median(self.ratios) if self.ratios else None


@dataclass
class WarmSync:
    """Runs of certwatchd sync that should find nothing to do."""

    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def run_timed(
    argv: list[str], log: Path, env: dict[str, str]
) -> tuple[float, int]:
    """Run ``argv`` to completion; return wall-clock seconds and status.

    ``log`` receives the output of this run only.
    """
    with log.open("wb") as output:
        started = time.perf_counter()
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
        seconds = time.perf_counter() - started
    return seconds, result.returncode


def run_or_fail(argv: list[str], log: Path, env: dict[str, str]) -> float:
    """Run ``argv`` like `run_timed`; raise BenchError unless it exits 0."""
    seconds, status = run_timed(argv, log, env)
    if status != 0:
        msg = f"{' '.join(argv)} exited {status}: {describe_failure(log)}"
        raise BenchError(msg)
    return seconds


def describe_failure(log: Path) -> str:
    """Summarise a failed run from its output: its errors, or its tail."""
    text = log.read_bytes().decode("utf-8", "replace")
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event.get("level") == "error":
            what = f"{event['event']}: {event.get('error', '')}".strip()
            counts[what] = counts.get(what, 0) + 1
    if counts:
        return "; ".join(f"{n} x {what}" for what, n in counts.items())
    return text[-TAIL:].strip() or "no output"


def compile_package() -> None:
    """Byte-compile certwatchd, as ``pip install`` does for a user.

    An editable install under ``PYTHONDONTWRITEBYTECODE`` (this machine
    sets it) would otherwise compile every module at every run, a cost
    no installed copy pays.
    """
    import certwatchd  # noqa: PLC0415 - only to find where it lives

    compileall.compile_dir(
        Path(certwatchd.__file__).parent, quiet=1, force=False
    )


def clean_env() -> dict[str, str]:
    """Return this environment without systemd's or certwatchd's settings."""
    hidden = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
    return {
        name: value
        for name, value in os.environ.items()
        if name not in hidden
        and not name.startswith("CERTWATCHD")
        and name != "RENEWED_DOMAINS"
    }


def read_tree(tree: Tree) -> None:
    """Read every file of ``tree`` once, so no run pays for a cold cache."""
    for directory, _, names in os.walk(tree.config_dir):
        for name in names:
            Path(directory, name).read_bytes()


def cold_sync(
    tree: Tree,
    mine: World,
    theirs: World | None,
    rounds: int,
) -> ColdSync:
    """Alternate cold runs of both tools; who goes first alternates too.

    ``theirs`` is None to run certwatchd alone. A run that fails or
    leaves a host unserved is timed all the same and noted in
    ``failures``.
    """
    env = clean_env()
    result = ColdSync()
    runs = {
        "certwatchd": (mine, certwatchd_command(mine, "sync")),
    }
    if theirs is not None:
        runs["prosodyctl"] = (theirs, prosodyctl_command(theirs, tree))

    read_tree(tree)
    for index in range(rounds):
        order = list(runs) if index % 2 == 0 else list(reversed(runs))
        result.first.append(order[0])
        for name in order:
            world, argv = runs[name]
            world.empty()
            log = world.root / "run.log"
            seconds, status = run_timed(argv, log, env)
            getattr(result, name).append(seconds)
            result.files[name] = world.installed()
            problem = _problem(world, name, tree, status, log)
            if problem:
                result.failures.append(
                    f"cold {name} round {index + 1}: {problem}"
                )
            shown = f" FAILED: {problem}" if problem else ""
            print(
                f"    cold {name:<10} round {index + 1}:"
                f" {seconds:7.2f} s{shown}"
            )
    return result


def warm_sync(mine: World, rounds: int) -> WarmSync:
    """Time ``certwatchd sync`` runs that find nothing to change.

    Call after a cold run left the certificate directory in step.
    """
    env = clean_env()
    argv = certwatchd_command(mine, "sync")
    result = WarmSync()
    for index in range(rounds):
        reloads = len(mine.reload_times())
        log = mine.root / "run.log"
        seconds, status = run_timed(argv, log, env)
        result.seconds.append(seconds)
        problem = None
        if status != 0:
            problem = f"exited {status}: {describe_failure(log)}"
        elif len(mine.reload_times()) != reloads:
            problem = "it reloaded, so it changed something"
        if problem:
            result.failures.append(f"warm round {index + 1}: {problem}")
        shown = f" FAILED: {problem}" if problem else ""
        print(
            f"    warm certwatchd round {index + 1}: {seconds:7.2f} s{shown}"
        )
    return result


def _problem(
    world: World, name: str, tree: Tree, status: int, log: Path
) -> str | None:
    """Say why a cold run failed, or None if every host can be served.

    prosodyctl writes one pair per certificate and lets Prosody fall
    back from a component to its parent host; certwatchd writes one pair
    per host.
    """
    files = world.installed()
    expected = len(tree.hosts) if name == "certwatchd" else tree.size
    problems = []
    if status != 0:
        problems.append(f"exited {status}")
    if files != expected:
        problems.append(f"installed {files:,} of {expected:,} certificates")
    if not problems:
        return None
    return ", ".join(problems) + f" ({describe_failure(log)})"
