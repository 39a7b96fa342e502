import pytest

from certwatchd.names import covers, is_dns_name, is_wildcard


@pytest.mark.parametrize(
    "name",
    [
        "example.com",
        "chat.example.com",
        "xn--bcher-kva.example",
        "a-b.c-d.example",
        "a.b",
        "0.example.com",
        "a" * 63 + ".example",
    ],
)
def test_host_names_are_accepted(name):
    """Lower-case, multi-label host names are safe file names."""
    assert is_dns_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "localhost",
        "Example.com",
        "example.com.",
        ".example.com",
        "example..com",
        "../example.com",
        "..",
        "a/b.example",
        "a\\b.example",
        "-a.example",
        "a-.example",
        "a_b.example",
        "exa mple.com",
        "example.com\n",
        "ex\x00ample.com",
        "bücher.example",
        "a" * 64 + ".example",
        ("a" * 63 + ".") * 4 + "example",
        "*.example.com",
    ],
)
def test_unsafe_names_are_refused(name):
    """Names that are not plain lower-case DNS names are refused."""
    assert not is_dns_name(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("*.example.com", True),
        ("*.com", False),
        ("*", False),
        ("*.*.example.com", False),
        ("a.*.example.com", False),
        ("**.example.com", False),
        ("*a.example.com", False),
    ],
)
def test_wildcards_are_one_leading_label(name, expected):
    """With wildcards allowed, only a leading ``*.`` label is accepted."""
    assert is_dns_name(name, allow_wildcard=True) is expected


def test_is_wildcard_looks_at_the_first_label():
    """Only names starting with ``*.`` are wildcards."""
    assert is_wildcard("*.example.com")
    assert not is_wildcard("example.com")


@pytest.mark.parametrize(
    ("san", "host", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "www.example.com", False),
        ("*.example.com", "chat.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "chat.example.org", False),
        ("*.example.com", "chatexample.com", False),
    ],
)
def test_coverage_of_a_host(san, host, expected):
    """A wildcard covers exactly one extra label; other names themselves."""
    assert covers(san, host) is expected
