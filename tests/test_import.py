"""Tests of what ``import softlb`` gives: the public names, and a core free of web dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import softlb
import softlb.balancers

#: The public names of ``softlb``; a change here is a change to the documented interface.
PUBLIC = {
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
}

#: Third-party packages the core must not need.
BLOCKED = ("werkzeug", "gunicorn", "redis", "urllib3")

_BLOCKER = """
import importlib.abc
import sys

BLOCKED = {blocked!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked by test_import")
        return None


for name in list(sys.modules):
    if name.partition(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, Blocker())
"""


def _run_blocked(body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a fresh interpreter where importing any BLOCKED package fails."""
    code = _BLOCKER.format(blocked=BLOCKED) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_all_is_pinned() -> None:
    """softlb.__all__ is exactly the documented set of public names."""
    assert set(softlb.__all__) == PUBLIC
    assert len(softlb.__all__) == len(PUBLIC), "no name listed twice"


def test_every_public_name_exists() -> None:
    """Every name in __all__ is an attribute of the package."""
    for name in softlb.__all__:
        assert hasattr(softlb, name), name


def test_version_is_a_string() -> None:
    """__version__ is a non-empty string."""
    assert isinstance(softlb.__version__, str)
    assert softlb.__version__


def test_balancers_all_is_pinned() -> None:
    """softlb.balancers exports the seven strategies, the base, the registry and its helpers."""
    assert set(softlb.balancers.__all__) == {
        "BALANCERS",
        "Balancer",
        "ConsistentHash",
        "LeastConnections",
        "PeakEwma",
        "PowerOfTwoChoices",
        "Random",
        "RoundRobin",
        "WeightedRoundRobin",
        "balancer_by_name",
        "parse_hash_key",
        "register",
    }


def test_blocker_really_blocks() -> None:
    """The blocker used below makes importing a blocked package fail."""
    result = _run_blocked("import urllib3\n")
    assert result.returncode != 0
    assert "urllib3 is blocked by test_import" in result.stderr


def test_core_imports_and_works_without_web_dependencies() -> None:
    """With werkzeug, gunicorn, redis and urllib3 unimportable, the core imports and runs."""
    result = _run_blocked(
        """
        import softlb
        from softlb import HealthChecker, Pool, ProbeResult
        from softlb.balancers import BALANCERS
        import softlb.backend, softlb.durations, softlb.errors, softlb.health, softlb.pool

        for name in BALANCERS:
            pool = Pool(["http://a:1", "http://b:1"], balancer=name)
            with pool.lease("key") as backend:
                pass
            assert backend.requests == 1

        checker = HealthChecker(pool, probe=lambda b: ProbeResult(True, "ok"))
        assert checker.run_pending() == 2
        checker.stop()

        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        assert not loaded, loaded
        assert "softlb.http.upstream" not in sys.modules
        print("core ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "core ok"
