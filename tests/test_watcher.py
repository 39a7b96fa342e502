from __future__ import annotations

import errno
import shutil
import threading

import pytest
from structlog.testing import capture_logs
from watchdog.observers.api import BaseObserver

from certwatchd.sandbox import LetsEncryptTree
from certwatchd.watcher import Watcher
from daemon_process import wait_until


class Recorder:
    """Collects ``(root, path)`` reports from watchdog's thread.

    Waiting wakes at each report, as the daemon's loop does, rather than
    at the next poll, so races against watchdog's threads show here too.
    """

    def __init__(self):
        self.seen = []
        self._changed = threading.Condition()

    def __call__(self, root, path):
        """Note one report; called on watchdog's thread."""
        with self._changed:
            self.seen.append((root, path))
            self._changed.notify_all()

    def paths(self, root=None):
        """Return the reported paths, for one root or all."""
        with self._changed:
            return [p for r, p in self.seen if root in {None, r}]

    def clear(self):
        """Forget what was reported so far."""
        with self._changed:
            self.seen.clear()

    def wait_for(self, condition, timeout=3.0):
        """Wait until ``condition(paths)`` holds; say whether it did."""
        with self._changed:
            return self._changed.wait_for(
                lambda: condition([p for _, p in self.seen]), timeout
            )


@pytest.fixture
def roots(tmp_path):
    """Make a certbot tree and a Prosody directory to watch."""
    tree = LetsEncryptTree(tmp_path / "letsencrypt")
    certs = tmp_path / "certs"
    certs.mkdir()
    return {"letsencrypt": tree.live, "prosody": certs}


@pytest.fixture
def watching():
    """Start watchers on demand and always stop them afterwards."""
    started = []

    def start(roots):
        recorder = Recorder()
        watcher = Watcher(roots, recorder)
        started.append(watcher)
        watcher.start()
        return watcher, recorder

    yield start
    for watcher in started:
        watcher.stop()
        assert not watcher.is_alive()


def under(directory):
    prefix = str(directory) + "/"
    return lambda paths: any(p.startswith(prefix) for p in paths)


def test_reports_changes_under_each_root(roots, watching):
    """A file written under a root is reported with that root's name."""
    _, recorder = watching(roots)

    (roots["prosody"] / "example.com.crt").write_text("x")

    assert recorder.wait_for(
        lambda paths: str(roots["prosody"] / "example.com.crt") in paths
    )
    assert {r for r, _ in recorder.seen} == {"prosody"}


def test_watches_lineages_created_later(roots, watching, authority):
    """A lineage made after start is watched too, down to its links."""
    _, recorder = watching(roots)
    tree = LetsEncryptTree(roots["letsencrypt"].parent)

    live = tree.create_lineage("example.com", authority.issue(["a.test"]))
    assert recorder.wait_for(lambda paths: str(live / "README") in paths)
    recorder.clear()
    tree.renew("example.com", authority.issue(["a.test"]))

    assert recorder.wait_for(
        lambda paths: (
            str(live / "fullchain.pem") in paths
            and str(live / "previous_fullchain.pem") in paths
        )
    )
    links = {
        str(live / name)
        for kind in ("cert", "privkey", "chain", "fullchain")
        for name in (f"{kind}.pem", f"previous_{kind}.pem")
    }
    # Late reports of the lineage's creation may still trickle in.
    assert set(recorder.paths()) <= links | {str(live), str(live / "README")}


def test_reading_is_not_reported(roots, watching, authority):
    """Opening and reading watched files reports nothing."""
    tree = LetsEncryptTree(roots["letsencrypt"].parent)
    live = tree.create_lineage("example.com", authority.issue(["a.test"]))
    (roots["prosody"] / "example.com.crt").write_text("x")
    _, recorder = watching(roots)

    for path in (
        live / "fullchain.pem",
        live / "privkey.pem",
        roots["prosody"] / "example.com.crt",
    ):
        path.read_bytes()
    sorted(live.iterdir())

    assert not recorder.wait_for(bool, timeout=0.5)


def test_missing_root_logged_once(tmp_path, watching):
    """A missing root is one warning, however often it is checked."""
    missing = tmp_path / "letsencrypt" / "live"
    with capture_logs() as logs:
        watcher, _ = watching({"letsencrypt": missing})
        changed = [watcher.ensure() for _ in range(3)]

    assert changed == [False] * 3
    assert watcher.watched() == set()
    warnings = [e for e in logs if e["event"] == "watch.root_missing"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["path"] == str(missing)


def test_missing_root_watched_once_it_appears(tmp_path, watching):
    """A root that appears is watched at the next check, which says so."""
    missing = tmp_path / "live"
    watcher, recorder = watching({"letsencrypt": missing})

    missing.mkdir()
    assert watcher.ensure()
    (missing / "README").write_text("x")

    assert watcher.watched() == {"letsencrypt"}
    assert not watcher.ensure()
    assert recorder.wait_for(under(missing))


def test_recreated_root_is_watched_again(roots, watching):
    """A root deleted and made again at once is watched in its new form."""
    watcher, recorder = watching(roots)
    live = roots["letsencrypt"]

    (live / "README").unlink()
    assert recorder.wait_for(lambda paths: str(live) in paths)
    recorder.clear()

    with capture_logs() as logs:
        live.rmdir()
        live.mkdir()
        # The new directory may get the old one's inode back; once the
        # root's deletion has been reported, the next check must see it.
        assert recorder.wait_for(lambda paths: str(live) in paths)
        assert watcher.ensure()
    recorder.clear()
    (live / "README").write_text("x")

    assert recorder.wait_for(lambda paths: str(live / "README") in paths)
    assert watcher.watched() == {"letsencrypt", "prosody"}
    assert not watcher.ensure()
    assert [e["event"] for e in logs] == ["watch.lost", "watch.started"]


def test_deleted_root_dropped_and_reported_missing(roots, watching):
    """A deleted root is dropped once, then reported missing once."""
    watcher, _ = watching(roots)

    with capture_logs() as logs:
        shutil.rmtree(roots["letsencrypt"])
        assert wait_until(watcher.ensure, 2)
        assert not watcher.ensure()

    assert watcher.watched() == {"prosody"}
    assert [e["event"] for e in logs] == ["watch.lost", "watch.root_missing"]


def test_stop_ends_the_observer(roots, watching):
    """The observer thread runs from start until stop."""
    watcher, _ = watching(roots)
    assert watcher.is_alive()

    watcher.stop()

    assert not watcher.is_alive()


def test_failing_callback_ends_the_observer(roots, monkeypatch):
    """A callback that raises kills the observer, and is_alive says so."""
    died = []
    monkeypatch.setattr(threading, "excepthook", died.append)

    def fail(root, path):
        msg = f"callback failed for {root}:{path}"
        raise RuntimeError(msg)

    watcher = Watcher(roots, fail)
    watcher.start()
    try:
        (roots["prosody"] / "example.com.crt").write_text("x")
        assert wait_until(lambda: not watcher.is_alive(), 3)
    finally:
        watcher.stop()

    assert [type(d.exc_value) for d in died] == [RuntimeError]


def test_watch_limit_is_an_actionable_error(roots, monkeypatch):
    """Running out of inotify watches says how to fix it, and goes on."""

    def exhausted(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Running out for real means lowering a machine-wide limit.
    monkeypatch.setattr(BaseObserver, "schedule", exhausted)
    watcher = Watcher(roots, Recorder())

    with capture_logs() as logs:
        watcher.start()
    try:
        assert watcher.is_alive()
        assert watcher.limited
        assert watcher.watched() == set()
    finally:
        watcher.stop()

    errors = [e for e in logs if e["event"] == "watch.limit_reached"]
    assert len(errors) == 2
    assert all(e["log_level"] == "error" for e in errors)
    assert "max_user_watches" in errors[0]["fix"]
