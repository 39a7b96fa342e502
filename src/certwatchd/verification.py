"""After a reload: does Prosody serve what was installed? If not, undo it.

Each configured endpoint is probed until it serves the leaf certwatchd
installed for its host or ``verify.timeout_seconds`` pass. A host whose
endpoint serves something else has its new certificate rejected, its
previous pair restored, and Prosody is reloaded and probed once more.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import structlog

from certwatchd.config import Endpoint, Settings
from certwatchd.reload import ReloadResult, run_reload
from certwatchd.sync import Synchronizer
from certwatchd.verify import VerifyError, fetch_served_leaf

log = structlog.get_logger()

_RETRY_PAUSE = 0.25
_PROBE_TIMEOUT = 5.0

Fetch = Callable[[str, str, int, str, float], bytes]


@dataclass(frozen=True)
class Outcome:
    """What one endpoint served, against what was installed."""

    host: str
    address: str
    port: int
    mode: str
    expected: str | None
    served: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Say whether the endpoint served the installed leaf."""
        return self.error is None and self.served == self.expected


def probe(
    endpoints: tuple[Endpoint, ...],
    expected: dict[str, str],
    timeout: float,
    fetch: Fetch = fetch_served_leaf,  # type: ignore[assignment]
) -> list[Outcome]:
    """Probe every endpoint until each serves its expected leaf or time is up.

    Connections go only to the addresses configured for the endpoints.
    """
    deadline = time.monotonic() + timeout
    outcomes: dict[int, Outcome] = {}
    waiting = dict(enumerate(endpoints))
    while waiting:
        for index, endpoint in list(waiting.items()):
            outcome = _probe_one(endpoint, expected, deadline, fetch)
            outcomes[index] = outcome
            if outcome.ok or outcome.expected is None:
                del waiting[index]
        if not waiting or time.monotonic() + _RETRY_PAUSE >= deadline:
            break
        time.sleep(_RETRY_PAUSE)

    results = [outcomes[index] for index in range(len(endpoints))]
    for outcome in results:
        _log_outcome(outcome)
    return results


def _probe_one(
    endpoint: Endpoint,
    expected: dict[str, str],
    deadline: float,
    fetch: Fetch,
) -> Outcome:
    wanted = expected.get(endpoint.host)
    base = Outcome(
        endpoint.host, endpoint.address, endpoint.port, endpoint.mode, wanted
    )
    if wanted is None:
        error = f"certwatchd installed no certificate for {endpoint.host}"
        return _replace(base, error=error)

    remaining = max(min(deadline - time.monotonic(), _PROBE_TIMEOUT), 0.1)
    try:
        der = fetch(
            endpoint.host,
            endpoint.address,
            endpoint.port,
            endpoint.mode,
            remaining,
        )
    except VerifyError as exc:
        return _replace(base, error=str(exc))
    served = hashlib.sha256(der).hexdigest()
    if served != wanted:
        return _replace(
            base, served=served, error="serves a different certificate"
        )
    return _replace(base, served=served)


def _replace(outcome: Outcome, **changes: str | None) -> Outcome:
    fields = asdict(outcome)
    fields.update(changes)
    return Outcome(**fields)


def _log_outcome(outcome: Outcome) -> None:
    fields = {
        "host": outcome.host,
        "endpoint": f"{outcome.address}:{outcome.port}",
        "mode": outcome.mode,
        "expected": (outcome.expected or "")[:16],
        "served": (outcome.served or "")[:16],
    }
    if outcome.ok:
        log.info("verify.ok", **fields)
    else:
        log.error("verify.failed", error=outcome.error, **fields)


@dataclass
class Verdict:
    """The end of a reload: how it went and what was undone."""

    reload: ReloadResult
    outcomes: list[Outcome]
    rolled_back: list[str]
    recovered: bool | None = None

    @property
    def ok(self) -> bool:
        """Say whether the reload worked and Prosody serves the new pairs."""
        return self.reload.ok and all(o.ok for o in self.outcomes)


def reload_and_verify(
    settings: Settings, synchronizer: Synchronizer
) -> Verdict:
    """Reload Prosody, check what it serves, and roll back a bad host.

    The caller must keep other passes from running meanwhile: a rollback
    installs files.
    """
    reload = settings.reload
    result = run_reload(reload.command, reload.timeout_seconds)
    endpoints = settings.verify.endpoints
    if not result.ok or not endpoints:
        return Verdict(result, [], [])

    timeout = settings.verify.timeout_seconds
    outcomes = probe(endpoints, synchronizer.expected, timeout)
    failed = {
        o.host: o.expected
        for o in outcomes
        if not o.ok and o.expected is not None
    }
    verdict = Verdict(result, outcomes, [])
    if failed:
        for host, fingerprint in failed.items():
            if fingerprint is not None:
                synchronizer.reject(host, fingerprint)
        verdict.rolled_back = synchronizer.roll_back(failed)
        if verdict.rolled_back:
            second = run_reload(reload.command, reload.timeout_seconds)
            after = probe(endpoints, synchronizer.expected, timeout)
            verdict.recovered = second.ok and all(o.ok for o in after)
            event = (
                "rollback.verified"
                if verdict.recovered
                else ("rollback.failed")
            )
            (log.warning if verdict.recovered else log.error)(
                event, hosts=",".join(verdict.rolled_back)
            )
    _record(synchronizer, verdict)
    return verdict


def _record(synchronizer: Synchronizer, verdict: Verdict) -> None:
    synchronizer.state.record_verification(
        {
            "at": datetime.now(UTC).isoformat(),
            "ok": verdict.ok,
            "endpoints": [asdict(o) | {"ok": o.ok} for o in verdict.outcomes],
            "rolled_back": verdict.rolled_back,
            "recovered": verdict.recovered,
        }
    )
