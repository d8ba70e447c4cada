"""Steps a resumed run does not redo: each part of a step is named by its completion marker
(``pipeline/output/provenance.py``), written after the part's data, and skipped when present.

Two shapes share the markers. Steps split into tasks that each own chunks of the output (the
pyramid levels above the inference tasks', the overview) run their pending parts with
:func:`run_resumable`. Steps done whole in the calling process (instance labels, the object
table, the export) run with :func:`run_once`, which keeps their summary in the marker. The
inference tasks mark themselves done at the end of their stream of batches
(``pipeline/engine/tasks.py``); :func:`pending` picks the ones still to run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dask.utils import funcname

from pipeline.engine.tasks import writing
from pipeline.output.lock import check_owner
from pipeline.output.provenance import done_summary, is_done, mark_done
from pipeline.runtime.execution import run_tasks
from pipeline.runtime.resolved import Runtime

__all__ = ["pending", "run_once", "run_part", "run_resumable"]


def pending(output: str, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The names of ``output``'s parts still to do, and of those done, each in the given order."""
    todo, done = [], []
    for name in names:
        (done if is_done(output, name) else todo).append(name)
    return todo, done


@dataclass(frozen=True)
class _Part:
    """One part of a step, as a task: picklable when ``work`` is a module-level function."""

    work: Callable[..., Any]
    args: tuple[Any, ...]
    output: str
    name: str
    run_id: str


def _run_part(part: _Part) -> dict[str, int]:
    check_owner(part.output, part.run_id)  # a run taken over writes nothing more
    with writing(part.output):
        part.work(*part.args)
        mark_done(part.output, part.name)
    return {"tiles": 0}


def run_part(
    work: Callable[..., Any], args: tuple[Any, ...], *, output: str, name: str, run_id: str
) -> None:
    """Run one part of a step in this thread, ``work(*args)``, and mark it done once written
    (as :func:`run_resumable` runs each of its parts)."""
    _run_part(_Part(work, tuple(args), output, name, run_id))


def run_resumable(
    work: Callable[..., Any],
    parts: Sequence[tuple[str, tuple[Any, ...]]],
    *,
    output: str,
    run_id: str,
    runtime: Runtime,
    name: str | None = None,
) -> None:
    """Run ``work(*args)`` for each ``(name, args)`` of ``parts`` not yet marked done in
    ``output``, as tasks where ``runtime`` says, each marking its part done once written.

    Parameters
    ----------
    work
        Writes one part (chunks no other part writes); a module-level function, so that the
        tasks pickle for a distributed scheduler.
    parts
        Each part's marker name and the arguments ``work`` is given.
    output
        The output the markers belong to.
    run_id
        The run that holds the output: a task of a run that was taken over raises instead of
        writing (an empty id checks nothing).
    runtime
        Where the tasks run.
    name
        The tasks' key prefix (default: the name of ``work``), so that a cluster's views and
        plugins tell the steps apart.
    """
    todo = [
        _Part(work, tuple(args), output, name, run_id)
        for name, args in parts
        if not is_done(output, name)
    ]
    run_tasks(_run_part, todo, name=name or funcname(work), **runtime.tasks())


def run_once(output: str, name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """A step done whole in this process: the summary it kept in its marker when a run before
    this one finished it, else ``work()``'s, kept in the marker written once it returns."""
    if is_done(output, name):
        return done_summary(output, name)
    with writing(output):
        summary = work()
        mark_done(output, name, summary)
    return summary
