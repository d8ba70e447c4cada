"""The label pyramid's levels above those the writers of level 0 write themselves.

Each level is split into parts that each own a band of its chunks (one chunk tall, a few
wide: raster-order tasks finish bands in order) and compute them from the level below
(:func:`~pipeline.output.ngff.downsample_region`). What every part reads is known before any
task runs: the chunks of the writers of the level below (the inference tasks, or the
upsampling parts, for the first level above theirs; else the parts of the level below). So
the parts can run as soon as those have finished, beside the tasks (:class:`PyramidFeed`),
or all after them, level by level (:func:`run_pyramid`). Either way a part writes the same
chunks from the same source chunks: the levels are the same whichever way they ran. A part
is marked done once written (``pipeline/engine/resumable.py``) and a resumed run skips it.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.engine.resumable import run_part, run_resumable
from pipeline.output.ngff import OutputLayout, downsample_region, half_region
from pipeline.output.provenance import is_done
from pipeline.runtime.resolved import Runtime

__all__ = ["PyramidFeed", "PyramidPart", "band_regions", "pyramid_parts", "run_pyramid"]

BAND_CHUNKS = 4  # a part's width in chunks (along x); one chunk along every other axis


@dataclass(frozen=True)
class PyramidPart:
    """One part: a band of chunks of ``level``, and the writers of the level below it reads."""

    name: str  # its completion marker
    level: int
    region: tuple[slice, ...]
    needs: frozenset[str]


def band_regions(layout: OutputLayout, level: int) -> list[tuple[slice, ...]]:
    """Regions covering pyramid ``level`` in raster order, each one chunk along every axis but
    the last and ``BAND_CHUNKS`` chunks along it."""
    shape, chunks = layout.levels[level], layout.level_chunks(level)
    step = (*chunks[:-1], chunks[-1] * BAND_CHUNKS)
    counts = [math.ceil(n / s) for n, s in zip(shape, step, strict=True)]
    return [
        tuple(slice(i * s, min((i + 1) * s, n)) for i, s, n in zip(index, step, shape, strict=True))
        for index in np.ndindex(*counts)
    ]


def pyramid_parts(
    layout: OutputLayout, levels: int, writers: Mapping[str, Sequence[Sequence[slice]]]
) -> list[PyramidPart]:
    """The parts of the levels above ``levels``, in the order of their levels.

    Parameters
    ----------
    layout
        The output's arrays.
    levels
        The highest level the ``writers`` write (each from its own level-0 regions).
    writers
        Each writer of levels 0 to ``levels`` (an inference task, an upsampling part) by its
        completion marker, with the chunk-aligned level-0 regions it writes.
    """
    owner: dict[tuple[int, ...], str] = {}
    chunks = layout.level_chunks(levels)
    for name, regions in writers.items():
        for region in regions:
            for _ in range(levels):
                region = half_region(region)
            for index in _chunk_indices(region, chunks):
                owner[index] = name
    parts: list[PyramidPart] = []
    for level in range(levels + 1, len(layout.levels)):
        below, chunks, owner = owner, layout.level_chunks(level - 1), {}
        end = layout.levels[level - 1]
        for i, region in enumerate(band_regions(layout, level)):
            doubled = (*region[:-2], *(slice(2 * s.start, 2 * s.stop) for s in region[-2:]))
            source = [slice(s.start, min(s.stop, n)) for s, n in zip(doubled, end, strict=True)]
            needs = frozenset(below[index] for index in _chunk_indices(source, chunks))
            part = PyramidPart(f"pyramid-{level}-band-{i:07d}", level, region, needs)
            parts.append(part)
            for index in _chunk_indices(region, layout.level_chunks(level)):
                owner[index] = part.name
    return parts


def _chunk_indices(region: Sequence[slice], chunks: Sequence[int]) -> Iterable[tuple[int, ...]]:
    """The indices of the chunks a region touches."""
    return itertools.product(
        *(range(s.start // c, -(-s.stop // c)) for s, c in zip(region, chunks, strict=True))
    )


def run_pyramid(
    parts: Sequence[PyramidPart], *, output: str, layout: OutputLayout, run_id: str,
    runtime: Runtime,
) -> None:  # fmt: skip
    """Run the parts not marked done where ``runtime`` says, level by level (each level's
    parts in parallel)."""
    for level in sorted({part.level for part in parts}):
        run_resumable(
            downsample_region,
            [(p.name, (output, layout, p.level, p.region)) for p in parts if p.level == level],
            output=output, run_id=run_id, runtime=runtime, name="pyramid",
        )  # fmt: skip


class PyramidFeed:
    """Runs pyramid parts in a thread of this process, each once the writers it reads have
    finished (:meth:`written`), while those still run.

    Parameters
    ----------
    parts
        Every part of the pyramid (:func:`pyramid_parts`).
    output, layout, run_id
        The output written, its arrays, and the run that holds it.
    done
        Writers finished before (those of a resumed run).
    """

    def __init__(
        self, parts: Sequence[PyramidPart], *, output: str, layout: OutputLayout, run_id: str,
        done: Iterable[str] = (),
    ) -> None:  # fmt: skip
        self._output, self._layout, self._run_id = output, layout, run_id
        finished = set(done) | {p.name for p in parts if is_done(output, p.name)}
        self._parts = {p.name: p for p in parts if p.name not in finished}
        self._waiting = {name: set(p.needs) - finished for name, p in self._parts.items()}
        self._readers: dict[str, list[str]] = {}
        for name, needs in self._waiting.items():
            for need in needs:
                self._readers.setdefault(need, []).append(name)
        self._lock = threading.Lock()
        self._futures: list[Future[None]] = []
        self._submitted: set[str] = set()
        self._stopped = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tileseg-pyramid")
        with self._lock:
            for name in [n for n, needs in self._waiting.items() if not needs]:
                self._submit(name)

    def written(self, name: str) -> None:
        """A writer (a task, or a part) has finished: run the parts that waited only for it."""
        with self._lock:
            for reader in self._readers.pop(name, ()):
                needs = self._waiting[reader]
                needs.discard(name)
                if not needs:
                    self._submit(reader)

    def _submit(self, name: str) -> None:
        if not self._stopped and name not in self._submitted:
            self._submitted.add(name)
            self._futures.append(self._pool.submit(self._run, self._parts[name]))

    def _run(self, part: PyramidPart) -> None:
        run_part(
            downsample_region, (self._output, self._layout, part.level, part.region),
            output=self._output, name=part.name, run_id=self._run_id,
        )  # fmt: skip
        self.written(part.name)

    def finish(self) -> None:
        """Run what is left once every writer has finished, and wait for every part: the first
        failure is raised once nothing is being written any more."""
        try:
            with self._lock:  # in the order of their levels: one thread runs them in turn
                for name in self._parts:
                    self._submit(name)
            while True:
                with self._lock:
                    if not self._futures:
                        break
                    future = self._futures.pop(0)
                future.result()
        finally:
            self.stop()

    def stop(self) -> None:
        """Start no more parts, and wait for the one running."""
        with self._lock:
            self._stopped = True
        self._pool.shutdown(wait=True, cancel_futures=True)
