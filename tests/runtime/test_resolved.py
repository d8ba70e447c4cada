"""The runtime of a run, resolved once from its options (``pipeline/runtime/resolved.py``)."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import SegmentOptions
from pipeline.errors import TilesegError
from pipeline.runtime.resolved import Runtime, resolve_runtime
from pipeline.runtime.worker import shared_cpu


def test_a_local_cpu_run_of_one_task(monkeypatch):
    monkeypatch.setattr("pipeline.runtime.resolved.usable_cores", lambda: 4)
    runtime = resolve_runtime(SegmentOptions(device="cpu"))
    assert runtime == Runtime(device="cpu", device_type="cpu", scheduler=None, workers=1, cores=4)
    assert runtime.local and runtime.local_cpu and runtime.serial
    assert runtime.tasks() == {"scheduler": None, "workers": 1}


@given(cores=st.integers(1, 64), workers=st.integers(2, 16))
def test_local_cpu_task_threads_split_the_cores(cores, workers):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pipeline.runtime.resolved.usable_cores", lambda: cores)
        runtime = resolve_runtime(SegmentOptions(device="cpu", workers=workers))
    assert runtime.cpu_threads == max(1, cores // workers)
    assert not runtime.serial


def test_a_distributed_run_is_not_local_and_leaves_threads_to_its_workers():
    options = SegmentOptions(device="cpu", scheduler="tcp://head:8786", workers=4)
    runtime = resolve_runtime(options)  # resolving never connects
    assert not runtime.local and not runtime.local_cpu and not runtime.serial
    assert runtime.cpu_threads is None
    assert runtime.tasks() == {"scheduler": "tcp://head:8786", "workers": 4}


def test_the_runtime_pickles_for_dask_workers():
    runtime = resolve_runtime(SegmentOptions(device="cpu", workers=3))
    assert pickle.loads(pickle.dumps(runtime)) == runtime


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_a_device_that_is_not_there_is_the_options_problem():
    with pytest.raises(TilesegError) as error:
        resolve_runtime(SegmentOptions(device="cuda"))
    assert error.value.path == "--device"


def test_shared_cpu_sets_the_threads_of_a_split_run_and_restores_them():
    before = torch.get_num_threads()
    split = Runtime(device="cpu", device_type="cpu", scheduler=None, workers=2, cores=2,
                    cpu_threads=1)  # fmt: skip
    with shared_cpu(split):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with shared_cpu(resolve_runtime(SegmentOptions(device="cpu"))):
        assert torch.get_num_threads() == before
