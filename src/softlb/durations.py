"""Durations in config files: ``"250ms"``, ``"5s"``, ``"1m"`` or a number of seconds.

:func:`parse_duration` turns what a user wrote into seconds (a float) and rejects anything else
with one line that names the key, shows the bad value and says what is allowed, so that
``softlb check`` can print it as is. :func:`format_duration` goes the other way, for status
pages and log lines; its output parses back to the same value.

The units are those of nginx and Go's ``time.ParseDuration`` that make sense for a load
balancer: ``ms``, ``s``, ``m`` and ``h``, lower-case (nginx reads ``M`` as months), and they may
be combined as in ``"1m30s"``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Final

from softlb.errors import ConfigError

__all__ = ["MAX_DURATION", "format_duration", "parse_duration"]

#: Longest duration accepted, in seconds (one day). No interval, timeout or ramp of a load
#: balancer needs more, a larger value is almost always a unit typo, and it keeps every value
#: far below ``threading.TIMEOUT_MAX`` so that no ``Event.wait()`` can overflow.
MAX_DURATION: Final = 86_400.0

#: Seconds per unit. ``ms`` is listed before ``m`` in the pattern below so that it wins.
_UNITS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

# A decimal number: "5", "1.5", ".5", "5." (ASCII digits only; ``\d`` would take any script's).
_NUMBER: Final = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_BARE: Final = re.compile(rf"(-?)\s*({_NUMBER})")
_COMPOUND: Final = re.compile(rf"(-?)((?:{_NUMBER}(?:ms|h|m|s))+)")
_PART: Final = re.compile(rf"({_NUMBER})(ms|h|m|s)")

_ALLOWED: Final = 'use a number of seconds or a string like "250ms", "5s", "1m"'


def _show(value: object) -> str:
    """Render a value for an error message the way it would look in the JSON file."""
    if value is None or isinstance(value, (bool, str, float)):
        text = json.dumps(value, ensure_ascii=False)
        # Keep the message on one line even for the separators str.splitlines() breaks on.
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        text = text.replace("\x85", "\\u0085")  # json.dumps escapes the C0 ones itself
        return text if len(text) <= 60 else text[:56] + '..."'
    if isinstance(value, int):
        # str() of an int with thousands of digits raises ValueError on Python 3.11+.
        return str(value) if value.bit_length() <= 128 else "a very large number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def parse_duration(
    value: object,
    *,
    key: str = "duration",
    allow_zero: bool = True,
    maximum: float = MAX_DURATION,
) -> float:
    """Return ``value`` as a number of seconds, or raise :class:`ConfigError` with one line.

    Accepted: an int or float (seconds; not a bool, not negative, finite), or a string of
    numbers with units such as ``"250ms"``, ``"1.5s"``, ``"1m30s"``; whitespace around and
    between the parts is ignored. A number in a string (``"5"``) is refused as a unit
    forgotten (SPEC §2 writes seconds as JSON numbers). ``key`` is the config key
    path named in the message. With ``allow_zero=False`` the value must be greater than zero
    (intervals and timeouts); ``maximum`` is the largest value accepted, one day by default.
    """
    shown = _show(value)
    seconds: float
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: {shown} is not a duration; {_ALLOWED}")
    if isinstance(value, str):
        text = value.strip()
        if _BARE.fullmatch(text):
            # A number in a string is most likely a unit forgotten: "5" could be meant as
            # minutes. Numbers of seconds are written as JSON numbers (SPEC §2).
            raise ConfigError(
                f"{key}: {shown} has no unit; write a number of seconds without quotes, or a "
                'string with a unit like "250ms", "5s", "1m"'
            )
        if compound := _COMPOUND.fullmatch(text):
            sign, parts = compound.groups()
            seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(parts))
        else:
            raise ConfigError(f"{key}: {shown} is not a duration; {_ALLOWED}")
        if sign and seconds:
            raise ConfigError(f"{key}: {shown} is negative; {_ALLOWED}")
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: {shown} is not a finite number; {_ALLOWED}")
        if value < 0:
            raise ConfigError(f"{key}: {shown} is negative; {_ALLOWED}")
        if value > maximum:  # compared before float() so that a huge int cannot overflow
            raise ConfigError(f"{key}: {shown} is too long; use at most {format_duration(maximum)}")
        seconds = float(value)
    if not math.isfinite(seconds) or seconds > maximum:  # "9999h", or 400 digits -> inf
        raise ConfigError(f"{key}: {shown} is too long; use at most {format_duration(maximum)}")
    if seconds == 0 and not allow_zero:
        raise ConfigError(
            f'{key}: {shown} is zero; use a duration greater than 0, like "250ms", "5s", "1m"'
        )
    return seconds


def _trim(number: float) -> str:
    """Format with at most three decimals and no trailing zeros: 1.5 -> "1.5", 250.0 -> "250"."""
    return f"{number:.3f}".rstrip("0").rstrip(".")


def format_duration(seconds: float) -> str:
    """Return a short human form of ``seconds``: ``"250ms"``, ``"5s"``, ``"1.5s"``, ``"1m30s"``.

    Precision is one microsecond; the result parses back with :func:`parse_duration` (as long
    as it is within the accepted range). Zero is ``"0s"``; infinities and NaN come back as
    ``str(seconds)``, since there is no duration to show.
    """
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    micros = round(seconds * 1_000_000)
    if micros == 0:
        return "0s"
    if micros < 1_000_000:
        return f"{_trim(micros / 1000)}ms"
    if micros < 60_000_000:
        return f"{_trim(micros / 1_000_000)}s"
    hours, rest = divmod(micros, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{_trim(rest / 1_000_000)}s" if rest else "")
