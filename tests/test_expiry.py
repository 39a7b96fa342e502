from datetime import UTC, datetime, timedelta

from certwatchd.expiry import Expiries, days_left

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def at(days):
    return NOW + timedelta(days=days)


def test_hosts_are_listed_by_name_with_their_expiry():
    """Iteration gives every host once, in name order."""
    expiries = Expiries()
    expiries.update({"b.example": at(30), "a.example": at(60)})

    assert list(expiries) == [
        ("a.example", at(60).timestamp()),
        ("b.example", at(30).timestamp()),
    ]
    assert len(expiries) == 2


def test_a_later_report_replaces_some_and_keeps_the_rest():
    """A host missing from a report keeps the expiry last seen."""
    expiries = Expiries()
    expiries.update({"a.example": at(5), "b.example": at(40)})

    expiries.update({"a.example": at(90), "c.example": at(20)})

    assert dict(expiries) == {
        "a.example": at(90).timestamp(),
        "b.example": at(40).timestamp(),
        "c.example": at(20).timestamp(),
    }
    assert expiries.soonest == ("c.example", at(20).timestamp())


def test_nothing_known_before_the_first_report_and_after_clear():
    """An empty record has no soonest host and lists nothing."""
    expiries = Expiries()
    assert expiries.soonest is None
    assert list(expiries) == []

    expiries.update({"a.example": at(1)})
    expiries.clear()

    assert expiries.soonest is None
    assert len(expiries) == 0


def test_days_left_rounds_down():
    """A certificate 36 hours from expiry has one whole day left."""
    now = NOW.timestamp()
    assert days_left(now + 36 * 3600, now) == 1
    assert days_left(now - 1, now) == -1
