"""Fuzz the certificate loading and lineage reading entry points.

Every input goes to one of ``split_pem``, ``parse_certificates``,
``parse_private_key``, ``read_small_file``, ``load_pair`` (with and
without chain verification) and ``read_lineage``, chosen by its first
byte. The contract under test: each call returns a value or raises
``PairError``. Any other exception, any warning, an input that runs
longer than ``--timeout`` seconds or a process past ``--rss-mb`` is a
crash, and libFuzzer saves the input that caused it.

Needs atheris (``.venv/bin/pip install atheris``), which is not part of
the test extras. The corpus is seeded with valid and broken PEM files
from a throwaway CA, so most mutations start from real certificates.

    .venv/bin/python bench/fuzz.py --minutes 10
    .venv/bin/python bench/fuzz.py --replay DIR/crashes/crash-1234abcd

The run happens in a child process, since libFuzzer ends the process
that runs it; the parent prints the output directory first and the
executions and crashes last.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certwatchd.certificate import (
    TrustStore,
    load_pair,
    parse_certificates,
    parse_private_key,
    read_small_file,
    split_pem,
)
from certwatchd.errors import PairError
from certwatchd.sandbox import Authority, Issued
from certwatchd.sources import LINKS, Source, read_lineage

TARGETS = (
    "split_pem",
    "parse_certificates",
    "parse_private_key",
    "read_small_file",
    "load_pair",
    "load_pair_untrusted",
    "read_lineage",
)
MAX_LEN = 16384
SYMLINK_MAX = 4095
NAME_MAX = 255
_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")


def main() -> int:
    """Parse the command line and fuzz, replay or run as the worker."""
    args = _arguments()
    if args.worker:
        return _work(args.out, args.libfuzzer)
    if args.replay:
        return _replay(args.replay)
    return _supervise(args)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="how long to fuzz"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="directory for the corpus, crashes and log (default: new"
        " temporary directory)",
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=10,
        help="seconds one input may take before it counts as a hang",
    )
    parser.add_argument(
        "--rss-mb",
        type=int,
        default=2048,
        help="memory the fuzzing process may reach before it counts",
    )
    parser.add_argument(
        "--replay",
        type=Path,
        nargs="+",
        help="run saved inputs (files or directories) once and report",
    )
    parser.add_argument(
        "--worker", action="store_true", help=argparse.SUPPRESS
    )
    parser.add_argument("libfuzzer", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args()


def _supervise(args: argparse.Namespace) -> int:
    """Run the worker for ``--minutes`` and summarise what it found."""
    out = args.out or Path(tempfile.mkdtemp(prefix="certwatchd-fuzz-"))
    corpus = out / "corpus"
    crashes = out / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(exist_ok=True)
    _seed(corpus)
    print(f"fuzz: output in {out} (crashes in {crashes})", flush=True)

    seconds = max(int(args.minutes * 60), 1)
    libfuzzer = [
        str(corpus),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={crashes}/",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_mb}",
        f"-max_len={MAX_LEN}",
        "-print_final_stats=1",
    ]
    command = [sys.executable, __file__, "--worker", "--out", str(out)]
    started = datetime.now(UTC)
    log_path = out / "fuzz.log"
    with log_path.open("wb") as log:
        status = subprocess.run(
            [*command, "--", *libfuzzer],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    finished = datetime.now(UTC)

    found = sorted(p for p in crashes.iterdir() if p.suffix != ".txt")
    done = _DONE.findall(log_path.read_bytes())
    runs, fuzzed = done[-1] if done else (b"unknown", b"unknown")
    wall = (finished - started).total_seconds()
    print(f"fuzz: started {started:%Y-%m-%d %H:%M:%S} UTC")
    print(f"fuzz: fuzzed {fuzzed.decode()} s ({wall:.0f} s with set-up)")
    print(f"fuzz: executions {runs.decode()}")
    print(f"fuzz: corpus {sum(1 for _ in corpus.iterdir())} inputs")
    print(f"fuzz: worker exit status {status}; log in {log_path}")
    if not found:
        print("fuzz: no crash, hang or leak")
        return 0 if status == 0 else 1
    for path in found:
        print(f"fuzz: saved input {path}")
        report = path.with_name(path.name + ".txt")
        if report.exists():
            last = report.read_text().strip().splitlines()[-1]
            print(f"fuzz:     {last}")
    print(f"fuzz: replay with {sys.argv[0]} --replay {crashes}")
    return 1


def _work(out: Path, libfuzzer: list[str]) -> int:
    """Run libFuzzer in this process; it exits when it is done."""
    import atheris  # noqa: PLC0415 - only the worker needs it

    scratch = out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    target = Target(scratch)
    recorder = Recorder(target, out / "crashes")
    # Coverage feedback from certwatchd's own code and the standard
    # library it calls; cryptography's parsers are compiled and opaque.
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *libfuzzer], recorder.run)
    atheris.Fuzz()
    return 0


class Recorder:
    """Saves each input that breaks the contract, then goes on fuzzing.

    One input is kept per distinct failure (exception type and the line
    that raised it), with its traceback beside it, so one known bug does
    not end the run. Hangs and memory blow-ups still end it: libFuzzer
    saves those inputs itself.
    """

    def __init__(self, target: Target, crashes: Path) -> None:
        self.target = target
        self.crashes = crashes
        self.seen: set[str] = set()

    def run(self, data: bytes) -> None:
        """Run ``data``; record it if it raises anything unexpected."""
        try:
            self.target.run(data)
        except Exception as exc:  # noqa: BLE001 - every escape is a finding
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{frames[-1].filename}:{frames[-1].lineno}"
            signature = f"{type(exc).__name__} at {where}"
            if signature in self.seen:
                return
            self.seen.add(signature)
            name = f"crash-{hashlib.sha1(data).hexdigest()}"  # noqa: S324
            (self.crashes / name).write_bytes(data)
            report = "".join(traceback.format_exception(exc))
            (self.crashes / f"{name}.txt").write_text(report)
            print(f"NEW FAILURE {signature}: {name}", file=sys.stderr)


def _replay(paths: list[Path]) -> int:
    """Run each saved input once; report which still fail."""
    files = []
    for path in paths:
        inside = sorted(path.iterdir()) if path.is_dir() else [path]
        files.extend(p for p in inside if p.suffix != ".txt")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="certwatchd-replay-") as name:
        target = Target(Path(name))
        for path in files:
            try:
                target.run(path.read_bytes())
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                failures += 1
                print(f"{path}: {type(exc).__name__}: {exc}")
            else:
                print(f"{path}: ok")
    return 1 if failures else 0


class Target:
    """Feeds one input to the entry point its first byte selects."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        authority = Authority.create("certwatchd fuzz CA")
        roots = authority.write_roots(scratch / "roots.pem")
        self.trust = TrustStore.from_setting(str(roots))
        self.untrusted = TrustStore.from_setting("none")
        self.valid = authority.issue(["example.com", "www.example.com"])
        self.archive = scratch / "archive" / "example.com"
        self.archive.mkdir(parents=True)
        for kind, data in _kinds(self.valid).items():
            (self.archive / f"{kind}1.pem").write_bytes(data)
        self.live = scratch / "live"
        calls: dict[str, Callable[[bytes], object]] = {
            "split_pem": lambda body: split_pem(body, Path("x.pem")),
            "parse_certificates": lambda body: parse_certificates(
                body, Path("fullchain.pem")
            ),
            "parse_private_key": lambda body: parse_private_key(
                body, Path("privkey.pem")
            ),
            "read_small_file": self._read_small_file,
            "load_pair": lambda body: self._load_pair(body, self.trust),
            "load_pair_untrusted": lambda body: self._load_pair(
                body, self.untrusted
            ),
            "read_lineage": self._read_lineage,
        }
        self.calls = [calls[name] for name in TARGETS]

    def run(self, data: bytes) -> None:
        """Call one entry point; only ``PairError`` may escape it."""
        if not data:
            return
        call = self.calls[data[0] % len(self.calls)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                call(data[1:])
            except PairError as exc:
                if not exc.path or not exc.reason:
                    msg = f"PairError without path or reason: {exc!r}"
                    raise AssertionError(msg) from None

    def _read_small_file(self, body: bytes) -> None:
        path = self.scratch / "file.pem"
        path.write_bytes(body)
        if read_small_file(path) != body:
            msg = "read_small_file returned other bytes than the file holds"
            raise AssertionError(msg)

    def _load_pair(self, body: bytes, trust: TrustStore) -> None:
        """Split ``body`` into a certificate file and a key file.

        The first byte says whether either side is swapped for the valid
        file, so the other side's mutations reach the later checks.
        """
        if len(body) < 3:
            return
        mode, size = body[0], int.from_bytes(body[1:3], "big")
        cert_data, key_data = body[3 : 3 + size], body[3 + size :]
        if mode % 3 == 1:
            cert_data = self.valid.fullchain_pem
        elif mode % 3 == 2:
            key_data = self.valid.key_pem
        cert = self.scratch / "fullchain.pem"
        key = self.scratch / "privkey.pem"
        cert.write_bytes(cert_data)
        key.write_bytes(key_data)
        load_pair(cert, key, trust)

    def _read_lineage(self, body: bytes) -> None:
        """Build ``live/<name>`` from NUL-separated names and link targets.

        Fields: the lineage name, then the targets of cert, chain,
        fullchain and privkey links and of ``previous_cert.pem`` (empty:
        no link). A seventh field makes ``live/<name>`` itself a link to
        it, as the daemon may be told about by an event.
        """
        fields = body.split(b"\0")
        name = _directory_name(fields[0])
        targets = [field[:SYMLINK_MAX] for field in fields[1:6]]
        if self.live.exists():
            shutil.rmtree(self.live)
        self.live.mkdir()
        directory = self.live / os.fsdecode(name)
        if len(fields) > 6 and fields[6]:
            os.symlink(fields[6][:SYMLINK_MAX], os.fsencode(directory))
        else:
            directory.mkdir()
            links = [f"{link}.pem" for link in LINKS]
            for link, target in zip(
                [*links, "previous_cert.pem"], targets, strict=False
            ):
                if target:
                    os.symlink(target, os.fsencode(directory / link))

        for settled in (False, True):
            found = read_lineage(self.live, os.fsdecode(name), settled=settled)
            if isinstance(found, Source):
                load_pair(found.cert_path, found.key_path, self.trust)


def _directory_name(raw: bytes) -> bytes:
    """Make ``raw`` a name ``list_lineages`` could return."""
    name = raw.replace(b"/", b"_")[:NAME_MAX]
    if name in {b"", b".", b".."} or name.startswith(b"."):
        name = b"x" + name[: NAME_MAX - 1]
    return name


def _kinds(issued: Issued) -> dict[str, bytes]:
    return {
        "cert": issued.cert_pem,
        "chain": issued.chain_pem,
        "fullchain": issued.fullchain_pem,
        "privkey": issued.key_pem,
    }


def _seed(corpus: Path) -> None:
    """Write valid and nearly valid inputs for every target."""
    authority = Authority.create("certwatchd fuzz seed CA")
    now = datetime.now(UTC)
    issued = [
        authority.issue(["example.com", "www.example.com"]),
        authority.issue(["example.org"], key_type="rsa"),
        authority.issue(["*.example.net"], key_type="ed25519"),
        authority.issue(
            ["example.com"],
            not_before=now - timedelta(days=90),
            not_after=now - timedelta(days=1),
        ),
        authority.issue([], common_name="example.com"),
    ]
    files: list[bytes] = []
    for one in issued:
        files.extend(_kinds(one).values())
        files.append(_der(one.cert_pem))
        files.append(_encrypted(one.key_pem))
        files.append(one.fullchain_pem + b"trailing\n")
    files.append(issued[0].key_pem + issued[0].fullchain_pem)

    seeds: list[bytes] = []
    for index in (0, 1, 2, 3):
        seeds.extend(bytes([index]) + data for data in files)
    for one in issued:
        cert, key = one.fullchain_pem, one.key_pem
        for mode in range(3):
            head = bytes([mode]) + len(cert).to_bytes(2, "big")
            seeds.extend(
                bytes([selector]) + head + cert + key for selector in (4, 5)
            )
    links = [
        b"../../archive/example.com/cert1.pem",
        b"../../archive/example.com/chain1.pem",
        b"../../archive/example.com/fullchain1.pem",
        b"../../archive/example.com/privkey1.pem",
    ]
    seeds.append(b"\x06example.com\0" + b"\0".join(links))
    seeds.append(b"\x06example.com\0" + b"\0".join([*links, links[0]]))
    seeds.append(b"\x06loop\0\0\0fullchain.pem\0privkey.pem")
    seeds.append(b"\x06dev\0\0\0/dev/zero\0/dev/urandom")
    seeds.append(b"\x06link\0\0\0\0\0\0example.com")
    for index, seed in enumerate(seeds):
        (corpus / f"seed-{index:03}").write_bytes(seed)


def _der(cert_pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.public_bytes(serialization.Encoding.DER)


def _encrypted(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


if __name__ == "__main__":
    sys.exit(main())
