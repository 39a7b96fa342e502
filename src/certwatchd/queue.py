"""Deciding when to act: which sources are ready, and when to reload.

Pure bookkeeping over monotonic timestamps the caller passes in, so the
rules can be tested without sleeping and without threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Debounce:
    """One action, due after ``quiet`` seconds without a new request.

    A steady stream of requests cannot delay it forever: it is due at the
    latest ``max_delay`` seconds after the first request still waiting.
    """

    quiet: float
    max_delay: float
    first: float | None = None
    last: float | None = None

    def request(self, now: float) -> None:
        """Ask for the action; repeated asks within the window merge."""
        if self.first is None:
            self.first = now
        self.last = now

    @property
    def pending(self) -> bool:
        """Say whether a request is waiting."""
        return self.first is not None

    def due_at(self) -> float | None:
        """Return when the waiting request becomes due, if there is one."""
        if self.first is None or self.last is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_delay)

    def is_due(self, now: float) -> bool:
        """Say whether the action should run now."""
        due = self.due_at()
        return due is not None and now >= due

    def clear(self) -> None:
        """Forget the waiting request, once the action has run."""
        self.first = None
        self.last = None


@dataclass
class Backoff:
    """Retry delays that double from ``initial`` up to ``ceiling``."""

    initial: float = 5.0
    ceiling: float = 300.0
    failures: int = 0
    retry_at: float | None = None

    def failed(self, now: float) -> float:
        """Record a failure; return the delay before the next attempt."""
        delay = min(self.initial * 2.0**self.failures, self.ceiling)
        self.failures += 1
        self.retry_at = now + delay
        return delay

    def succeeded(self) -> None:
        """Reset after a success."""
        self.failures = 0
        self.retry_at = None

    def is_waiting(self, now: float) -> bool:
        """Say whether a retry is scheduled for later than ``now``."""
        return self.retry_at is not None and now < self.retry_at


@dataclass
class DirtySet:
    """Sources touched by events, with the time of each one's last event.

    A key can be put off (:meth:`wait`) until a given time; a new event
    for it ends the wait.
    """

    touched: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, float] = field(default_factory=dict)

    def mark(self, key: str, now: float) -> None:
        """Note an event for ``key``."""
        self.touched[key] = now
        self.waiting.pop(key, None)

    def wait(self, key: str, until: float) -> None:
        """Put ``key`` off until ``until``, unless an event comes first."""
        if key in self.touched:
            self.waiting[key] = until

    def quiet_since(self, key: str, now: float) -> float:
        """Return how long ``key`` has had no event (0 if it is clean)."""
        last = self.touched.get(key)
        return 0.0 if last is None else now - last

    def ordered(self) -> list[str]:
        """Return the dirty keys, oldest event first."""
        return sorted(self.touched, key=self.touched.__getitem__)

    def discard(self, key: str) -> None:
        """Forget ``key`` once it has been handled."""
        self.touched.pop(key, None)
        self.waiting.pop(key, None)

    def next_quiet(self, quiet: float) -> float | None:
        """Return when the next key is due another look.

        That is once it has been quiet for ``quiet`` seconds, or, for a
        key put off by :meth:`wait`, when its wait ends.
        """
        if not self.touched:
            return None
        return min(
            self.waiting.get(key, last + quiet)
            for key, last in self.touched.items()
        )

    def __bool__(self) -> bool:
        return bool(self.touched)
