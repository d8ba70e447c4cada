"""What a CPU forward gets on a Dask worker started elsewhere: its share of the cores
(``pipeline/runtime/cores.py``), and a word when it runs off the main heap
(``pipeline/runtime/heap.py``)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from imagefiles import write_tiff

from pipeline.cli.main import main
from pipeline.models import UNetConfig, save_unet, seeded_unet
from pipeline.output.ngff import read_record
from pipeline.runtime.cores import thread_share, usable_cores, use_worker_cores

cpusets = st.frozensets(st.integers(0, 15), min_size=1)


def test_a_worker_shares_its_cores_with_the_workers_on_them():
    job = frozenset(range(8))
    assert thread_share(job, [(job, 1)]) == 8
    assert thread_share(job, [(job, 2), (job, 2)]) == 2
    # another SLURM job's worker on the same node runs on cores of its own
    assert thread_share(job, [(job, 2), (frozenset(range(8, 16)), 4)]) == 4
    assert thread_share(frozenset({0}), [(frozenset({0}), 4)]) == 1  # never below one


@given(cores=cpusets, own=st.integers(1, 8), others=st.lists(st.tuples(cpusets, st.integers(1, 8))))
def test_the_threads_sharing_cores_never_take_more_than_them(cores, own, others):
    share = thread_share(cores, [(cores, own), *others])
    sharing = own + sum(n for other, n in others if other & cores)
    assert share >= 1
    assert share * sharing <= len(cores) or share == 1
    assert share == thread_share(cores, [(cores, own), *((o, n) for o, n in others if o & cores)])


def _forward_threads() -> int:
    return torch.get_num_threads()


def _threads_after_use() -> int:
    use_worker_cores()
    return torch.get_num_threads()


@pytest.fixture
def dask_cluster():
    """Worker processes as ``dask worker`` starts them: Dask's nanny defaults, none of
    tileseg's (flows/cluster.py sets those only for the clusters it starts)."""
    from distributed import Client, LocalCluster

    def start(**options):
        cluster = LocalCluster(
            threads_per_worker=1, processes=True, dashboard_address=None, **options
        )
        clusters.append(cluster)
        client = Client(cluster, set_as_default=False)
        clients.append(client)
        return cluster, client

    clusters, clients = [], []
    environ = dict(os.environ)
    yield start
    for client in clients:
        client.close()
    for cluster in clusters:
        cluster.close()
    # A nanny sets its workers' variables in this process too: later tests' children would
    # inherit them.
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture
def slide(tmp_path):
    model = tmp_path / "small.safetensors"
    save_unet(seeded_unet(UNetConfig(depth=2, width=4, padding="valid"), seed=0), model)
    image = tmp_path / "slide.ome.tif"
    write_tiff(image, np.arange(96 * 80, dtype=np.uint16).reshape(96, 80), axes="YX")
    return ["segment", str(image), str(tmp_path / "out.zarr"), "--model", str(model),
            "--tile", "64", "--chunk", "64", "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.mark.slow  # worker processes of a LocalCluster, each importing torch
@pytest.mark.skipif(usable_cores() < 2, reason="one core: its share is Dask's one thread")
def test_an_inference_task_on_a_default_dask_worker_uses_the_cores(tmp_path, slide, dask_cluster):
    cluster, client = dask_cluster(n_workers=1)
    assert client.submit(_forward_threads, pure=False).result() == 1  # Dask's default
    assert main([*slide, "--scheduler", cluster.scheduler_address]) == 0
    assert read_record(tmp_path / "out.zarr")["timings"]["cpu_forward_threads"] == usable_cores()
    # The worker's one task thread ran the inference tasks, and kept their thread count.
    assert client.submit(_forward_threads, pure=False).result() == usable_cores()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap (Linux only)")
@pytest.mark.parametrize("arenas", [None, "1"])
def test_a_run_says_when_its_forwards_ran_off_the_main_heap(
    tmp_path, slide, dask_cluster, capsys, arenas
):
    """A worker's task threads keep freed memory only when all threads share the main heap,
    which only the worker's environment at start-up can ask for."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    if arenas:
        environ["MALLOC_ARENA_MAX"] = arenas
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster, _ = dask_cluster(n_workers=1)
    assert main([*slide, "--scheduler", cluster.scheduler_address]) == 0
    tasks = read_record(tmp_path / "out.zarr")["timings"]["tasks_off_main_heap"]
    hinted = (
        "start the Dask workers (or tileseg) with MALLOC_ARENA_MAX=1" in capsys.readouterr().err
    )
    assert (tasks > 0, hinted) == ((True, True) if arenas is None else (False, False))


def test_a_local_run_forwards_on_the_main_heap(tmp_path, slide, capsys):
    assert main(slide) == 0
    timings = read_record(tmp_path / "out.zarr")["timings"]
    assert timings["tasks_off_main_heap"] == 0 and "hint" not in capsys.readouterr().err
    assert timings["cpu_forward_threads"] == torch.get_num_threads()


@pytest.mark.slow
@pytest.mark.skipif(usable_cores() < 2, reason="one core: its share is Dask's one thread")
def test_workers_on_one_host_split_its_cores(dask_cluster):
    # On two cores each gets one, as Dask's default: a worker that missed its sibling takes two.
    _, client = dask_cluster(n_workers=2)
    client.wait_for_workers(2, timeout=60)
    seen = [client.submit(_threads_after_use, workers=[w], pure=False).result()
            for w in client.nthreads()]  # fmt: skip
    assert seen == [usable_cores() // 2] * 2


@pytest.mark.slow
def test_a_worker_started_with_its_own_thread_count_keeps_it(dask_cluster):
    asked = usable_cores() + 1  # not its share; and Dask's MKL_NUM_THREADS=1 would win in torch
    _, client = dask_cluster(n_workers=1, env={"OMP_NUM_THREADS": str(asked)})
    assert client.submit(_threads_after_use, pure=False).result() == asked


def test_outside_a_dask_worker_nothing_changes():
    before = torch.get_num_threads()
    use_worker_cores()
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap (Linux only)")
def test_the_heap_is_judged_by_the_environment_the_process_started_with(monkeypatch):
    """Dask's nanny sets its workers' variables in its own process too: too late for glibc."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.runtime.heap import _startup_environ, keep_freed_memory, off_main_heap

    if _startup_environ().get("MALLOC_ARENA_MAX") == "1" or not keep_freed_memory():
        pytest.skip("this process started on the main heap, or keeps no freed memory")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(off_main_heap).result()
    assert not off_main_heap()  # the main thread's allocations are the main heap's
