"""Client-side balancing for programs that already use requests or httpx.

Each adapter sends through a :class:`~softlb.client.BalancedClient`, so it picks, counts,
retries and records exactly as that client does; only the request and response objects
differ. Neither module is imported here: each needs its library, installed with the extra of
the same name.

=======================================  =====================  ===============================
module                                   class                  install
=======================================  =====================  ===============================
:mod:`softlb.contrib.requests_adapter`   ``BalancedAdapter``    ``pip install softlb[requests]``
:mod:`softlb.contrib.httpx_transport`    ``BalancedTransport``  ``pip install softlb[httpx]``
=======================================  =====================  ===============================
"""

from __future__ import annotations

from typing import Any

from softlb.client import BalancedClient
from softlb.pool import Pool

__all__: list[str] = []


def client_for(
    target: Pool | BalancedClient, options: dict[str, Any]
) -> tuple[BalancedClient, bool]:
    """The client an adapter sends through, and whether the adapter owns (and closes) it.

    ``target`` is a pool (a client is made for it with ``options``, the keyword arguments of
    :class:`~softlb.client.BalancedClient`) or a client to share (then ``options`` must be
    empty: they belong to that client).
    """
    if isinstance(target, BalancedClient):
        if options:
            raise TypeError(
                f"give {', '.join(sorted(options))} to the BalancedClient, not to the adapter"
            )
        return target, False
    if isinstance(target, Pool):
        return BalancedClient(target, **options), True
    raise TypeError(f"expected a softlb Pool or BalancedClient, got {type(target).__name__}")
