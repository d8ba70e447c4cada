"""Where a run's seconds go: wall time per phase, for the record's ``timings`` and ``--profile``.

A run passes through fixed phases (open the image, load the model, choose the scale, check
object sizes, hash the input, decide the normalisation, create the output, warm the model up,
run the tasks, pyramid, overview, object steps, record). Each is timed as ``<phase>_wall`` in
the record's ``timings``; what no phase covers is ``other_wall``, so the phases add up to
``total_wall``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

__all__ = ["PHASES", "PhaseTimer", "profile_table"]

# In the order a run passes through them, with what each covers (the --profile table).
PHASES = {
    "open": "open the image",
    "model_load": "load the model file (cached per process)",
    "scale": "the scale segmented at (--mpp, --object-size)",
    "object_size": "object-size check (one small forward)",
    "fingerprint": "input identity and fingerprint",
    "normalization": "normalisation sample and percentiles",
    "tissue": "tissue mask",
    "output": "output skeleton: what is left after the normalisation, built beside it",
    "warmup": "model prepared for the run (cached per process)",
    "segment": "inference tasks: read, forward, write",
    "pyramid": "pyramid levels above the tasks' own (beside them: what is left after them)",
    "overview": "overview (beside the tasks on a GPU or cluster)",
    "objects": "instances, object table, export",
    "record": "provenance record written",
}


class PhaseTimer:
    """Accumulates wall seconds per phase name (a phase may be entered more than once)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (also when it raises)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def walls(self) -> dict[str, float]:
        """``<phase>_wall`` for every phase timed, ``other_wall`` and ``total_wall``."""
        total = time.perf_counter() - self.started
        walls = {f"{name}_wall": s for name, s in self.seconds.items()}
        walls["other_wall"] = max(0.0, total - sum(self.seconds.values()))
        walls["total_wall"] = total
        return walls


def profile_table(timings: Mapping[str, float]) -> str:
    """A run's phases as an aligned text table: seconds and share of the total.

    Parameters
    ----------
    timings
        A record's ``timings`` (``<phase>_wall`` entries, ``total_wall``).

    Returns
    -------
    str
        One line per phase that was timed, then ``other`` and ``total``.
    """
    total = float(timings.get("total_wall", 0.0)) or 1e-9
    names = [name for name in PHASES if f"{name}_wall" in timings]
    rows = [(name, PHASES[name], float(timings[f"{name}_wall"])) for name in names]
    rows.append(("other", "not in a phase", float(timings.get("other_wall", 0.0))))
    lines = [f"{'phase':<14}{'seconds':>9}{'share':>8}  what"]
    for name, what, seconds in rows:
        lines.append(f"{name:<14}{seconds:>9.3f}{seconds / total:>8.1%}  {what}")
    lines.append(f"{'total':<14}{total:>9.3f}{1:>8.1%}")
    return "\n".join(lines)
