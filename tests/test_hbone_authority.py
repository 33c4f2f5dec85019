"""CONNECT authorities (SPEC §3.3, §3.4): `ip:port`, `[v6]:port` or `host:port`; anything else is refused."""

from __future__ import annotations

import pytest

from hbone.authority import BadAuthority, parse_authority


@pytest.mark.parametrize(
    ("text", "host", "port", "is_ip"),
    [
        ("10.0.0.7:8080", "10.0.0.7", 8080, True),
        ("[fd00::1]:8080", "fd00::1", 8080, True),
        ("[FD00:0::1]:80", "fd00::1", 80, True),  # canonical form
        ("[::1]:15008", "::1", 15008, True),
        ("reviews.default.svc.cluster.local:9080", "reviews.default.svc.cluster.local", 9080, False),
        ("Reviews.Default.:9080", "reviews.default", 9080, False),
    ],
)
def test_good_authorities(text: str, host: str, port: int, is_ip: bool) -> None:
    authority = parse_authority(text)
    assert (authority.host, authority.port, authority.is_ip) == (host, port, is_ip)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10.0.0.7",
        "10.0.0.7:",
        ":8080",
        "10.0.0.7:0",
        "10.0.0.7:65536",
        "10.0.0.7:http",
        "u@10.0.0.7:80",
        "[fd00::1]",
        "[fd00::1]8080",
        "[reviews]:80",
        "[10.0.0.7]:80",  # brackets hold an IPv6 address only
        # IPv6 without brackets: where the address ends and the port begins is a guess.
        "fd00::1:8080",
        "::1:80",
        "::ffff:10.0.0.7:80",
        "fd00::1",
        "a:b:80",
    ],
)
def test_bad_authorities(text: str) -> None:
    with pytest.raises(BadAuthority):
        parse_authority(text)


def test_str_brackets_ipv6_again() -> None:
    assert str(parse_authority("[fd00::1]:8080")) == "[fd00::1]:8080"
    assert str(parse_authority("10.0.0.7:8080")) == "10.0.0.7:8080"
