"""Overlapping the three stages of a task: read, infer, write.

The accelerator should never wait for TIFF decoding or Zarr writes. Reads of the next items
run in threads ahead of inference and writes of finished items in threads behind it; both are
bounded by ``depth``, so memory stays a few batches whatever the task size. Decoders,
compressors and torch release the GIL, so the threads overlap for real.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["StageTimes", "run_stages"]

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")


@dataclass
class StageTimes:
    """Seconds spent in each stage (summed over its threads), and seconds the inference thread
    waited for a read or for the write queue to drain (``stall``)."""

    read: float = 0.0
    infer: float = 0.0
    write: float = 0.0
    stall: float = 0.0
    items: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def timed(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                with self._lock:
                    setattr(self, stage, getattr(self, stage) + time.perf_counter() - t)

        return run

    def to_dict(self) -> dict[str, float]:
        keys = ("read", "infer", "write", "stall")
        return {k: getattr(self, k) for k in keys}


def run_stages(
    items: Sequence[T],
    *,
    read: Callable[[T], A],
    infer: Callable[[T, A], B],
    write: Callable[[T, B], None],
    depth: int = 2,
    after: Callable[[T], None] | None = None,
) -> StageTimes:
    """``write(item, infer(item, read(item)))`` for every item.

    ``infer`` runs in the calling thread, in order (it owns the model and its device); with
    ``depth`` >= 1, up to ``depth`` reads run ahead of it and up to ``depth`` writes behind it,
    in threads. ``depth=0`` runs everything serially in the calling thread. Returns once every
    write has finished. The first exception of any stage is raised after the threads have
    stopped, so a caller that marks work done afterwards never marks a failed write done.
    ``after(item)``, when given, runs in the calling thread once the item's write has finished,
    in the order of ``items``, and never after a failure of an earlier item.
    """
    times = StageTimes()
    read_t, infer_t, write_t = (times.timed(s, f) for s, f in
                                (("read", read), ("infer", infer), ("write", write)))  # fmt: skip
    if depth <= 0:
        for item in items:
            write_t(item, infer_t(item, read_t(item)))
            times.items += 1
            if after is not None:
                after(item)
        return times
    readers = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="tileseg-read")
    writers = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="tileseg-write")
    reads: deque[Future[A]] = deque()
    writes: deque[tuple[T, Future[None]]] = deque()
    submitted = 0

    def read_ahead() -> None:
        nonlocal submitted
        while submitted < len(items) and len(reads) < depth:
            reads.append(readers.submit(read_t, items[submitted]))
            submitted += 1

    def finish_oldest() -> None:
        item, written = writes.popleft()
        written.result()
        if after is not None:
            after(item)

    try:
        read_ahead()
        for item in items:
            t = time.perf_counter()
            data = reads.popleft().result()
            times.stall += time.perf_counter() - t
            read_ahead()
            out = infer_t(item, data)
            del data  # the input batch is not needed while the write queue drains
            writes.append((item, writers.submit(write_t, item, out)))
            times.items += 1
            t = time.perf_counter()
            while len(writes) > depth or (writes and writes[0][1].done()):
                finish_oldest()
            times.stall += time.perf_counter() - t
        while writes:
            finish_oldest()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
    return times
