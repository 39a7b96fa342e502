"""When each installed host's certificate expires, kept between passes.

A daemon with thousands of hosts keeps this for as long as it runs, so
it is held in two objects, the names joined in one string and the times
in one array, rather than as a name and a number per host. Small
objects made after a large pass land among that pass's freed memory and
keep it from going back to the system; two large ones do not.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator, Mapping
from datetime import datetime

DAY_SECONDS = 86400


class Expiries:
    """Each host's notAfter, as a POSIX timestamp, sorted by host name.

    Hosts stay until :meth:`clear`: a host missing from a pass's report
    (its new source refused, say) still has its installed certificate,
    which still expires.
    """

    def __init__(self) -> None:
        self._names = ""
        self._times = array("d")
        self._soonest: tuple[str, float] | None = None

    def __len__(self) -> int:
        return len(self._times)

    def update(self, hosts: Mapping[str, datetime]) -> None:
        """Add or replace the expiry of each host in ``hosts``."""
        merged = dict(self)
        for host, not_after in hosts.items():
            merged[host] = not_after.timestamp()
        names = sorted(merged)
        # Host names are DNS names: they never hold a newline.
        self._names = "\n".join(names)
        self._times = array("d", (merged[name] for name in names))
        self._soonest = None
        if names:
            index = min(range(len(names)), key=self._times.__getitem__)
            self._soonest = (names[index], self._times[index])

    def clear(self) -> None:
        """Forget every host."""
        self._names = ""
        self._times = array("d")
        self._soonest = None

    def __iter__(self) -> Iterator[tuple[str, float]]:
        """Yield ``(host, not_after)`` in host order."""
        if not self._times:
            return
        yield from zip(self._names.split("\n"), self._times, strict=True)

    @property
    def soonest(self) -> tuple[str, float] | None:
        """The host whose certificate expires first, and when."""
        return self._soonest


def days_left(not_after: float, now: float) -> int:
    """Return whole days from ``now`` to ``not_after``, rounded down."""
    return math.floor((not_after - now) / DAY_SECONDS)
