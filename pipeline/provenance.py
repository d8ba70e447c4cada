"""What an output was made from, and whether an existing output can be trusted or resumed.

An output records a *fingerprint* of everything that decides its pixels: the input file's
identity, the model's sha256, and every option that changes the result. Options that only
decide where and how the work runs (scheduler, resources, workers, prefetch, overwrite) are
left out, so a run can be resumed on another cluster. Batch size, tiles per task, device and
compilation stay in: they can change the last bits of a float result, and a resumed output
must be byte-identical to an uninterrupted one (``batch_size: auto`` resumes with the batch
size the interrupted run measured, which its record holds).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import SegmentOptions
from pipeline.ngff import read_record

RUNTIME_ONLY = ("scheduler", "resources", "workers", "prefetch", "overwrite")
# Options added after outputs were made, at their default. There ``auto`` takes, for an output
# begun earlier, the setting that output ran with (``pipeline.worker.NUMERICS``), so they are
# left out of the fingerprint at that value: an upgrade must not make finished outputs
# "different" (a directory run would redo every slide), and an unfinished one still resumes.
ADDED_LATER = {"fold_norm": "auto", "force_halo": False}
_ABSENT = object()
_ZARR_METADATA = (".zarray", ".zgroup", ".zattrs", "zarr.json")


def input_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Path, size and modification time of an input (for a Zarr directory: of its metadata),
    cheap to compute even for a gigapixel file, and changed by any rewrite of it."""
    path = Path(path).absolute()
    st = path.stat()
    identity: dict[str, Any] = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.is_dir():
        meta = sorted(p for p in path.rglob("*") if p.name in _ZARR_METADATA)
        identity["metadata"] = [
            [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in meta
        ]
    return identity


def result_options(options: SegmentOptions) -> dict[str, Any]:
    """The options that decide the output's pixels."""
    return {
        k: v
        for k, v in options.to_dict().items()
        if k not in RUNTIME_ONLY and ADDED_LATER.get(k, _ABSENT) != v
    }


def fingerprint(
    input_path: str | os.PathLike[str], options: SegmentOptions, *, model_sha256: str
) -> str:
    payload = {
        "input": input_identity(input_path),
        "options": result_options(options),
        "model": model_sha256,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def output_state(output: str | os.PathLike[str], expected: str) -> str:
    """``missing``, ``complete`` or ``partial`` (same fingerprint, unfinished), ``different``
    (made from another input, model or config) or ``foreign`` (not a tileseg output)."""
    path = Path(output)
    if not path.exists():
        return "missing"
    record = read_record(path)
    if record is None or "fingerprint" not in record:
        return "foreign"
    if record["fingerprint"] != expected:
        return "different"
    return "complete" if record.get("status") == "complete" else "partial"


def done_dir(output: str | os.PathLike[str]) -> Path:
    """Where per-task completion markers live inside an output."""
    return Path(output) / ".tileseg" / "done"


def mark_done(
    output: str | os.PathLike[str], name: str, summary: dict[str, Any] | None = None
) -> None:
    """Written after a task's data is fully written: a task without its marker is redone.
    ``summary`` (JSON) is kept in the marker, for a resumed run's record (:func:`done_summary`)."""
    marker = done_dir(output) / name
    tmp = marker.with_name(f".{name}.tmp")
    tmp.write_text("" if summary is None else json.dumps(summary))
    tmp.replace(marker)


def done_summary(output: str | os.PathLike[str], name: str) -> dict[str, Any] | None:
    """The summary a finished step kept in its marker (None when it kept none)."""
    text = (done_dir(output) / name).read_text()
    return json.loads(text) if text else None


def is_done(output: str | os.PathLike[str], name: str) -> bool:
    return (done_dir(output) / name).exists()
