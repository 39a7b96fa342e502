"""Profile one `certwatchd sync` with pyinstrument on a cached tree.

A cold sync starts from empty certificate and state directories; a warm
one follows an unprofiled cold sync. pyinstrument is found on the path
or in ``<cache>/tools`` (``pip install --target <cache>/tools
pyinstrument``). Writes a call tree and a flat list of self time.

    .venv/bin/python bench/hotspots.py --kind ec --size 1000 cold
    .venv/bin/python bench/hotspots.py --kind ec --size 10000 warm
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trees
from oneshot import (
    clean_env,
    compile_package,
    read_tree,
    run_or_fail,
    run_timed,
)
from run import CACHE
from worlds import certwatchd_command, certwatchd_world

TOP_LINES = 40


def main() -> int:
    """Profile the sync asked for and print the top of the flat list."""
    args = _arguments()
    tree = trees.cached(args.kind, args.size, args.cache / "trees")
    compile_package()
    out = args.cache / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.kind}-{args.size}-{args.state}"
    env = clean_env()
    tools = args.cache / "tools"
    if tools.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(tools), env.get("PYTHONPATH")])
        )

    work = Path(tempfile.mkdtemp(prefix="profile-", dir=args.cache))
    try:
        world = certwatchd_world(work / "certwatchd", tree)
        read_tree(tree)
        if args.state == "warm":
            run_timed(certwatchd_command(world, "sync"), work / "log", env)
            # Files written less than 2 s ago are read again (state.py);
            # the profile is of a run where nothing needs reading.
            time.sleep(2.5)
            run_timed(certwatchd_command(world, "sync"), work / "log", env)
        sync = ["certwatchd", "sync", "--config", str(world.config)]
        profiler = [sys.executable, "-m", "pyinstrument", "--no-color"]
        session = stem.with_suffix(".pyisession")
        seconds, status = run_timed(
            [*profiler, "-r", "pyisession", "-o", str(session), "-m", *sync],
            work / "log",
            env,
        )
        for suffix, options in ((".txt", []), (".flat.txt", ["flat=true"])):
            render = [*profiler, "--load", str(session), "-r", "text"]
            render += [f"-p{option}" for option in options]
            render += ["-o", str(stem.with_suffix(suffix))]
            run_or_fail(render, work / "log", env)
    finally:
        shutil.rmtree(work)

    print(
        f"{args.state} sync of {args.size} {args.kind}: {seconds:.2f} s"
        f" under the profiler, exit status {status}"
    )
    print(f"profiles: {stem}.txt, {stem}.flat.txt")
    lines = stem.with_suffix(".flat.txt").read_text().splitlines()
    print("\n".join(lines[:TOP_LINES]))
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", choices=["cold", "warm"])
    parser.add_argument("--kind", choices=["ec", "rsa"], default="ec")
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=CACHE)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
