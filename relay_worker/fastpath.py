"""The compiled hot path (relay_worker/_fastpath.c) and the switch that turns it off.

One `Router` per worker walks a read's frames in C for as long as each is a SendPacket to a client
on this worker, and builds each destination's RecvPacket frames in one bytes object: the per-packet
Python of session.py's loop (a slice, a bytes key, a dict lookup, a header, a join) becomes C.
Everything else a frame can mean stays in Python, and so does the whole loop when the extension is
absent (it is built by pip from source, optional: no C compiler, no extension) or
`DERP_PURE_PYTHON=1` is set. The Python loop is the reference: tests run both and compare.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

from .frames import MAX_PACKET_SIZE, Payload

if TYPE_CHECKING:
    from .seams import Client

try:
    from . import _fastpath  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the pure-Python loop runs
    _fastpath = None

#: the environment switch to the pure-Python reference loop (A/B benchmarks, tests)
PURE_PYTHON_ENV = "DERP_PURE_PYTHON"

Batch = tuple["Client", bytes, int]  # destination, its RecvPacket frames, how many


class Router(Protocol):
    #: frames recorded since the last take()
    pending: int

    def route(self, data: Payload, pos: int, /) -> int:
        """File the run of locally routable SendPacket frames of `data` from `pos`; where it stopped."""
        ...

    def take(self, key: bytes, /) -> tuple[list[Batch], int, int, int]:
        """This read's batches from source `key`, with packets, payload bytes and read-limit charge."""
        ...

    def discard_from(self, payload: Payload, /) -> None:
        """Forget what was recorded from this frame's position on (the connection stopped there)."""
        ...

    def clear(self) -> None: ...


def available() -> bool:
    return _fastpath is not None


def new_router(clients: dict[bytes, Client], *, min_burst: int) -> Router | None:
    """The compiled router over `clients`, or None for the pure-Python loop."""
    if _fastpath is None or os.environ.get(PURE_PYTHON_ENV) == "1":
        return None
    router: Router = _fastpath.Router(clients, MAX_PACKET_SIZE, min_burst)
    return router
