"""The exceptions softlb raises, and the HTTP status each one stands for.

::

    SoftLBError
    ├── ConfigError (ValueError)            a config value is wrong; .problems lists every one
    ├── InvalidBackend (ValueError)         a backend URL or weight is not acceptable
    ├── BackendExists (KeyError)            add() of a URL that is already a member
    ├── UnknownBackend (KeyError)           remove()/get() of a URL that is not a member
    └── ProxyError                          a request could not be proxied; .status is the answer
        ├── NoBackendAvailable      503     nothing is in rotation
        │   └── QueueTimeout        503     every backend stayed at its max_connections too long
        └── UpstreamError           502     the backend could not be used
            ├── UpstreamConnectError 502    nothing was sent (refused, unreachable, connect timeout)
            ├── UpstreamTimeout      504    the backend did not answer within the read timeout
            └── UpstreamBroken       502    the connection failed after the request was sent

Every error that concerns a backend carries its URL in ``.backend`` so that a log line or an
error page can say which one failed.
"""

from __future__ import annotations

__all__ = [
    "BackendExists",
    "ConfigError",
    "InvalidBackend",
    "NoBackendAvailable",
    "ProxyError",
    "QueueTimeout",
    "SoftLBError",
    "UnknownBackend",
    "UpstreamBroken",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamTimeout",
]


class SoftLBError(Exception):
    """Base class of every error softlb raises on purpose."""


class ConfigError(SoftLBError, ValueError):
    """A configuration is invalid.

    ``problems`` holds one readable line per problem, each naming the key path, what was wrong
    and what is allowed; ``str()`` joins them with newlines.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class InvalidBackend(SoftLBError, ValueError):
    """A backend URL or weight is not acceptable."""


class BackendExists(SoftLBError, KeyError):
    """The backend is already a member of the pool."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "backend already present"


class UnknownBackend(SoftLBError, KeyError):
    """The backend is not a member of the pool."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown backend"


class ProxyError(SoftLBError):
    """A request could not be served by a backend; ``status`` is the HTTP answer to give."""

    status: int = 502
    #: Short reason used in the body of the error response.
    reason: str = "Bad Gateway"

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


class NoBackendAvailable(ProxyError):
    """No backend is in rotation (all removed, drained or unhealthy)."""

    status = 503
    reason = "Service Unavailable"


class QueueTimeout(NoBackendAvailable):
    """Every backend in rotation was at its ``max_connections`` for the whole queue timeout.

    A request that finds every eligible backend full waits in the pool's queue, in order of
    arrival (HAProxy's ``timeout queue``); this is raised when its wait ran out first. It is a
    :class:`NoBackendAvailable`, so whatever answers that one with a 503 answers this too.
    """


class UpstreamError(ProxyError):
    """The chosen backend could not be used."""

    status = 502
    reason = "Bad Gateway"


class UpstreamConnectError(UpstreamError):
    """The connection to the backend could not be made; nothing was sent, so any retry is safe."""


class UpstreamTimeout(UpstreamError):
    """The backend accepted the request but did not answer within the read timeout."""

    status = 504
    reason = "Gateway Timeout"


class UpstreamBroken(UpstreamError):
    """The connection failed after the request was sent (reset, closed without an answer)."""
