"""softlb: an HTTP load balancer you can import.

The core — backends, the pool, the balancing strategies and the health checker — needs no web
server and imports neither urllib3 nor werkzeug nor gunicorn; the WSGI proxy
(:mod:`softlb.wsgi`), the admin API and the command line sit on top of it.
"""

from importlib.metadata import PackageNotFoundError, version

from softlb.backend import Backend
from softlb.balancers import (
    Balancer,
    ConsistentHash,
    LeastConnections,
    PeakEwma,
    PowerOfTwoChoices,
    Random,
    RoundRobin,
    WeightedRoundRobin,
    balancer_by_name,
)
from softlb.errors import (
    BackendExists,
    ConfigError,
    InvalidBackend,
    NoBackendAvailable,
    ProxyError,
    SoftLBError,
    UnknownBackend,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from softlb.health import HealthChecker, HealthState, ProbeResult
from softlb.pool import Lease, Pool, PoolEvent

try:
    __version__ = version("softlb")
except PackageNotFoundError:  # running from a source tree that was never installed
    from softlb._version import __version__

__all__ = [
    "Backend",
    "BackendExists",
    "Balancer",
    "ConfigError",
    "ConsistentHash",
    "HealthChecker",
    "HealthState",
    "InvalidBackend",
    "Lease",
    "LeastConnections",
    "NoBackendAvailable",
    "PeakEwma",
    "Pool",
    "PoolEvent",
    "PowerOfTwoChoices",
    "ProbeResult",
    "ProxyError",
    "Random",
    "RoundRobin",
    "SoftLBError",
    "UnknownBackend",
    "UpstreamBroken",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamTimeout",
    "WeightedRoundRobin",
    "__version__",
    "balancer_by_name",
]
