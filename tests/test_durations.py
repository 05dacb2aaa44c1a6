"""Tests for softlb.durations: parsing "250ms" / "5s" / "1m" / numbers, and formatting."""

from __future__ import annotations

import pytest

from softlb.durations import MAX_DURATION, format_duration, parse_duration
from softlb.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (0.25, 0.25),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("1.5ms", 0.0015),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h30m", 5400.0),
        ("1s500ms", 1.5),
        ("0s", 0.0),
        ("  5s  ", 5.0),
        ("\t250ms\n", 0.25),
        ("24h", MAX_DURATION),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    """Numbers are seconds and strings may carry ms, s, m or h units."""
    assert parse_duration(value) == pytest.approx(seconds)


def test_parse_duration_returns_float() -> None:
    """An int number of seconds comes back as a float."""
    result = parse_duration(5)
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "value",
    [
        "5 sec",
        "5 s",
        "1m 30s",
        "5",
        "1.5",
        ".5",
        "5sec",
        "5S",
        "5M",
        "1d",
        "2us",
        "",
        "   ",
        "s",
        "ms",
        "five",
        "5s5",
        "1e3",
        "nan",
        "inf",
        "+5s",
        "5,5s",
        "١s",  # an Arabic-Indic digit: not ASCII
        None,
        True,
        False,
        [5],
        {"seconds": 5},
    ],
)
def test_parse_duration_rejects_non_durations(value: object) -> None:
    """Anything that is not a number of seconds or a number with a known unit is refused."""
    with pytest.raises(ConfigError, match=r"is not a duration|has no unit"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5, "-5s", "-1m"])
def test_parse_duration_rejects_negative(value: object) -> None:
    """A negative duration is refused with a message saying so."""
    with pytest.raises(ConfigError, match="is negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_parse_duration_rejects_non_finite(value: float) -> None:
    """NaN and infinities are refused."""
    with pytest.raises(ConfigError, match="is not a finite number"):
        parse_duration(value)


@pytest.mark.parametrize("value", [86_401, 1e12, 10**400, "25h", "1" * 400 + "s", "9999999h"])
def test_parse_duration_rejects_too_long(value: object) -> None:
    """Values beyond a day, however large, are refused without overflowing."""
    with pytest.raises(ConfigError, match="is too long; use at most 24h"):
        parse_duration(value)


def test_parse_duration_custom_maximum() -> None:
    """The maximum can be lowered or raised by the caller."""
    assert parse_duration("48h", maximum=2 * MAX_DURATION) == 172_800.0
    with pytest.raises(ConfigError, match="use at most 1m"):
        parse_duration("2m", maximum=60.0)


@pytest.mark.parametrize("value", [0, 0.0, "0s", "0ms", "0m0s", "-0s"])
def test_parse_duration_zero_refused_when_not_allowed(value: object) -> None:
    """With allow_zero=False any spelling of zero is refused."""
    assert parse_duration(value) == 0.0
    with pytest.raises(ConfigError, match="is zero; use a duration greater than 0"):
        parse_duration(value, allow_zero=False)


def test_parse_duration_message_is_one_line_naming_key_value_and_allowed() -> None:
    """The error names the key, shows the value as JSON and says what is allowed."""
    with pytest.raises(ConfigError) as info:
        parse_duration("5 sec", key="health_check.interval")
    assert info.value.problems == [
        'health_check.interval: "5 sec" is not a duration; '
        'use a number of seconds or a string like "250ms", "5s", "1m"'
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "null"), (True, "true"), ([1], "a list"), ({}, "an object"), ("x" * 200, '"xxx')],
)
def test_parse_duration_message_shows_value_as_json(value: object, shown: str) -> None:
    """Values appear as they look in the JSON file, long strings shortened."""
    with pytest.raises(ConfigError) as info:
        parse_duration(value, key="k")
    message = str(info.value)
    assert message.startswith(f"k: {shown}")
    assert "\n" not in message
    assert len(message) < 200


@pytest.mark.parametrize("separator", ["\n", "\r", "\u2028", "\u2029", "\x85", "\x1c"])
def test_parse_duration_message_stays_one_line(separator: str) -> None:
    """A value holding any line separator is escaped, so the message is one line."""
    with pytest.raises(ConfigError) as info:
        parse_duration(f"five{separator}seconds", key="k")
    assert len(str(info.value).splitlines()) == 1


def test_parse_duration_default_key() -> None:
    """Without a key the message names "duration"."""
    with pytest.raises(ConfigError, match=r'^duration: "x" is not a duration'):
        parse_duration("x")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0, "0s"),
        (0.25, "250ms"),
        (0.0015, "1.5ms"),
        (0.001, "1ms"),
        (0.9999999, "1s"),
        (1, "1s"),
        (5.0, "5s"),
        (1.5, "1.5s"),
        (59.5, "59.5s"),
        (60, "1m"),
        (90, "1m30s"),
        (90.5, "1m30.5s"),
        (3600, "1h"),
        (3605, "1h5s"),
        (5400, "1h30m"),
        (86_400, "24h"),
        (-2, "-2s"),
        (float("inf"), "inf"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    """Durations are shown in the shortest unit-bearing form."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.25, 1.0, 1.5, 59.999, 60.0, 90.5, 3725.25])
def test_format_duration_round_trips(seconds: float) -> None:
    """What format_duration writes, parse_duration reads back to the same value."""
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
