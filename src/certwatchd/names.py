"""DNS names: which ones are safe to build paths from, and coverage."""

from __future__ import annotations

import re

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_NAME = 253


def is_dns_name(name: str, *, allow_wildcard: bool = False) -> bool:
    """Say whether ``name`` is a lower-case host name, safe as a file name.

    Only ASCII letters, digits and inner hyphens, labels of 1 to 63
    characters, at least two labels, no trailing dot. With
    ``allow_wildcard`` the first label may be ``*`` alone.
    """
    if not name or len(name) > _MAX_NAME:
        return False

    labels = name.split(".")
    if allow_wildcard and labels[0] == "*":
        labels = labels[1:]
    if len(labels) < 2:  # noqa: PLR2004 - a host, not a bare label
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


def is_wildcard(name: str) -> bool:
    """Say whether ``name`` is a one-label wildcard such as ``*.a.b``."""
    return name.startswith("*.")


def covers(san: str, host: str) -> bool:
    """Say whether a certificate name covers ``host``.

    A wildcard covers exactly one label: ``*.example.com`` covers
    ``chat.example.com`` but neither ``example.com`` nor ``a.b.example.com``.
    """
    if not is_wildcard(san):
        return san == host
    head, _, rest = host.partition(".")
    return bool(head) and rest == san[2:]
