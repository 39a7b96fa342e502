"""What was already validated, so unchanged pairs cost no cryptography.

Entries are keyed by a digest of the trust store and of both files'
bytes, so any change to either file, or to the trusted roots, is a miss.
The entries are kept in the state directory and survive restarts: a
second ``certwatchd sync`` over thousands of unchanged lineages reads and
hashes files but parses no certificate and loads no key.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import structlog

from certwatchd.certificate import Pair
from certwatchd.state import StateDir

log = structlog.get_logger()

_FILE = "validated.json"


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
        """Write the entries used since start, if any changed.

        Entries no pass has used since the process started are dropped,
        so the file holds only pairs that still exist.
        """
        if not self._changed or self._entries is None:
            return
        now = datetime.now(UTC)
        kept = {
            key: value
            for key, value in self._entries.items()
            if key in self._used and _time(value["not_after"]) > now
        }
        document = json.dumps({"version": 1, "pairs": kept})
        try:
            self._state.write_private(_FILE, document.encode())
        except OSError as exc:
            log.warning(
                "state.unwritable",
                path=str(self._state.path),
                error=exc.strerror,
                consequence="unchanged pairs are validated again next time",
            )
            return
        self._changed = False


def _time(value: object) -> datetime:
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        msg = f"{value!r} has no time zone"
        raise ValueError(msg)
    return moment
