"""When a failed request may be sent to another backend: one set of rules for the proxy
(:mod:`softlb.wsgi`) and the client-side balancer (:mod:`softlb.client`).

SPEC §3: a request that could not be connected (nothing was sent) may go to another
backend whatever its method; one that failed after it was sent only if sending it twice is
safe — an idempotent method (RFC 9110 §9.2.2) or an ``Idempotency-Key`` header — and only
while its body can be sent again; and at most ``retries`` more backends are tried.
"""

from __future__ import annotations

from typing import Final

from softlb.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout

__all__ = ["IDEMPOTENT_METHODS", "failure_kind", "failure_reason", "may_resend", "may_retry"]

#: Methods a request may be sent again with after it reached a backend (RFC 9110 §9.2.2).
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def may_resend(method: str, has_idempotency_key: bool) -> bool:
    """Whether a request may reach a backend twice: idempotent, or carrying a key."""
    return method in IDEMPOTENT_METHODS or has_idempotency_key


def may_retry(
    error: UpstreamError, *, resend: bool, replayable: bool, tried: int, limit: int
) -> bool:
    """Whether to try another backend after ``error``, ``tried`` backends having been tried.

    ``resend`` comes from :func:`may_resend`; ``replayable`` says the body can be sent again.
    """
    if not replayable or tried > limit:
        return False
    return isinstance(error, UpstreamConnectError) or resend


def failure_kind(error: UpstreamError) -> str:
    """The failure a lease records for an upstream error (passive health counts these)."""
    if isinstance(error, UpstreamConnectError):
        return "connect"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    return "broken"


#: What each failure kind of :func:`failure_kind` means, in words (for log lines).
_KIND_WORDS: Final = {
    "connect": "could not connect",
    "timeout": "no answer in time",
    "broken": "the connection failed after the request was sent",
    "error": "an error in the proxy",
}


def failure_reason(kind: str) -> str:
    """A failure kind a lease records (``"connect"``, ``"timeout"``, ``"broken"``) in words."""
    return _KIND_WORDS.get(kind, kind)
