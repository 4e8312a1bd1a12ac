"""The compiled hot path (relay_worker/_fastpath.c) and the switch that turns it off.

One `Router` per worker walks a read's frames in C for as long as each is a SendPacket to a client
on this worker or to a key another worker of the cluster owns, and builds each destination's
RecvPacket frames (or each mesh link's packet records) in one bytes object: the per-packet Python of
session.py's loop (a slice, a bytes key, a dict lookup, a header, a join) and of the forwarder
becomes C. `mesh_frames` does the same for a PACKETS message arriving from another worker.
Everything else a frame can mean stays in Python, and so does the whole loop when the extension is
absent (it is built by pip from source, optional: no C compiler, no extension) or
`DERP_PURE_PYTHON=1` is set. The Python loops are the reference: tests run both and compare.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

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
LinkBatch = tuple[Any, bytes, int]  # a mesh link (mesh/transport.py), its packet records, how many
#: (RecvPacket frames per client, records read, records dropped, (src, dst) runs, first malformation)
MeshFrames = tuple[list[Batch], int, int, list[tuple[bytes, bytes]], str | None]


class Router(Protocol):
    #: frames recorded since the last take()
    pending: int

    def route(self, data: Payload, pos: int, /) -> int:
        """File the run of locally routable SendPacket frames of `data` from `pos`; where it stopped."""
        ...

    def take(self, key: bytes, /) -> tuple[list[Batch], list[LinkBatch], int, int, int]:
        """This read's batches from source `key` (to clients, to mesh links), with packets, payload
        bytes and read-limit charge."""
        ...

    def attach_mesh(self, *, owners: dict[bytes, Any], own: Any, links: dict[Any, Any]) -> None:
        """Also route to keys whose owner (the directory) is another worker with a link."""
        ...

    def discard_from(self, payload: Payload, /) -> None:
        """Forget what was recorded from this frame's position on (the connection stopped there)."""
        ...

    def clear(self) -> None: ...


def available() -> bool:
    return _fastpath is not None


def mesh_frames_function() -> Callable[[Payload, Mapping[bytes, Any]], MeshFrames] | None:
    """The compiled receiving end of the worker mesh, or None for the Python one."""
    if _fastpath is None or os.environ.get(PURE_PYTHON_ENV) == "1":
        return None
    function: Callable[[Payload, Mapping[bytes, Any]], MeshFrames] = _fastpath.mesh_frames
    return function


def new_router(clients: dict[bytes, Client], *, min_burst: int) -> Router | None:
    """The compiled router over `clients`, or None for the pure-Python loop."""
    if _fastpath is None or os.environ.get(PURE_PYTHON_ENV) == "1":
        return None
    router: Router = _fastpath.Router(clients, MAX_PACKET_SIZE, min_burst)
    return router
