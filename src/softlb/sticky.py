"""Sticky sessions by an inserted cookie (Traefik's ``sticky.cookie``, HAProxy's ``cookie
SRV insert``).

The first answer to a client sets a cookie holding an opaque id of the backend that served
it; later requests carrying the cookie go to that backend while it is in rotation (and below
its ``max_connections``), else they are balanced afresh and the cookie is set again. The id is
a keyed hash of the backend's URL, so it is the same in every worker and on every host of a
cluster (they share the key: the cluster's name) and does not reveal the backend's address.

How a proxy uses it, in any engine::

    sticky = StickySessions("lb", secret=cluster)
    wanted = sticky.find(pool, request_cookie_header)      # a Backend, or None
    with pool.lease(key, prefer=wanted) as backend:        # or try_lease / lease_async
        ...
        if backend is not wanted:                           # no valid cookie, or rebalanced
            response_headers.append(("Set-Cookie", sticky.set_cookie(backend)))
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Final

from softlb.backend import Backend
from softlb.pool import Pool

__all__ = ["ID_LENGTH", "StickySessions"]

#: Length of a backend id in hex digits (the first 64 bits of an HMAC-SHA256 of its URL).
ID_LENGTH: Final = 16

#: Cookie names RFC 6265 allows (an HTTP token).
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class StickySessions:
    """Cookie-based session affinity for one pool's backends.

    ``cookie_name`` is the cookie to set and read; ``secret`` keys the hash that makes a
    backend's id (give every process of a cluster the same one, e.g. the cluster's name).
    ``secure`` adds the ``Secure`` attribute (for a listener that speaks HTTPS).

    Thread-safe and lock-free; :meth:`find` costs a dictionary lookup once the ids of the
    pool's current rotation are known (they are recomputed when the rotation changes).
    """

    __slots__ = ("_attributes", "_ids", "_key", "_seen", "cookie_name")

    def __init__(self, cookie_name: str, *, secret: str = "softlb", secure: bool = False) -> None:
        if not isinstance(cookie_name, str) or not _TOKEN.fullmatch(cookie_name):
            raise ValueError(
                f"sticky cookie name must be a non-empty HTTP token "
                f"(letters, digits, !#$%&'*+-.^_`|~), got {cookie_name!r}"
            )
        self.cookie_name = cookie_name
        self._key = secret.encode()
        self._attributes = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
        # (rotation tuple, id -> backend): replaced as a whole, read without a lock.
        self._seen: tuple[tuple[Backend, ...], dict[str, Backend]] = ((), {})
        self._ids: dict[str, str] = {}  # url -> id, a cache (ids never change)

    def backend_id(self, backend: Backend | str) -> str:
        """The opaque, stable id of a backend (or of a backend URL): 16 hex digits, the same
        in every process that shares the secret."""
        url = backend.url if isinstance(backend, Backend) else backend
        found = self._ids.get(url)
        if found is None:
            digest = hmac.new(self._key, url.encode(), hashlib.sha256).hexdigest()
            found = digest[:ID_LENGTH]
            if len(self._ids) > 65_536:  # bound the cache (backends come and go)
                self._ids.clear()
            self._ids[url] = found
        return found

    def find(self, pool: Pool, cookie_header: str | None) -> Backend | None:
        """The backend the request's ``Cookie`` header names, if it is in rotation; else
        ``None`` (no header, no such cookie, an id of no backend in rotation)."""
        if not cookie_header:
            return None
        value = self.cookie_value(cookie_header)
        if value is None:
            return None
        eligible = pool.eligible
        seen, ids = self._seen
        if seen is not eligible:
            ids = {self.backend_id(b): b for b in eligible}
            self._seen = (eligible, ids)
        return ids.get(value)

    def cookie_value(self, cookie_header: str) -> str | None:
        """The value of this cookie in a ``Cookie`` header (the first one well formed as an
        id when the header repeats it), or ``None``."""
        name = self.cookie_name
        if name not in cookie_header:
            return None
        for part in cookie_header.split(";"):
            key, sep, value = part.partition("=")
            if sep and key.strip() == name:
                value = value.strip().strip('"')
                if len(value) == ID_LENGTH and _is_hex(value):
                    return value
        return None

    def set_cookie(self, backend: Backend) -> str:
        """The ``Set-Cookie`` header value that sends the client's next requests to
        ``backend``: a session cookie, ``Path=/; HttpOnly; SameSite=Lax``."""
        return f"{self.cookie_name}={self.backend_id(backend)}{self._attributes}"

    def __repr__(self) -> str:
        return f"<StickySessions cookie={self.cookie_name!r}>"


def _is_hex(text: str) -> bool:
    return all(ch in "0123456789abcdef" for ch in text)
