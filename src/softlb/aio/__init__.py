"""The event-loop engine: one asyncio loop (uvloop when installed) per worker, httptools for
HTTP/1.1, no thread on the proxied path.

``softlb serve`` uses it by default (``--engine eventloop``); under plain gunicorn::

    gunicorn -k softlb.aio.Worker 'softlb.wsgi:create_app("config.json")'

:class:`Worker` is the gunicorn worker class; :class:`~softlb.aio.engine.Engine` the data
plane itself, usable without gunicorn (:func:`softlb.aio.serve.running` runs one on a thread,
for tests and embedding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Worker"]

if TYPE_CHECKING:
    from softlb.aio.worker import Worker


def __getattr__(name: str) -> Any:
    # gunicorn is imported only when the worker class is asked for.
    if name == "Worker":
        from softlb.aio.worker import Worker

        return Worker
    raise AttributeError(name)
