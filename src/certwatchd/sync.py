"""One pass: find, validate, choose and install a pair for every host.

The one-shot ``certwatchd sync`` and the daemon both run this pass; the
daemon only decides when. Reloading Prosody is the caller's business.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from certwatchd.cache import LineageCache, ValidationCache
from certwatchd.certificate import Pair, TrustStore, Verdicts, load_pair
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
from certwatchd.state import FilePath, StateDir, digest
from certwatchd.workers import Result, collect, fork_validation

log = structlog.get_logger()

_LIBC_NAME = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_LIBC_NAME) if _LIBC_NAME else None

# A validated pair is re-verified after this long even if its files did
# not change, so an intermediate that expires is noticed.
_REVERIFY_AFTER = timedelta(hours=1)
# Validation is spread over processes only when each gets this many
# pairs; below it, starting a process costs more than it saves.
_PER_WORKER = 64
# Up to this many hosts, validated pairs and records stay in memory
# between passes; beyond it, each pass reads them from the state
# directory, so the memory of a daemon at rest does not grow with them.
_KEPT_IN_MEMORY = 500
# A stat signature stands for a file's contents only once the file has
# been left alone this long (see state.py).
_SETTLED_NS = 2_000_000_000


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
    signature: str | None
    verified_at: datetime
    digest: str | None


class _Deferred(Exception):  # noqa: N818 - a signal, not an error
    """Raised to put off a validation the cache could not answer."""


class _Recorder:
    """Passes verdicts through, noting what a load used or found."""

    def __init__(self, inner: Verdicts | None, *, defer: bool) -> None:
        self._inner = inner
        self._defer = defer
        self.digest: str | None = None
        self.validated = False

    def recall(
        self, digest: str, cert_path: Path, key_path: Path, blocks: bytes
    ) -> Pair | None:
        """Answer from the cache, or put the validation off."""
        self.digest = digest
        known = None
        if self._inner is not None:
            known = self._inner.recall(digest, cert_path, key_path, blocks)
        if known is None and self._defer:
            raise _Deferred
        return known

    def remember(self, digest: str, pair: Pair) -> None:
        """Note a pair that was validated just now."""
        self.digest = digest
        self.validated = True
        if self._inner is not None:
            self._inner.remember(digest, pair)


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
        self._tick = tick or _nothing
        # Processes to validate in; more than one only where forking is
        # safe (no other threads), as in the one-shot commands.
        self.workers = workers
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
        self._remembering = True
        # Pairs recalled in this pass without reading their files: the
        # digests of the certificate and key as they would be installed.
        self._unread: dict[tuple[Path, Path], tuple[str, str]] = {}
        self._read_pairs: dict[tuple[Path, Path], Pair] = {}
        self._looked_at: set[tuple[Path, Path]] = set()
        self.verdicts = ValidationCache(self.state)
        self.lineages = LineageCache(self.state)
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
        self.verdicts.save()
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
        self._looked_at = set()
        self._unread = {}
        self._read_pairs = {}
        if hosts <= _KEPT_IN_MEMORY:
            return
        self._checked = {}
        self.verdicts.release()
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
        self.verdicts.begin()
        self.lineages.begin()
        self.state.forget()
        self._looked_at = set()
        self._unread = {}
        self._read_pairs = {}
        sources = self._discover(plan, settled)
        # Past a few hundred pairs, validations are not kept in memory
        # (see _release), so their files need no stat signature either.
        self._remembering = len(sources) <= _KEPT_IN_MEMORY

        outcomes = self._check_all(sources, now)
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
        # Forget pairs whose files no pass looks at any more.
        self._checked = {
            paths: checked
            for paths, checked in self._checked.items()
            if paths in self._looked_at
        }
        return plan

    def _check_all(
        self, sources: list[Source], now: datetime
    ) -> list[Pair | PairError]:
        """Validate every source; return a pair or the refusal for each.

        What the caches cannot answer is validated in up to ``workers``
        processes when there is enough of it.
        """
        parallel = self.workers > 1
        outcomes: list[Pair | PairError | None] = []
        deferred: list[int] = []
        for index, source in enumerate(sources):
            if index % 100 == 0:
                self._tick()
            try:
                outcomes.append(self._check(source, now, defer=parallel))
            except _Deferred:
                outcomes.append(None)
                deferred.append(index)
            except PairError as exc:
                outcomes.append(exc)
        if deferred:
            chosen = [sources[index] for index in deferred]
            for index, outcome in zip(
                deferred, self._validate_many(chosen, now), strict=True
            ):
                outcomes[index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _validate_many(
        self, sources: list[Source], now: datetime
    ) -> list[Pair | PairError]:
        """Validate ``sources`` that no cache knows, in several processes.

        Each child validates every n-th source and sends the outcomes
        back pickled; a child that fails has its share done here.
        """
        workers = min(self.workers, max(len(sources) // _PER_WORKER, 1))
        children = []
        for share in range(1, workers):
            child = fork_validation(sources[share::workers], self.trust, now)
            if child is not None:
                children.append((share, child))
        outcomes: list[Pair | PairError | None] = [None] * len(sources)
        forked = {share for share, _ in children}
        for index, source in enumerate(sources):
            if index % workers in forked:
                continue
            if index % 100 == 0:
                self._tick()
            try:
                outcomes[index] = self._check(source, now)
            except PairError as exc:
                outcomes[index] = exc
        for share, (pid, fd) in children:
            results = collect(pid, fd)
            mine = range(share, len(sources), workers)
            if results is None or len(results) != len(mine):
                results = [None] * len(mine)
            for index, result in zip(mine, results, strict=True):
                outcomes[index] = self._adopt(sources[index], result, now)
        return [outcome for outcome in outcomes if outcome is not None]

    def _adopt(
        self, source: Source, result: Result | None, now: datetime
    ) -> Pair | PairError:
        """Take a child's outcome for ``source``; redo it here if missing."""
        if result is None:
            try:
                return self._check(source, now)
            except PairError as exc:
                return exc
        if result.pair is None:
            return PairError(
                result.path, result.reason, breaks_tls=result.breaks_tls
            )
        digest = result.digest
        pair = replace(
            result.pair, cert_path=source.cert_path, key_path=source.key_path
        )
        self.verdicts.remember(digest, pair)
        paths = (source.cert_path, source.key_path)
        signature = _signature(paths) if self._remembering else None
        self._remember(paths, signature, pair, now, digest)
        _log_validated(source, pair, self.trust)
        return pair

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

    def _check(
        self,
        source: Source,
        now: datetime,
        *,
        announce: bool = True,
        defer: bool = False,
    ) -> Pair:
        """Validate ``source``, reusing the result while its files stay.

        With ``defer``, a pair no cache knows raises ``_Deferred``
        instead of being validated here.
        """
        paths = (source.cert_path, source.key_path)
        self._looked_at.add(paths)
        signature = _signature(paths) if self._remembering else None
        cached = self._checked.get(paths)
        if (
            cached is not None
            and signature is not None
            and cached.signature == signature
            and now - cached.verified_at < _REVERIFY_AFTER
        ):
            if cached.digest is not None:
                self.verdicts.keep(cached.digest)
            pair = cached.pair
            if now > pair.not_after:
                msg = f"expired at {pair.not_after.isoformat()}"
                raise PairError(str(source.cert_path), msg, breaks_tls=False)
            return pair

        noting = not self._remembering and source.origin == "letsencrypt"
        files = _files_signature(paths) if noting else None
        if files is not None:
            known = self._recall_unread(source, files[0], now)
            if known is not None:
                return known

        recorder = _Recorder(self.verdicts, defer=defer)
        pair = load_pair(
            source.cert_path, source.key_path, self.trust, now, recorder
        )
        if announce and recorder.validated:
            _log_validated(source, pair, self.trust)
        self._remember(paths, signature, pair, now, recorder.digest)
        if files is not None and recorder.digest is not None:
            self._note_unread(source, files, recorder.digest, pair)
        return pair

    def _recall_unread(
        self, source: Source, files: str, now: datetime
    ) -> Pair | None:
        """Recall a lineage's pair by its files' stat signatures alone.

        The pair comes without its PEM; :meth:`_plan_host` reads the
        files if it has to install them.
        """
        prefix = f"{self.trust.identity} {files} "
        note = self.lineages.note_of(source.name)
        if not note.startswith(prefix):
            return None
        parts = note[len(prefix) :].split(" ")
        if len(parts) != 3:  # noqa: PLR2004 - verdict, cert and key digests
            return None
        verdict, cert_digest, key_digest = parts
        pair = self.verdicts.recall(
            verdict, source.cert_path, source.key_path, b""
        )
        if pair is None or now >= pair.chain_not_after:
            return None
        pair.check_window(now)
        self._unread[(source.cert_path, source.key_path)] = (
            cert_digest,
            key_digest,
        )
        return pair

    def _note_unread(
        self, source: Source, files: tuple[str, int], verdict: str, pair: Pair
    ) -> None:
        """Keep what is needed to recall ``pair`` without reading it."""
        signature, changed = files
        if changed >= time.time_ns() - _SETTLED_NS:
            return
        self.lineages.note(
            source.name,
            f"{self.trust.identity} {signature} {verdict}"
            f" {digest(pair.cert_pem)} {digest(pair.key_pem)}",
        )

    def _remember(
        self,
        paths: tuple[Path, Path],
        signature: str | None,
        pair: Pair,
        now: datetime,
        digest: str | None,
    ) -> None:
        self._looked_at.add(paths)
        if signature is not None:
            self._checked[paths] = _Checked(pair, signature, now, digest)

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
        unread = self._unread.get((pair.cert_path, pair.key_path))
        if unread is not None:
            write = self.installer.differs(files, *unread)
        else:
            content = Content(host, pair.cert_pem, pair.key_pem)
            write = self.installer.needs_write(content, files)
        if write and unread is not None:
            try:
                pair = self._read_pair(source, now)
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

    def _read_pair(self, source: Source, now: datetime) -> Pair:
        """Load a pair recalled without its PEM, this time with it.

        Every host the pair serves gets the same load in this pass.
        """
        paths = (source.cert_path, source.key_path)
        pair = self._read_pairs.get(paths)
        if pair is None:
            pair = load_pair(*paths, self.trust, now, self.verdicts)
            self._read_pairs[paths] = pair
        return pair

    def _installed_pair(self, host: str, now: datetime) -> Pair | None:
        if not os.path.lexists(self.installer.files(host)[0]):
            return None
        cert_path, key_path = self.installer.paths(host)
        source = Source("prosody", host, cert_path, key_path, cert_path)
        try:
            pair = self._check(source, now, announce=False)
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


def _log_validated(source: Source, pair: Pair, trust: TrustStore) -> None:
    """Log a validation done just now (not one recalled from the cache)."""
    log.info(
        "cert.validated",
        source=source.key,
        names=",".join(pair.names),
        serial=pair.serial,
        not_after=pair.not_after.date().isoformat(),
        chain="verified" if trust.verifies else "not checked",
    )


def _log_choice(event: str, choice: Choice) -> None:
    log.info(
        event,
        host=choice.host,
        source=str(choice.source.shown),
        serial=choice.pair.serial,
        not_after=choice.pair.not_after.date().isoformat(),
        fingerprint=choice.pair.fingerprint[:16],
    )


def _files_signature(paths: tuple[Path, Path]) -> tuple[str, int] | None:
    """Sum up both files' stat signatures, and when either last changed.

    ``None`` unless both are regular files.
    """
    parts = []
    changed = 0
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        parts.append(
            f"{info.st_dev}:{info.st_ino}:{info.st_size}:"
            f"{info.st_mtime_ns}:{info.st_ctime_ns}"
        )
        changed = max(changed, info.st_mtime_ns, info.st_ctime_ns)
    return ",".join(parts), changed


def _signature(paths: tuple[Path, Path]) -> str | None:
    """Identify the current contents of both files without reading them."""
    found = _files_signature(paths)
    return None if found is None else found[0]
