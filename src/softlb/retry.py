"""When a failed request may be sent to another backend, and the loop of tries that applies
it: one set of rules and one loop (:class:`Attempts`) for the WSGI proxy (:mod:`softlb.wsgi`),
the event-loop engine (:mod:`softlb.aio`) and the client-side balancer (:mod:`softlb.client`).

SPEC §3: a request that could not be connected (nothing was sent) may go to another
backend whatever its method; one that failed after it was sent only if sending it twice is
safe — an idempotent method (RFC 9110 §9.2.2) or an ``Idempotency-Key`` header — and only
while its body can be sent again; and at most ``retries`` more backends are tried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from softlb.errors import (
    NoBackendAvailable,
    ProxyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from softlb.events import RETRIED
from softlb.queueing import lease_async

if TYPE_CHECKING:
    from softlb.backend import Backend
    from softlb.pool import Lease, Pool

__all__ = [
    "IDEMPOTENT_METHODS",
    "Attempts",
    "Budget",
    "ClientAbort",
    "failure_kind",
    "failure_reason",
    "failure_text",
    "may_resend",
    "may_retry",
]

log = logging.getLogger("softlb.proxy")

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


def failure_text(error: BaseException, backend: str | None = None) -> str:
    """Why a try on ``backend`` failed, in words and without the backend's URL (the log line
    names it once): ``"connection refused"``, ``"the connection closed before an answer"``."""
    text = str(error)
    url = backend if backend is not None else getattr(error, "backend", None)
    if url:
        text = text.replace(f"connection to {url} failed: ", "")
        for joined in (f": {url}", f" from {url}", f" to {url}", f" {url}"):
            text = text.replace(joined, "")
    return {"closed before answering": "the connection closed before an answer"}.get(text, text)


class Budget(Protocol):
    """What :class:`Attempts` asks before each retry: :class:`softlb.client.RetryBudget`."""

    def try_withdraw(self) -> bool:
        """Take one retry if there is one; ``False`` if not."""
        ...


class ClientAbort(Exception):
    """Raised through :meth:`Attempts.abort` for a try that ended by the client's fault (its
    body broke, it went away): the lease ends with no failure recorded against the backend."""


class Attempts:
    """The tries of one request: which backend next, and after a failure whether to try
    another. The one loop of SPEC §3 that every front end drives with its own I/O (Go's
    ``ReverseProxy`` and ``Transport.roundTrip`` split it the same way).

    Each try takes a lease with :meth:`next` (or :meth:`next_async` on an event loop), which
    excludes the backends already tried and keeps the sticky ``prefer`` backend first. The
    loop owns that lease until the try ends one of three ways:

    * :meth:`failed` — the backend failed (an :class:`~softlb.errors.UpstreamError`): the
      lease ends with the failure recorded (passive health counts it), the failure is logged,
      and the answer says whether another backend may be tried (:func:`may_retry`, then the
      ``budget`` if any). A retry is counted with ``on_retry`` and published as a
      ``"retried"`` event;
    * :meth:`abort` — something else broke the try: the client's fault (``client=True``: no
      failure recorded) or the proxy's own error (recorded as ``"error"``);
    * :meth:`succeeded` — the backend answered: the lease passes to the caller, who releases
      it when the answer has been relayed.

    When :meth:`next` returns ``None`` nothing more is tried, and :attr:`error` is why: the
    last backend's failure, or :class:`~softlb.errors.NoBackendAvailable` when nothing was in
    rotation. Not thread-safe: one request, one thread or task.

    ``first`` is a lease the caller took already (with :meth:`Pool.try_lease`, no exclusions,
    no preference): the first :meth:`next` returns it instead of leasing, so a front end that
    starts the usual request without the loop (the event-loop engine's fast path) can hand it
    over when its first try fails, and the loop goes on as if it had taken that lease itself.
    """

    __slots__ = (
        "_first",
        "_stopped",
        "budget",
        "error",
        "key",
        "lease",
        "log",
        "method",
        "on_retry",
        "pool",
        "prefer",
        "resend",
        "retries",
        "target",
        "tried",
        "wait",
    )

    def __init__(
        self,
        pool: Pool,
        key: str | None = None,
        *,
        method: str,
        target: str,
        resend: bool,
        retries: int,
        prefer: Backend | None = None,
        wait: float = 0.0,
        budget: Budget | None = None,
        on_retry: Callable[[], object] | None = None,
        logger: logging.Logger = log,
        first: Lease | None = None,
    ) -> None:
        self.pool = pool
        self.key = key
        self.method = method
        #: The request target, for log lines and events only.
        self.target = target
        #: Whether the request may reach a backend twice (:func:`may_resend`).
        self.resend = resend
        #: How many more backends may be tried after the first.
        self.retries = retries
        self.prefer = prefer
        #: Seconds a try may wait in the pool's queue for a backend below its limit.
        self.wait = wait
        self.budget = budget
        self.on_retry = on_retry
        #: Where each failed try is logged (``softlb.proxy``; the client's is ``softlb.client``).
        self.log = logger
        #: The backends tried so far, in order.
        self.tried: list[Backend] = []
        #: Why the request could not be served, once :meth:`next` returned ``None``.
        self.error: ProxyError | None = None
        #: The lease of the try under way, owned by the loop until :meth:`succeeded`.
        self.lease: Lease | None = None
        #: A lease taken before the loop began, for its first try (:meth:`next` returns it).
        self._first = first
        self._stopped = False

    def next(self) -> Lease | None:
        """The lease of the next try (waiting up to :attr:`wait` in the pool's queue), or
        ``None`` when nothing more is to be tried."""
        if self._stopped:
            return None
        if self._first is not None:
            return self._take_first()
        try:
            lease = self.pool.lease(
                self.key, exclude=self.tried, prefer=self.prefer, wait=self.wait
            )
        except NoBackendAvailable as exc:
            self._none_left(exc)
            return None
        self.lease = lease
        return lease

    async def next_async(self) -> Lease | None:
        """:meth:`next` for an asyncio event loop: the queue is waited in without blocking it."""
        if self._stopped:
            return None
        if self._first is not None:
            return self._take_first()
        pool = self.pool
        try:
            lease = pool.try_lease(self.key, exclude=self.tried, prefer=self.prefer)
            if lease is None:
                lease = await lease_async(
                    pool, self.key, exclude=self.tried, prefer=self.prefer, wait=self.wait
                )
        except NoBackendAvailable as exc:
            self._none_left(exc)
            return None
        self.lease = lease
        return lease

    def _take_first(self) -> Lease:
        lease = self._first
        assert lease is not None
        self._first = None
        self.lease = lease
        return lease

    def _none_left(self, exc: NoBackendAvailable) -> None:
        self._stopped = True
        self.error = self.error or exc

    def failed(self, error: UpstreamError, *, replayable: bool = True) -> bool:
        """The try's backend failed with ``error``: end its lease with the failure, log it,
        and say whether another backend may be tried. ``replayable`` says the request's body
        can be sent again."""
        lease = self._take()
        backend = lease.backend
        lease.release(failure_kind(error))
        self.tried.append(backend)
        self.error = error
        why = failure_text(error, backend.url)
        self.log.warning("backend %s failed %s %s: %s", backend.url, self.method, self.target, why)
        if not may_retry(
            error,
            resend=self.resend,
            replayable=replayable,
            tried=len(self.tried),
            limit=self.retries,
        ):
            self._stopped = True
            return False
        if self.budget is not None and not self.budget.try_withdraw():
            self.log.warning(
                "%s %s not retried: the retry budget is spent", self.method, self.target
            )
            self._stopped = True
            return False
        if self.on_retry is not None:
            self.on_retry()
        self.pool.publish(RETRIED, backend, f"{self.method} {self.target}: {why}")
        return True

    def abort(self, *, client: bool) -> None:
        """The try ended without an answer, not by the backend's failure: the client's fault
        (``client=True``: its body broke, it went away; nothing recorded against the backend)
        or the proxy's own error (recorded as ``"error"``). Nothing more is tried."""
        lease = self._take()
        lease.release(None if client else "error")
        self._stopped = True

    def succeeded(self) -> Lease:
        """The try's backend answered: the caller owns the lease from here and releases it
        once the answer has been relayed (or hands it to a response object that does)."""
        lease = self._take()
        self._stopped = True
        return lease

    def _take(self) -> Lease:
        lease = self.lease
        if lease is None:
            raise RuntimeError("no try is under way: call next() first")
        self.lease = None
        return lease

    def __repr__(self) -> str:
        tried = ", ".join(b.url for b in self.tried) or "none"
        return f"<Attempts {self.method} {self.target} tried: {tried}>"
