"""What an output was made from, and whether an existing output can be trusted or resumed.

An output records a *fingerprint* of everything that decides its pixels: the input's content
identity, the model's sha256, and every option that changes the result. Where the input is
(its path, a symlink, another mount point) and when it was written do not take part, nor do
options that decide only where and how the work runs (:data:`EXECUTION_ONLY`): a finished
output is finished whichever device, batch size or cluster made it. A resumed run takes the
settings that can change a float result's last bits (batch size, tasks, numerics) from the
record of the run it continues, so its chunks are byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import SegmentOptions
from pipeline.output.ngff import read_record

__all__ = [
    "EXECUTION_ONLY",
    "done_dir",
    "done_summary",
    "fingerprint",
    "input_identity",
    "is_done",
    "mark_done",
    "output_state",
    "result_options",
]

EXECUTION_ONLY = (
    "scheduler", "resources", "workers", "prefetch", "overwrite", "batch_size",
    "batches_per_task", "device", "compile", "channels_last", "fold_norm",
)  # fmt: skip
_ZARR_METADATA = (".zarray", ".zgroup", ".zattrs", "zarr.json")
# A file's content identity: its size, its first and last bytes (headers, directories) and
# blocks spread over it. Cheap for a gigapixel file (a few hundred KiB read), and changed by
# a rewrite with other pixels, but not by a copy, a move or a touch.
_ENDS = 1 << 16
_BLOCK = 1 << 12
_BLOCKS = 32
_SAMPLED_CHUNKS = 16


def input_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The content identity of an input file or Zarr directory (not its path or mtime)."""
    path = Path(path)
    if path.is_dir():
        return _directory_identity(path)
    return {"size": path.stat().st_size, "sha256": _sampled_hash(path)}


def _sampled_hash(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * _ENDS + _BLOCKS * _BLOCK:
            digest.update(f.read())
            return digest.hexdigest()
        offsets = [0, size - _ENDS]
        offsets += [_ENDS + (size - 2 * _ENDS) * k // _BLOCKS for k in range(_BLOCKS)]
        for k, offset in enumerate(offsets):
            f.seek(offset)
            digest.update(f.read(_ENDS if k < 2 else _BLOCK))
    return digest.hexdigest()


def _directory_identity(path: Path) -> dict[str, Any]:
    """A Zarr store: its metadata documents' content, its chunk files' names, and the content
    of some of them. Listed with ``os.walk`` and no ``stat`` per chunk: a store can hold
    millions of chunk files, and this runs before every run and directory skip check."""
    files = sorted(
        os.path.relpath(os.path.join(root, name), path)
        for root, _, names in os.walk(path)
        for name in names
    )
    meta = [f for f in files if os.path.basename(f) in _ZARR_METADATA]
    chunks = [f for f in files if os.path.basename(f) not in _ZARR_METADATA]
    digest = hashlib.sha256()
    for f in meta:
        digest.update(f.encode() + b"\0" + (path / f).read_bytes())
    digest.update("\0".join(chunks).encode())
    step = max(1, len(chunks) // _SAMPLED_CHUNKS)
    for f in chunks[::step][:_SAMPLED_CHUNKS]:
        digest.update((path / f).read_bytes())
    return {"files": len(files), "sha256": digest.hexdigest()}


def result_options(options: SegmentOptions) -> dict[str, Any]:
    """The options that decide the output's pixels. ``channels`` is not one of them: the
    channels it resolves to are (:func:`fingerprint`)."""
    return {
        k: v for k, v in options.to_dict().items() if k not in EXECUTION_ONLY and k != "channels"
    }


def fingerprint(
    input_path: str | os.PathLike[str],
    options: SegmentOptions,
    *,
    model_sha256: str,
    stain: dict[str, Any] | None = None,
    channels: tuple[int, ...] | None = None,
) -> str:
    """What decides an output's pixels: the input's content identity, the result options,
    the model, when stains are mapped, the step and its reference (what is fitted on the
    slide follows from its content), and the input's channels the model is given, where not
    all of them (``--channels`` by name or index, or chosen for the model, alike)."""
    payload = {
        "input": input_identity(input_path),
        "options": result_options(options),
        "model": model_sha256,
    }
    # Absent otherwise: fingerprints of earlier outputs stay valid.
    if stain is not None:
        payload["stain"] = stain
    if channels is not None:
        payload["channels"] = list(channels)
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
