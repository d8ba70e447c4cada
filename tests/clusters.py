"""A real Dask scheduler's view of the tasks a run sends it."""

from __future__ import annotations

from distributed.diagnostics.plugin import SchedulerPlugin


class TaskRestrictions(SchedulerPlugin):
    """Records the worker resources each task asked for, by key, for keys naming ``kinds``
    (e.g. ``"run_block"``); add with ``cluster.scheduler.add_plugin``."""

    def __init__(self, scheduler, kinds: tuple[str, ...]) -> None:
        self.scheduler, self.kinds = scheduler, kinds
        self.seen: dict[str, dict] = {}

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        ts = self.scheduler.tasks.get(key)
        if ts is not None and any(kind in str(key) for kind in self.kinds):
            self.seen[str(key)] = dict(ts.resource_restrictions or {})
