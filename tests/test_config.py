"""Tests for softlb.config: the JSON config file, its aliases, defaults and error messages."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import ssl
from pathlib import Path

import pytest

from softlb.config import (
    ALGORITHMS,
    MAX_RETRIES,
    AdminConfig,
    BackendTlsConfig,
    Config,
    HealthCheckConfig,
    LimitsConfig,
    ServerSpec,
    StickyConfig,
    TimeoutsConfig,
    TlsConfig,
    listens_clash,
    load_config,
    parse_config,
    parse_listen,
)
from softlb.errors import ConfigError

SEED = {
    "listenPort": ":8080",
    "healthCheckInterval": "5s",
    "servers": ["http://localhost:8081", "http://localhost:8082", "http://localhost:8083"],
    "algorithm": "least_connections",
}

# Every problem line starts with a key path (or a file name) followed by ": ".
PROBLEM_LINE = re.compile(r'^[A-Za-z0-9_."\[\]\- ]+: \S.*$')


def problems(data: object) -> list[str]:
    """The problems parse_config reports for ``data`` (it must fail)."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    for line in info.value.problems:
        assert "\n" not in line
        assert PROBLEM_LINE.match(line), line
    return info.value.problems


def only_problem(data: object) -> str:
    """The single problem parse_config reports for ``data``."""
    found = problems(data)
    assert len(found) == 1, found
    return found[0]


def write(tmp_path: Path, text: str | bytes, name: str = "config.json") -> Path:
    """Write a config file in tmp_path and return its path."""
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the seed and defaults


def test_seed_config_parses_as_is() -> None:
    """The seed project's config file is valid and means what it meant there."""
    config = parse_config(SEED)
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8080)
    assert config.health_check.interval == 5.0
    assert config.algorithm == "least_connections"
    assert config.servers == (
        ServerSpec("http://localhost:8081"),
        ServerSpec("http://localhost:8082"),
        ServerSpec("http://localhost:8083"),
    )


def test_seed_config_file_loads(tmp_path: Path) -> None:
    """The seed file loads from disk and remembers where it came from."""
    path = write(tmp_path, json.dumps(SEED, indent=4))
    config = load_config(path)
    assert config.source == str(path)
    assert config.listen == "0.0.0.0:8080"


def test_empty_object_gives_every_default() -> None:
    """An empty config takes the defaults SPEC §2 lists."""
    config = parse_config({})
    assert config == Config()
    assert config.listen == "127.0.0.1:8080"
    assert config.algorithm == "least_connections"
    assert config.servers == ()
    assert config.health_check == HealthCheckConfig()
    assert config.health_check.expected_status == ((200, 399),)
    assert config.hash_key == "client_ip"
    assert config.retries == 2
    assert config.slow_start == 0.0
    assert config.timeouts == TimeoutsConfig(connect=2.0, read=30.0)
    assert config.admin == AdminConfig(token=None, prefix="/_softlb", seed_routes=True)
    assert config.state is None
    assert config.cluster == "softlb"


def test_source_is_recorded() -> None:
    """parse_config keeps the source it was given."""
    assert parse_config({}, source="lb.json").source == "lb.json"


def test_algorithms_are_pinned() -> None:
    """The algorithm names are part of the public interface."""
    assert ALGORITHMS == (
        "least_connections",
        "round_robin",
        "weighted_round_robin",
        "random",
        "power_of_two_choices",
        "consistent_hash",
        "peak_ewma",
    )


@pytest.mark.parametrize(
    "obj", [Config(), ServerSpec("http://a"), HealthCheckConfig(), TimeoutsConfig(), AdminConfig()]
)
def test_dataclasses_are_frozen(obj: object) -> None:
    """Config objects cannot be changed after parsing."""
    field = dataclasses.fields(obj)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, None)


# --------------------------------------------------------------------------- listen


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("localhost:80", "localhost", 80),
        ("lb.example.com:443", "lb.example.com", 443),
        (":8080", "0.0.0.0", 8080),
        ("*:8080", "0.0.0.0", 8080),
        ("0.0.0.0:1", "0.0.0.0", 1),
        (8080, "0.0.0.0", 8080),
        ("8080", "0.0.0.0", 8080),
        (" 8080 ", "0.0.0.0", 8080),
        (65535, "0.0.0.0", 65535),
        ("[::1]:8080", "::1", 8080),
        ("[::]:8080", "::", 8080),
        ("[2001:DB8::1]:9000", "2001:db8::1", 9000),
    ],
)
def test_listen_accepts(value: object, host: str, port: int) -> None:
    """Listen addresses are read the way nginx reads them."""
    assert parse_listen(value) == (host, port)
    config = parse_config({"listen": value})
    assert (config.listen_host, config.listen_port) == (host, port)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0, "port 0 is out of range; use a port from 1 to 65535"),
        (":0", "port 0 is out of range"),
        (65536, "port 65536 is out of range"),
        ("localhost:70000", "port 70000 is out of range"),
        (-1, "port -1 is out of range"),
        ("localhost", "has no port"),
        ("localhost:", 'port "" is not a number'),
        ("localhost:http", 'port "http" is not a number'),
        ("99999999999", "is not a number from 1 to 65535"),
        ("::1:8080", "IPv6 address without brackets"),
        ("[::1]", "has no port"),
        ("[nothost]:80", "does not hold an IPv6 address"),
        ("[127.0.0.1]:80", "does not hold an IPv6 address"),
        ("bad host:80", "does not start with a valid host"),
        ("-bad:80", "does not start with a valid host"),
        ("999.1.1.1:80", "does not start with a valid host"),
        ("", "has no port"),
        (None, "null is not a listen address"),
        (True, "true is not a listen address"),
        (8080.0, "8080.0 is not a listen address"),
        (["127.0.0.1", 80], "a list is not a listen address"),
        ({"port": 80}, "an object is not a listen address"),
    ],
)
def test_listen_rejects(value: object, fragment: str) -> None:
    """A bad listen address gives one line naming the key and the allowed forms."""
    message = only_problem({"listen": value})
    assert message.startswith("listen: ")
    assert fragment in message


def test_parse_listen_names_its_key() -> None:
    """parse_listen puts the given key (e.g. a CLI flag) in the message."""
    with pytest.raises(ConfigError, match=r"^--bind: .*has no port"):
        parse_listen("localhost", key="--bind")


def test_parse_listen_port_zero_on_request() -> None:
    """Port 0 is refused unless the caller asks for it."""
    with pytest.raises(ConfigError):
        parse_listen("127.0.0.1:0")
    assert parse_listen("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("host", "port", "listen"),
    [("127.0.0.1", 80, "127.0.0.1:80"), ("::1", 8080, "[::1]:8080"), ("::", 1, "[::]:1")],
)
def test_listen_property(host: str, port: int, listen: str) -> None:
    """Config.listen joins host and port, bracketing IPv6 hosts."""
    assert Config(listen_host=host, listen_port=port).listen == listen


@pytest.mark.parametrize("alias", ["listenPort", "port"])
@pytest.mark.parametrize(("value", "expected"), [(":9000", "0.0.0.0:9000"), (9000, "0.0.0.0:9000")])
def test_listen_aliases(alias: str, value: object, expected: str) -> None:
    """listenPort and port mean the same as listen."""
    assert parse_config({alias: value}).listen == expected


def test_listen_alias_error_names_the_alias() -> None:
    """A bad value under an alias is reported under the name the user wrote."""
    assert only_problem({"listenPort": "nope"}).startswith('listenPort: "nope"')


@pytest.mark.parametrize(
    ("keys", "extra"),
    [
        (("listen", "listenPort"), ["listenPort"]),
        (("listen", "port"), ["port"]),
        (("listenPort", "port"), ["port"]),
        (("listen", "listenPort", "port"), ["listenPort", "port"]),
    ],
)
def test_listen_alias_and_canonical_conflict(keys: tuple[str, ...], extra: list[str]) -> None:
    """Giving the listen address under two names is an error, even with equal values."""
    found = problems(dict.fromkeys(keys, ":8080"))
    assert [line.split(":")[0] for line in found] == extra
    assert all("keep only one" in line and keys[0] in line for line in found)


# --------------------------------------------------------------------------- algorithm


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_accepts_every_name(name: str) -> None:
    """Every listed algorithm name is accepted."""
    assert parse_config({"algorithm": name}).algorithm == name


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("round-robin", '"round-robin" is not a known algorithm (did you mean "round_robin"?)'),
        ("LEAST_CONNECTIONS", '(did you mean "least_connections"?)'),
        ("roundrobin", '(did you mean "round_robin"?)'),
        ("fastest", '"fastest" is not a known algorithm; allowed: least_connections, '),
        (None, "must be a string, got null"),
        (1, "must be a string, got 1"),
        (["random"], "must be a string, got a list"),
    ],
)
def test_algorithm_rejects(value: object, fragment: str) -> None:
    """An unknown algorithm is refused with the list of allowed names."""
    message = only_problem({"algorithm": value})
    assert message.startswith("algorithm: ")
    assert fragment in message
    assert "peak_ewma" in message


# --------------------------------------------------------------------------- servers


def test_servers_strings_and_objects() -> None:
    """Servers may be URL strings or url/weight objects; weight defaults to 1."""
    config = parse_config(
        {
            "servers": [
                "http://10.0.0.1:8000",
                {"url": "http://10.0.0.2:8000", "weight": 3},
                {"url": "https://10.0.0.3"},
            ]
        }
    )
    assert config.servers == (
        ServerSpec("http://10.0.0.1:8000", 1),
        ServerSpec("http://10.0.0.2:8000", 3),
        ServerSpec("https://10.0.0.3", 1),
    )


def test_servers_urls_are_normalized() -> None:
    """Server URLs come back in normalize_url's canonical form."""
    config = parse_config({"servers": ["HTTP://Example.COM:8080/", " http://b/api/ "]})
    assert [s.url for s in config.servers] == ["http://example.com:8080", "http://b/api"]


def test_servers_empty_list() -> None:
    """An empty server list is valid (backends can be added through the admin API)."""
    assert parse_config({"servers": []}).servers == ()


@pytest.mark.parametrize(
    "servers",
    [
        ["http://a:80", "http://a:80"],
        ["http://a:80", "HTTP://A:80/"],
        ["http://a:80", {"url": "http://a:80/", "weight": 2}],
    ],
)
def test_servers_duplicate_url(servers: list[object]) -> None:
    """The same backend listed twice, after normalization, is an error naming both indexes."""
    message = only_problem({"servers": servers})
    assert message.startswith('servers[1]: "http://a:80" is listed twice (also servers[0])')


@pytest.mark.parametrize(
    ("weight", "shown"),
    [
        (0, "0"),
        (-1, "-1"),
        (10_001, "10001"),
        (1.5, "1.5"),
        (2.0, "2.0"),
        (True, "true"),
        ("2", '"2"'),
        (None, "null"),
        (10**30, str(10**30)),
        (10**200, "a very large number"),
    ],
)
def test_servers_bad_weight(weight: object, shown: str) -> None:
    """A weight that is not an integer from 1 to 10000 is reported with its index."""
    message = only_problem(
        {"servers": ["http://a", "http://b", {"url": "http://c", "weight": weight}]}
    )
    assert message == f"servers[2].weight: must be an integer from 1 to 10000, got {shown}"


@pytest.mark.parametrize(
    ("servers", "start", "fragment"),
    [
        (["ftp://a"], "servers[0]: ", "must start with http:// or https://"),
        (["http://"], "servers[0]: ", "has no host"),
        ([""], "servers[0]: ", "empty"),
        ([{"url": "a b"}], "servers[0].url: ", "whitespace"),
        ([{"url": None}], "servers[0].url: ", "must be a string"),
        ([{"weight": 2}], "servers[0].url: ", 'is missing; every server object needs a "url"'),
        ([5], "servers[0]: ", "must be a URL string or an object"),
        ([None], "servers[0]: ", "got null"),
        ([["http://a"]], "servers[0]: ", "got a list"),
        ("http://a", "servers: ", 'must be a list of URLs or {"url": ..., "weight": N} objects'),
        ({"url": "http://a"}, "servers: ", "got an object"),
        (None, "servers: ", "got null"),
    ],
)
def test_servers_rejects(servers: object, start: str, fragment: str) -> None:
    """Bad server entries are reported with their index and what is allowed."""
    message = only_problem({"servers": servers})
    assert message.startswith(start)
    assert fragment in message


def test_servers_object_unknown_key() -> None:
    """A typo inside a server object is reported with its full path."""
    message = only_problem({"servers": [{"url": "http://a", "wieght": 2}]})
    assert message == (
        'servers[0].wieght: unknown key (did you mean "weight"?); allowed: url, weight, '
        "max_connections, resolve"
    )


def test_servers_every_bad_entry_reported() -> None:
    """Each bad server is reported, not only the first."""
    found = problems({"servers": ["ftp://a", "http://ok", {"url": "http://b", "weight": 0}, 7]})
    assert [line.split(":")[0] for line in found] == [
        "servers[0]",
        "servers[2].weight",
        "servers[3]",
    ]


# --------------------------------------------------------------------------- health_check


def test_health_check_full() -> None:
    """Every health_check key is read and converted."""
    config = parse_config(
        {
            "health_check": {
                "path": "/healthz?full=1",
                "interval": "10s",
                "timeout": "500ms",
                "rise": 1,
                "fall": 5,
                "expected_status": "200-299",
                "initial_state": "down",
                "enabled": False,
            }
        }
    )
    assert config.health_check == HealthCheckConfig(
        path="/healthz?full=1",
        interval=10.0,
        timeout=0.5,
        rise=1,
        fall=5,
        expected_status=((200, 299),),
        initial_state="down",
        enabled=False,
    )


def test_health_check_partial_keeps_defaults() -> None:
    """Keys left out of health_check keep their defaults."""
    assert parse_config({"health_check": {"path": "/h"}}).health_check == HealthCheckConfig(
        path="/h"
    )


def test_health_check_interval_alias() -> None:
    """healthCheckInterval sets health_check.interval and merges with the other keys."""
    config = parse_config({"healthCheckInterval": 2, "health_check": {"path": "/h", "rise": 4}})
    assert config.health_check == HealthCheckConfig(path="/h", interval=2.0, rise=4)


def test_health_check_interval_alias_error_names_the_alias() -> None:
    """A bad healthCheckInterval is reported under that name."""
    message = only_problem({"healthCheckInterval": "5 sec"})
    assert message == (
        'healthCheckInterval: "5 sec" is not a duration; '
        'use a number of seconds or a string like "250ms", "5s", "1m"'
    )


def test_health_check_interval_alias_and_canonical_conflict() -> None:
    """healthCheckInterval together with health_check.interval is an error."""
    message = only_problem({"healthCheckInterval": "5s", "health_check": {"interval": "5s"}})
    assert message.startswith("healthCheckInterval: sets the same thing as health_check.interval")


def test_health_check_not_object_still_checks_alias() -> None:
    """A bad health_check does not hide a bad healthCheckInterval next to it."""
    found = problems({"health_check": "on", "healthCheckInterval": "often"})
    assert [line.split(":")[0] for line in found] == ["health_check", "healthCheckInterval"]


@pytest.mark.parametrize(
    ("value", "ranges"),
    [
        (200, ((200, 200),)),
        ("200", ((200, 200),)),
        ("200-399", ((200, 399),)),
        ("200 - 399", ((200, 399),)),
        ("200,204,300-399", ((200, 200), (204, 204), (300, 399))),
        ("2xx", ((200, 299),)),
        ("2XX, 3xx", ((200, 299), (300, 399))),
        ([200, "300-399"], ((200, 200), (300, 399))),
        (["300-399", 204], ((204, 204), (300, 399))),
        (["200,201"], ((200, 200), (201, 201))),
        ("100-599", ((100, 599),)),
    ],
)
def test_expected_status_forms(value: object, ranges: tuple[tuple[int, int], ...]) -> None:
    """expected_status accepts codes, ranges, classes, comma lists and JSON lists."""
    config = parse_config({"health_check": {"expected_status": value}})
    assert config.health_check.expected_status == ranges


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (700, "700 is not an HTTP status; use codes from 100 to 599"),
        (99, "99 is not an HTTP status"),
        ("200-600", "600 is not an HTTP status"),
        ("399-200", '"399-200" is an empty range; write the lower code first'),
        ("6xx", '"6xx" is not a status code or range'),
        ("ok", '"ok" is not a status code or range'),
        ("200,", '"200," is not a status code or range'),
        ("", '"" is not a status code or range'),
        ([], "is empty"),
        ([200, None], "null is not a status code or range"),
        ([[200]], "a list is not a status code or range"),
        (True, "true is not a status code or range"),
        (200.0, "200.0 is not a status code or range"),
        (None, "null is not a status code or range"),
    ],
)
def test_expected_status_rejects(value: object, fragment: str) -> None:
    """A bad expected_status says what is wrong and which forms are allowed."""
    message = only_problem({"health_check": {"expected_status": value}})
    assert message.startswith("health_check.expected_status: ")
    assert fragment in message


@pytest.mark.parametrize(
    ("status", "ok"),
    [(199, False), (200, True), (204, True), (300, False), (302, True), (500, False)],
)
def test_status_ok(status: int, ok: bool) -> None:
    """status_ok checks a status against every inclusive range."""
    check = HealthCheckConfig(expected_status=((200, 204), (301, 302)))
    assert check.status_ok(status) is ok


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("path", "health", '"health" does not start with "/"'),
        ("path", "/a b", "contains spaces"),
        ("path", "/a#b", "contains spaces, control characters or '#'"),
        ("path", "/a\r\nX: y", "contains spaces"),
        ("path", 5, "must be a string, got 5"),
        ("interval", 0, "0 is zero; use a duration greater than 0"),
        ("interval", "0s", '"0s" is zero'),
        ("interval", "-1s", "is negative"),
        ("interval", "fast", "is not a duration"),
        ("timeout", 0, "is zero"),
        ("timeout", None, "null is not a duration"),
        ("rise", 0, "must be an integer of 1 or more, got 0"),
        ("rise", 1.5, "must be an integer of 1 or more, got 1.5"),
        ("fall", True, "must be an integer of 1 or more, got true"),
        ("fall", "3", 'got "3"'),
        ("initial_state", "UP", '"UP" is not a known initial state (did you mean "up"?)'),
        ("initial_state", "healthy", "allowed: up, down"),
        ("initial_state", None, "must be a string, got null"),
        ("enabled", "yes", 'must be true or false, got "yes"'),
        ("enabled", 1, "must be true or false, got 1"),
    ],
)
def test_health_check_rejects(key: str, value: object, fragment: str) -> None:
    """Each bad health_check value is reported under its full key path."""
    message = only_problem({"health_check": {key: value}})
    assert message.startswith(f"health_check.{key}: ")
    assert fragment in message


@pytest.mark.parametrize("value", [None, False, True, "5s", 5, ["/health"]])
def test_health_check_must_be_object(value: object) -> None:
    """health_check must be an object, and the message shows how to turn checks off."""
    message = only_problem({"health_check": value})
    assert message.startswith("health_check: must be an object like ")
    assert '{"enabled": false}' in message


# --------------------------------------------------------------------------- hash_key


@pytest.mark.parametrize(
    "value", ["client_ip", "path", "header:X-User", "header:x_tenant.id", "cookie:session"]
)
def test_hash_key_accepts(value: str) -> None:
    """hash_key takes client_ip, path, header:NAME and cookie:NAME."""
    assert parse_config({"hash_key": value}).hash_key == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("header:", '"header:" does not name a header'),
        ("header: X-User", "no spaces"),
        ("header:X User", "does not name a header"),
        ("cookie:a=b", "does not name a cookie"),
        ("cookie:", "does not name a cookie"),
        ("client-ip", '"client-ip" is not a hash key (did you mean "client_ip"?)'),
        ("uri", 'use "client_ip", "path", "header:NAME" or "cookie:NAME"'),
        ("Header:X", "is not a hash key"),
        ("", "is not a hash key"),
        (None, "must be a string, got null"),
        (["path"], "got a list"),
    ],
)
def test_hash_key_rejects(value: object, fragment: str) -> None:
    """A bad hash_key is reported with the allowed forms."""
    message = only_problem({"hash_key": value})
    assert message.startswith("hash_key: ")
    assert fragment in message


# --------------------------------------------------------------------------- retries, slow_start


@pytest.mark.parametrize("value", [0, 1, 2, MAX_RETRIES])
def test_retries_accepts(value: int) -> None:
    """retries takes an integer from 0 to MAX_RETRIES."""
    assert parse_config({"retries": value}).retries == value


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (-1, "-1"),
        (MAX_RETRIES + 1, "11"),
        (True, "true"),
        (1.0, "1.0"),
        ("2", '"2"'),
        (None, "null"),
    ],
)
def test_retries_rejects(value: object, shown: str) -> None:
    """A bad retries value names the allowed range."""
    assert only_problem({"retries": value}) == (
        f"retries: must be an integer from 0 to {MAX_RETRIES}, got {shown}"
    )


@pytest.mark.parametrize(("value", "seconds"), [(0, 0.0), ("0s", 0.0), ("30s", 30.0), (1.5, 1.5)])
def test_slow_start_accepts(value: object, seconds: float) -> None:
    """slow_start is a duration; zero turns it off."""
    assert parse_config({"slow_start": value}).slow_start == seconds


@pytest.mark.parametrize("value", [-1, "-1s", "soon", None, True])
def test_slow_start_rejects(value: object) -> None:
    """A bad slow_start is reported as a bad duration."""
    assert only_problem({"slow_start": value}).startswith("slow_start: ")


# --------------------------------------------------------------------------- timeouts


def test_timeouts_accepts() -> None:
    """timeouts.connect and timeouts.read are durations."""
    config = parse_config({"timeouts": {"connect": "500ms", "read": "1m"}})
    assert config.timeouts == TimeoutsConfig(connect=0.5, read=60.0)


def test_timeouts_partial_keeps_defaults() -> None:
    """A timeout left out keeps its default."""
    assert parse_config({"timeouts": {"read": 5}}).timeouts == TimeoutsConfig(connect=2.0, read=5.0)


@pytest.mark.parametrize(
    ("value", "start"),
    [
        ({"connect": 0}, "timeouts.connect: 0 is zero"),
        ({"read": "0ms"}, 'timeouts.read: "0ms" is zero'),
        ({"read": "forever"}, 'timeouts.read: "forever" is not a duration'),
        ({"connect": -2}, "timeouts.connect: -2 is negative"),
        ("30s", 'timeouts: must be an object like {"connect": "2s", "read": "30s"}, got "30s"'),
        (None, "timeouts: must be an object"),
    ],
)
def test_timeouts_rejects(value: object, start: str) -> None:
    """Bad timeouts are reported under their full key path."""
    assert only_problem({"timeouts": value}).startswith(start)


# --------------------------------------------------------------------------- admin


def test_admin_accepts() -> None:
    """admin.token, admin.prefix and admin.seed_routes are read."""
    config = parse_config(
        {"admin": {"token": "s3cr3t-T0ken", "prefix": "/lb-admin", "seed_routes": False}}
    )
    assert config.admin == AdminConfig(token="s3cr3t-T0ken", prefix="/lb-admin", seed_routes=False)


@pytest.mark.parametrize(
    ("prefix", "normalized"),
    [("/admin/", "/admin"), ("/admin//", "/admin"), ("/a/b", "/a/b"), ("/_softlb", "/_softlb")],
)
def test_admin_prefix_trailing_slash_dropped(prefix: str, normalized: str) -> None:
    """A trailing slash on the admin prefix is dropped."""
    assert parse_config({"admin": {"prefix": prefix}}).admin.prefix == normalized


def test_admin_token_null_means_no_auth() -> None:
    """A null token is the same as no token."""
    assert parse_config({"admin": {"token": None}}).admin.token is None


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("token", "", "is empty"),
        ("token", 12345, "must be a string or null, got a number"),
        ("token", "has space", "contains spaces"),
        ("token", "caf\u00e9", "non-ASCII"),
        ("prefix", "/", '"/" would hide every proxied path'),
        ("prefix", "//", "would hide every proxied path"),
        ("prefix", "admin", 'does not start with "/"'),
        ("prefix", "/a b", "is not a plain path"),
        ("prefix", "/a//b", "is not a plain path"),
        ("prefix", "/a/../b", "is not a plain path"),
        ("prefix", "/a?x", "is not a plain path"),
        ("prefix", None, "must be a string, got null"),
        ("seed_routes", "false", 'must be true or false, got "false"'),
        ("seed_routes", 0, "must be true or false, got 0"),
    ],
)
def test_admin_rejects(key: str, value: object, fragment: str) -> None:
    """Bad admin values are reported under their full key path."""
    message = only_problem({"admin": {key: value}})
    assert message.startswith(f"admin.{key}: ")
    assert fragment in message


@pytest.mark.parametrize("token", ["my secret", "secret\n", "s\u00e9cret"])
def test_admin_token_never_echoed(token: str) -> None:
    """A rejected token does not appear in the message: it is a secret."""
    assert "secret" not in only_problem({"admin": {"token": token}}).replace("a secret", "")


def test_admin_must_be_object() -> None:
    """admin must be an object."""
    assert only_problem({"admin": "token"}).startswith("admin: must be an object like ")


# --------------------------------------------------------------------------- state, cluster


@pytest.mark.parametrize(
    "value",
    [
        "memory",
        "sqlite:///softlb.db",
        "sqlite:///run/state/softlb.db",
        "sqlite:////var/lib/softlb/state.db",
        "redis://localhost:6379/0",
        "redis://localhost",
        "redis://localhost:6379",
        "redis://:pw@redis.internal:6380/2",
        "rediss://user:pw@redis.example.com:6379/15",
        "redis://[::1]:6379/0",
    ],
)
def test_state_accepts(value: str) -> None:
    """state takes memory, sqlite URLs with a path and redis URLs with a host."""
    assert parse_config({"state": value}).state == value


def test_state_null_means_not_set() -> None:
    """A null state is the same as leaving it out."""
    assert parse_config({"state": None}).state is None


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("sqlite://", "has no file path"),
        ("sqlite:///", "has no file path"),
        ("sqlite:relative.db", "has no file path"),
        ("sqlite:////var/lib/", "has no file path"),
        ("redis://", "has no host"),
        ("redis:///0", "has no host"),
        ("redis://localhost:99999/0", "has an invalid port"),
        ("redis://localhost:0/0", "has an invalid port"),
        ("redis://localhost:port/0", "has an invalid port"),
        ("redis://localhost:6379/db1", "has a database that is not a number"),
        ("postgres://db/x", '"postgres://db/x" is not a supported store'),
        ("Memory", '(did you mean "memory"?)'),
        ("", "is not a supported store"),
        (5, "must be a string, got 5"),
        (True, "must be a string, got true"),
        ({"url": "redis://x"}, "got an object"),
    ],
)
def test_state_rejects(value: object, fragment: str) -> None:
    """A bad state says which store URLs are allowed."""
    message = only_problem({"state": value})
    assert message.startswith("state: ")
    assert fragment in message


@pytest.mark.parametrize(
    "value", ["redis://:hunter2@h:99999/0", "redis://u:hunter2@h/zero", "mysql://u:hunter2@h/db"]
)
def test_state_password_never_echoed(value: str) -> None:
    """A password inside a rejected state URL is masked in the message."""
    message = only_problem({"state": value})
    assert "hunter2" not in message
    assert "***" in message


@pytest.mark.parametrize("value", ["softlb", "prod-eu.1", "a:b_c", "x" * 100])
def test_cluster_accepts(value: str) -> None:
    """cluster takes a short name of letters, digits and _.:-."""
    assert parse_config({"cluster": value}).cluster == value


@pytest.mark.parametrize("value", ["", "a b", "a/b", "x" * 101, "caf\u00e9", None, 5])
def test_cluster_rejects(value: object) -> None:
    """A bad cluster name is reported with what is allowed."""
    message = only_problem({"cluster": value})
    assert message.startswith("cluster: ")
    assert 'letters, digits and "_.:-"' in message


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("data", "start"),
    [
        ({"listne": ":80"}, 'listne: unknown key (did you mean "listen"?); allowed: listen, '),
        ({"healthCheck": {}}, 'healthCheck: unknown key (did you mean "health_check"?)'),
        ({"listen_port": 80}, 'listen_port: unknown key (did you mean "listenPort"?)'),
        ({"backends": []}, 'backends: unknown key (did you mean "servers"?); allowed: listen, '),
        (
            {"health_check": {"intervall": 5}},
            'health_check.intervall: unknown key (did you mean "interval"?); allowed: path, '
            "interval, timeout, rise, fall, expected_status, initial_state, enabled",
        ),
        (
            {"health_check": {"expectedStatus": 200}},
            'health_check.expectedStatus: unknown key (did you mean "expected_status"?)',
        ),
        (
            {"timeouts": {"connection": 1}},
            'timeouts.connection: unknown key (did you mean "connect"?); allowed: connect, read',
        ),
        (
            {"admin": {"tokn": "x"}},
            'admin.tokn: unknown key (did you mean "token"?); allowed: token, prefix, seed_routes',
        ),
        (
            {"servers": ["http://a", {"url": "http://b", "wt": 1}]},
            "servers[1].wt: unknown key; allowed: url, weight",
        ),
        ({"a b": 1}, '"a b": unknown key; allowed: '),
        ({"": 1}, '"": unknown key; allowed: '),
    ],
)
def test_unknown_keys_rejected_with_path(data: object, start: str) -> None:
    """An unknown key at any level is an error naming its full path and the allowed keys."""
    assert only_problem(data).startswith(start)


def test_unknown_top_level_key_lists_aliases() -> None:
    """The top-level unknown-key message also lists the accepted aliases."""
    assert "aliases listenPort, port, healthCheckInterval" in only_problem({"x": 1})


def test_unknown_key_does_not_stop_checking_siblings() -> None:
    """Known keys next to an unknown one are still checked."""
    found = problems({"health_check": {"intervall": 5, "rise": 0}})
    assert [line.split(":")[0] for line in found] == ["health_check.intervall", "health_check.rise"]


def test_non_string_key_from_python_data() -> None:
    """A non-string key (possible from Python, not JSON) is an unknown key, not a crash."""
    assert only_problem({1: 2}).startswith('"1": unknown key')


# --------------------------------------------------------------------------- all problems at once


def test_every_problem_is_collected() -> None:
    """parse_config reports every problem in one ConfigError, one line each."""
    found = problems(
        {
            "listen": "nowhere",
            "listenPort": 80,
            "algorithm": "fastest",
            "servers": ["ftp://a", {"url": "http://b", "weight": 0}],
            "health_check": {"interval": "0s", "rise": 0, "bogus": 1},
            "healthCheckInterval": "1s",
            "hash_key": "header:",
            "retries": -1,
            "slow_start": "later",
            "timeouts": {"read": 0},
            "admin": {"prefix": "/", "token": ""},
            "state": "postgres://x",
            "cluster": "a b",
            "extra": True,
        }
    )
    paths = sorted(line.split(": ")[0] for line in found)
    assert paths == sorted(
        [
            "extra",
            "listenPort",
            "listen",
            "algorithm",
            "servers[0]",
            "servers[1].weight",
            "health_check.bogus",
            "healthCheckInterval",
            "health_check.interval",
            "health_check.rise",
            "hash_key",
            "retries",
            "slow_start",
            "timeouts.read",
            "admin.prefix",
            "admin.token",
            "state",
            "cluster",
        ]
    )


def test_config_error_str_joins_problems() -> None:
    """str() of the error is the problems joined by newlines, ready to print."""
    with pytest.raises(ConfigError) as info:
        parse_config({"retries": -1, "cluster": ""})
    assert str(info.value) == "\n".join(info.value.problems)
    assert len(info.value.problems) == 2


WEIRD_VALUES: list[object] = [
    None,
    True,
    0,
    -1,
    10**30,
    1e308,
    math.nan,
    math.inf,
    "",
    "x" * 10_000,
    "\x00",
    [],
    [[[[]]]],
    {},
    {"x": {"y": []}},
]
WEIRD_KEYS: list[tuple[str, ...]] = [
    ("listen",),
    ("listenPort",),
    ("port",),
    ("algorithm",),
    ("servers",),
    ("servers", "0"),
    ("servers", "0", "url"),
    ("servers", "0", "weight"),
    ("health_check",),
    ("healthCheckInterval",),
    *[("health_check", key) for key in HealthCheckConfig.__dataclass_fields__],
    ("hash_key",),
    ("retries",),
    ("slow_start",),
    ("timeouts",),
    ("timeouts", "connect"),
    ("timeouts", "read"),
    ("admin",),
    ("admin", "token"),
    ("admin", "prefix"),
    ("admin", "seed_routes"),
    ("state",),
    ("cluster",),
]


def _nest(keys: tuple[str, ...], value: object) -> dict[str, object]:
    """Build a config with ``value`` at the key path ``keys`` ("0" means a one-item list)."""
    if keys[-1] == "0":
        inner: object = [value]
    elif len(keys) == 3:
        inner = {"url": "http://a", keys[-1]: value}
    else:
        inner = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        if key != "0":
            inner = {key: inner}
    return inner  # type: ignore[return-value]


@pytest.mark.parametrize("keys", WEIRD_KEYS, ids=".".join)
def test_weird_values_never_crash(keys: tuple[str, ...]) -> None:
    """Whatever JSON value sits at any key, the result is a Config or a ConfigError."""
    for value in WEIRD_VALUES:
        data = _nest(keys, value)
        try:
            parse_config(data)
        except ConfigError as exc:
            assert exc.problems
            for line in exc.problems:
                assert "\n" not in line
                assert len(line) < 600, line


# --------------------------------------------------------------------------- load_config


def test_load_config_missing_file(tmp_path: Path) -> None:
    """A missing file is one line naming it."""
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: config file not found"]


def test_load_config_directory(tmp_path: Path) -> None:
    """A directory instead of a file is one readable line."""
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_load_config_unreadable(tmp_path: Path) -> None:
    """An unreadable file is one line saying permission was denied."""
    path = write(tmp_path, "{}")
    path.chmod(0)
    try:
        with pytest.raises(ConfigError, match="cannot read config file: permission denied"):
            load_config(path)
    finally:
        path.chmod(0o600)


def test_load_config_bad_json_names_line_and_column(tmp_path: Path) -> None:
    """Invalid JSON is one line with the file, line, column and parser message."""
    path = write(tmp_path, '{\n  "listen": ":8080",\n  "servers": []\n  "retries": 2\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}: not valid JSON: line 4 column 3: Expecting ',' delimiter"
    ]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "file is empty"),
        ("  \n", "file is empty"),
        ("{'listen': 80}", "not valid JSON: line 1 column 2"),
        ('{"retries": 2,}', "not valid JSON: line 1 column 15"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ('{"retries": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
)
def test_load_config_rejects_bad_text(tmp_path: Path, text: str, fragment: str) -> None:
    """Empty, malformed, absurdly nested or absurdly long JSON is one readable line."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: {fragment}")


def test_load_config_invalid_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are reported with their line."""
    path = write(tmp_path, b'{\n"cluster": "caf\xe9"}')
    with pytest.raises(ConfigError, match=r"not valid UTF-8 at line 2; save it as UTF-8"):
        load_config(path)


def test_load_config_accepts_utf8_bom(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark, as some Windows editors write, is tolerated."""
    path = write(tmp_path, b'\xef\xbb\xbf{"retries": 1}')
    assert load_config(path).retries == 1


@pytest.mark.parametrize(
    ("text", "kind"), [("[]", "a list"), ('"x"', "a string"), ("3", "a number"), ("null", "null")]
)
def test_load_config_top_level_not_object(tmp_path: Path, text: str, kind: str) -> None:
    """A top level that is not an object is one line naming the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f'{path}: the top level must be a JSON object like {{"servers": [...]}}, got {kind}'
    ]


def test_load_config_accepts_str_path(tmp_path: Path) -> None:
    """load_config takes a str as well as a Path."""
    path = write(tmp_path, '{"algorithm": "random"}')
    assert load_config(str(path)).algorithm == "random"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"retries": 1, "retries": 2}', "retries"),
        ('{"health_check": {"rise": 1, "rise": 2}}', "health_check.rise"),
        ('{"servers": [{"url": "http://a", "url": "http://b"}]}', "servers[0].url"),
        ('{"admin": {"token": "a", "prefix": "/x", "token": "b"}}', "admin.token"),
    ],
)
def test_load_config_duplicate_keys(tmp_path: Path, text: str, path: str) -> None:
    """A key repeated in one JSON object is an error naming its path."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [f"{path}: is given more than once; write each key once"]


def test_load_config_duplicate_keys_reported_once() -> None:
    """A key repeated three times is reported once, with every other problem."""
    from softlb.config import _object_pairs

    data = json.loads(
        '{"retries": 1, "retries": 2, "retries": 3, "x": 0}', object_pairs_hook=_object_pairs
    )
    assert problems(data) == [
        "retries: is given more than once; write each key once",
        "x: unknown key; allowed: listen, algorithm, servers, health_check, hash_key, retries, "
        "slow_start, timeouts, admin, state, cluster, access_log, access_log_format, tls, "
        "backend_tls, limits, sticky (and the aliases listenPort, port, healthCheckInterval)",
    ]


def test_load_config_reports_every_problem(tmp_path: Path) -> None:
    """Problems in a file come back all together, each one line."""
    path = write(tmp_path, json.dumps({"retries": 99, "algorithm": "x", "admin": {"prefix": "/"}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 3


def test_more_servers_than_a_pool_holds_is_an_error() -> None:
    """A servers list longer than a pool's 1,024 slots is refused at check time, not at start."""
    servers = [f"http://10.0.{i // 250}.{i % 250 + 1}:80" for i in range(1025)]
    with pytest.raises(ConfigError) as caught:
        parse_config({"servers": servers})
    assert caught.value.problems == ["servers: lists 1025 backends; a pool holds at most 1024"]


def test_redis_state_without_the_client_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A redis:// state on a machine without redis-py names the extra to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a)
    )
    with pytest.raises(ConfigError) as caught:
        parse_config({"state": "redis://127.0.0.1:6379/0"})
    assert 'pip install "softlb[redis]"' in caught.value.problems[0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("logs/access.csv", "logs/access.csv"), (None, None)],
)
def test_access_log_is_a_file_path_or_null(value: object, expected: object) -> None:
    """access_log names the CSV file the proxy appends to; null turns it off."""
    assert parse_config({"access_log": value}).access_log == expected


@pytest.mark.parametrize("value", ["", 3, True, "logs/", ["a.csv"]])
def test_bad_access_log_is_an_error(value: object) -> None:
    """Anything but a file path or null is one problem naming access_log."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"access_log": value})
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("access_log: ")


# --------------------------------------------------------------------------- SPEC §2, new keys


def test_new_keys_have_spec_defaults() -> None:
    """tls off, limits 10000 / 65536, the client-side timeouts, sticky off, csv log lines."""
    config = parse_config({})
    assert config.tls is None
    assert config.limits == LimitsConfig(max_connections=10_000, max_header_bytes=65_536)
    assert config.sticky is None
    assert config.access_log_format == "csv"
    timeouts = config.timeouts
    assert (timeouts.client_header, timeouts.keepalive, timeouts.tunnel) == (10.0, 5.0, 3600.0)
    assert (timeouts.client_body, timeouts.queue) == (30.0, 5.0)
    assert config.admin.allow == ()
    assert config.admin.listen is None


def test_new_keys_are_read(tmp_path: Path) -> None:
    import trustme

    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    issued = trustme.CA().issue_cert("localhost")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    config = parse_config(
        {
            "listen": "127.0.0.1:8080",
            "servers": [
                {"url": "http://web.internal:8000", "resolve": True, "max_connections": 5},
                "http://10.0.0.2:8000",
            ],
            "tls": {"certfile": str(cert), "keyfile": str(key)},
            "limits": {"max_connections": 200, "max_header_bytes": 8192},
            "timeouts": {"client_header": "2s", "keepalive": "1s", "tunnel": "10m", "queue": 0},
            "sticky": {"cookie": "SERVERID"},
            "access_log": "-",
            "access_log_format": "json",
            "admin": {"allow": ["10.0.0.0/8", "192.168.1.5", "::1"], "listen": "127.0.0.1:9901"},
        }
    )
    assert config.servers[0].resolve is True
    assert config.servers[0].max_connections == 5
    assert config.servers[1].max_connections is None
    assert config.tls == TlsConfig(certfile=str(cert), keyfile=str(key))
    assert config.limits == LimitsConfig(max_connections=200, max_header_bytes=8192)
    assert config.timeouts.tunnel == 600.0
    assert config.timeouts.queue == 0.0
    assert config.sticky == StickyConfig(cookie="SERVERID")
    assert (config.access_log, config.access_log_format) == ("-", "json")
    assert config.admin.allow == ("10.0.0.0/8", "192.168.1.5/32", "::1/128")
    assert config.admin.listen == "127.0.0.1:9901"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"tls": {"certfile": "/no/such.pem", "keyfile": "/no/key.pem"}}, "tls.certfile: "),
        ({"tls": {"certfile": "/no/such.pem"}}, "tls.keyfile: is missing"),
        ({"tls": "yes"}, "tls: must be an object"),
        ({"limits": {"max_connections": 0}}, "limits.max_connections: "),
        ({"limits": {"max_header_bytes": 100}}, "limits.max_header_bytes: "),
        (
            {"limits": {"max_conections": 5}},
            'limits.max_conections: unknown key (did you mean "max_connections"?)',
        ),
        ({"timeouts": {"client_header": 0}}, "timeouts.client_header: "),
        ({"timeouts": {"keepalive": "5 s"}}, "timeouts.keepalive: "),
        ({"sticky": {}}, "sticky.cookie: is missing"),
        ({"sticky": {"cookie": "a b"}}, "sticky.cookie: must be a cookie name"),
        ({"access_log_format": "apache"}, "access_log_format: "),
        ({"admin": {"allow": "10.0.0.0/8"}}, "admin.allow: must be a list"),
        ({"admin": {"allow": ["10.0.0.0/8", "nope"]}}, "admin.allow[1]: "),
        (
            {"admin": {"listen": "127.0.0.1:8080"}},
            "admin.listen: is the proxy's own listen address",
        ),
        (
            {"admin": {"listen": ":8080"}},  # every interface, the proxy's among them
            "admin.listen: 0.0.0.0:8080 takes the port of the proxy's listen address",
        ),
        (
            {"admin": {"listen": "localhost:8080"}},
            "admin.listen: localhost:8080 takes the port of the proxy's listen address",
        ),
        (
            {"listen": ":9000", "admin": {"listen": "127.0.0.1:9000"}},
            "admin.listen: 127.0.0.1:9000 takes the port of the proxy's listen address",
        ),
        ({"admin": {"listen": "nowhere"}}, "admin.listen: "),
        ({"servers": [{"url": "http://10.0.0.1:80", "resolve": True}]}, "servers[0].resolve: "),
        ({"servers": [{"url": "http://a:80", "resolve": "yes"}]}, "servers[0].resolve: "),
        (
            {"servers": [{"url": "http://a:80", "max_connections": 0}]},
            "servers[0].max_connections: ",
        ),
    ],
)
def test_new_keys_refuse_bad_values(data: dict[str, object], expected: str) -> None:
    found = problems(data)
    assert any(line.startswith(expected) for line in found), found


def test_backend_tls_ca_file_is_read(tmp_path: Path) -> None:
    """``backend_tls.ca_file``: a PEM bundle of CAs, loaded once to check it; off by default
    (the system's CAs)."""
    import trustme

    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    assert parse_config({}).backend_tls == BackendTlsConfig(ca_file=None)
    assert parse_config({"backend_tls": {}}).backend_tls == BackendTlsConfig(ca_file=None)
    config = parse_config({"backend_tls": {"ca_file": str(ca_file)}})
    assert config.backend_tls == BackendTlsConfig(ca_file=str(ca_file))
    context = config.backend_tls.ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"backend_tls": "ca.pem"}, "backend_tls: must be an object"),
        ({"backend_tls": {"ca_file": "/no/such/ca.pem"}}, "backend_tls.ca_file: "),
        ({"backend_tls": {"ca_file": 5}}, "backend_tls.ca_file: must be a file path"),
        (
            {"backend_tls": {"cafile": "x"}},
            'backend_tls.cafile: unknown key (did you mean "ca_file"?)',
        ),
    ],
)
def test_backend_tls_refuses_bad_values(data: dict[str, object], expected: str) -> None:
    found = problems(data)
    assert any(line.startswith(expected) for line in found), found


def test_backend_tls_ca_file_must_hold_a_certificate(tmp_path: Path) -> None:
    """A readable file with no PEM certificate in it: one line, before anything starts."""
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    [line] = problems({"backend_tls": {"ca_file": str(bogus)}})
    assert line.startswith("backend_tls.ca_file: ") and "no CA certificate in PEM" in line, line


def test_tls_files_must_be_a_usable_pair(tmp_path: Path) -> None:
    """Readable files that are not a certificate and its key: one line, as ``nginx -t``."""
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    [line] = problems({"tls": {"certfile": str(cert), "keyfile": str(key)}})
    assert line.startswith("tls: ") and "not a certificate chain" in line


@pytest.mark.parametrize(
    ("first", "second", "clash"),
    [
        ("127.0.0.1:80", "127.0.0.1:80", True),
        ("127.0.0.1:80", "127.0.0.1:81", False),
        ("127.0.0.1:80", "127.0.0.2:80", False),
        (":80", "10.1.2.3:80", True),
        ("80", "localhost:80", True),
        ("LOCALHOST:80", "127.0.0.1:80", True),
        ("[::]:80", "127.0.0.1:80", True),  # a dual-stack wildcard takes IPv4 too
        ("0.0.0.0:80", "[::1]:80", False),
        ("[::1]:80", "[::1]:80", True),
        ("example.test:80", "127.0.0.1:80", False),  # not looked up here (serve binds both)
        ("nonsense", "127.0.0.1:80", False),
    ],
)
def test_listens_clash(first: str, second: str, clash: bool) -> None:
    """Two listen addresses clash when they take one port on one interface."""
    assert listens_clash(first, second) is clash
    assert listens_clash(second, first) is clash
