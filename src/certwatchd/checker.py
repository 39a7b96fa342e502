"""Validating a pass's sources, and remembering what was validated.

A pair is validated once and then recalled for as long as its files
stay as they were: from memory by the files' stat signatures, while
there are few enough pairs to keep there; from the lineage cache by the
same signatures, without reading the files, when there are more; or
from the validation cache by the digest of the files' bytes. What none
of them knows is validated here, or in child processes when the caller
may fork.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from certwatchd.cache import LineageCache, ValidationCache
from certwatchd.certificate import Pair, TrustStore, Verdicts, load_pair
from certwatchd.errors import PairError
from certwatchd.sources import Source
from certwatchd.state import digest
from certwatchd.workers import Result, collect, fork_validation

log = structlog.get_logger()

# A validated pair is re-verified after this long even if its files did
# not change, so an intermediate that expires is noticed.
_REVERIFY_AFTER = timedelta(hours=1)
# Validation is spread over processes only when each gets this many
# pairs; below it, starting a process costs more than it saves.
_PER_WORKER = 64
# A stat signature stands for a file's contents only once the file has
# been left alone this long (see state.py).
_SETTLED_NS = 2_000_000_000


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


class Checker:
    """Validates sources, recalling what earlier passes validated."""

    def __init__(
        self,
        trust: TrustStore,
        verdicts: ValidationCache,
        lineages: LineageCache,
        tick: Callable[[], None],
        *,
        workers: int = 1,
    ) -> None:
        self.trust = trust
        self.verdicts = verdicts
        self._lineages = lineages
        self._tick = tick
        # Processes to validate in; more than one only where forking is
        # safe (no other threads), as in the one-shot commands.
        self.workers = workers
        self._checked: dict[tuple[Path, Path], _Checked] = {}
        self._remembering = True
        # Pairs recalled in this pass without reading their files: the
        # digests of the certificate and key as they would be installed.
        self._unread: dict[tuple[Path, Path], tuple[str, str]] = {}
        self._read_pairs: dict[tuple[Path, Path], Pair] = {}
        self._looked_at: set[tuple[Path, Path]] = set()

    def begin(self) -> None:
        """Start a pass."""
        self.verdicts.begin()
        self._forget_pass()

    def save(self) -> None:
        """Keep the verdicts this pass used for the next one."""
        self.verdicts.save()

    def end(self) -> None:
        """Forget pairs whose files the pass did not look at."""
        self._checked = {
            paths: checked
            for paths, checked in self._checked.items()
            if paths in self._looked_at
        }

    def release(self, *, everything: bool) -> None:
        """Drop what only the pass needed; with ``everything``, all of it.

        What is dropped is found again on disk by the next pass.
        """
        self._forget_pass()
        if everything:
            self._checked = {}
            self.verdicts.release()

    def _forget_pass(self) -> None:
        self._looked_at = set()
        self._unread = {}
        self._read_pairs = {}

    def unread(self, pair: Pair) -> tuple[str, str] | None:
        """Digests of a pair recalled without its PEM, as installed.

        ``None`` if this pass read the pair's files.
        """
        return self._unread.get((pair.cert_path, pair.key_path))

    def check_all(
        self, sources: list[Source], now: datetime, *, remember: bool
    ) -> list[Pair | PairError]:
        """Validate every source; return a pair or the refusal for each.

        What the caches cannot answer is validated in up to ``workers``
        processes when there is enough of it. With ``remember``, what is
        validated is also kept in memory for the next pass, known by its
        files' stat signatures.
        """
        self._remembering = remember
        parallel = self.workers > 1
        outcomes: list[Pair | PairError | None] = []
        deferred: list[int] = []
        for index, source in enumerate(sources):
            if index % 100 == 0:
                self._tick()
            try:
                outcomes.append(self.check(source, now, defer=parallel))
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
                outcomes[index] = self.check(source, now)
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
                return self.check(source, now)
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

    def check(
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
        note = self._lineages.note_of(source.name)
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
        self._lineages.note(
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

    def read_pair(self, source: Source, now: datetime) -> Pair:
        """Load a pair recalled without its PEM, this time with it.

        Every host the pair serves gets the same load in this pass.
        """
        paths = (source.cert_path, source.key_path)
        pair = self._read_pairs.get(paths)
        if pair is None:
            pair = load_pair(*paths, self.trust, now, self.verdicts)
            self._read_pairs[paths] = pair
        return pair


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
