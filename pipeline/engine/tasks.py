"""The inference tasks: each owns a block of tiles, reads their windows, infers, writes.

A :class:`BlockTask` is small and picklable; the worker that runs it opens the image and the
model itself (cached per process). :func:`run_block` is what a Dask worker runs for one task;
:func:`run_blocks` runs several tasks in the calling thread as one stream of batches, so that
the reads of a task's first batch and the writes of its last overlap the forwards of its
neighbours instead of waiting for them (a local run with one task at a time, as on the CPU;
with ``prefetch`` 0, the default on a CPU of few cores, the stages take turns). Either way a
task's done marker is written only once every tile of it is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import wait
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.engine.stages import run_stages
from pipeline.errors import TilesegError
from pipeline.geometry import Tile, TileGrid, apply_window, window_read
from pipeline.io import chunk_cache
from pipeline.io.readers import ImageSpec, LazyImage, cached_image
from pipeline.models import ModelSpec
from pipeline.models.inference import Prediction, Predictor
from pipeline.output.lock import check_owner
from pipeline.output.ngff import OutputLayout, half_region, next_level, write_region
from pipeline.output.provenance import mark_done
from pipeline.preprocess.normalize import Normalization, count_nonfinite
from pipeline.runtime import worker
from pipeline.runtime.cores import use_worker_cores
from pipeline.runtime.heap import off_main_heap
from pipeline.runtime.worker import RunSettings, cached_predictor, io_pool

__all__ = ["BlockTask", "read_window", "run_block", "run_blocks", "writing"]


@dataclass(frozen=True)
class BlockTask:
    """One task: a group of tiles of one image. Small and picklable; workers load the rest."""

    image: ImageSpec
    model: ModelSpec
    normalization: Normalization
    grid: TileGrid
    tiles: tuple[tuple[int, ...], ...]
    output: str
    layout: OutputLayout
    run: RunSettings
    name: str  # completion marker written when every tile of the task is written
    skip: tuple[tuple[int, ...], ...] = ()  # tiles without tissue: written as background
    levels: int = 0  # pyramid levels above 0 the task writes too (see ngff.levels_in_tasks)
    run_id: str = ""  # the run the output must still belong to when the task writes
    # Where the task's arrays are: the output's own, or its labels on the model's grid when
    # they are upsampled to the input's after the tasks (ngff.MODEL_GRID).
    arrays: str = ""


@contextmanager
def writing(output: str) -> Iterator[None]:
    """A full disk or an unwritable output is the user's to fix: one line, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise TilesegError(output, f"cannot write output ({exc.strerror or exc})") from None


def read_window(image: LazyImage, start, stop) -> np.ndarray:
    """Read a (C, *window) input window whose parts outside the image are mirrored."""
    plan = window_read(start, stop, image.spatial_shape)
    return apply_window(image.read(plan.source), plan, first_spatial_axis=1)


def _tile_in_window(tile: Tile) -> tuple[slice, ...]:
    """Where a tile's own output region lies inside its input window."""
    return tuple(
        slice(a - w, b - w)
        for a, b, w in zip(tile.start, tile.stop, tile.window_start, strict=True)
    )


def run_block(task: BlockTask) -> dict[str, float]:
    """Infer one block of tiles and write their outputs. Returns timings and counts.

    Reads of the next batches and writes of the finished ones overlap inference (see
    :mod:`pipeline.engine.stages`); the task's done marker is written after the last write.
    """
    return run_blocks([task])


def run_blocks(
    tasks: Sequence[BlockTask], *, on_done: Callable[[dict[str, float]], None] | None = None
) -> dict[str, float]:
    """Run ``tasks`` in the calling thread as one stream of batches (inference in this thread:
    a CPU forward's memory comes from the main heap there, see :mod:`pipeline.runtime.heap`).

    Each task's done marker is written, and ``on_done`` called with its ``tiles``,
    ``pixels`` and name (in ``tasks``), in this thread once its last write has finished.
    After a failure no task is marked, not even one whose writes were still in flight and
    then finished: a resumed run redoes it. Returns the stream's timings and counts, summed
    over the tasks, and the tasks' names (``tasks``).
    """
    t0 = time.perf_counter()
    blocks = [_Block(task) for task in tasks]
    cpu = any(block.predictor.device.type == "cpu" for block in blocks)
    if cpu:
        use_worker_cores()  # on a Dask worker: its share of the cores
    items: list[tuple[_Block, tuple[Tile, ...]]] = []
    for block in blocks:
        block.write_skipped()
        if block.batches:
            items.extend((block, batch) for batch in block.batches)
        else:
            block.finish(on_done)

    def after(item: tuple[_Block, tuple[Tile, ...]]) -> None:
        block = item[0]
        block.unwritten -= 1
        if not block.unwritten:
            block.finish(on_done)

    times = run_stages(
        items, read=lambda item: item[0].read(item[1]),
        infer=lambda item, x: item[0].infer(item[1], x),
        write=lambda item, out: item[0].write(item[1], out),
        depth=max((task.run.prefetch for task in tasks), default=0), after=after,
    )  # fmt: skip
    return {
        **times.to_dict(),
        "tasks": [task.name for task in tasks],  # the markers of those it finished
        "tiles": sum(block.inferred for block in blocks),
        "pixels": sum(block.pixels for block in blocks),
        "nonfinite": sum(block.nonfinite for block in blocks),
        "task": time.perf_counter() - t0,
        # How the CPU forwards ran (what segment reports, and hints at when it is slow).
        "cpu_forward_threads": torch.get_num_threads() if cpu else 0,
        "tasks_off_main_heap": len(tasks) if cpu and off_main_heap() else 0,
    }


class _Block:
    """A task as its worker runs it: the image and predictor it uses, its batches, and how one
    batch is read, inferred and written."""

    def __init__(self, task: BlockTask) -> None:
        self.task = task
        self.image = image = cached_image(task.image)
        chunks = image.chunk_shape
        if chunks is not None:
            chunk_cache.reserve(
                window=task.grid.window, spatial_shape=image.spatial_shape,
                bytes_per_pixel=image.n_channels * image.dtype.itemsize, tile_rows=chunks[-2],
            )  # fmt: skip
        self.predictor: Predictor = cached_predictor(
            task.model, task.run, window=task.grid.window,
            in_channels=task.normalization.channels(image.n_channels),
        )  # fmt: skip
        self.label_dtype = np.dtype(task.layout.label_dtype)
        self.probability_dtype = task.layout.probability_dtype
        skip = set(task.skip)
        tiles = [task.grid.tile_at(index) for index in task.tiles if index not in skip]
        size = task.run.batch_size
        self.batches = [tuple(tiles[i : i + size]) for i in range(0, len(tiles), size)]
        self.inferred = len(tiles)
        self.unwritten = len(self.batches)  # batches whose write has not finished yet
        self.pixels = sum(int(np.prod(tile.shape)) for tile in tiles)
        self.nonfinite = 0  # NaN/Inf input pixels of its tiles (not of their halos)

    def write_skipped(self) -> None:
        """Write the tiles without tissue as background, without inferring them."""
        task, layout = self.task, self.task.layout
        for index in task.skip:
            tile = task.grid.tile_at(index)
            labels = np.zeros(tile.shape, self.label_dtype)
            pdtype = self.probability_dtype
            p = np.zeros((layout.classes, *tile.shape), pdtype) if pdtype else None
            if p is not None and layout.classes > 1:
                p[0] = 1  # background for certain, not "no class at all"
            _write_levels(task, tile.region, labels, p)
            self.pixels += int(np.prod(tile.shape))

    def finish(self, on_done: Callable[[dict[str, float]], None] | None) -> None:
        task = self.task
        check_owner(task.output, task.run_id)
        with writing(task.output):
            summary = {"nonfinite": self.nonfinite} if self.nonfinite else None
            mark_done(task.output, task.name, summary)
        if on_done is not None:
            on_done({"tasks": [task.name], "tiles": self.inferred, "pixels": self.pixels})

    def _each(self, fn: Callable[[int], None], batch: tuple[Tile, ...]) -> None:
        """``fn(k)`` for each tile of ``batch``; on the I/O threads where they are used, after
        the calls of batches before this one in the grid (those of tasks running alongside)."""
        n = len(batch)
        if worker.parallel_io(self.predictor.device):
            # Every one finishes before the first failure is raised: nothing of this task is
            # still being written once it has failed.
            first = batch[0].index
            futures = [io_pool().submit(fn, k, priority=first) for k in range(n)]
            wait(futures)
            for future in futures:
                future.result()
        else:
            for k in range(n):
                fn(k)

    def read(self, batch: tuple[Tile, ...]) -> torch.Tensor:
        task, image = self.task, self.image
        channels = task.normalization.channels(image.n_channels)
        x, view = self.predictor.batch_buffer((len(batch), channels, *task.grid.window))
        nonfinite = [0] * len(batch)  # per window: filled by parallel threads

        def fill(k: int) -> None:
            tile = batch[k]
            window = read_window(image, tile.window_start, tile.window_stop)
            nonfinite[k] = count_nonfinite(window[(slice(None), *_tile_in_window(tile))])
            task.normalization.apply(window, out=view[k])

        self._each(fill, batch)
        self.nonfinite += sum(nonfinite)
        return x

    def infer(self, batch: tuple[Tile, ...], x: torch.Tensor) -> Prediction:
        predictor = self.predictor
        try:
            return predictor.predict(
                x, label_dtype=self.label_dtype, probability_dtype=self.probability_dtype,
                labels_from=self.task.run.labels_from,
            )  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            # Not retried in smaller batches behind the user's back: the batch size is part of
            # the output's fingerprint (it can change the last bits of a float result).
            size, window = self.task.run.batch_size, "x".join(map(str, self.task.grid.window))
            raise TilesegError(
                "--batch-size",
                f"out of memory on {predictor.device} with batches of {size} windows of "
                f"{window} px: give a smaller --batch-size (or --tile) with --overwrite",
            ) from None

    def write(self, batch: tuple[Tile, ...], out: Prediction) -> None:
        def put(k: int) -> None:
            crop = batch[k].crop_region
            labels = out.labels[k][crop]
            p = out.probabilities
            probs = None if p is None else p[k][(slice(None), *crop)]
            _write_levels(self.task, batch[k].region, labels, probs)

        self._each(put, batch)


def _write_levels(
    task: BlockTask, region: tuple[slice, ...], labels: np.ndarray, probs: np.ndarray | None
) -> None:
    """Write a tile's output at level 0 and at the pyramid levels its task owns, so that the
    pyramid after the tasks only has the small levels left, not a second pass over level 0."""
    check_owner(task.output, task.run_id)
    for level in range(task.levels + 1):
        if level:
            labels, probs = next_level(labels, probs, layout=task.layout)
            region = half_region(region)
        with writing(task.output):
            write_region(task.arrays or task.output, region, labels, probs, level=level)
