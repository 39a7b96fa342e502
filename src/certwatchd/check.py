"""A read-only report on what Prosody's directory holds.

Statuses follow the monitoring-plugin convention, so Nagios or Icinga can
run ``certwatchd check`` as it is: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path

from cryptography import x509

from certwatchd.certificate import (
    TrustStore,
    dns_names,
    parse_certificates,
    parse_private_key,
    same_public_key,
)
from certwatchd.config import Settings
from certwatchd.errors import PairError
from certwatchd.install import Installer
from certwatchd.pem import read_small_file
from certwatchd.sync import Plan


class Status(IntEnum):
    """Monitoring-plugin states, ordered by severity."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass
class PairReport:
    """One installed pair as an operator needs to see it."""

    host: str
    cert_path: str
    key_path: str
    status: str = "OK"
    names: list[str] = field(default_factory=list)
    issuer: str | None = None
    serial: str | None = None
    not_after: str | None = None
    days_left: int | None = None
    key_matches: bool | None = None
    chain_verifies: bool | None = None
    cert_owner: str | None = None
    key_owner: str | None = None
    cert_mode: str | None = None
    key_mode: str | None = None
    problems: list[str] = field(default_factory=list)
    replaced_by: str | None = None


@dataclass
class CheckReport:
    """The whole report: the worst status wins."""

    certs_dir: str
    pairs: list[PairReport]
    status: str = "OK"
    exit_code: int = 0
    summary: str = ""
    last_verification: dict[str, object] | None = None

    def as_dict(self) -> dict[str, object]:
        """Return the report as a JSON-ready dictionary."""
        return asdict(self)

    def as_text(self) -> str:
        """Render a first line for monitoring, then one line per pair."""
        lines = [f"CERTWATCHD {self.status}: {self.summary}"]
        for pair in self.pairs:
            days = "?" if pair.days_left is None else pair.days_left
            line = (
                f"{pair.status} {pair.host}: {days} days left,"
                f" serial {pair.serial or '?'}, issuer {pair.issuer or '?'}"
            )
            if pair.problems:
                line += "; " + "; ".join(pair.problems)
            if pair.replaced_by:
                line += f"; would be replaced from {pair.replaced_by}"
            lines.append(line)
        return "\n".join(lines)


def installed_pairs(certs_dir: Path) -> list[tuple[str, Path, Path]]:
    """List ``(host, cert, key)`` for each pair in Prosody's own names."""
    try:
        entries = sorted(os.scandir(certs_dir), key=lambda e: e.name)
    except OSError:
        return []

    names = {entry.name for entry in entries}
    found = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.name.endswith(".crt"):
            stem = entry.name.removesuffix(".crt")
            if f"{stem}.key" in names:
                found.append((stem, path, certs_dir / f"{stem}.key"))
        elif entry.is_dir() and (path / "fullchain.pem").exists():
            found.append(
                (entry.name, path / "fullchain.pem", path / "privkey.pem")
            )
    return found


def check(
    settings: Settings,
    installer: Installer,
    trust: TrustStore,
    plan: Plan,
    now: datetime | None = None,
) -> CheckReport:
    """Judge every installed pair; change nothing."""
    now = now or datetime.now(UTC)
    certs_dir = settings.install.certs_dir
    replacing = {c.host: str(c.source.shown) for c in plan.choices if c.write}

    pairs = []
    for host, cert_path, key_path in installed_pairs(certs_dir):
        report = _judge(settings, installer, trust, now, (cert_path, key_path))
        report.host = host
        report.replaced_by = replacing.get(host)
        pairs.append(report)

    worst = max((Status[p.status] for p in pairs), default=Status.WARNING)
    verification = installer.state.last_verification()
    summary = _summary(pairs, certs_dir)
    if verification is not None and not verification.get("ok"):
        level = (
            Status.WARNING
            if verification.get("recovered")
            else (Status.CRITICAL)
        )
        worst = max(worst, level)
        summary += ", the last verification after a reload failed"
    result = CheckReport(str(certs_dir), pairs, worst.name, int(worst))
    result.summary = summary
    result.last_verification = verification
    return result


class _Judgement:
    """Collects the problems of one pair; the worst one sets its status."""

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self.report = PairReport("", str(cert_path), str(key_path))
        self.status = Status.OK

    def problem(self, level: Status, text: str) -> None:
        self.status = max(self.status, level)
        self.report.problems.append(text)

    def done(self) -> PairReport:
        self.report.status = self.status.name
        return self.report


def _judge(
    settings: Settings,
    installer: Installer,
    trust: TrustStore,
    now: datetime,
    paths: tuple[Path, Path],
) -> PairReport:
    cert_path, key_path = paths
    judgement = _Judgement(cert_path, key_path)
    _judge_files(judgement, installer, cert_path, key_path)

    try:
        certs = parse_certificates(read_small_file(cert_path), cert_path)
    except PairError as exc:
        judgement.problem(Status.CRITICAL, str(exc))
        return judgement.done()

    _judge_leaf(judgement, settings, certs.leaf, now, cert_path)
    try:
        key = parse_private_key(read_small_file(key_path), key_path)
    except PairError as exc:
        judgement.problem(Status.CRITICAL, str(exc))
    else:
        judgement.report.key_matches = same_public_key(key, certs.leaf)
        if not judgement.report.key_matches:
            judgement.problem(
                Status.CRITICAL, "the key does not match the certificate"
            )

    names = judgement.report.names
    if trust.verifies and names:
        try:
            trust.verify(certs, names[0], now, cert_path)
            judgement.report.chain_verifies = True
        except PairError as exc:
            judgement.report.chain_verifies = False
            judgement.problem(Status.WARNING, exc.reason)
    return judgement.done()


def _judge_files(
    judgement: _Judgement, installer: Installer, cert: Path, key: Path
) -> None:
    _describe_files(judgement.report, cert, key)
    for path, is_key in ((cert, False), (key, True)):
        wrong = installer.wrong_attributes(
            path, installer.mode_for(key=is_key)
        )
        if wrong:
            judgement.problem(Status.WARNING, f"{path.name}: {wrong}")
    try:
        key_mode = stat.S_IMODE(os.stat(key).st_mode)
    except OSError:
        key_mode = 0
    if key_mode & 0o004:
        judgement.problem(
            Status.WARNING, f"{key.name} is readable by every user"
        )


def _judge_leaf(
    judgement: _Judgement,
    settings: Settings,
    leaf: x509.Certificate,
    now: datetime,
    cert_path: Path,
) -> None:
    report = judgement.report
    report.issuer = leaf.issuer.rfc4514_string()
    report.serial = f"{leaf.serial_number:x}"
    report.not_after = leaf.not_valid_after_utc.isoformat()
    days_left = (leaf.not_valid_after_utc - now).days
    report.days_left = days_left
    try:
        report.names = list(dns_names(leaf, cert_path))
    except PairError as exc:
        judgement.problem(Status.WARNING, exc.reason)

    expiry = settings.expiry
    if now > leaf.not_valid_after_utc:
        judgement.problem(Status.CRITICAL, f"expired {report.not_after}")
    elif days_left < expiry.critical_days:
        judgement.problem(Status.CRITICAL, f"expires in {days_left} days")
    elif days_left < expiry.warn_days:
        judgement.problem(Status.WARNING, f"expires in {days_left} days")


def _describe_files(report: PairReport, cert: Path, key: Path) -> None:
    for path, prefix in ((cert, "cert"), (key, "key")):
        try:
            info = os.stat(path)
        except OSError:
            continue
        owner = f"{_user(info.st_uid)}:{_group(info.st_gid)}"
        setattr(report, f"{prefix}_owner", owner)
        setattr(report, f"{prefix}_mode", f"{stat.S_IMODE(info.st_mode):#o}")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _summary(pairs: list[PairReport], certs_dir: Path) -> str:
    if not pairs:
        return f"no certificate pairs in {certs_dir}"
    dated = [p for p in pairs if p.days_left is not None]
    text = f"{len(pairs)} pairs"
    if dated:
        soonest = min(dated, key=lambda p: p.days_left or 0)
        text += f", soonest expiry {soonest.host} in {soonest.days_left} days"
    bad = [p.host for p in pairs if p.status != "OK"]
    if bad:
        text += f", attention: {', '.join(bad)}"
    return text
