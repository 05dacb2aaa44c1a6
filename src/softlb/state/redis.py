"""The Redis store: membership, health verdicts, the prober lease and load snapshots shared
by every process on every host of a cluster.

Needs redis-py (``pip install "softlb[redis]"``), imported only when a store is built, and
works with the Redis 7.0 that Debian ships (no 7.2+ or 7.4-only commands, no functions).

Key layout, everything under the prefix ``{cluster}:`` so that two clusters share one Redis
(the ``cluster`` config key, ``"softlb"`` by default)::

    {cluster}:members        hash    url -> {"weight": W, "slot": S, "seq": N,
                                     "draining": B}; seq orders members as they were
                                     added (a hash has no order); no draining = false
    {cluster}:version        string  the membership version; no key = no membership
    {cluster}:last_slot      string  the slot handed out last (slots go round the table)
    {cluster}:health:{url}   string  {"healthy": B, "reason": R}, expires by PX
    {cluster}:health_urls    set     urls that may have a verdict key: the index health()
                                     reads in one step; pruned as their keys expire
    {cluster}:prober         string  the prober lease holder's token, expires by PX
    {cluster}:load:{node}    string  {url: in_flight} of one node, expires by PX
    {cluster}:nodes          set     nodes that may have a load key; pruned likewise
    {cluster}:changes        channel the new version, published after each membership change

Per-verdict expiry uses one string key with ``PX`` each, not a hash: Redis 7.0 has no
per-field expiry (``HEXPIRE`` is 7.4), and a key Redis expires itself needs no clock shared
between hosts. The two index sets let a reader fetch every live verdict or snapshot in one
script instead of a ``SCAN`` over the whole keyspace.

Every change that must be atomic is one Lua script, so nothing is left half-written if a
client dies: add, remove and seed check, write the member, move ``last_slot`` and ``INCR``
the version together; ``membership()`` reads the version and the members in one step. The
``changes`` channel is only a hint for whoever listens: a subscriber misses what is published
while it reconnects, so every process polls :meth:`RedisStore.version`.

Scripts name keys they build from the prefix, which a single Redis (or a primary with
replicas) allows; Redis Cluster, which wants every key declared, is not supported. Use
``maxmemory-policy noeviction`` (the default) on a Redis that holds membership: the keys have
no TTL, but an ``allkeys-*`` policy could still evict them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

from softlb.errors import BackendExists, ConfigError, InvalidBackend, UnknownBackend
from softlb.forking import after_fork_in_child
from softlb.state.base import (
    MAX_SLOTS,
    HealthVerdict,
    Member,
    Membership,
    SeedEntry,
    StateStore,
    StoreUnavailable,
    seed_entries,
)

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["RedisStore"]

#: Seconds a call may wait for Redis to accept a connection or to answer. Short, so that a dead
#: or stopped Redis costs a caller at most this long (once per call: nothing is retried).
#: Every call is a single small command or script that Redis answers in well under 1 ms.
DEFAULT_TIMEOUT: Final = 0.5

#: Seconds a pooled connection may sit idle before redis-py PINGs it before reuse, so a
#: connection a firewall or NAT dropped silently is replaced instead of failing a call.
HEALTH_CHECK_INTERVAL: Final = 30

#: Size of a SCAN page and of a DEL batch in :meth:`RedisStore.clear`.
_CLEAR_BATCH: Final = 500

#: Key names after the prefix that are not per url or per node (see the module docstring).
_FIXED_KEYS: Final = frozenset(
    {"members", "version", "last_slot", "health_urls", "prober", "nodes"}
)

_TOO_MANY = f"a shared pool holds at most {MAX_SLOTS} backends"

#: Characters that have a meaning in a SCAN MATCH pattern.
_GLOB = re.compile(r"([*?\[\]\\])")

#: Characters Redis accepts in a client name (CLIENT SETNAME refuses spaces and newlines).
_CLIENT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


# -- Lua -------------------------------------------------------------------------------------
#
# The membership scripts share KEYS and the first ARGV:
#   KEYS[1] version, KEYS[2] members, KEYS[3] last_slot, KEYS[4] health_urls
#   ARGV[1] changes channel, ARGV[2] MAX_SLOTS, ARGV[3] health key prefix, ARGV[4..] own
# and answer {status, version, url1, member1, url2, member2, ...} or {status} on refusal.

_MEMBERSHIP_PRELUDE = """
local function reply(version)
  local out = {'ok', tostring(version)}
  for _, item in ipairs(redis.call('HGETALL', KEYS[2])) do out[#out + 1] = item end
  return out
end
local function bump()
  local version = redis.call('INCR', KEYS[1])
  redis.call('PUBLISH', ARGV[1], version)
  return version
end
"""

#: membership(): the version and the members as of one instant.
_READ_LUA = (
    _MEMBERSHIP_PRELUDE
    + """
local version = redis.call('GET', KEYS[1])
if not version then return {'none'} end
return reply(version)
"""
)

#: seed(): unless a membership exists, write ARGV[5..] as (url, weight, draining "0"/"1")
#: triples at version ARGV[4] + 1. Slots go round the table from last_slot like
#: softlb.state.base.next_free_slot; the caller removed duplicate urls and checked there are
#: at most MAX_SLOTS of them.
_SEED_LUA = (
    _MEMBERSHIP_PRELUDE
    + """
local version = redis.call('GET', KEYS[1])
if version then return reply(version) end
redis.call('DEL', KEYS[2])
local max = tonumber(ARGV[2])
local last = tonumber(redis.call('GET', KEYS[3]) or '-1')
local used = {}
local seq = 0
for i = 5, #ARGV, 3 do
  last = (last + 1) % max
  while used[last] do last = (last + 1) % max end
  used[last] = true
  seq = seq + 1
  local member = {weight = tonumber(ARGV[i + 1]), slot = last, seq = seq}
  if ARGV[i + 2] == '1' then member.draining = true end
  redis.call('HSET', KEYS[2], ARGV[i], cjson.encode(member))
end
redis.call('SET', KEYS[3], last)
redis.call('SET', KEYS[1], ARGV[4])
return reply(bump())
"""
)

#: add(): refuse a present url ('exists') or a full table ('full'); otherwise take the first
#: free slot after last_slot (next_free_slot's rule), write the member, bump the version.
#: Members left without a version key (a partial loss) are not a membership: start afresh.
_ADD_LUA = (
    _MEMBERSHIP_PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
local url = ARGV[4]
if redis.call('HEXISTS', KEYS[2], url) == 1 then return {'exists'} end
local max = tonumber(ARGV[2])
local used, count, seq = {}, 0, 0
for _, raw in ipairs(redis.call('HVALS', KEYS[2])) do
  local member = cjson.decode(raw)
  used[member.slot] = true
  count = count + 1
  if member.seq > seq then seq = member.seq end
end
if count >= max then return {'full'} end
local slot = (tonumber(redis.call('GET', KEYS[3]) or '-1') + 1) % max
while used[slot] do slot = (slot + 1) % max end
redis.call('HSET', KEYS[2], url,
  cjson.encode({weight = tonumber(ARGV[5]), slot = slot, seq = seq + 1}))
redis.call('SET', KEYS[3], slot)
return reply(bump())
"""
)

#: remove(): refuse an absent url ('unknown'); otherwise drop it and its verdict, bump.
_REMOVE_LUA = (
    _MEMBERSHIP_PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
local url = ARGV[4]
if redis.call('HDEL', KEYS[2], url) == 0 then return {'unknown'} end
redis.call('DEL', ARGV[3] .. url)
redis.call('SREM', KEYS[4], url)
return reply(bump())
"""
)

#: update(): refuse an absent url ('unknown'); otherwise set its weight (ARGV[5], unless
#: empty) and draining flag (ARGV[6]: '1', '0' or empty), keep its slot and seq, bump.
_UPDATE_LUA = (
    _MEMBERSHIP_PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local url = ARGV[4]
local raw = redis.call('HGET', KEYS[2], url)
if not raw then return {'unknown'} end
local member = cjson.decode(raw)
if ARGV[5] ~= '' then member.weight = tonumber(ARGV[5]) end
if ARGV[6] == '1' then member.draining = true elseif ARGV[6] == '0' then member.draining = nil end
redis.call('HSET', KEYS[2], url, cjson.encode(member))
return reply(bump())
"""
)

#: set_health() and publish_load(): KEYS[1] the value's key, KEYS[2] its index set;
#: ARGV value, ttl in ms, name in the index.
_PUT_EXPIRING_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

#: health() and remote_load(): KEYS[1] an index set, ARGV[1] the prefix of its value keys.
#: Answers {name1, value1, ...} for every value that has not expired and drops the others
#: from the index.
_READ_INDEXED_LUA = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local value = redis.call('GET', ARGV[1] .. name)
  if value then
    out[#out + 1] = name
    out[#out + 1] = value
  else
    redis.call('SREM', KEYS[1], name)
  end
end
return out
"""

#: claim_prober(): take the lease if free (SET NX PX); renew it only if ARGV[1] holds it.
_CLAIM_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: release_prober(): delete the lease only if ARGV[1] holds it, never someone else's.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class _Script:
    """A Lua script run by EVALSHA, falling back to EVAL (which caches it) when Redis does
    not know it yet, as after a restart or SCRIPT FLUSH."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


_READ = _Script(_READ_LUA)
_SEED = _Script(_SEED_LUA)
_ADD = _Script(_ADD_LUA)
_REMOVE = _Script(_REMOVE_LUA)
_UPDATE = _Script(_UPDATE_LUA)
_PUT_EXPIRING = _Script(_PUT_EXPIRING_LUA)
_READ_INDEXED = _Script(_READ_INDEXED_LUA)
_CLAIM = _Script(_CLAIM_LUA)
_RELEASE = _Script(_RELEASE_LUA)


# -- the optional dependency -----------------------------------------------------------------


def _import_redis() -> ModuleType:
    """redis-py, or a ConfigError that says how to install it."""
    try:
        import redis
    except ImportError as exc:
        raise ConfigError(
            'state: a "redis://" store needs the Redis client; install it with '
            'pip install "softlb[redis]"'
        ) from exc
    return redis


def _redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _check_url(url: str) -> None:
    """Raise ValueError unless ``url`` is ``redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB]``."""
    shown = _redact(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"{shown!r} is not a Redis URL; use redis://HOST:PORT/DB or rediss://")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{shown!r} has an invalid port; use a port from 1 to 65535")
    if not parts.hostname:
        raise ValueError(f"{shown!r} has no host; use redis://HOST:PORT/DB")
    database = parts.path.strip("/")
    if database and not (database.isascii() and database.isdigit()):
        raise ValueError(f"{shown!r} has a database that is not a number; use redis://HOST:PORT/0")


def _text(value: Any) -> str:
    """A reply item as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Stores alive in this process. A forked child gets fresh locks and no client: the parent's
# connections belong to the parent (gunicorn forks workers from a master that holds stores).
_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._forget_parent()


after_fork_in_child(_after_fork_in_child)


class RedisStore(StateStore):
    """State shared through one Redis by every process of every host of a cluster.

    ``RedisStore("redis://HOST:PORT/DB", cluster="softlb")`` (or :meth:`from_url`) connects
    with short timeouts and no retries; ``RedisStore(factory)`` calls ``factory()`` for a
    ready ``redis.Redis`` client instead (its timeouts are then the factory's business).
    Nothing connects until the first call, and each process (after ``fork()``) opens its own
    client. Every Redis error becomes :class:`StoreUnavailable`.

    ``_lock`` protects ``_client_obj`` and ``_pid``; the redis-py client is thread-safe.
    """

    kind = "redis"
    multi_host = True

    def __init__(
        self,
        client: str | Callable[[], Redis],
        *,
        cluster: str = "softlb",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not cluster:
            raise ValueError("cluster must be a non-empty name")
        self._lib = _import_redis()
        if isinstance(client, str):
            _check_url(client)
            self._url: str | None = client
            self._factory: Callable[[], Redis] | None = None
            self._where = _redact(client)
        else:
            self._url = None
            self._factory = client
            self._where = getattr(client, "__qualname__", None) or repr(client)
        self.cluster = cluster
        self.timeout = timeout
        prefix = f"{cluster}:"
        self._prefix = prefix
        self._keys_membership = (
            prefix + "version",
            prefix + "members",
            prefix + "last_slot",
            prefix + "health_urls",
        )
        self._key_version = prefix + "version"
        self._health_prefix = prefix + "health:"
        self._key_health_urls = prefix + "health_urls"
        self._key_prober = prefix + "prober"
        self._load_prefix = prefix + "load:"
        self._key_nodes = prefix + "nodes"
        #: Pub/sub channel that gets the new version after every membership change (a hint).
        self.channel = prefix + "changes"
        self._lock = threading.Lock()
        self._client_obj: Redis | None = None
        self._pid = os.getpid()
        #: Last version this object read or wrote, for ``repr`` (which never calls Redis).
        self._seen_version: int | None = None
        _STORES.add(self)

    @classmethod
    def from_url(
        cls, url: str, *, cluster: str = "softlb", timeout: float = DEFAULT_TIMEOUT
    ) -> RedisStore:
        """A store for ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://`` for TLS);
        port 6379 and DB 0 by default. Raises ValueError for any other form."""
        return cls(url, cluster=cluster, timeout=timeout)

    # -- the client, one per process -------------------------------------------------------

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's client and lock. Dropping is safe: redis-py
        never shuts down a socket another process opened, it only closes its own copy."""
        self._lock = threading.Lock()
        self._client_obj = None
        self._pid = os.getpid()

    def _client(self) -> Redis:
        if self._pid != os.getpid():  # forked without the hook (or it has not run yet)
            self._forget_parent()
        client = self._client_obj
        if client is not None:
            return client
        with self._lock:
            if self._client_obj is None:
                self._client_obj = self._open()
            return self._client_obj

    def _open(self) -> Redis:
        if self._factory is not None:
            return self._factory()
        assert self._url is not None
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client: Redis = self._lib.Redis.from_url(
            self._url,
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            health_check_interval=HEALTH_CHECK_INTERVAL,
            retry=Retry(NoBackoff(), 0),
            # CLIENT LIST then shows which worker holds a connection. A user whose ACL
            # forbids CLIENT SETNAME adds "?client_name=" to the URL (query values win).
            client_name=_CLIENT_NAME_UNSAFE.sub("_", f"softlb:{self.cluster}:{os.getpid()}"),
        )
        return client

    @contextmanager
    def _unavailable(self, doing: str) -> Iterator[None]:
        """Turn any Redis error, or a reply that cannot be read, into StoreUnavailable."""
        try:
            yield
        except (self._lib.RedisError, OSError) as exc:
            raise StoreUnavailable(
                f"redis store {self._where} (cluster {self.cluster}): {doing} failed: "
                f"{_one_line(exc)}"
            ) from exc
        except (ValueError, TypeError, LookupError, AttributeError) as exc:
            if isinstance(exc, (BackendExists, UnknownBackend, InvalidBackend)):
                raise
            raise StoreUnavailable(
                f"redis store {self._where} (cluster {self.cluster}): {doing}: "
                f"unreadable data: {_one_line(exc)}"
            ) from exc

    def _run(self, script: _Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        client = self._client()
        try:
            return client.evalsha(script.sha, len(keys), *keys, *args)
        except self._lib.exceptions.NoScriptError:
            return client.eval(script.source, len(keys), *keys, *args)

    # -- membership --------------------------------------------------------------------------

    def _membership_script(self, script: _Script, args: Sequence[str | int], doing: str) -> Any:
        with self._unavailable(doing):
            reply = self._run(
                script,
                self._keys_membership,
                (self.channel, MAX_SLOTS, self._health_prefix, *args),
            )
            status = _text(reply[0])
            if status != "ok":
                return status
            return self._decode_membership(reply)

    def _decode_membership(self, reply: Sequence[Any]) -> Membership:
        version = int(_text(reply[1]))
        urls = [_text(item) for item in reply[2::2]]
        # One json.loads for every member: about twice as fast as one call each.
        data = json.loads("[" + ",".join(_text(item) for item in reply[3::2]) + "]")
        members = sorted(
            zip(urls, data, strict=True), key=lambda pair: (int(pair[1]["seq"]), pair[0])
        )
        self._seen_version = version
        return Membership(
            version,
            tuple(
                Member(url, int(d["weight"]), int(d["slot"]), d.get("draining") is True)
                for url, d in members
            ),
        )

    def membership(self) -> Membership | None:
        result = self._membership_script(_READ, (), "reading membership")
        if isinstance(result, Membership):
            return result
        self._seen_version = None
        return None

    def version(self) -> int | None:
        with self._unavailable("reading the version"):
            raw = self._client().get(self._key_version)
            version = None if raw is None else int(_text(raw))
        self._seen_version = version
        return version

    def seed(self, members: Iterable[SeedEntry], *, after: int = 0) -> Membership:
        unique = seed_entries(members)
        if len(unique) > MAX_SLOTS:
            raise InvalidBackend(_TOO_MANY)
        args: list[str | int] = [int(after)]
        for url, weight, draining in unique:
            args += [url, weight, "1" if draining else "0"]
        result = self._membership_script(_SEED, args, "seeding membership")
        assert isinstance(result, Membership)
        return result

    def add(self, url: str, weight: int) -> Membership:
        result = self._membership_script(_ADD, (url, int(weight)), f"adding {url}")
        if result == "exists":
            raise BackendExists(f"backend {url} is already in the pool")
        if result == "full":
            raise InvalidBackend(_TOO_MANY)
        assert isinstance(result, Membership)
        return result

    def remove(self, url: str) -> Membership:
        result = self._membership_script(_REMOVE, (url,), f"removing {url}")
        if result == "unknown":
            raise UnknownBackend(f"no backend {url} in the pool")
        assert isinstance(result, Membership)
        return result

    def update(
        self, url: str, *, weight: int | None = None, draining: bool | None = None
    ) -> Membership:
        args = (
            url,
            "" if weight is None else int(weight),
            "" if draining is None else ("1" if draining else "0"),
        )
        result = self._membership_script(_UPDATE, args, f"updating {url}")
        if result == "unknown":
            raise UnknownBackend(f"no backend {url} in the pool")
        assert isinstance(result, Membership)
        return result

    # -- values that expire, with an index ----------------------------------------------------

    def _put_expiring(
        self, prefix: str, index: str, name: str, value: str, *, ttl: float, doing: str
    ) -> None:
        ttl_ms = int(ttl * 1000)
        with self._unavailable(doing):
            if ttl_ms <= 0:  # expired as soon as written; PX 0 is an error in Redis
                self._client().delete(prefix + name)
            else:
                self._run(_PUT_EXPIRING, (prefix + name, index), (value, ttl_ms, name))

    def _read_indexed(self, index: str, prefix: str) -> list[tuple[str, Any]]:
        """Every live ``(name, decoded JSON value)`` of an index; call inside _unavailable."""
        reply = self._run(_READ_INDEXED, (index,), (prefix,))
        return [(_text(reply[i]), json.loads(_text(reply[i + 1]))) for i in range(0, len(reply), 2)]

    # -- health -------------------------------------------------------------------------------

    def health(self) -> Mapping[str, HealthVerdict]:
        verdicts: dict[str, HealthVerdict] = {}
        with self._unavailable("reading health"):
            for url, data in self._read_indexed(self._key_health_urls, self._health_prefix):
                verdicts[url] = HealthVerdict(bool(data["healthy"]), str(data.get("reason", "")))
        return verdicts

    def set_health(self, url: str, verdict: HealthVerdict, ttl: float) -> None:
        value = json.dumps({"healthy": verdict.healthy, "reason": verdict.reason})
        self._put_expiring(
            self._health_prefix,
            self._key_health_urls,
            url,
            value,
            ttl=ttl,
            doing=f"writing health of {url}",
        )

    # -- the prober lease ---------------------------------------------------------------------

    def claim_prober(self, owner: str, ttl: float) -> bool:
        ttl_ms = max(1, int(ttl * 1000))
        with self._unavailable("claiming the prober lease"):
            return int(self._run(_CLAIM, (self._key_prober,), (owner, ttl_ms))) == 1

    def release_prober(self, owner: str) -> None:
        with self._unavailable("releasing the prober lease"):
            self._run(_RELEASE, (self._key_prober,), (owner,))

    # -- load between hosts -------------------------------------------------------------------

    def publish_load(self, node: str, loads: Mapping[str, int], ttl: float) -> None:
        value = json.dumps({url: int(count) for url, count in loads.items()})
        self._put_expiring(
            self._load_prefix,
            self._key_nodes,
            node,
            value,
            ttl=ttl,
            doing=f"publishing load of {node}",
        )

    def remote_load(self, node: str) -> dict[str, int]:
        total: dict[str, int] = {}
        with self._unavailable("reading remote load"):
            for other, loads in self._read_indexed(self._key_nodes, self._load_prefix):
                if other == node:
                    continue
                for url, count in loads.items():
                    total[url] = total.get(url, 0) + int(count)
        return total

    # -- life cycle ---------------------------------------------------------------------------

    def clear(self) -> None:
        """Delete this cluster's keys (SCAN + DEL); other clusters' keys stay.

        Only names of this module's layout are deleted, so clearing cluster ``a`` leaves
        cluster ``a:b`` alone although both match the pattern ``a:*``.
        """
        pattern = _GLOB.sub(r"\\\1", self._prefix) + "*"
        with self._unavailable("clearing"):
            client = self._client()
            batch: list[str] = []
            for item in client.scan_iter(match=pattern, count=_CLEAR_BATCH):
                key = _text(item)
                if not self._owns(key):
                    continue
                batch.append(key)
                if len(batch) >= _CLEAR_BATCH:
                    client.delete(*batch)
                    batch.clear()
            if batch:
                client.delete(*batch)
        self._seen_version = None

    def _owns(self, key: str) -> bool:
        """Whether ``key`` (which starts with the prefix) is one of this cluster's keys."""
        rest = key[len(self._prefix) :]
        return rest in _FIXED_KEYS or rest.startswith(("health:", "load:"))

    def close(self) -> None:
        """Close this process's connections; a later call opens new ones."""
        with self._lock:
            client, self._client_obj = self._client_obj, None
        if client is not None and self._pid == os.getpid():
            client.close()

    def __repr__(self) -> str:
        connected = "connected" if self._client_obj is not None else "not connected"
        seen = self._seen_version
        version = "no membership seen" if seen is None else f"v{seen} last seen"
        return f"<RedisStore [{self._where}, cluster {self.cluster!r}, {connected}, {version}]>"
