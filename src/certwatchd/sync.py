"""One pass: find, validate, choose and install a pair for every host.

The one-shot ``certwatchd sync`` and the daemon both run this pass; the
daemon only decides when. Reloading Prosody is the caller's business.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from certwatchd.cache import ValidationCache
from certwatchd.certificate import Pair, TrustStore, load_pair
from certwatchd.config import Ownership, Settings
from certwatchd.errors import InstallError, PairError
from certwatchd.install import Content, Installer, Modes
from certwatchd.names import covers, is_wildcard
from certwatchd.sources import (
    Pending,
    Source,
    hand_placed,
    list_lineages,
    read_lineage,
)
from certwatchd.state import StateDir

log = structlog.get_logger()

# A validated pair is re-verified after this long even if its files did
# not change, so an intermediate that expires is noticed.
_REVERIFY_AFTER = timedelta(hours=1)


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


@dataclass(frozen=True)
class _Checked:
    pair: Pair
    signature: tuple[object, ...]
    verified_at: datetime


class Synchronizer:
    """Keeps the certificate directory in step with the sources."""

    def __init__(
        self,
        settings: Settings,
        ownership: Ownership,
        trust: TrustStore,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._tick = tick or _nothing
        self.trust = trust
        install = settings.install
        self.state = StateDir(settings.state.dir, install.certs_dir)
        self.installer = Installer(
            install.certs_dir,
            install.layout,
            Modes(ownership, install.cert_mode, install.key_mode),
            self.state,
        )
        self._checked: dict[tuple[Path, Path], _Checked] = {}
        self.verdicts = ValidationCache(self.state)
        # Host -> fingerprint of the leaf Prosody should serve for it.
        self.expected: dict[str, str] = {}
        # Held by every method that writes, so a rollback on the reload
        # thread never interleaves with a pass.
        self.lock = threading.RLock()
        self._reported: dict[str, str] = {}

    def run(
        self, *, dry_run: bool = False, settled: Collection[str] = ()
    ) -> Report:
        """Run one pass and return what it did (or would do)."""
        with self.lock:
            return self._run(dry_run=dry_run, settled=settled)

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
        self.verdicts.save()
        self.expected.update(plan.serving)
        for choice in plan.choices:
            if not choice.write or choice.host in report.installed:
                self.expected[choice.host] = choice.pair.fingerprint
        return report

    def plan(self, *, settled: Collection[str] = ()) -> Plan:
        """Decide what every host should hold; change nothing."""
        now = datetime.now(UTC)
        plan = Plan()
        self.installer.forget_reads()
        sources = self._discover(plan, settled)

        valid: dict[str, tuple[Source, Pair]] = {}
        for index, source in enumerate(sources):
            if index % 100 == 0:
                self._tick()
            try:
                valid[source.key] = (source, self._check(source, now))
            except PairError as exc:
                plan.refused[str(exc.path)] = exc.reason
                self._report_refusal(source, exc)
                if source.origin == "prosody" and exc.breaks_tls:
                    plan.broken.append((source, exc))
            else:
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
            item = read_lineage(live, name, settled=name in settled)
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

    def _is_ours(self, path: Path) -> bool:
        if path.is_symlink():
            return os.readlink(path).startswith(".certwatchd-")
        return self.state.is_ours(path, self.installer.read(path))

    def _check(
        self, source: Source, now: datetime, *, announce: bool = True
    ) -> Pair:
        """Validate ``source``, reusing the result while its files stay."""
        paths = (source.cert_path, source.key_path)
        signature = _signature(paths)
        cached = self._checked.get(paths)
        if (
            cached is not None
            and signature is not None
            and cached.signature == signature
            and now - cached.verified_at < _REVERIFY_AFTER
        ):
            pair = cached.pair
            if now > pair.not_after:
                msg = f"expired at {pair.not_after.isoformat()}"
                raise PairError(str(source.cert_path), msg, breaks_tls=False)
            return pair

        pair = load_pair(
            source.cert_path, source.key_path, self.trust, now, self.verdicts
        )
        (log.info if announce else log.debug)(
            "cert.validated",
            source=source.key,
            names=",".join(pair.names),
            serial=pair.serial,
            not_after=pair.not_after.date().isoformat(),
            chain="verified" if self.trust.verifies else "not checked",
        )
        if signature is not None:
            self._checked[paths] = _Checked(pair, signature, now)
        return pair

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
                return
        if not covering:
            self._once(host, "host.uncovered", "warning", host=host)
            return
        source, pair = max(
            covering,
            key=lambda item: (
                item[1].not_before,
                item[1].not_after,
                str(item[1].cert_path),
            ),
        )

        cert_path, key_path = self.installer.paths(host)
        if source.cert_path == cert_path:
            plan.serving[host] = pair.fingerprint
            return
        content = Content(host, pair.cert_pem, pair.key_pem)
        write = self.installer.needs_write(content)
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
            self._plan_corrections(plan, cert_path, key_path)

    def _installed_pair(self, host: str, now: datetime) -> Pair | None:
        cert_path, key_path = self.installer.paths(host)
        if not os.path.lexists(cert_path):
            return None
        source = Source("prosody", host, cert_path, key_path, cert_path)
        try:
            pair = self._check(source, now, announce=False)
        except PairError:
            return None
        if not any(covers(name, host) for name in pair.names):
            return None
        return pair

    def _plan_corrections(
        self, plan: Plan, cert_path: Path, key_path: Path
    ) -> None:
        for path, is_key in ((cert_path, False), (key_path, True)):
            self._plan_correction(
                plan, path, self.installer.mode_for(key=is_key)
            )

    def _plan_correction(self, plan: Plan, path: Path, mode: int) -> None:
        problem = self.installer.wrong_attributes(path, mode)
        if problem is not None:
            plan.corrections.append((path, mode, problem))

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
                self.expected[content.host] = pair.fingerprint
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


def _log_choice(event: str, choice: Choice) -> None:
    log.info(
        event,
        host=choice.host,
        source=str(choice.source.shown),
        serial=choice.pair.serial,
        not_after=choice.pair.not_after.date().isoformat(),
        fingerprint=choice.pair.fingerprint[:16],
    )


def _signature(paths: tuple[Path, Path]) -> tuple[object, ...] | None:
    """Identify the current contents of both files without reading them."""
    parts: list[object] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        parts.extend(
            (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        )
        parts.append(info.st_ctime_ns)
    return tuple(parts)
