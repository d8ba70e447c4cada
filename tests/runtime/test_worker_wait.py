"""Runs sent to a real Dask scheduler never wait forever for workers that cannot come."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from operator import neg

import dask
import pytest
from distributed import LocalCluster

from pipeline.errors import TilesegError
from pipeline.runtime.execution import run_tasks
from pipeline.runtime.worker_wait import CONFIG_KEY, NoWorkers, able_workers, worker_wait_s

GPU_TASK = {"GPU": 0.5}


@pytest.fixture(scope="module")
def cpu_cluster():
    """One in-process worker declaring no resources (what a CPU node's worker is)."""
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster:
        yield cluster


def test_tasks_asking_for_a_gpu_fail_within_the_wait_on_cpu_workers(cpu_cluster):
    with dask.config.set({CONFIG_KEY: 1.5}):
        start = time.monotonic()
        with pytest.raises(NoWorkers) as caught:
            run_tasks(neg, [1, 2], scheduler=cpu_cluster.scheduler_address, resources=GPU_TASK)
    assert time.monotonic() - start < 15
    message = str(caught.value)
    assert message.startswith(cpu_cluster.scheduler_address)
    assert "no Dask worker with resources GPU=0.5 within 1.5 s" in message
    assert "1 worker(s) connected, none declares any resource" in message
    assert "\n" not in message
    # the same workers run tasks that ask for nothing
    assert run_tasks(neg, [1, 2], scheduler=cpu_cluster.scheduler_address) == [-1, -2]


def test_a_scheduler_without_workers_fails_within_the_wait():
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        with dask.config.set({CONFIG_KEY: 1}), pytest.raises(NoWorkers, match="no Dask worker "
                                                             "connected within 1 s"):  # fmt: skip
            run_tasks(neg, [1], scheduler=cluster.scheduler_address)


def test_workers_lost_while_tasks_wait_end_the_run_within_the_wait(monkeypatch):
    """The only able worker leaves after the run started (a job's walltime): the run ends."""
    import pipeline.runtime.execution

    monkeypatch.setattr(pipeline.runtime.execution, "WATCH_S", 0.5)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1},
            dashboard_address=":0",
        ) as cluster,
        dask.config.set({CONFIG_KEY: 1}),
        ThreadPoolExecutor(1) as pool,
    ):  # fmt: skip
        run = pool.submit(
            run_tasks, time.sleep, [1.0] * 4, scheduler=cluster.scheduler_address,
            resources=GPU_TASK,
        )  # fmt: skip
        time.sleep(0.5)  # the first task runs
        cluster.scale(0)
        start = time.monotonic()
        with pytest.raises(NoWorkers, match="no Dask worker connected within 1 s"):
            run.result(timeout=30)
        assert time.monotonic() - start < 20


def test_able_workers_need_every_resource_asked_for():
    workers = {"a": {"resources": {"GPU": 1}}, "b": {"resources": {}}, "c": {}}
    assert able_workers(workers, {"GPU": 0.5}) == ["a"]
    assert able_workers(workers, {"GPU": 2}) == []
    assert able_workers(workers, None) == ["a", "b", "c"]


def test_the_wait_comes_from_dask_config():
    assert worker_wait_s() == 300
    with dask.config.set({CONFIG_KEY: "20"}):
        assert worker_wait_s() == 20
    with dask.config.set({CONFIG_KEY: "soon"}), pytest.raises(TilesegError, match="number"):
        worker_wait_s()
