"""The command line; the only place errors become exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from certwatchd import __version__, logs
from certwatchd.certificate import TrustStore
from certwatchd.check import Status, check
from certwatchd.config import (
    Settings,
    load_settings,
    resolve_ownership,
)
from certwatchd.errors import CertwatchdError, ConfigError
from certwatchd.sync import Synchronizer
from certwatchd.verification import reload_and_verify

log = structlog.get_logger()

EX_OK = 0
EX_FAILED = 1
EX_CONFIG = 78


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named in ``argv`` and return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certwatchd",
        description="Keep Prosody's TLS certificates in step with "
        "Let's Encrypt.",
    )
    parser.add_argument(
        "--version", action="version", version=f"certwatchd {__version__}"
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    sync = commands.add_parser(
        "sync", help="validate and install every pair once, then reload"
    )
    _add_config(sync)
    sync.add_argument(
        "--dry-run",
        action="store_true",
        help="report what would be installed and change nothing",
    )
    sync.set_defaults(handler=_sync)

    report = commands.add_parser(
        "check", help="report on installed pairs (monitoring-plugin codes)"
    )
    _add_config(report)
    report.add_argument(
        "--json", action="store_true", help="print one JSON document"
    )
    report.set_defaults(handler=_check)

    run = commands.add_parser("run", help="watch and sync until stopped")
    _add_config(run)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo", help="run the daemon on a throwaway tree for a few seconds"
    )
    demo.set_defaults(handler=_demo)
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file (default: $CERTWATCHD_CONFIG, else "
        "/etc/certwatchd/config.toml)",
    )


def _prepare(
    args: argparse.Namespace,
) -> tuple[Settings, Synchronizer]:
    """Load settings, set up logging and build the synchronizer."""
    settings = load_settings(args.config)
    logs.configure(settings.log.level, settings.log.format)
    ownership = resolve_ownership(settings)
    trust = TrustStore.from_setting(settings.validation.trust)
    # A one-shot command has no other thread, so it may validate in
    # child processes, one per CPU it may run on.
    workers = len(os.sched_getaffinity(0))
    synchronizer = Synchronizer(settings, ownership, trust, workers=workers)
    return settings, synchronizer


def _config_failure(exc: ConfigError) -> None:
    print(f"certwatchd: configuration error: {exc}", file=sys.stderr)


def _sync(args: argparse.Namespace) -> int:
    try:
        settings, synchronizer = _prepare(args)
    except ConfigError as exc:
        _config_failure(exc)
        return EX_CONFIG

    try:
        if not args.dry_run:
            synchronizer.installer.remove_stale()
        report = synchronizer.run(dry_run=args.dry_run)
        reloaded = True
        if report.changed and not args.dry_run:
            # A broken pair left beside ours would be loaded by this reload.
            for source, error in report.broken:
                synchronizer.quarantine(source, error)
            reloaded = reload_and_verify(settings, synchronizer).ok
    except CertwatchdError as exc:
        log.error("sync.failed", error=str(exc))
        return EX_FAILED

    log.info(
        "sync.finished",
        dry_run=args.dry_run,
        installed=len(report.installed),
        corrected=len(report.corrected),
        refused=len(report.refused),
        pending=len(report.pending),
        failed=len(report.failed),
    )
    return EX_OK if report.ok and reloaded else EX_FAILED


def _check(args: argparse.Namespace) -> int:
    try:
        settings, synchronizer = _prepare(args)
        plan = synchronizer.plan()
        result = check(
            settings, synchronizer.installer, synchronizer.trust, plan
        )
    except CertwatchdError as exc:
        if args.json:
            document = {"status": "UNKNOWN", "exit_code": 3, "error": str(exc)}
            print(json.dumps(document))
        else:
            print(f"CERTWATCHD UNKNOWN: {exc}")
        return int(Status.UNKNOWN)

    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(result.as_text())
    return result.exit_code


def _run(args: argparse.Namespace) -> int:
    from certwatchd.daemon import serve  # noqa: PLC0415 - needs watchdog

    try:
        return serve(args.config)
    except ConfigError as exc:
        _config_failure(exc)
        return EX_CONFIG


def _demo(args: argparse.Namespace) -> int:
    del args
    from certwatchd.demo import run_demo  # noqa: PLC0415 - needs watchdog

    return run_demo()
