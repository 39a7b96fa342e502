from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from certwatchd.queue import Backoff, Debounce, DirtySet


def test_debounce_idle_has_nothing_due():
    """A debounce nobody asked for is not pending and never due."""
    debounce = Debounce(quiet=2.0, max_delay=30.0)

    assert not debounce.pending
    assert debounce.due_at() is None
    assert not debounce.is_due(1e9)


def test_debounce_due_after_quiet():
    """One request is due exactly ``quiet`` seconds later."""
    debounce = Debounce(quiet=2.0, max_delay=30.0)

    debounce.request(100.0)

    assert debounce.pending
    assert debounce.due_at() == 102.0
    assert not debounce.is_due(101.999)
    assert debounce.is_due(102.0)


def test_debounce_new_request_restarts_quiet():
    """A later request pushes the action back to quiet after it."""
    debounce = Debounce(quiet=2.0, max_delay=30.0)

    debounce.request(100.0)
    debounce.request(101.5)

    assert debounce.due_at() == 103.5
    assert not debounce.is_due(102.0)
    assert debounce.is_due(103.5)


def test_debounce_steady_stream_due_at_max_delay():
    """Requests every second, quiet 2 s: due max_delay after the first."""
    debounce = Debounce(quiet=2.0, max_delay=10.0)

    for second in range(10):
        debounce.request(100.0 + second)

    assert debounce.due_at() == 110.0
    assert not debounce.is_due(109.9)
    assert debounce.is_due(110.0)


def test_debounce_clear_starts_a_new_window():
    """After clear, the next request starts its own max_delay window."""
    debounce = Debounce(quiet=2.0, max_delay=5.0)
    debounce.request(100.0)
    debounce.request(104.0)

    debounce.clear()
    assert not debounce.pending
    assert debounce.due_at() is None
    debounce.request(120.0)

    assert debounce.first == 120.0
    assert debounce.due_at() == 122.0


def test_debounce_zero_quiet_is_due_at_once():
    """With quiet 0 a request is due at the instant it is made."""
    debounce = Debounce(quiet=0.0, max_delay=30.0)

    debounce.request(7.0)

    assert debounce.is_due(7.0)


@given(
    st.lists(
        st.floats(min_value=0.0, max_value=5.0, allow_nan=False),
        min_size=1,
        max_size=50,
    ),
    st.floats(min_value=0.0, max_value=10.0, allow_nan=False),
    st.floats(min_value=0.001, max_value=60.0, allow_nan=False),
)
def test_debounce_never_waits_past_max_delay(gaps, quiet, max_delay):
    """However requests arrive, the wait is neither too short nor long."""
    debounce = Debounce(quiet=quiet, max_delay=max_delay)
    now = 1000.0
    times = []
    for gap in gaps:
        now += gap
        times.append(now)
        debounce.request(now)

    due = debounce.due_at()

    assert due is not None
    assert due <= times[0] + max_delay
    assert due <= times[-1] + quiet
    assert due >= min(times[-1] + quiet, times[0] + max_delay)


def test_backoff_doubles_from_initial():
    """Each failure doubles the delay, starting at ``initial``."""
    backoff = Backoff(initial=5.0, ceiling=300.0)

    delays = [backoff.failed(0.0) for _ in range(5)]

    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0]
    assert backoff.failures == 5


def test_backoff_stops_at_ceiling():
    """Delays grow to the ceiling and stay there."""
    backoff = Backoff(initial=5.0, ceiling=300.0)

    delays = [backoff.failed(0.0) for _ in range(10)]

    assert delays[5:] == [160.0, 300.0, 300.0, 300.0, 300.0]
    assert max(delays) == 300.0


def test_backoff_ceiling_below_initial_wins():
    """A ceiling lower than the first delay caps even the first retry."""
    backoff = Backoff(initial=5.0, ceiling=2.0)

    assert backoff.failed(0.0) == 2.0
    assert backoff.failed(0.0) == 2.0


def test_backoff_schedules_retry_from_failure_time():
    """The retry is due the delay after the failure, not before."""
    backoff = Backoff(initial=5.0, ceiling=300.0)

    backoff.failed(100.0)
    assert backoff.retry_at == 105.0
    assert backoff.is_waiting(104.9)
    assert not backoff.is_waiting(105.0)
    backoff.failed(105.0)

    assert backoff.retry_at == 115.0


def test_backoff_success_resets():
    """A success forgets the failures; the next delay is ``initial``."""
    backoff = Backoff(initial=5.0, ceiling=300.0)
    for _ in range(4):
        backoff.failed(0.0)

    backoff.succeeded()

    assert backoff.failures == 0
    assert backoff.retry_at is None
    assert not backoff.is_waiting(0.0)
    assert backoff.failed(50.0) == 5.0


def test_dirty_set_tracks_quiet_time():
    """A marked key has been quiet since its last mark; a clean one, 0."""
    dirty = DirtySet()

    dirty.mark("letsencrypt:a", 10.0)

    assert dirty.quiet_since("letsencrypt:a", 12.5) == 2.5
    assert dirty.quiet_since("letsencrypt:b", 12.5) == 0.0


def test_dirty_set_new_mark_resets_quiet():
    """Another event for the same key starts its quiet time again."""
    dirty = DirtySet()
    dirty.mark("letsencrypt:a", 10.0)

    dirty.mark("letsencrypt:a", 12.0)

    assert dirty.quiet_since("letsencrypt:a", 12.5) == 0.5
    assert list(dirty.touched) == ["letsencrypt:a"]


def test_dirty_set_orders_oldest_event_first():
    """Keys come out in the order of their last event."""
    dirty = DirtySet()
    dirty.mark("b", 3.0)
    dirty.mark("a", 1.0)
    dirty.mark("c", 2.0)
    dirty.mark("a", 4.0)

    assert dirty.ordered() == ["c", "b", "a"]


def test_dirty_set_next_quiet_is_the_oldest_plus_quiet():
    """The next key to settle is the one whose last event is oldest."""
    dirty = DirtySet()
    assert dirty.next_quiet(2.0) is None

    dirty.mark("a", 5.0)
    dirty.mark("b", 3.0)

    assert dirty.next_quiet(2.0) == 5.0


def test_dirty_set_discard_and_truth():
    """Discarding every key leaves a clean, falsy set; unknown keys pass."""
    dirty = DirtySet()
    dirty.mark("a", 1.0)
    assert dirty

    dirty.discard("a")
    dirty.discard("never-marked")

    assert not dirty
    assert dirty.next_quiet(1.0) is None
