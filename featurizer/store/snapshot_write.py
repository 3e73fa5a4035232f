"""How a snapshot of the in-process store gets written (`featurizer.store.in_process`): the
`SnapshotWrite` that `InProcessStore.freeze` returns, which the caller runs on any thread after
encoding a delta's handed-over values a slice at a time on its event loop, if it likes; and whether
this process may fork the writer of a full snapshot (`fork_is_safe`)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable

from featurizer.store.base import Owned, encode_value

# gRPC's own fork handlers are on in its core and off in its Python layer by default (grpcio >= 1.74;
# grpc/grpc#41433 calls the mixed state a source of problems): a child forked while calls run can
# write on the parent's connections, and its peer then reads a broken HTTP/2 stream ("Trailing
# metadata frame received without an end-of-stream", seen on a LogEvents in CI). With
# GRPC_ENABLE_FORK_SUPPORT=false set before grpc is imported (serving/__init__.py does), no handler
# runs in the child, which only writes a file and leaves by os._exit.
GRPC_FORK_ENV = "GRPC_ENABLE_FORK_SUPPORT"


def fork_is_safe() -> bool:
    """Whether this process may fork a snapshot writer: os.fork exists, and gRPC, if it is loaded,
    runs no fork handlers of its own."""
    if not hasattr(os, "fork"):
        return False
    return "grpc" not in sys.modules or os.environ.get(GRPC_FORK_ENV, "").strip().lower() in ("0", "false", "no")


class SnapshotWrite:
    """A snapshot `InProcessStore.freeze` took: calling it (on any thread) writes it. Before that, on
    an event loop, `encode_slices` may encode a delta's handed-over values a slice at a time, paced
    by the caller (the server gives them its share of the loop for writes, `ApplySlices`), so that
    the encoding (hundreds of ms of the GIL for the co-occurrence states of a write flood's delta)
    never holds the loop, as it would on the writing thread or, forked, in reading the child's file
    back; the write then encodes what is left."""

    def __init__(self, delta: dict[str, dict[str, bytes | Owned | None]] | None):
        self._todo = None if delta is None else (
            (part, entity, k, v) for entity, part in delta.items() for k, v in part.items() if type(v) is Owned)
        self.encoded: dict[tuple[str, str], tuple[Owned, bytes]] = {}  # (entity, key) -> (value, its encoding)
        self.slices = 0  # `encode_slices` calls of `encode_some`
        self.write: Callable[[], None] = lambda: None

    def __call__(self) -> None:
        self.write()

    def encode_some(self, budget_s: float) -> bool:
        """Encode handed-over values of the delta for about `budget_s`; True when none is left. Each
        goes into the delta, for the file, and into `encoded`, for the store."""
        if self._todo is None:
            return True
        end = time.perf_counter() + budget_s
        for part, entity, k, v in self._todo:
            blob = encode_value(v)
            part[k] = blob
            self.encoded[(entity, k)] = (v, blob)
            if time.perf_counter() >= end:
                return False
        self._todo = None
        return True

    async def encode_slices(self, slice_s: float, pace: Callable[[float], Awaitable[None]]) -> None:
        """`encode_some` in slices of `slice_s` on the running loop; after each, `pace(seconds it
        took)` waits as long as the caller's share of the loop wants."""
        while True:
            began = time.perf_counter()
            done = self.encode_some(slice_s)
            self.slices += 1
            if done:
                return
            await pace(time.perf_counter() - began)
