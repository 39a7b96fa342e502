from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from daemon_process import daemon_env

# In order; the first reload may finish after the renewal has begun.
STEPS = (
    "cert.installed",
    "demo.renewing",
    "lineage.changed",
    "cert.validated",
    "cert.installed",
    "reload.finished",
    "daemon.stopping",
)


def test_demo_renews_and_lists_installed_files(tmp_path):
    """``certwatchd demo`` shows each step, lists the files and exits 0."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "certwatchd", "demo"],
        capture_output=True,
        text=True,
        timeout=15,
        env=daemon_env(),
        cwd=tmp_path,
        check=False,
    )
    took = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert took < 15
    position = 0
    for step in STEPS:
        position = result.stderr.index(step, position) + len(step)
    assert result.stderr.count("reload.finished") == 2
    listed = re.search(r"Installed in (\S+):\n((?:  .*\n)+)", result.stdout)
    assert listed is not None, result.stdout
    lines = listed.group(2).splitlines()
    files = {line.split()[-1]: line.split()[0] for line in lines}
    assert files == {
        "demo.example.crt": "-rw-r--r--",
        "demo.example.key": "-rw-r-----",
        "conference.demo.example.crt": "-rw-r--r--",
        "conference.demo.example.key": "-rw-r-----",
    }
    assert not Path(listed.group(1)).exists()
