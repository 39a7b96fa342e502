"""What was already found, so unchanged lineages and pairs cost little.

:class:`ValidationCache`: what was already validated, so unchanged pairs
cost no cryptography.

Entries are keyed by a digest of the trust store and of both files'
bytes, so any change to either file, or to the trusted roots, is a miss.
The entries are kept in the state directory and survive restarts: a
second ``certwatchd sync`` over thousands of unchanged lineages reads and
hashes files but parses no certificate and loads no key. Each pass keeps
only the entries it used, so the file does not grow with renewals.

:class:`LineageCache`: what each lineage directory held when it was last
read, known by the directory's stat signature, so a pass over unchanged
lineages lists no directory and reads no link (which, in a watched tree,
would also queue inotify events for every lineage).
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from certwatchd.certificate import Pair
from certwatchd.sources import Pending, Source, read_lineage
from certwatchd.state import StateDir

log = structlog.get_logger()

_FILE = "validated.json"
_LINEAGES = "lineages.json"
# A directory's stat signature stands for its entries only once it has
# been left alone this long (see state.py).
_SETTLED_NS = 2_000_000_000


class ValidationCache:
    """Summaries of validated pairs, by digest, persisted in the state."""

    def __init__(self, state: StateDir) -> None:
        self._state = state
        self._entries: dict[str, dict[str, object]] | None = None
        self._used: set[str] = set()
        self._changed = False

    def _load(self) -> dict[str, dict[str, object]]:
        if self._entries is not None:
            return self._entries
        self._entries = {}
        try:
            data = json.loads((self._state.path / _FILE).read_bytes())
        except (OSError, ValueError):
            return self._entries
        if isinstance(data, dict) and isinstance(data.get("pairs"), dict):
            self._entries = {
                str(key): value
                for key, value in data["pairs"].items()
                if isinstance(value, dict)
            }
        return self._entries

    def recall(
        self, digest: str, cert_path: Path, key_path: Path, blocks: bytes
    ) -> Pair | None:
        """Return the pair validated under ``digest``, if it is known."""
        entry = self._load().get(digest)
        if entry is None or not isinstance(entry.get("names"), list):
            return None
        names: list[object] = entry["names"]  # type: ignore[assignment]
        try:
            pair = Pair(
                cert_path=cert_path,
                key_path=key_path,
                cert_pem=blocks,
                key_pem=b"",
                names=tuple(str(name) for name in names),
                not_before=_time(entry["not_before"]),
                not_after=_time(entry["not_after"]),
                serial=str(entry["serial"]),
                issuer=str(entry["issuer"]),
                fingerprint=str(entry["fingerprint"]),
                chain_not_after=_time(entry["chain_not_after"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        self._used.add(digest)
        return pair

    def begin(self) -> None:
        """Start a pass: entries it does not use are dropped at the save."""
        self._used = set()

    def release(self) -> None:
        """Drop the entries from memory; they are read again when needed."""
        self._entries = None
        self._used = set()
        self._changed = False

    def keep(self, digest: str) -> None:
        """Count the entry under ``digest`` as used by this pass."""
        self._used.add(digest)

    def remember(self, digest: str, pair: Pair) -> None:
        """Keep the summary of a pair that passed every check."""
        self._load()[digest] = {
            "names": list(pair.names),
            "not_before": pair.not_before.isoformat(),
            "not_after": pair.not_after.isoformat(),
            "serial": pair.serial,
            "issuer": pair.issuer,
            "fingerprint": pair.fingerprint,
            "chain_not_after": pair.chain_not_after.isoformat(),
        }
        self._used.add(digest)
        self._changed = True

    def save(self) -> None:
        """Write the entries this pass used, if anything changed.

        Entries the last pass did not use, or whose pair has expired, are
        dropped, so the file holds only pairs that still exist. Losing
        the file costs only validating again, so it is not flushed.
        """
        if self._entries is None:
            return
        now = datetime.now(UTC)
        kept = {
            key: value
            for key, value in self._entries.items()
            if key in self._used and _expires_after(value, now)
        }
        if not self._changed and len(kept) == len(self._entries):
            return
        self._entries = kept
        document = json.dumps({"version": 1, "pairs": kept})
        if _write(
            self._state,
            _FILE,
            document,
            "unchanged pairs are validated again next time",
        ):
            self._changed = False


def _expires_after(entry: dict[str, object], now: datetime) -> bool:
    try:
        return _time(entry["not_after"]) > now
    except (KeyError, TypeError, ValueError):
        return False


def _time(value: object) -> datetime:
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        msg = f"{value!r} has no time zone"
        raise ValueError(msg)
    return moment


class LineageCache:
    """Lineages as last read, by their directory's stat signature.

    Creating, removing or renaming an entry of a directory changes its
    modification and change times, and a symlink cannot be pointed
    elsewhere in place, so a lineage directory whose signature is the
    one it had when it was read still holds the same links. Only
    lineages that were consistent, and left alone for a while before
    they were read, are kept.
    """

    def __init__(self, state: StateDir) -> None:
        self._state = state
        # Name -> directory signature, certificate and key paths, and a
        # note on the pair those files held (see :meth:`note`).
        self._entries: dict[str, tuple[str, str, str, str]] | None = None
        self._used: set[str] = set()
        self._changed = False

    def _load(self) -> dict[str, tuple[str, str, str, str]]:
        if self._entries is not None:
            return self._entries
        self._entries = {}
        try:
            data = json.loads((self._state.path / _LINEAGES).read_bytes())
        except (OSError, ValueError):
            return self._entries
        if isinstance(data, dict) and isinstance(data.get("lineages"), dict):
            for name, value in data["lineages"].items():
                if (
                    isinstance(value, list)
                    and len(value) == 4  # noqa: PLR2004 - the entry's shape
                    and all(isinstance(part, str) for part in value)
                ):
                    self._entries[str(name)] = (
                        value[0],
                        value[1],
                        value[2],
                        value[3],
                    )
        return self._entries

    def begin(self) -> None:
        """Start a pass: lineages it does not read are dropped at save."""
        self._used = set()

    def read(
        self, live: Path, name: str, *, settled: bool = False
    ) -> Source | Pending | None:
        """Return what :func:`read_lineage` would, from the cache if it can."""
        entries = self._load()
        self._used.add(name)
        directory = os.path.join(live, name)
        try:
            info = os.stat(directory)
        except OSError:
            entries.pop(name, None)
            return read_lineage(live, name, settled=settled)
        signature = (
            f"{info.st_dev}:{info.st_ino}:{info.st_mtime_ns}:"
            f"{info.st_ctime_ns}"
        )
        known = entries.get(name)
        if known is not None and known[0] == signature:
            return Source(
                origin="letsencrypt",
                name=name,
                cert_path=Path(known[1]),
                key_path=Path(known[2]),
                shown=live / name,
            )
        item = read_lineage(live, name, settled=settled)
        old_enough = time.time_ns() - _SETTLED_NS
        if (
            isinstance(item, Source)
            and max(info.st_mtime_ns, info.st_ctime_ns) < old_enough
        ):
            entries[name] = (
                signature,
                os.fspath(item.cert_path),
                os.fspath(item.key_path),
                "",
            )
            self._changed = True
        elif known is not None:
            del entries[name]
            self._changed = True
        return item

    def note_of(self, name: str) -> str:
        """Return what :meth:`note` kept about the lineage's pair, or ""."""
        known = self._load().get(name)
        return known[3] if known is not None else ""

    def note(self, name: str, note: str) -> None:
        """Keep ``note`` about the pair of a lineage kept here.

        The note goes when the lineage's directory changes.
        """
        known = self._load().get(name)
        if known is not None and known[3] != note:
            self._load()[name] = (*known[:3], note)
            self._changed = True

    def save(self) -> None:
        """Write the lineages this pass read, if anything changed."""
        if self._entries is None:
            return
        kept = {
            name: entry
            for name, entry in self._entries.items()
            if name in self._used
        }
        if not self._changed and len(kept) == len(self._entries):
            return
        self._entries = kept
        document = json.dumps(
            {"version": 1, "lineages": {k: list(v) for k, v in kept.items()}}
        )
        if _write(
            self._state,
            _LINEAGES,
            document,
            "unchanged lineages are read again next time",
        ):
            self._changed = False

    def release(self) -> None:
        """Drop the entries from memory; they are read again when needed."""
        self._entries = None
        self._used = set()
        self._changed = False


def _write(
    state: StateDir, name: str, document: str, consequence: str
) -> bool:
    """Write one cache file into the state directory, not durably.

    A cache that cannot be written is only a cost: the failure is logged
    with ``consequence`` and ``False`` returned.
    """
    try:
        state.write_private(name, document.encode(), durable=False)
    except OSError as exc:
        log.warning(
            "state.unwritable",
            path=str(state.path),
            error=exc.strerror,
            consequence=consequence,
        )
        return False
    return True
