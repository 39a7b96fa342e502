"""One pass: find, validate, choose and install a pair for every host.

The one-shot ``certwatchd sync`` and the daemon both run this pass; the
daemon only decides when. Reloading Prosody is the caller's business.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from certwatchd.cache import LineageCache, ValidationCache
from certwatchd.certificate import Pair, TrustStore, load_pair
from certwatchd.checker import Checker
from certwatchd.config import Ownership, Settings
from certwatchd.errors import InstallError, PairError
from certwatchd.install import Content, Installer, Modes
from certwatchd.names import covers, is_wildcard
from certwatchd.sources import (
    Pending,
    Source,
    hand_placed,
    list_lineages,
)
from certwatchd.state import FilePath, StateDir

log = structlog.get_logger()

_LIBC_NAME = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_LIBC_NAME) if _LIBC_NAME else None

# Up to this many hosts, validated pairs and records stay in memory
# between passes; beyond it, each pass reads them from the state
# directory, so the memory of a daemon at rest does not grow with them.
_KEPT_IN_MEMORY = 500


@dataclass(frozen=True)
class Choice:
    """The pair one host should have, and whether the disk must change."""

    host: str
    source: Source
    pair: Pair
    write: bool


@dataclass
class Plan:
    """Everything a pass would do, before it does any of it."""

    choices: list[Choice] = field(default_factory=list)
    corrections: list[tuple[Path, int, str]] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    broken: list[tuple[Source, PairError]] = field(default_factory=list)
    serving: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    """What a pass did."""

    installed: list[str] = field(default_factory=list)
    corrected: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    hosts: dict[str, datetime] = field(default_factory=dict)
    broken: list[tuple[Source, PairError]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Say whether Prosody needs a reload to see the result."""
        return bool(self.installed or self.corrected)

    @property
    def ok(self) -> bool:
        """Say whether nothing was refused and nothing failed."""
        return not self.refused and not self.failed


class Synchronizer:
    """Keeps the certificate directory in step with the sources."""

    def __init__(
        self,
        settings: Settings,
        ownership: Ownership,
        trust: TrustStore,
        tick: Callable[[], None] | None = None,
        *,
        workers: int = 1,
    ) -> None:
        self.settings = settings
        self.trust = trust
        install = settings.install
        self.state = StateDir(settings.state.dir, install.certs_dir)
        self.installer = Installer(
            install.certs_dir,
            install.layout,
            Modes(ownership, install.cert_mode, install.key_mode),
            self.state,
        )
        self.lineages = LineageCache(self.state)
        self.checker = Checker(
            trust,
            ValidationCache(self.state),
            self.lineages,
            tick or _nothing,
            workers=workers,
        )
        # Host -> fingerprint of the leaf Prosody should serve for it,
        # for the hosts whose endpoints are probed after a reload.
        self.expected: dict[str, str] = {}
        self._probed = {e.host for e in settings.verify.endpoints}
        # Held by every method that writes, so a rollback on the reload
        # thread never interleaves with a pass.
        self.lock = threading.RLock()
        self._reported: dict[str, str] = {}
        self._released = False

    def run(
        self, *, dry_run: bool = False, settled: Collection[str] = ()
    ) -> Report:
        """Run one pass and return what it did (or would do)."""
        with self.lock:
            report = self._run(dry_run=dry_run, settled=settled)
            # Only now is the plan, which holds every pair, gone.
            if not dry_run:
                self._release(len(report.hosts))
            return report

    def _run(self, *, dry_run: bool, settled: Collection[str]) -> Report:
        plan = self.plan(settled=settled)
        report = Report(
            refused=dict(plan.refused),
            pending=[item.name for item in plan.pending],
            hosts={c.host: c.pair.not_after for c in plan.choices},
            broken=list(plan.broken),
        )
        if dry_run:
            for choice in plan.choices:
                if choice.write:
                    _log_choice("cert.would_install", choice)
            for path, _, problem in plan.corrections:
                log.info("cert.would_correct", path=str(path), found=problem)
            report.installed = [c.host for c in plan.choices if c.write]
            report.corrected = [str(p) for p, _, _ in plan.corrections]
            return report

        self._apply(plan, report)
        self.checker.save()
        self.lineages.save()
        if self.state.dirty:
            self.state.save(durable=False)
        for host, fingerprint in plan.serving.items():
            self._expect(host, fingerprint)
        for choice in plan.choices:
            if not choice.write or choice.host in report.installed:
                self._expect(choice.host, choice.pair.fingerprint)
        return report

    def _expect(self, host: str, fingerprint: str) -> None:
        """Note what Prosody should serve for ``host``, if it is probed."""
        if host in self._probed:
            self.expected[host] = fingerprint

    def _release(self, hosts: int) -> None:
        """Bound what stays in memory between passes.

        Beyond a few hundred hosts the caches are left on disk, where the
        next pass finds them, rather than kept in memory.
        """
        everything = hosts > _KEPT_IN_MEMORY
        self.checker.release(everything=everything)
        if not everything:
            return
        self.lineages.release()
        self.state.release()
        self._released = True
        # Now, while the plan's pairs are gone but the report is not, so
        # what the caller makes of the report packs into the memory the
        # pass still pins; return_free_memory() hands back the rest.
        _return_free_memory()

    def return_free_memory(self) -> None:
        """Hand back what the last pass freed, once its report is gone.

        Only after a pass that left its caches on disk: below that size
        the memory is kept for the next pass.
        """
        if self._released:
            self._released = False
            _return_free_memory()

    def plan(self, *, settled: Collection[str] = ()) -> Plan:
        """Decide what every host should hold; change nothing."""
        now = datetime.now(UTC)
        plan = Plan()
        self.checker.begin()
        self.lineages.begin()
        self.state.forget()
        sources = self._discover(plan, settled)
        # Past a few hundred pairs, validations are not kept in memory
        # (see _release), so their files need no stat signature either.
        outcomes = self.checker.check_all(
            sources, now, remember=len(sources) <= _KEPT_IN_MEMORY
        )
        valid: dict[str, tuple[Source, Pair]] = {}
        for source, outcome in zip(sources, outcomes, strict=True):
            if isinstance(outcome, PairError):
                plan.refused[str(outcome.path)] = outcome.reason
                self._report_refusal(source, outcome)
                if source.origin == "prosody" and outcome.breaks_tls:
                    plan.broken.append((source, outcome))
            else:
                valid[source.key] = (source, outcome)
                self._reported.pop(source.key, None)

        for source, _ in valid.values():
            if source.origin != "prosody":
                continue
            self._plan_corrections(plan, source.cert_path, source.key_path)
            directory = source.cert_path.parent
            if directory != self.settings.sources.prosody_certs:
                self._plan_correction(
                    plan, directory, self.installer.modes.dir_mode
                )

        names = _NameIndex(valid.values())
        for host in sorted(self._hosts(valid)):
            self._plan_host(plan, host, names.covering(host), now)
        self.checker.end()
        return plan

    def _discover(self, plan: Plan, settled: Collection[str]) -> list[Source]:
        found: list[Source] = []
        live = self.settings.sources.letsencrypt_live
        for root in (live, self.settings.sources.prosody_certs):
            if not root.is_dir():
                self._once(
                    str(root),
                    "source.missing",
                    "warning",
                    path=str(root),
                    consequence="nothing found there until it exists",
                )
        for name in list_lineages(live):
            item = self.lineages.read(live, name, settled=name in settled)
            if isinstance(item, Pending):
                plan.pending.append(item)
                log.info(
                    "lineage.pending",
                    lineage=name,
                    path=str(item.shown),
                    reason=item.reason,
                )
            elif item is not None:
                found.append(item)
        found.extend(
            hand_placed(self.settings.sources.prosody_certs, self._is_ours)
        )
        return found

    def _is_ours(self, path: FilePath) -> bool:
        if not self.state.is_link(path):
            return self.state.is_ours(path)
        try:
            return os.readlink(path).startswith(".certwatchd-")
        except OSError:
            return False

    def _report_refusal(self, source: Source, exc: PairError) -> None:
        if self._reported.get(source.key) == exc.reason:
            return
        self._reported[source.key] = exc.reason
        log.error(
            "cert.refused",
            source=source.key,
            path=exc.path,
            reason=exc.reason,
        )

    def _hosts(self, valid: dict[str, tuple[Source, Pair]]) -> set[str]:
        configured = self.settings.install.hosts
        if configured:
            return set(configured)

        hosts = set()
        for source, pair in valid.values():
            names = [name for name in pair.names if not is_wildcard(name)]
            if not names:
                self._once(
                    source.key,
                    "cert.wildcard_only",
                    "warning",
                    source=str(source.shown),
                    names=",".join(pair.names),
                    fix="list the hosts it should serve in install.hosts",
                )
            hosts.update(names)
        return hosts

    def _plan_host(
        self,
        plan: Plan,
        host: str,
        covering: list[tuple[Source, Pair]],
        now: datetime,
    ) -> None:
        best = self._best(host, covering)
        if best is None:
            return
        source, pair = best
        # Strings, not paths: this runs for every host at every pass.
        files = self.installer.files(host)
        if os.fspath(source.cert_path) == files[0]:
            plan.serving[host] = pair.fingerprint
            return
        unread = self.checker.unread(pair)
        if unread is not None:
            write = self.installer.differs(files, *unread)
        else:
            content = Content(host, pair.cert_pem, pair.key_pem)
            write = self.installer.needs_write(content, files)
        if write and unread is not None:
            try:
                pair = self.checker.read_pair(source, now)
            except PairError as exc:
                plan.refused[str(exc.path)] = exc.reason
                self._report_refusal(source, exc)
                return
        if write:
            installed = self._installed_pair(host, now)
            if installed is not None and installed.not_after > pair.not_after:
                plan.kept.append(host)
                plan.serving[host] = installed.fingerprint
                self._once(
                    host,
                    "cert.kept_installed",
                    "warning",
                    host=host,
                    source=str(source.shown),
                    source_not_after=pair.not_after.isoformat(),
                    installed_not_after=installed.not_after.isoformat(),
                    reason="the source expires before the installed one",
                )
                return
        plan.choices.append(Choice(host, source, pair, write))
        if not write:
            self._plan_corrections(plan, *files)

    def _best(
        self, host: str, covering: list[tuple[Source, Pair]]
    ) -> tuple[Source, Pair] | None:
        """Choose the pair ``host`` should have, if any may serve it."""
        rejected = self.state.rejected(host)
        if rejected and any(p.fingerprint in rejected for _, p in covering):
            covering = [
                c for c in covering if c[1].fingerprint not in rejected
            ]
            if not covering:
                self._once(
                    host,
                    "cert.rejected_skipped",
                    "error",
                    host=host,
                    reason="Prosody did not serve it after a reload; "
                    "keeping the installed pair until certbot renews",
                )
                return None
        if not covering:
            self._once(host, "host.uncovered", "warning", host=host)
            return None
        return max(
            covering,
            key=lambda item: (
                item[1].not_before,
                item[1].not_after,
                str(item[1].cert_path),
            ),
        )

    def _installed_pair(self, host: str, now: datetime) -> Pair | None:
        if not os.path.lexists(self.installer.files(host)[0]):
            return None
        cert_path, key_path = self.installer.paths(host)
        source = Source("prosody", host, cert_path, key_path, cert_path)
        try:
            pair = self.checker.check(source, now, announce=False)
        except PairError:
            return None
        if not any(covers(name, host) for name in pair.names):
            return None
        return pair

    def _plan_corrections(
        self, plan: Plan, cert_path: FilePath, key_path: FilePath
    ) -> None:
        for path, is_key in ((cert_path, False), (key_path, True)):
            self._plan_correction(
                plan, path, self.installer.mode_for(key=is_key)
            )

    def _plan_correction(self, plan: Plan, path: FilePath, mode: int) -> None:
        info = self.state.stat_of(path)
        problem = self.installer.wrong_attributes(path, mode, info)
        if problem is not None:
            plan.corrections.append((Path(path), mode, problem))

    def _once(
        self, subject: str, event: str, level: str, **fields: str
    ) -> None:
        key = f"{event}:{subject}"
        text = repr(sorted(fields.items()))
        if self._reported.get(key) == text:
            return
        self._reported[key] = text
        getattr(log, level)(event, **fields)

    def _apply(self, plan: Plan, report: Report) -> None:
        for path, mode, problem in plan.corrections:
            if path.is_symlink():
                log.warning(
                    "cert.not_corrected",
                    path=str(path),
                    found=problem,
                    reason="it is a symlink; fix the file it points at",
                )
                continue
            try:
                self.installer.correct(path, mode)
            except InstallError as exc:
                log.error(
                    "cert.correct_failed", path=str(path), error=str(exc)
                )
                report.failed.append(str(path))
                continue
            log.info("cert.corrected", path=str(path), found=problem)
            report.corrected.append(str(path))

        writes = {c.host: c for c in plan.choices if c.write}
        contents = [
            Content(c.host, c.pair.cert_pem, c.pair.key_pem)
            for c in writes.values()
        ]
        done = self.installer.install(contents)
        for host in done:
            _log_choice("cert.installed", writes[host])
        report.installed = done
        report.failed.extend(sorted(set(writes) - set(done)))
        if writes:
            self.state.save()

    def quarantine(self, source: Source, error: PairError) -> None:
        """Move a broken hand-placed pair out of Prosody's directory.

        The pair is judged again first: this very pass may have installed
        over it, or the operator may have fixed it meanwhile.
        """
        with self.lock:
            if self._still_broken(source):
                self._quarantine(source, error)

    def _still_broken(self, source: Source) -> bool:
        if not os.path.lexists(source.cert_path) or self._is_ours(
            source.cert_path
        ):
            return False
        try:
            load_pair(source.cert_path, source.key_path, self.trust)
        except PairError as exc:
            return exc.breaks_tls
        return False

    def _quarantine(self, source: Source, error: PairError) -> None:
        if (
            source.cert_path.parent
            == source.key_path.parent
            != (self.settings.sources.prosody_certs)
        ):
            paths = [source.cert_path.parent]
        else:
            paths = [source.cert_path, source.key_path]
        try:
            destination = self.state.quarantine(paths)
        except InstallError as exc:
            log.error("cert.quarantine_failed", path=exc.args[0])
            return
        log.error(
            "cert.quarantined",
            path=str(source.shown),
            reason=error.reason,
            moved_to=str(destination),
            why="Prosody would load it at its next reload and lose TLS",
        )

    def reject(self, host: str, fingerprint: str) -> None:
        """Never install ``fingerprint`` for ``host`` again."""
        with self.lock:
            self.state.reject(host, fingerprint)
            self.state.save()

    def roll_back(self, hosts: Collection[str]) -> list[str]:
        """Reinstall each host's previous pair; return the hosts restored."""
        with self.lock:
            return self._roll_back(hosts)

    def _roll_back(self, hosts: Collection[str]) -> list[str]:
        contents = []
        for host in sorted(hosts):
            cert_path, key_path = self.state.previous_paths(host)
            try:
                pair = load_pair(cert_path, key_path, self.trust)
            except PairError as exc:
                log.error(
                    "rollback.impossible",
                    host=host,
                    reason=f"the previous pair {exc.reason}",
                )
                continue
            contents.append((pair, Content(host, pair.cert_pem, pair.key_pem)))

        restored = self.installer.install(
            [content for _, content in contents], keep_previous=False
        )
        if restored:
            self.state.save()
        for pair, content in contents:
            if content.host in restored:
                self._expect(content.host, pair.fingerprint)
                log.warning(
                    "rollback.installed",
                    host=content.host,
                    serial=pair.serial,
                    not_after=pair.not_after.date().isoformat(),
                )
        return restored


class _NameIndex:
    """Valid pairs by the names they cover, for one pass's choices."""

    def __init__(self, valid: Iterable[tuple[Source, Pair]]) -> None:
        self._by_name: dict[str, list[tuple[Source, Pair]]] = {}
        for item in valid:
            for name in item[1].names:
                self._by_name.setdefault(name, []).append(item)

    def covering(self, host: str) -> list[tuple[Source, Pair]]:
        """Return the pairs naming ``host`` or a wildcard that covers it."""
        found = {s.key: (s, p) for s, p in self._by_name.get(host, ())}
        parent = host.partition(".")[2]
        for source, pair in self._by_name.get(f"*.{parent}", ()):
            if covers(f"*.{parent}", host):
                found.setdefault(source.key, (source, pair))
        return list(found.values())


def _nothing() -> None:
    """Stand in for a missing ``tick``."""


def _return_free_memory() -> None:
    """Hand the heap a large pass freed back to the system, where it can.

    A daemon at rest after a pass over thousands of pairs would otherwise
    keep most of its peak size: Python keeps thousands of freed tuples
    and other small objects for reuse, which pins the arenas holding
    them, until a full collection empties those free lists; glibc keeps
    freed memory until it is trimmed.
    """
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)


def _log_choice(event: str, choice: Choice) -> None:
    log.info(
        event,
        host=choice.host,
        source=str(choice.source.shown),
        serial=choice.pair.serial,
        not_after=choice.pair.not_after.date().isoformat(),
        fingerprint=choice.pair.fingerprint[:16],
    )
