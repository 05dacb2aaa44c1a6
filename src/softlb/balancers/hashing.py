"""Consistent hashing: the same key goes to the same backend while membership allows."""

from __future__ import annotations

import bisect
import hashlib
import random
import re
import zlib
from collections.abc import Collection
from typing import Final

from softlb.backend import Backend
from softlb.balancers.base import ONLY_ONE, Balancer, Candidate, candidate, register
from softlb.durations import _show

__all__ = ["HASH_KEYS", "ConsistentHash", "parse_hash_key"]

#: Ring points per unit of weight. libketama (and nginx's ``hash ... consistent``) place 160
#: points per server of weight 1; more points even out the shares at the cost of ring size.
POINTS_PER_WEIGHT: Final = 160

#: Upper bound on the ring size. Beyond it the points of every backend are scaled down
#: together (Envoy's ring hash does the same with ``maximum_ring_size``); 2**18 points keep a
#: rebuild for 10,000 backends near 0.2 s and a lookup at one bisect.
MAX_RING_POINTS: Final = 1 << 18

#: The request attributes a key can be taken from (the config's ``hash_key``).
HASH_KEYS: Final = ("client_ip", "path", "header:NAME", "cookie:NAME")
#: RFC 9110 §5.6.2 token: what a header name (and an RFC 6265 cookie name) may be made of.
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_hash_key(spec: str) -> tuple[str, str | None]:
    """Split a ``hash_key`` setting into ``(kind, name)``: ``"header:X-User"`` gives
    ``("header", "X-User")``; ``"client_ip"`` gives ``("client_ip", None)``.

    The one grammar of ``hash_key`` (the config file calls this too): NAME is an RFC 9110
    token written right after the colon. Raises :class:`ValueError` naming the allowed forms.
    """
    if spec in ("client_ip", "path"):
        return spec, None
    kind, sep, name = spec.partition(":")
    if sep and kind in ("header", "cookie"):
        if _TOKEN.fullmatch(name):
            return kind, name
        raise ValueError(
            f"{_show(spec)} does not name a {kind}; "
            f'write the name right after the colon, like "{kind}:X-User" (no spaces)'
        )
    raise ValueError(f"hash key {spec!r} is not one of {', '.join(HASH_KEYS)}")


def _hash32s(text: str) -> tuple[int, int, int, int]:
    """Four 32-bit ring positions from one MD5 digest, as libketama does."""
    d = hashlib.md5(text.encode(), usedforsecurity=False).digest()
    return (
        int.from_bytes(d[0:4], "little"),
        int.from_bytes(d[4:8], "little"),
        int.from_bytes(d[8:12], "little"),
        int.from_bytes(d[12:16], "little"),
    )


def key_position(key: str) -> int:
    """The ring position of a request key, the same in every process and on every host.

    CRC-32 (ten times cheaper than MD5 on short keys) followed by MurmurHash3's 32-bit
    finaliser, which spreads keys that differ in one character (``user1``, ``user2``) over the
    whole ring; CRC-32 alone is linear and would keep them close.
    """
    h = zlib.crc32(key.encode())
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@register
class ConsistentHash(Balancer):
    """Ring hash with virtual nodes (Karger et al. 1997; libketama's point layout).

    Every backend owns ``160 × weight`` points on a 32-bit ring (scaled down together past
    :data:`MAX_RING_POINTS`); a request key is hashed onto the ring and served by the owner of
    the next point clockwise. Removing one of N backends — or taking it out of rotation —
    moves only the keys it owned, about 1/N of them; the others keep their backend. Hashes are
    MD5-based, so every worker and every host maps a key the same way.

    A request without a key (``pick(None)``) goes to a random backend, as Envoy does.
    """

    name = "consistent_hash"
    uses_key = True
    rule = (
        "the request key is hashed onto a ring; the backend owning the next point clockwise "
        "serves it (no key: a random backend)"
    )

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._eligible: tuple[Backend, ...] = ()
        self._points: list[int] = []
        self._owners: list[Backend] = []
        # (url, points) -> that backend's sorted positions, reused across rebuilds.
        self._cache: dict[tuple[str, int], tuple[int, ...]] = {}

    def _positions(self, url: str, count: int) -> tuple[int, ...]:
        cached = self._cache.get((url, count))
        if cached is None:
            out: list[int] = []
            for i in range((count + 3) // 4):
                out.extend(_hash32s(f"{url}-{i}"))
            cached = self._cache[(url, count)] = tuple(out[:count])
        return cached

    def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
        self._eligible = eligible
        if not eligible:
            self._points, self._owners = [], []
            return
        # Weights, not effective weights: slow start does not apply to hashing, and a ramp
        # would move keys around on every step.
        total = sum(b.weight for b in eligible) * POINTS_PER_WEIGHT
        scale = min(1.0, MAX_RING_POINTS / total)
        shift = max(len(eligible) - 1, 1).bit_length()
        mask = (1 << shift) - 1
        packed: list[int] = []
        wanted: set[tuple[str, int]] = set()
        for index, backend in enumerate(eligible):
            count = max(1, round(backend.weight * POINTS_PER_WEIGHT * scale))
            wanted.add((backend.url, count))
            packed.extend((p << shift) | index for p in self._positions(backend.url, count))
        packed.sort()
        self._points = [p >> shift for p in packed]
        self._owners = [eligible[p & mask] for p in packed]
        if len(self._cache) > 2 * len(wanted) + 16:
            self._cache = {k: v for k, v in self._cache.items() if k in wanted}

    def pick(self, key: str | None, now: float) -> Backend | None:
        eligible = self._eligible
        if not eligible:
            return None
        if len(eligible) == 1:
            return eligible[0]
        if key is None:
            return eligible[int(self._rng.random() * len(eligible))]
        i = bisect.bisect_left(self._points, key_position(key))
        return self._owners[i if i < len(self._owners) else 0]

    def pick_excluding(
        self, key: str | None, now: float, exclude: Collection[Backend]
    ) -> Backend | None:
        """For a retry: the next owner clockwise that is not excluded, so the key fails over
        to the backend that would own it if the failed one left (not to the first in list)."""
        owners = self._owners
        if key is None or not owners:
            return None
        start = bisect.bisect_left(self._points, key_position(key))
        n = len(owners)
        for step in range(n):
            owner = owners[(start + step) % n]
            if owner not in exclude:
                return owner
        return None

    def explain(self, key: str | None, now: float, limit: int | None = None) -> list[Candidate]:
        """Score: how far clockwise from the key's ring position the backend's first point is.
        The owner of the key (the nearest) is ``chosen``; the others follow in the order the
        key would move to them if those before them left rotation. Without a key, every
        backend has the same chance and the next random draw is ``chosen``."""
        eligible = self._eligible
        n = len(eligible)
        if n == 0:
            return []
        if n == 1:
            return [candidate(eligible[0], 0, ONLY_ONE, True)]
        count = n if limit is None else min(n, limit)
        if key is None:
            rng = self._rng
            state = rng.getstate()
            try:
                drawn = int(rng.random() * n)
            finally:
                rng.setstate(state)
            order = [drawn, *(k for k in range(n) if k != drawn)]
            return [
                candidate(
                    eligible[k],
                    1.0 / n,
                    f"no request key: drawn with probability {1 / n:.1%}"
                    + ("; the next draw" if k == drawn else ""),
                    k == drawn,
                )
                for k in order[:count]
            ]
        position = key_position(key)
        points, owners = self._points, self._owners
        size = len(points)
        start = bisect.bisect_left(points, position)
        out: list[Candidate] = []
        seen: set[Backend] = set()
        for step in range(size):  # walk clockwise until every backend (or `limit`) is found
            index = (start + step) % size
            owner = owners[index]
            if owner in seen:
                continue
            seen.add(owner)
            distance = (points[index] - position) % (1 << 32)
            if not out:
                why = (
                    f"owns the key: its point is the first clockwise from the key's ring "
                    f"position {position:#010x}, {distance:,} further on"
                )
            else:
                before = (
                    "the backend before it leaves"
                    if len(out) == 1
                    else f"the {len(out)} backends before it leave"
                )
                why = (
                    f"its first point is {distance:,} clockwise from the key's position: the "
                    f"key moves here if {before} rotation"
                )
            out.append(candidate(owner, distance, why, not out))
            if len(out) >= count:
                break
        return out
