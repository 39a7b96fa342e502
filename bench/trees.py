"""Certbot-shaped trees of N lineages, generated once and kept on disk.

A tree lives in ``<cache>/<kind>-<size>/``: certbot's ``letsencrypt/``
config directory, the root that issued every leaf (``roots.pem``) and the
list of lineages with their names (``lineages.json``). RSA keys take tens
of milliseconds each, so a tree is built in a pool of worker processes
and reused by every later run; it is only ever read from there.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from certwatchd.sandbox import Authority, Issued, KeyType, LetsEncryptTree

DOMAIN = "bench.example"
# One lineage in this many carries extra names, as a host with its MUC
# and upload components would; never fewer than MIN_MULTI per tree.
MULTI_EVERY = 100
MIN_MULTI = 3
COMPONENTS = ("conference", "upload")
CHUNK = 64

_authority: Authority | None = None


@dataclass(frozen=True)
class Tree:
    """A cached tree: where it is and what it holds."""

    kind: str
    size: int
    root: Path
    lineages: dict[str, list[str]]

    @property
    def config_dir(self) -> Path:
        """Certbot's --config-dir."""
        return self.root / "letsencrypt"

    @property
    def live(self) -> Path:
        """Certbot's live directory, one subdirectory per lineage."""
        return self.config_dir / "live"

    @property
    def roots(self) -> Path:
        """The root certificate every leaf chains to."""
        return self.root / "roots.pem"

    @property
    def hosts(self) -> list[str]:
        """Every DNS name of every lineage, sorted."""
        return sorted({n for names in self.lineages.values() for n in names})


def lineage_names(size: int) -> dict[str, list[str]]:
    """Return ``size`` lineages and the DNS names each certificate holds."""
    multi = max(MIN_MULTI, size // MULTI_EVERY)
    step = max(size // multi, 1)
    lineages = {}
    for index in range(size):
        host = f"host{index:05}.{DOMAIN}"
        names = [host]
        if index % step == step // 2 and index // step < multi:
            names += [f"{part}.{host}" for part in COMPONENTS]
        lineages[host] = names
    return lineages


def cached(kind: str, size: int, cache: Path) -> Tree:
    """Return the tree of ``size`` lineages of ``kind``, building it once."""
    root = cache / f"{kind}-{size}"
    listing = root / "lineages.json"
    if not listing.exists():
        _build(kind, size, root)
    lineages = json.loads(listing.read_text())
    return Tree(kind, size, root, lineages)


def fresh(kind: KeyType, size: int, root: Path) -> tuple[Tree, Authority]:
    """Build a tree in ``root`` and keep its authority for renewals."""
    authority = Authority.create("certwatchd bench CA")
    lineages = lineage_names(size)
    tree = LetsEncryptTree(root / "letsencrypt")
    for name, names in lineages.items():
        tree.create_lineage(name, authority.issue(names, key_type=kind))
    authority.write_roots(root / "roots.pem")
    return Tree(kind, size, root, lineages), authority


def _build(kind: str, size: int, root: Path) -> None:
    """Generate a tree into a scratch directory, then move it in place."""
    global _authority  # noqa: PLW0603 - handed to forked workers
    started = time.monotonic()
    print(f"generating {size} {kind} lineages in {root} (cached)")
    scratch = root.with_name(root.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)

    _authority = Authority.create("certwatchd bench CA")
    lineages = lineage_names(size)
    tree = LetsEncryptTree(scratch / "letsencrypt")
    jobs = [(names, kind) for names in lineages.values()]
    context = multiprocessing.get_context("fork")
    with context.Pool(os.cpu_count()) as pool:
        issued = pool.imap(_issue, jobs, chunksize=CHUNK)
        for name, leaf in zip(lineages, issued, strict=True):
            tree.create_lineage(name, leaf)
    _authority.write_roots(scratch / "roots.pem")
    (scratch / "lineages.json").write_text(json.dumps(lineages, indent=0))

    shutil.rmtree(root, ignore_errors=True)
    scratch.rename(root)
    print(f"  done in {time.monotonic() - started:.1f} s")


def _issue(job: tuple[list[str], KeyType]) -> Issued:
    """Issue one leaf in a worker, from the authority it inherited."""
    names, kind = job
    assert _authority is not None  # noqa: S101 - set before the fork
    return _authority.issue(names, key_type=kind)
