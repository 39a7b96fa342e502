"""Benchmark certwatchd against prosodyctl cert import, and at rest.

One command measures, on certbot-shaped trees of N lineages of EC or RSA
2048 certificates (one DNS name each, a few with three): cold and warm
one-shot syncs against `prosodyctl --root cert import` on the same tree;
start to READY=1; idle CPU, RSS and inotify watches; event-to-install
and event-to-reload latency; reloads per burst of renewals. It writes
the numbers into docs/benchmarks.md.

    .venv/bin/python bench/run.py --quick
    .venv/bin/python bench/run.py --sizes 100,1000,10000 --kinds ec,rsa
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import report
import service
import trees
from oneshot import (
    BenchError,
    cold_sync,
    compile_package,
    describe_failure,
    warm_sync,
)
from worlds import certwatchd_world, prosody_world

REPO = Path(__file__).resolve().parent.parent
# Outside the repository, kept across runs on purpose.
CACHE = Path("/var/tmp/certwatchd-bench")  # noqa: S108
QUICK = {"sizes": "50,200", "rounds": 2, "renewals": 20, "idle": 5.0}


def main() -> int:
    """Run every measurement asked for and write the report."""
    args = _arguments()
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        report.write(args.output, results)
        print(f"wrote {args.output}")
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    compile_package()
    results = _new_results(args)
    saved = args.cache / f"results-{time.strftime('%Y%m%dT%H%M%S')}.json"
    _measure(args, results, saved)

    report.write(args.output, results)
    print(f"wrote {args.output} (raw numbers in {saved})")
    for target, measured, verdict in report.targets(results):
        print(f"  {target}: {measured}, {verdict}")
    for failure in results["failures"]:
        print(f"  failed: {failure}")
    return 1 if results["failures"] else 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--kinds", default="ec,rsa")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes ({QUICK['sizes']}), short windows, report to "
        "the cache directory unless --output is given",
    )
    parser.add_argument(
        "--prosodyctl-max",
        type=int,
        default=None,
        metavar="N",
        help="run prosodyctl only on trees of at most N lineages",
    )
    parser.add_argument(
        "--idle-sizes",
        default="1000,10000",
        help="sizes at which to watch an idle daemon (default: %(default)s)",
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--latency-lineages", type=int, default=100)
    parser.add_argument("--renewals", type=int, default=200)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--debounce", type=float, default=0.2)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="rewrite the report from a saved results file; measure nothing",
    )
    args = parser.parse_args()

    if args.quick:
        if args.sizes == parser.get_default("sizes"):
            args.sizes = QUICK["sizes"]
        args.rounds = min(args.rounds, QUICK["rounds"])
        args.renewals = min(args.renewals, QUICK["renewals"])
        args.idle_seconds = min(args.idle_seconds, QUICK["idle"])
        args.idle_sizes = args.sizes
        args.burst = min(args.burst, args.latency_lineages)
    if args.output is None:
        args.output = (
            args.cache / "quick.md"
            if args.quick
            else REPO / "docs" / "benchmarks.md"
        )
    args.size_list = [int(size) for size in args.sizes.split(",")]
    args.kind_list = args.kinds.split(",")
    args.idle_list = {int(size) for size in args.idle_sizes.split(",")}
    return args


def _new_results(args: argparse.Namespace) -> dict[str, Any]:
    command = ["python", "bench/run.py", *sys.argv[1:]]
    return {
        "machine": report.machine(REPO, args.cache),
        "command": ".venv/bin/" + shlex.join(command),
        "measured": [
            "certwatchd sync --config certwatchd/config.toml",
            (
                "prosodyctl --root --config prosody/prosody.cfg.lua"
                " cert import letsencrypt/live"
            ),
            (
                "certwatchd run --config certwatchd/config.toml"
                "  # NOTIFY_SOCKET=notify.sock"
            ),
        ],
        "notes": _notes(args),
        "cold": [],
        "warm": [],
        "ready": [],
        "idle": [],
        "latency": [],
        "failures": [],
    }


def _notes(args: argparse.Namespace) -> list[str]:
    return [
        (
            "Trees are generated once into a cache directory and only read;"
            " every run gets fresh certificate and state directories on the"
            " same disk. Every file of a tree is read once before its"
            " timed runs, so neither tool pays for a cold page cache."
        ),
        (
            "`certwatchd sync` validates what its caches do not know in one"
            " process per CPU it may use (here"
            f" {len(os.sched_getaffinity(0))}); prosodyctl uses one."
        ),
        (
            "certwatchd's modules are byte-compiled before the first run,"
            " as `pip install` leaves them; prosodyctl's Lua is read from"
            " source at every run, as Prosody ships it."
        ),
        (
            "certwatchd runs with its shipped settings except the paths:"
            " chain verification against the bench root, root:prosody"
            " 0644/0640, JSON logs at info to a file, and a reload command"
            " that appends `date +%s.%N` to a file (no Prosody is signalled;"
            " prosodyctl finds no running Prosody and skips its SIGHUP)."
        ),
        (
            "The Prosody config declares every name as a VirtualHost, or as"
            " a Component for the conference./upload. names of the"
            " three-name certificates, with `certificates` pointing at an"
            " empty directory."
        ),
        (
            f"Latency and bursts: {args.latency_lineages} fresh lineages,"
            f" reload.debounce_seconds = {args.debounce:g} (shipped: 2),"
            " EC or RSA renewals as in the key column."
        ),
        (
            "The machine is shared: other work may run during a"
            " measurement. Ratios come from alternated runs to even that"
            " out; absolute times are noisier."
        ),
    ]


def _measure(
    args: argparse.Namespace, results: dict[str, Any], saved: Path
) -> None:
    for kind in args.kind_list:
        for size in args.size_list:
            tree = trees.cached(kind, size, args.cache / "trees")
            print(f"{kind} {size}: {len(tree.hosts)} hosts")
            with _workdir(args.cache, results, f"{kind} {size}") as work:
                _measure_tree(args, results, tree, work)
            saved.write_text(json.dumps(results, indent=1))
        print(f"{kind}: latency and bursts")
        with _workdir(args.cache, results, f"{kind} latency") as work:
            results["latency"].append(_latency(args, kind, work, results))
        saved.write_text(json.dumps(results, indent=1))


def _measure_tree(
    args: argparse.Namespace,
    results: dict[str, Any],
    tree: trees.Tree,
    work: Path,
) -> None:
    label = f"{tree.kind} {tree.size}"
    key = {"kind": tree.kind, "size": tree.size, "load": os.getloadavg()[0]}
    mine = certwatchd_world(work / "certwatchd", tree)
    theirs = None
    if args.prosodyctl_max is None or tree.size <= args.prosodyctl_max:
        theirs = prosody_world(work / "prosody", tree)

    cold = cold_sync(tree, mine, theirs, args.rounds)
    results["failures"] += [f"{label}: {text}" for text in cold.failures]
    results["cold"].append(
        {
            **key,
            "hosts": len(tree.hosts),
            **dataclasses.asdict(cold),
            "ratios": cold.ratios,
            "ratio": cold.ratio,
        }
    )
    warm = warm_sync(mine, args.rounds)
    results["failures"] += [f"{label}: {text}" for text in warm.failures]
    results["warm"].append({**key, **dataclasses.asdict(warm)})

    in_step = []
    for index in range(args.rounds):
        with service.daemon(mine) as running:
            in_step.append(running.ready_seconds)
            print(
                f"    ready in step round {index + 1}:"
                f" {running.ready_seconds:7.2f} s"
            )
            if index == args.rounds - 1 and tree.size in args.idle_list:
                load = os.getloadavg()[0]
                idle = service.idle(
                    running.process.pid, settle=5.0, window=args.idle_seconds
                )
                results["idle"].append(
                    {
                        **key,
                        "load": load,
                        **dataclasses.asdict(idle),
                        "cpu_percent": idle.cpu_percent,
                    }
                )
                print(
                    f"    idle: {idle.cpu_percent:.3f} % CPU,"
                    f" {idle.rss_max_kib / 1024:.1f} MiB,"
                    f" {idle.watches} watches"
                )
        _check_log(results, f"{label} in-step start", running.log)
    mine.empty()
    with service.daemon(mine) as running:
        empty = [running.ready_seconds]
        print(f"    ready from empty: {running.ready_seconds:7.2f} s")
    _check_log(results, f"{label} start from empty", running.log)
    results["ready"].append({**key, "in_step": in_step, "empty": empty})


def _latency(
    args: argparse.Namespace, kind: str, work: Path, results: dict[str, Any]
) -> dict[str, Any]:
    load = os.getloadavg()[0]
    tree, authority = trees.fresh(kind, args.latency_lineages, work / "tree")
    world = certwatchd_world(work / "certwatchd", tree, debounce=args.debounce)
    with service.daemon(world) as running:
        service.wait_for_reloads(world, 1)
        time.sleep(1.0)
        latency = service.renew_one_by_one(
            tree, authority, world, args.renewals, gap=0.1
        )
        names = list(tree.lineages)
        bursts = []
        for index in range(args.rounds):
            start = (index * args.burst) % len(names)
            chosen = (names * 2)[start : start + args.burst]
            burst = service.renew_burst(
                tree, authority, world, chosen, quiet=2.0
            )
            print(f"    burst {index + 1}: {burst.reloads} reloads")
            bursts.append(dataclasses.asdict(burst))
    _check_log(results, f"{kind} latency", running.log)
    installs = latency.installs
    print(
        f"    install p50 {service.percentile(installs, 50) * 1000:.1f} ms"
        f" p99 {service.percentile(installs, 99) * 1000:.1f} ms"
    )
    return {
        "kind": kind,
        "size": tree.size,
        "debounce": args.debounce,
        "load": load,
        **dataclasses.asdict(latency),
        "bursts": bursts,
    }


@contextlib.contextmanager
def _workdir(
    cache: Path, results: dict[str, Any], label: str
) -> Iterator[Path]:
    """Give a scratch directory; on failure note it, keep it, go on."""
    work = Path(tempfile.mkdtemp(prefix="work-", dir=cache))
    try:
        yield work
    except BenchError as exc:
        results["failures"].append(f"{label}: {exc} (stopped this part)")
        print(f"bench: {label}: {exc}; kept {work}", file=sys.stderr)
        return
    shutil.rmtree(work)


def _check_log(results: dict[str, Any], label: str, log: Path) -> None:
    """Note the error events a daemon logged, if any."""
    if service.errors(log):
        results["failures"].append(f"{label}: {describe_failure(log)}")


if __name__ == "__main__":
    sys.exit(main())
