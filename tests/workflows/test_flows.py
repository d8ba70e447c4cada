"""Prefect orchestration (flows/): directory runs, skipping, failure isolation, configs, files.

Prefect runs against its test harness (a temporary local server and SQLite database): no
Prefect server, account or network is needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# Prefect reads its settings when imported: keep it off any user profile, server or telemetry.
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tileseg-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"  # no log shipping after the server stops
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# A task held back by a tag concurrency limit asks again after at most this (default 10 s).
os.environ["PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS"] = "0.5"

import numpy as np
import pytest
import yaml
from imagefiles import write_tiff

from flows.cluster import _task_resources, load_cluster_config
from flows.core import load_directory_config, plan_directory, run_batch, summary_lines
from pipeline.cli.main import main
from pipeline.errors import TilesegError
from pipeline.models import UNetConfig
from pipeline.output.ngff import read_record
from pipeline.runtime.cores import usable_cores
from pipeline.runtime.heap import off_main_heap

ROOT = Path(__file__).resolve().parents[2]
SMALL = UNetConfig(depth=2, width=4, padding="valid", classes=2)
GPU = {"GPU": 1}
GPU_TASK = {"GPU": 0.5}  # two tasks per GPU, sharing its model
# A SLURMCluster's scheduler takes port 8787 by default, often taken on a shared machine
NO_DASHBOARD = {"dashboard_address": ":0"}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def slides(tmp_path) -> Path:
    """Two small slides and one truncated TIFF (its tiles cut off half way)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a.ome.tif", (200, 180)), ("b.tif", (150, 230))):
        image = (rng.random(shape) * 4000).astype(np.uint16)
        write_tiff(folder / name, image, axes="YX", tile=(64, 64), compression="zlib")
    broken = write_tiff(
        folder / "broken.tif", (rng.random((200, 200)) * 4000).astype(np.uint16), axes="YX",
        tile=(64, 64), compression="zlib",
    )  # fmt: skip
    os.truncate(broken, broken.stat().st_size // 2)
    (folder / "notes.txt").write_text("not a slide")
    return folder


def write_config(path: Path, model: str, *, run: dict | None = None, **segment) -> Path:
    config = {
        "segment": {"model": str(model), "tile": 64, "chunk": 64, "device": "cpu", **segment},
        "run": {"retries": 1, "retry_delay_seconds": 0, "max_concurrent_slides": 2, **(run or {})},
        "cluster": {"type": "none"},  # embedded threads: no cluster start-up in the tests
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def model_config():
    return SMALL


@pytest.fixture
def config(tmp_path, model) -> Path:
    return write_config(tmp_path / "directory.yaml", model)


def no_inference(monkeypatch) -> list[str]:
    """Make any inference fail loudly, and record attempts."""
    calls: list[str] = []

    def refuse(tasks, **_):
        calls.extend(task.name for task in ([tasks] if hasattr(tasks, "name") else tasks))
        raise AssertionError("inference ran for a slide that was already complete")

    monkeypatch.setattr("pipeline.engine.driver.run_block", refuse)
    monkeypatch.setattr("pipeline.engine.driver.run_blocks", refuse)
    return calls


def table(key: str) -> list[dict[str, str]]:
    """The latest table artifact with this key (a closed client: Artifact.get leaks one)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            limit=1,
            sort=ArtifactSort.UPDATED_DESC,
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
        )
    return json.loads(artifact.data)


def artifacts(flow_run_id, kind: str) -> list:
    """The artifacts of one type (table, markdown, image, progress) of a flow run and its tasks."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                type=ArtifactFilterType(any_=[kind]),
            )
        )


def progress_artifact(task_run_id):
    """The progress artifact of one task run, as the API holds it now."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterTaskRunId,
        ArtifactFilterType,
    )

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                task_run_id=ArtifactFilterTaskRunId(any_=[task_run_id]),
                type=ArtifactFilterType(any_=["progress"]),
            )
        )
    return artifact


class InFlight:
    """Wraps the library call each slide task makes (``segment_image``): how many slides are
    being segmented at once, at most."""

    def __init__(self, monkeypatch, *, hold_s: float = 0.0) -> None:
        import pipeline.engine.driver

        self._real = pipeline.engine.driver.segment_image
        self._lock = threading.Lock()
        self._hold = hold_s
        self.now = self.most = 0
        self.slides: list[str] = []
        monkeypatch.setattr(pipeline.engine.driver, "segment_image", self)

    def __call__(self, input_path, output_path, options, **kwargs):
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.slides.append(Path(input_path).name)
        try:
            time.sleep(self._hold)  # long enough for slides that are not held back to overlap
            return self._real(input_path, output_path, options, **kwargs)
        finally:
            with self._lock:
                self.now -= 1


def test_pipeline_never_imports_prefect():
    code = (
        "import sys, pipeline, pipeline.cli.main, pipeline.engine.driver, pipeline.config, "
        "pipeline.output.qc, "
        "pipeline.runtime.execution, pipeline.output.provenance, pipeline.io.readers\n"
        "pipeline.cli.main.build_parser()  # loads the flows CLI plugin too\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # the first test to use it starts the Prefect test server
def test_directory_flow_isolates_failures_skips_done_slides_and_redoes_changed_config(
    harness, slides, model, config, tmp_path, monkeypatch
):
    from flows.segment_flows import SlidesFailed, segment_directory

    out = tmp_path / "results"
    args = {"input_dir": str(slides), "output_dir": str(out), "config": str(config)}

    state = segment_directory(**args, return_state=True)
    assert state.is_failed()  # the run reports the broken slide ...
    with pytest.raises(SlidesFailed, match=r"1 of 3 slide\(s\) failed: broken.tif"):
        state.result()
    for stem, shape in (("a", [200, 180]), ("b", [150, 230])):  # ... after the others finished
        record = read_record(out / f"{stem}.zarr")
        assert record["status"] == "complete" and record["spatial_shape"] == shape
        assert (out / "qc" / f"{stem}.png").stat().st_size > 0
    assert (read_record(out / "broken.zarr") or {}).get("status") != "complete"
    rows = {row["slide"]: row for row in table("tileseg-results")}
    assert set(rows) == {"a.ome.tif", "b.tif", "broken.tif"}
    assert rows["a.ome.tif"]["status"] == "done" and rows["a.ome.tif"]["size"] == "200x180"
    assert rows["b.tif"]["throughput (MP/s)"] != "" and rows["b.tif"]["time (s)"] != ""
    assert rows["broken.tif"]["status"].startswith("failed: ")
    assert "truncated TIFF file" in rows["broken.tif"]["status"]  # the library's one-line error
    [summary] = summaries(out)  # also on disk, written as the slides finished
    assert summary["status"] == "complete"
    statuses = {r["slide"]: r["status"] for r in summary["slides"]}
    assert statuses == {"a.ome.tif": "done", "b.tif": "done", "broken.tif": "failed"}

    # Second run: both done slides are skipped without any inference.
    calls = no_inference(monkeypatch)
    state = segment_directory(**args, return_state=True)
    assert state.is_failed() and calls == []
    rows = {row["slide"]: row for row in table("tileseg-results")}
    assert [rows[s]["status"] for s in ("a.ome.tif", "b.tif")] == ["skipped", "skipped"]

    # A changed config (another tile size changes the fingerprint; how the work runs, e.g.
    # the batch size, does not) reprocesses both.
    monkeypatch.undo()
    before = read_record(out / "a.zarr")["fingerprint"]
    write_config(config, model, tile=128)
    segment_directory(**args, patterns=["*.tif"], return_state=True)
    rows = {row["slide"]: row for row in table("tileseg-results")}
    assert [rows[s]["status"] for s in ("a.ome.tif", "b.tif")] == ["done", "done"]
    after = read_record(out / "a.zarr")
    assert after["fingerprint"] != before and after["config"]["tile"] == 128


def tiny_slides(folder: Path, names: dict[str, tuple[int, int]], *, tissue: bool = False) -> Path:
    """Small TIFF slides; with ``tissue``, bright tissue over the left ~60% and dark glass."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, shape in names.items():
        image = rng.random(shape) * 200
        if tissue:
            image[:, : shape[1] * 3 // 5] += 2000 + rng.random((shape[0], shape[1] * 3 // 5)) * 2000
        write_tiff(folder / name, image.astype(np.uint16), axes="YX", tile=(64, 64))
    return folder


@contextmanager
def tag_limit(slots: int | None):
    """A Prefect tag concurrency limit on the slide task's tag, as ``prefect concurrency-limit
    create tileseg-slide N`` makes it (none for ``None``)."""
    from prefect.client.orchestration import get_client

    from flows.segment_flows import SLIDE_TAG

    if slots is None:
        yield
        return
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=SLIDE_TAG, concurrency_limit=slots)
    # Task runs of this process remember for a while (5 s in Prefect 3.9) that their tags had
    # no limit (an earlier test's slides): forget it, as a process started after the limit
    # was made would. The cache is private: where a Prefect release lacks it, wait it out.
    from prefect.concurrency import services

    cache = getattr(services, "_no_limits_cache", None)
    if cache is not None and hasattr(cache, "clear"):
        cache.clear()
    else:
        time.sleep(6.0)
    try:
        yield
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag(SLIDE_TAG)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("max_slides", "tag_slots", "at_most"),
    [
        pytest.param(1, None, 1, id="run-max-concurrent-slides"),
        pytest.param(3, 1, 1, id="tileseg-slide-tag-limit"),
        pytest.param(3, None, None, id="unlimited"),  # the control: the counter sees overlaps
    ],
)
def test_directory_flow_limits_the_slides_in_flight(
    harness, model, tmp_path, monkeypatch, max_slides, tag_slots, at_most
):
    from flows.segment_flows import segment_directory

    names = ("s1.tif", "s2.tif", "s3.tif")
    folder = tiny_slides(tmp_path / "slides", dict.fromkeys(names, (128, 128)))
    config = write_config(tmp_path / "c.yaml", model, run={"max_concurrent_slides": max_slides})
    seen = InFlight(monkeypatch, hold_s=0.5)
    with tag_limit(tag_slots):
        rows = segment_directory(str(folder), str(tmp_path / "out"), config=str(config))
    assert [row["status"] for row in rows] == ["done"] * 3
    assert sorted(seen.slides) == list(names) and seen.now == 0
    if at_most is None:
        assert seen.most >= 2
    else:
        assert seen.most == at_most


@pytest.mark.slow
def test_directory_flow_publishes_table_qc_and_progress_artifacts(
    harness, model, tmp_path, monkeypatch
):
    """The run's table (tissue fraction and objects filled when masking and instances are on),
    the QC links and images, and one progress artifact per slide that moves while it runs."""
    from prefect.context import TaskRunContext

    import pipeline.engine.driver
    from flows.segment_flows import segment_directory

    names = {"left.tif": (128, 128), "wide.tif": (128, 192)}
    folder = tiny_slides(tmp_path / "slides", names, tissue=True)
    config = write_config(
        tmp_path / "c.yaml", model, tissue="otsu", instances="connected", batch_size=1,
        batches_per_task=1,  # one task per tile: progress is reported between tiles
    )  # fmt: skip
    real = pipeline.engine.driver.segment_image
    shown: dict[str, list[tuple[float, float]]] = {}

    def watched(input_path, output_path, options, *, progress=None):
        task_run_id = TaskRunContext.get().task_run.id
        calls = shown.setdefault(Path(input_path).name, [])

        def report(done: int, total: int) -> None:
            progress(done, total)
            calls.append((100 * done / total, progress_artifact(task_run_id).data))

        return real(input_path, output_path, options, progress=report)

    monkeypatch.setattr(pipeline.engine.driver, "segment_image", watched)
    out = tmp_path / "QC run"
    base = "http://qc.example/runs/qc-run/"
    state = segment_directory(
        str(folder), str(out), config=str(config), qc_base_url=base, return_state=True
    )
    assert state.is_completed()
    run_id = state.state_details.flow_run_id

    [summary] = artifacts(run_id, "table")
    assert summary.key == "tileseg-qc-run"
    rows = {row["slide"]: row for row in json.loads(summary.data)}
    assert set(rows) == set(names)
    columns = ["slide", "size", "tissue fraction", "time (s)", "throughput (MP/s)", "objects"]
    for name, (h, w) in names.items():
        row, output = rows[name], out / name.replace(".tif", ".zarr")
        record = read_record(output)
        assert list(row) == [*columns, "status", "output"]
        assert row["status"] == "done" and row["output"] == str(output)
        assert row["size"] == f"{h}x{w}" and float(row["time (s)"]) > 0
        assert float(row["throughput (MP/s)"]) > 0
        fraction = record["tissue"]["fraction"]
        assert 0.3 < fraction < 0.9  # glass was found: masking was on
        assert row["tissue fraction"] == f"{fraction:.3f}"
        assert row["objects"] == str(record["instances"]["objects"])

    [links] = artifacts(run_id, "markdown")
    assert links.key == "tileseg-qc-run-qc"
    for name in names:
        png = out / "qc" / name.replace(".tif", ".png")
        assert png.stat().st_size > 0
        assert f"| {name} | [{png.name}]({png.as_uri()}) |" in links.data
    images = sorted(a.data for a in artifacts(run_id, "image"))
    assert images == [f"{base}qc/{name.replace('.tif', '.png')}" for name in sorted(names)]

    progress = artifacts(run_id, "progress")
    assert sorted(a.description for a in progress) == [f"segmenting {n}" for n in sorted(names)]
    assert all(a.task_run_id is not None and a.data == 100 for a in progress)
    for name in names:  # while the slide ran, its first report was in the API at once
        [(percent, artifact), *_] = shown[name]
        assert 0 < percent < 100 and artifact == pytest.approx(percent)


def test_batch_command_needs_no_prefect_server(slides, config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "batch"
    argv = ["batch", str(slides), str(out), "--config", str(config), "--no-progress"]
    assert main(argv) == 2  # one slide failed: the others are written
    printed = capsys.readouterr().out
    assert "FAILED  broken.tif: " in printed and "3 slide(s): 2 done, 0 skipped" in printed
    assert read_record(out / "b.zarr")["status"] == "complete"

    calls = no_inference(monkeypatch)
    assert main([*argv, "--pattern", "*.ome.tif", "--pattern", "b.*"]) == 0
    printed = capsys.readouterr().out
    assert "2 slide(s): 0 done, 2 skipped" in printed and calls == []


def test_batch_on_a_cluster_asks_each_task_for_a_gpu(slides, config, tmp_path):
    """Inference tasks sent to GPU workers ask for the GPU resource; pyramid tasks do not."""
    from clusters import TaskRestrictions
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, resources=GPU,
        dashboard_address=":0",
    ) as cluster:  # fmt: skip
        plugin = TaskRestrictions(cluster.scheduler, ("run_block", "pyramid"))
        cluster.scheduler.add_plugin(plugin)
        cluster_file = tmp_path / "cluster.yaml"
        spec = {"type": "address", "address": cluster.scheduler_address, "task_resources": GPU}
        cluster_file.write_text(yaml.safe_dump(spec))
        plan = plan_directory(
            slides, tmp_path / "out", config=config, patterns=["a.*"], cluster_config=cluster_file
        )
        [report] = run_batch(plan)
    assert report.status == "done"
    infer = {k: r for k, r in plugin.seen.items() if "run_block" in k}
    pyramid = {k: r for k, r in plugin.seen.items() if "pyramid" in k}
    assert infer and all(r == GPU for r in infer.values())
    assert pyramid and not any(pyramid.values())  # downsampling needs no GPU
    if sys.platform.startswith("linux"):  # CPU forwards in a worker thread of this process
        assert report.tasks_off_main_heap > 0
        assert "MALLOC_ARENA_MAX=1" in list(summary_lines([report]))[-1]


def test_example_configs_are_valid():
    directory = load_directory_config(ROOT / "configs" / "directory.yaml")
    assert directory.run.patterns and directory.cluster["type"] in ("local", "slurm", "address")

    spec = load_cluster_config(ROOT / "configs" / "slurm-gpu.yaml")
    assert spec["type"] == "slurm" and _task_resources(spec) == GPU_TASK
    from dask_jobqueue import SLURMCluster

    from flows.cluster import slurm_arguments

    # Builds the job script only: no job is submitted (scale is never called).
    with SLURMCluster(**slurm_arguments(spec), scheduler_options=dict(NO_DASHBOARD)) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script
    # the prologue's environment chooses the Python; workers leave before the 12 h walltime
    assert "\npython -m distributed.cli.dask_worker " in script and sys.executable not in script
    assert "--lifetime 42660s --lifetime-stagger 240s" in script
    assert spec["adapt"]["minimum_jobs"] >= 1  # workers that leave are replaced
    assert "MALLOC_ARENA_MAX" not in script  # a GPU's forward needs no heap of its own


def test_slurm_cpu_workers_start_on_the_main_heap():
    from dask_jobqueue import SLURMCluster

    from flows.cluster import slurm_arguments

    prologue = ["source ~/tileseg/.venv/bin/activate"]
    slurm = {"cores": 8, "memory": "32GB", "job_script_prologue": prologue}
    spec = {"type": "slurm", "slurm": slurm}
    with SLURMCluster(**slurm_arguments(spec), scheduler_options=dict(NO_DASHBOARD)) as cluster:
        script = cluster.job_script()
    # exported before the worker command starts the nanny, whose worker inherits it
    lines = script.splitlines()
    worker = next(i for i, line in enumerate(lines) if "distributed.cli.dask_worker" in line)
    assert lines.index("export MALLOC_ARENA_MAX=1") < lines.index(prologue[0]) < worker
    assert spec["slurm"]["job_script_prologue"] == prologue  # the user's config is left as is
    ours = {"slurm": {"cores": 8, "memory": "32GB",
                      "job_script_prologue": ["export MALLOC_ARENA_MAX=2"]}}  # fmt: skip
    assert slurm_arguments(ours)["job_script_prologue"] == ["export MALLOC_ARENA_MAX=2"]


def test_config_mistakes_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("segment: {tile: 64}\nrun: {retrys: 3}\n")
    with pytest.raises(TilesegError, match=r"run: unknown key\(s\) \['retrys'\]"):
        load_directory_config(bad)
    bad.write_text("cluster: {type: kubernetes}\n")
    with pytest.raises(TilesegError, match="cluster type must be one of"):
        plan_directory(tmp_path, tmp_path / "out", config=bad)
    bad.write_text("segment: {tile: 64}\nnightly: true\n")
    with pytest.raises(TilesegError, match="unknown section"):
        load_directory_config(bad)


def test_serve_refuses_to_run_without_a_server(tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "prefect server start" in capsys.readouterr().err


def test_serve_creates_a_cron_deployment(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.segment_flows import segment_directory

    seen = {}
    monkeypatch.setattr(segment_directory, "serve", lambda **kw: seen.update(kw))
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        argv = ["serve", "in", "out", "--cron", "30 1 * * *", "--timezone", "Europe/Berlin"]
        assert main([*argv, "--pattern", "*.svs"]) == 0
    [schedule] = seen["schedules"]
    assert schedule.cron == "30 1 * * *" and schedule.timezone == "Europe/Berlin"
    assert seen["parameters"]["input_dir"] == str(Path("in").absolute())
    assert seen["parameters"]["patterns"] == ["*.svs"] and seen["limit"] == 1


def test_prefect_yaml_declares_a_nightly_deployment_of_the_flow():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule

    data = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(data)
    [deployment] = [d for d in model.deployments if d.name == "nightly"]
    path, name = deployment.entrypoint.split(":")
    assert (ROOT / path).is_file() and name == "segment_directory"
    [schedule] = [
        _schedule_config_to_deployment_schedule(s.model_dump(exclude_unset=True))
        for s in deployment.schedules
    ]
    assert schedule["schedule"].cron.count(" ") == 4
    assert set(deployment.parameters) >= {"input_dir", "output_dir", "config"}


def test_compose_file_has_server_scheduler_and_gpu_worker():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"prefect-server", "dask-scheduler", "gpu-worker"} <= set(services)
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    command = " ".join(services["gpu-worker"]["command"])
    assert "--resources GPU=1" in command and "dask-scheduler:8786" in command
    flows = services["flows"]["command"]
    cluster = load_cluster_config(ROOT / flows[flows.index("--cluster-config") + 1])
    assert cluster["task_resources"] == GPU_TASK
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "cuda" in dockerfile.lower() and ".[flows]" in dockerfile


def test_transient_errors_are_retried_and_bad_slides_are_not(tmp_path, monkeypatch):
    from prefect.states import Failed

    from flows import core
    from flows.segment_flows import _retry_transient

    assert _retry_transient(None, None, Failed(data=OSError("worker lost")))
    assert not _retry_transient(None, None, Failed(data=TilesegError("x.tif", "corrupt")))

    outcomes = [ConnectionError("worker lost"), core.SlideReport("a.tif", "a.zarr", "done")]
    attempts = []

    def flaky(job, options, **kwargs):
        attempts.append(job.name)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(core, "process_slide", flaky)
    settings = core.RunSettings(retries=2, retry_delay_seconds=0)
    job = core.SlideJob(tmp_path / "a.tif", tmp_path / "a.zarr")
    report = core.run_with_retries(job, core.SegmentOptions(), settings, sleep=lambda s: None)
    assert report.status == "done" and attempts == ["a.tif", "a.tif"]

    outcomes[:] = [TilesegError("a.tif", "not a readable TIFF file")]
    report = core.run_with_retries(job, core.SegmentOptions(), settings, sleep=lambda s: None)
    assert report.status == "failed" and report.error == "not a readable TIFF file"
    assert len(attempts) == 3  # a bad slide is not retried


def test_local_gpu_cluster_gives_each_worker_its_own_gpu(monkeypatch):
    """One worker process per GPU, seeing only its GPU, declaring GPU=1 with two task threads
    (no GPU needed here: nothing touches CUDA)."""
    from distributed import Client

    from flows.cluster import open_cluster

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # e.g. what SLURM gave this job
    with open_cluster({"type": "local", "gpus": 2}) as handle:
        assert handle.task_resources == GPU_TASK
        with Client(handle.address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info()["workers"].values()
            # os.getenv pickles by reference (os.environ.get would carry our environ along)
            seen = client.run(os.getenv, "CUDA_VISIBLE_DEVICES")
    assert all(w["resources"] == GPU and w["nthreads"] == 2 for w in workers)
    assert sorted(seen.values()) == ["3", "5"]


def test_local_cpu_cluster_workers_get_the_cores_and_the_main_heap():
    """Dask's nanny starts workers with one OpenMP thread and glibc's arenas per thread; a CPU
    forward wants its share of the cores and the main heap (pipeline/runtime/heap.py)."""
    from distributed import Client

    from flows.cluster import THREAD_VARIABLES, open_cluster

    with open_cluster({"type": "local", "n_workers": 2}) as handle:
        assert handle.task_resources is None
        with Client(handle.address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            # os.getenv pickles by reference (os.environ.get would carry our environ along)
            arenas = client.run(os.getenv, "MALLOC_ARENA_MAX")
            threads = {name: client.run(os.getenv, name) for name in THREAD_VARIABLES}
            # in a task thread, as an inference task runs: no hint about the heap
            off = [client.submit(off_main_heap, workers=[w], pure=False).result()
                   for w in client.nthreads()]  # fmt: skip
    assert list(arenas.values()) == ["1", "1"]
    assert off == [False, False]
    share = str(max(1, usable_cores() // 2))
    assert all(list(seen.values()) == [share, share] for seen in threads.values())


@pytest.mark.skipif(usable_cores() < 2, reason="one core: every worker count gets one thread")
def test_a_second_local_cluster_in_one_process_gets_its_own_worker_environment(monkeypatch):
    """Dask's nanny writes its workers' variables into this process's environment before it
    spawns them, and a later nanny prefers those to its config: the second run of a
    long-lived process (``tileseg serve``) would start its workers with the first's share."""
    from distributed import Client

    from flows.cluster import THREAD_VARIABLES, open_cluster

    names = ("MALLOC_ARENA_MAX", *THREAD_VARIABLES)
    for name in names:  # a nanny prefers the parent's own to its config: none set here
        monkeypatch.delenv(name, raising=False)
    before = {name: os.environ.get(name) for name in names}
    with open_cluster({"type": "local", "n_workers": 2}):
        during = {name: os.environ.get(name) for name in names}
    after = {name: os.environ.get(name) for name in names}
    with open_cluster({"type": "local", "n_workers": 1}) as handle:
        with Client(handle.address, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=60)
            threads = client.run(os.getenv, "OMP_NUM_THREADS")
    assert during == before and after == before
    assert list(threads.values()) == [str(usable_cores())]


# ------------------------------------------------------------------- never hang, never redo


@pytest.fixture(scope="module")
def cpu_scheduler():
    """A real scheduler whose one worker declares no GPU (in-process: starts in a second)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster:
        yield cluster.scheduler_address


def gpu_cluster_config(path: Path, address: str) -> Path:
    path.write_text(yaml.safe_dump({"type": "address", "address": address,
                                    "task_resources": GPU_TASK}))  # fmt: skip
    return path


def test_batch_without_gpu_workers_fails_within_the_wait(
    slides, model, tmp_path, capsys, cpu_scheduler
):
    config = write_config(tmp_path / "wait.yaml", model, run={"worker_wait_seconds": 1})
    cluster = gpu_cluster_config(tmp_path / "gpu.yaml", cpu_scheduler)
    argv = ["batch", str(slides), str(tmp_path / "out"), "--config", str(config),
            "--cluster-config", str(cluster), "--no-progress"]  # fmt: skip
    start = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - start < 30
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"tileseg: error: {cpu_scheduler}: no Dask worker with resources ")
    assert "GPU=0.5 within 1 s: 1 worker(s) connected, none declares any resource" in line
    assert not (tmp_path / "out" / "a.zarr").exists()  # checked before any slide started


def test_an_unreachable_scheduler_is_one_check_not_one_per_slide(
    slides, config, tmp_path, capsys, monkeypatch
):
    import dask
    import distributed

    connects = []

    class Counting(distributed.Client):
        def __init__(self, address, *args, **kwargs):
            connects.append(address)
            super().__init__(address, *args, **kwargs)

    monkeypatch.setattr(distributed, "Client", Counting)
    argv = [
        "batch",
        str(slides),
        str(tmp_path / "out"),
        "--config",
        str(config),
        "--scheduler",
        "tcp://127.0.0.1:9",
    ]  # fmt: skip (port 9: discard, nobody listens)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(argv) == 2
    assert connects == ["tcp://127.0.0.1:9"]  # three slides, one attempt
    err = capsys.readouterr().err
    assert "tileseg: error: tcp://127.0.0.1:9: cannot connect to the Dask scheduler" in err


def test_slurm_without_sbatch_is_one_line(monkeypatch):
    from flows.cluster import open_cluster

    monkeypatch.setenv("PATH", "")
    with pytest.raises(TilesegError, match="sbatch not found on PATH"):
        with open_cluster({"type": "slurm", "slurm": {"cores": 1, "memory": "1GB"}}):
            pass


def test_flow_fails_instead_of_hanging_and_the_next_run_is_not_blocked(
    harness, slides, model, tmp_path
):
    from distributed import LocalCluster

    from flows.segment_flows import segment_directory

    config = write_config(tmp_path / "wait.yaml", model, run={"worker_wait_seconds": 1})
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        args = {"input_dir": str(slides), "output_dir": str(tmp_path / "out"),
                "config": str(config), "scheduler": empty.scheduler_address}  # fmt: skip
        for _ in range(2):  # a scheduled run after a failed one starts and ends the same way
            start = time.monotonic()
            state = segment_directory(**args, return_state=True)
            assert state.is_failed() and time.monotonic() - start < 60
            with pytest.raises(TilesegError, match="no Dask worker connected within 1 s"):
                state.result()
    runs = summaries(tmp_path / "out")
    assert len(runs) == 2 and all(r["status"] == "failed" for r in runs)
    assert "no Dask worker connected" in runs[-1]["error"]
    assert {r["status"] for r in runs[-1]["slides"]} == {"pending"}


def test_serve_takes_the_flow_timeout_from_the_config(tmp_path, monkeypatch):
    from prefect import Flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    seen = {}
    monkeypatch.setattr(Flow, "serve", lambda self, **kw: seen.update(timeout=self.timeout_seconds))
    config = tmp_path / "c.yaml"
    config.write_text("run: {flow_timeout_seconds: 3600, slide_timeout_seconds: 600}\n")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert main(["serve", "in", "out", "--config", str(config)]) == 0
    assert seen["timeout"] == 3600


def test_the_flow_timeout_from_the_config_bounds_any_run_of_the_flow(
    harness, model, tmp_path, monkeypatch
):
    """A ``prefect.yaml`` deployment passes only parameters: the flow itself takes
    ``run.flow_timeout_seconds`` from its config, fails at it, and starts no slide after it."""
    from flows.segment_flows import RunTimedOut, segment_directory

    folder = tiny_slides(tmp_path / "slides", {"s1.tif": (96, 96), "s2.tif": (96, 96)})
    # time enough for the first slide to start on a loaded machine, which it then outlasts
    run = {"max_concurrent_slides": 1, "flow_timeout_seconds": 3, "qc": False}
    config = write_config(tmp_path / "c.yaml", model, run=run)
    seen = InFlight(monkeypatch, hold_s=6.0)
    state = segment_directory(str(folder), str(tmp_path / "out"), config=str(config),
                              return_state=True)  # fmt: skip
    assert state.is_failed()
    with pytest.raises(RunTimedOut, match=r"flow_timeout_seconds \(3 s\) passed with 2 of 2"):
        state.result()
    assert seen.slides == ["s1.tif"]  # s2 never started
    [summary] = summaries(tmp_path / "out")
    assert summary["status"] == "failed" and "flow_timeout_seconds" in summary["error"]
    assert [r["status"] for r in summary["slides"]][1] == "pending"


def summaries(output: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((output / "runs").glob("*.json"))]


@pytest.mark.slow
def test_sigterm_mid_batch_leaves_a_summary_and_the_next_run_resumes(model, tmp_path, capsys):
    """SLURM's walltime and scancel send SIGTERM: the run ends cleanly, non-zero, with a
    summary of done, failed and pending slides; the same command then finishes the rest."""
    folder = tiny_slides(tmp_path / "slides", {f"s{i}.tif": (384, 384) for i in range(1, 6)})
    broken = write_tiff(folder / "s0-broken.tif", np.zeros((200, 200), np.uint16), axes="YX",
                        tile=(64, 64), compression="zlib")  # fmt: skip
    os.truncate(broken, broken.stat().st_size // 2)
    config = write_config(tmp_path / "c.yaml", model, batch_size=1, run={"qc": False,
                                                                         "retries": 0})  # fmt: skip
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pipeline", "batch", str(folder), str(out), "--config",
            str(config), "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until one slide failed and one is done
        rows = [r["status"] for s in summaries(out) for r in s["slides"]] if out.exists() else []
        if "failed" in rows and "done" in rows:
            break
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    [first] = summaries(out)
    assert first["status"] == "interrupted" and first["finished"]
    status = {r["slide"]: r["status"] for r in first["slides"]}
    assert status["s0-broken.tif"] == "failed" and "done" in status.values()
    assert "pending" in status.values() and "running" not in status.values()
    errors = {r["slide"]: r["error"] for r in first["slides"]}
    assert "truncated TIFF file" in errors["s0-broken.tif"]

    in_process = argv[3:]  # the same command, without the interpreter's start-up
    assert main(in_process) == 2  # the broken slide fails again
    second = summaries(out)[-1]
    again = {r["slide"]: r["status"] for r in second["slides"]}
    assert second["status"] == "complete"
    assert all(again[s] == "skipped" for s, st in status.items() if st == "done")
    # a slide running when SIGTERM came may have written its record before the run stopped:
    # the summary cannot confirm it, so it is pending, and the next run finds it complete
    pending = [again[s] for s, st in status.items() if st == "pending"]
    assert set(pending) <= {"done", "skipped"} and "done" in pending

    assert main([*in_process, "--only-failed", "--exclude", "s3*"]) == 2
    assert [r["slide"] for r in summaries(out)[-1]["slides"]] == ["s0-broken.tif"]
    capsys.readouterr()
    assert main([*in_process, "--exclude", "*broken*"]) == 0
    assert "5 slide(s): 0 done, 5 skipped" in capsys.readouterr().out


def test_outputs_inside_the_input_directory_are_never_slides(slides, config, tmp_path, capsys):
    out = slides / "results"
    argv = ["batch", str(slides), str(out), "--config", str(config), "--no-progress",
            "--pattern", "**/*.tif", "--pattern", "**/*.zarr", "--exclude", "broken*"]  # fmt: skip
    assert main(argv) == 0
    assert "2 slide(s): 2 done" in capsys.readouterr().out
    assert (out / "a.zarr").is_dir()
    assert main(argv) == 0  # the outputs in results/ match **/*.zarr, and are not taken
    assert "2 slide(s): 0 done, 2 skipped" in capsys.readouterr().out

    assert main(["batch", str(slides), str(slides), "--config", str(config)]) == 2
    assert "OUTPUT_DIR is INPUT_DIR" in capsys.readouterr().err


def test_batch_honours_max_concurrent_slides(model, tmp_path, monkeypatch, capsys):
    names = {f"s{i}.tif": (96, 96) for i in range(4)}
    folder = tiny_slides(tmp_path / "slides", names)
    for limit in (1, 2):
        counter = InFlight(monkeypatch, hold_s=0.5)
        config = write_config(tmp_path / f"{limit}.yaml", model,
                              run={"max_concurrent_slides": limit, "qc": False})  # fmt: skip
        out = tmp_path / f"out{limit}"
        assert main(["batch", str(folder), str(out), "--config", str(config)]) == 0
        assert counter.most == limit and sorted(counter.slides) == sorted(names)
        assert "4 slide(s): 4 done" in capsys.readouterr().out
        monkeypatch.undo()


def test_serve_and_prefect_yaml_deployments_have_distinct_names():
    from pipeline.cli.main import build_parser

    served = build_parser().parse_args(["serve", "in", "out"]).name
    deployed = {
        d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    }
    assert served not in deployed  # one would overwrite the other (segment-directory/<name>)


def test_the_ephemeral_prefect_server_gets_time_to_start():
    code = (
        "import flows.segment_flows\n"
        "from prefect.settings import get_current_settings as s\n"
        "print(s().server.ephemeral.startup_timeout_seconds)"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert int(out.stdout.strip()) >= 90  # Prefect's own default, 20 s, is too short


@pytest.mark.parametrize(
    ("walltime", "seconds"),
    [("30", 1800), ("45:00", 2700), ("12:00:00", 43200), ("2-12", 216000), ("1-2:30", 95400)],
)
def test_worker_lifetimes_end_before_the_walltime(walltime, seconds):
    from dask.utils import parse_timedelta

    from flows.cluster import worker_lifetime

    lifetime, stagger = (parse_timedelta(t) for t in worker_lifetime(walltime))
    assert 0 < stagger and seconds * 0.85 < lifetime + stagger < seconds


def test_slurm_interface_and_explicit_lifetimes_are_kept():
    from dask_jobqueue import SLURMCluster

    from flows.cluster import slurm_arguments

    slurm = {"cores": 2, "memory": "4GB", "walltime": "01:00:00", "interface": "lo",
             "worker_extra_args": ["--lifetime", "50m"], "python": "/opt/bin/python"}  # fmt: skip
    with SLURMCluster(
        **slurm_arguments({"type": "slurm", "slurm": slurm}), scheduler_options=dict(NO_DASHBOARD)
    ) as cluster:
        script = cluster.job_script()
    assert "--interface lo" in script and script.count("--lifetime") == 1
    assert "/opt/bin/python -m distributed.cli.dask_worker" in script
    with pytest.raises(TilesegError, match="not a SLURM time"):
        slurm_arguments({"slurm": {"walltime": "noon"}})


def test_docker_runs_unprivileged_with_a_small_context_and_local_ports():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "**/*.zarr", "bench/results"} <= set(ignored)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert 'pip install -c constraints.txt ".[flows]"' in dockerfile  # extras pinned too
    pins = (ROOT / "constraints.txt").read_text()
    assert "\nprefect==" in pins and "\ndask-jobqueue==" in pins
    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    ports = [p for s in services.values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    assert all("user" in services[s] for s in ("gpu-worker", "flows"))  # output owners
