"""The baggage codec: ztunnel's writer and naive parser, plus our bounds on what a peer can make us keep."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbone.baggage import (
    MAX_HEADER_BYTES,
    MAX_VALUE_BYTES,
    REASON_INVALID_VALUE,
    REASON_NOT_ASCII,
    REASON_TOO_LARGE,
    WORKLOAD_TYPES,
    Baggage,
    encode,
    parse,
)

FULL = Baggage(
    cluster_id="cluster1",
    namespace="default",
    workload_type="deployment",
    workload_name="sleep",
    service_name="sleep",
    service_version="v1",
    region="r1",
    zone="z1",
)


def test_encode_fixed_order_no_spaces() -> None:
    assert encode(FULL) == (
        "k8s.cluster.name=cluster1,k8s.namespace.name=default,k8s.deployment.name=sleep,"
        "service.name=sleep,service.version=v1,cloud.region=r1,cloud.availability_zone=z1"
    )


def test_encode_spec_example_omits_empty_items() -> None:
    b = Baggage("cluster1", "default", "deployment", "sleep", "sleep", "v1", "", None)
    assert encode(b) == (
        "k8s.cluster.name=cluster1,k8s.namespace.name=default,k8s.deployment.name=sleep,"
        "service.name=sleep,service.version=v1"
    )
    assert encode(Baggage()) == ""


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        (None, "k8s.deployment.name"),
        ("", "k8s.deployment.name"),
        ("Pod", "k8s.pod.name"),
        ("job", "k8s.job.name"),
    ],
)
def test_encode_workload_type(kind: str | None, key: str) -> None:
    assert encode(Baggage(workload_type=kind, workload_name="w")) == f"{key}=w"


def test_encode_unknown_workload_type_omits_the_name() -> None:
    assert encode(Baggage(namespace="ns", workload_type="statefulset", workload_name="w")) == "k8s.namespace.name=ns"


def test_encode_drops_values_that_would_corrupt_the_header() -> None:
    assert encode(Baggage(namespace="a,k8s.cluster.name=evil", service_name="ok")) == "service.name=ok"


def test_round_trip() -> None:
    result = parse([encode(FULL)])
    assert result.baggage == FULL
    assert result.dropped == 0
    assert result.reason == ""


def test_parse_every_line_and_later_duplicates_win() -> None:
    result = parse(["k8s.namespace.name=a,service.name=s", b"k8s.namespace.name=b"])
    assert result.baggage == Baggage(namespace="b", service_name="s")


def test_parse_empty_value_is_absent_and_overrides() -> None:
    assert parse(["k8s.cluster.name=c1,k8s.cluster.name="]).baggage == Baggage()
    assert parse(["service.version="]).baggage.service_version is None


def test_parse_workload_keys_set_type_and_name() -> None:
    assert parse(["k8s.cronjob.name=nightly"]).baggage == Baggage(workload_type="cronjob", workload_name="nightly")
    later = parse(["k8s.deployment.name=a,k8s.pod.name=b"]).baggage
    assert (later.workload_type, later.workload_name) == ("pod", "b")


def test_parse_unknown_keys_and_malformed_items_ignored() -> None:
    result = parse(["app.name=x,garbage,=v,k8s.statefulset.name=s, k8s.namespace.name=spaced,service.name=ok"])
    assert result.baggage == Baggage(service_name="ok")
    assert result.dropped == 0  # ignoring unknown keys is Istio's behaviour, not a drop


def test_parse_text_after_second_equals_is_lost() -> None:
    assert parse(["service.name=a=b"]).baggage.service_name == "a"


@pytest.mark.parametrize("line", ["k8s.namespace.name=caf\u00e9", "app.name=\u00fc,service.name=s"])
def test_parse_non_ascii_anywhere_makes_header_absent(line: str) -> None:
    for value in (line, line.encode("utf-8"), line.encode("latin-1")):
        result = parse(["service.name=ok", value])
        assert result.baggage == Baggage()
        assert (result.dropped, result.reason) == (1, REASON_NOT_ASCII)


def test_parse_oversize_header_absent_and_counted() -> None:
    big = "service.name=ok," + "x" * MAX_HEADER_BYTES
    result = parse([big])
    assert result.baggage == Baggage()
    assert (result.dropped, result.reason) == (1, REASON_TOO_LARGE)
    # The bound is on the total over all lines, not per line.
    half = "a" * (MAX_HEADER_BYTES // 2)
    assert parse([half, half, "service.name=ok"]).reason == REASON_TOO_LARGE
    assert parse([half, "service.name=ok"]).baggage.service_name == "ok"


@pytest.mark.parametrize(
    "value",
    [
        'a"b',
        "a\\b",
        "a\nb",
        "a{b}",
        "a}",
        "a b",
        "a;b",
        "a%20b",
        "a/b",
        "a:b",
        "\t",
        "x" * (MAX_VALUE_BYTES + 1),
    ],
)
def test_parse_drops_values_unsafe_as_labels(value: str) -> None:
    result = parse([f"k8s.namespace.name={value},service.name=fine"])
    assert result.baggage == Baggage(service_name="fine")
    assert (result.dropped, result.reason) == (1, REASON_INVALID_VALUE)


def test_parse_accepts_longest_allowed_value() -> None:
    value = "a" * MAX_VALUE_BYTES
    assert parse([f"service.name={value}"]).baggage.service_name == value


def test_invalid_later_duplicate_still_wins() -> None:
    result = parse(['service.name=good,service.name=b"ad'])
    assert result.baggage.service_name is None
    assert result.dropped == 1


# --- properties ---------------------------------------------------------------------------------------

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
_VALID = re.compile(r"[A-Za-z0-9._-]{1,253}")
valid_values = st.none() | st.text(alphabet=_ALPHABET, min_size=1, max_size=MAX_VALUE_BYTES)


@st.composite
def valid_baggage(draw: st.DrawFn) -> Baggage:
    name = draw(valid_values)
    kind = draw(st.sampled_from(sorted(WORKLOAD_TYPES))) if name is not None else None
    return Baggage(
        cluster_id=draw(valid_values),
        namespace=draw(valid_values),
        workload_type=kind,
        workload_name=name,
        service_name=draw(valid_values),
        service_version=draw(valid_values),
        region=draw(valid_values),
        zone=draw(valid_values),
    )


@settings(max_examples=200, deadline=None)
@given(valid_baggage())
def test_property_round_trip(b: Baggage) -> None:
    result = parse([encode(b)])
    assert result.baggage == b
    assert result.dropped == 0


_KEYS = [
    "k8s.cluster.name",
    "k8s.namespace.name",
    "k8s.pod.name",
    "service.name",
    "service.version",
    "cloud.region",
    "cloud.availability_zone",
]
# Text biased towards things that look like baggage, so the parser's interesting paths are reached.
_item = st.tuples(st.sampled_from(_KEYS) | st.text(max_size=8), st.text(max_size=20)).map(lambda kv: "=".join(kv))
header_text = st.lists(_item, max_size=6).map(",".join) | st.text()
header_line = header_text | header_text.map(lambda t: t.encode("utf-8")) | st.binary()


@settings(max_examples=300, deadline=None)
@given(st.lists(header_line, max_size=4))
def test_property_parse_never_raises_and_values_stay_bounded(lines: list[str | bytes]) -> None:
    result = parse(lines)
    b = result.baggage
    for value in (
        b.cluster_id,
        b.namespace,
        b.workload_name,
        b.service_name,
        b.service_version,
        b.region,
        b.zone,
    ):
        assert value is None or _VALID.fullmatch(value)
    assert b.workload_type is None or b.workload_type in WORKLOAD_TYPES
    assert (b.workload_type is None) == (b.workload_name is None)
    assert result.dropped >= 0
    assert (result.dropped == 0) == (result.reason == "")
