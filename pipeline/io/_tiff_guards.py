"""Guards around tifffile, so that a bad TIFF ends in one line of ours and nothing else.

* :func:`tifffile_logs` collects, per thread, what tifffile logs while parsing (it would print
  its own warning lines beside our error);
* :func:`check_not_truncated` refuses a cut copy when it is opened;
* :class:`GuardedStore` and :class:`GuardedArray` make a window read over corrupt tiles raise
  only once every chunk read of that window has finished.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import tifffile
from zarr.storage import WrapperStore

from pipeline.errors import TilesegError


class _TiffLogs(logging.Filter):
    """Drops tifffile's log records in threads that collect them (see :func:`tifffile_logs`).
    A filter on the logger with thread-local lists, since reader threads open files at once."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        messages = getattr(self.local, "messages", None)
        if messages is None:
            return True
        messages.append(record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_TiffLogs())


@contextmanager
def tifffile_logs() -> Iterator[list[str]]:
    """What tifffile logs in this thread meanwhile, collected instead of printed."""
    outer = getattr(_TiffLogs.local, "messages", None)
    _TiffLogs.local.messages = messages = []
    try:
        yield messages
    finally:
        _TiffLogs.local.messages = outer


def check_not_truncated(path: str, tif: tifffile.TiffFile, skipped: list[str]) -> None:
    """Refuse, on open, a file whose tiles or strips lie past its end (a cut copy): otherwise it
    fails at the first task that reaches them, with a decoder's error. ``skipped``: what
    tifffile logged while parsing, the first of which the message quotes."""
    size = os.path.getsize(path)
    end = 0
    with tifffile_logs() as more:  # series and SubIFD levels are parsed lazily
        pages = [p for s in tif.series for lv in s.levels for p in lv.pages if p is not None]
    skipped = skipped + more
    for page in pages:
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        if offsets.size:
            end = max(end, int((offsets + counts).max()))
    if end > size:
        why = f"; {skipped[0]}" if skipped else ""
        raise TilesegError(
            path, f"truncated TIFF file: image data extend to byte {end}, the file has {size}{why}"
        )


class _Read:
    """One window read through a :class:`GuardedArray`: the first error of its chunk reads."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None


# The read in progress, seen by the chunk reads zarr runs for it as tasks on its event loop (tasks
# inherit the context of the thread that submits the read).
_READ: contextvars.ContextVar[_Read | None] = contextvars.ContextVar("_READ", default=None)


class GuardedStore(WrapperStore[Any]):
    """tifffile's Zarr store, whose chunk reads never fail during a :class:`GuardedArray` read.

    zarr reads the chunks of a window as concurrent tasks gathered without cancelling the others
    when one fails: the failure would return to the reader while its siblings are still queued or
    decoding, to fail later on the file handle the reader closes meanwhile (or be destroyed pending
    at exit), and asyncio would print each of those unretrieved errors. Instead the first error is
    kept for the read, the remaining chunks of that read are skipped (read as fill, without file
    access), so zarr's read completes with every task finished, and :class:`GuardedArray` raises.
    """

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        read = _READ.get()
        if read is None:  # metadata, while zarr opens the array
            return await self._store.get(key, prototype, byte_range)
        if read.error is not None:
            return None
        try:
            return await self._store.get(key, prototype, byte_range)
        except Exception as exc:  # codec errors, short reads, ...
            if read.error is None:
                read.error = exc
            return None


class GuardedArray:
    """A Zarr array over a :class:`GuardedStore`; a read raises the first error of its chunks, once
    all of them have finished."""

    def __init__(self, array: Any) -> None:
        self._array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def __getattr__(self, name: str) -> Any:  # metadata, chunks, ... of the array
        return getattr(self._array, name)

    def __getitem__(self, index: Any) -> Any:
        read = _Read()
        token = _READ.set(read)
        try:
            data = self._array[index]
        finally:
            _READ.reset(token)
        if read.error is not None:
            error, read.error = read.error, None
            raise error
        return data
