"""Options of ``tileseg segment``: defaults, YAML config files, validation.

Precedence: built-in defaults < YAML config file < command-line flags. Every problem is a
:class:`~pipeline.errors.TilesegError` naming the config file (or the flag) and the key.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import TilesegError

NORMALIZE = ("none", "percentile", "fixed")
PRECISION = ("auto", "fp32", "bf16", "fp16")
CHANNELS_LAST = ("auto", "on", "off")
FOLD_NORM = ("auto", "on", "off")
PROBABILITY_DTYPES = ("float16", "float32")
TISSUE = ("none", "otsu", "triangle", "fixed")
INSTANCES = ("none", "connected", "watershed")
TABLES = ("none", "parquet", "csv")
# On a CPU of at most this many cores, ``prefetch: auto`` runs the stages serially (worker.py).
SERIAL_CORES = 4


@dataclass(frozen=True)
class SegmentOptions:
    """Everything that decides how an image is segmented (and is recorded as provenance)."""

    model: str | None = None
    halo: int | None = None
    align: int | None = None
    force_halo: bool = False  # a --halo below the measured receptive field (not exact)
    tile: int | None = None  # default: 1024 (2D) / 128 (3D)
    chunk: int | None = None  # default: min(512, tile) (2D) / min(64, tile) (3D)
    batch_size: int | str = "auto"  # from free GPU memory; 4 on the CPU
    batches_per_task: int = 4  # at most; a task overlaps reading, inferring, writing its batches
    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"  # channels-last on every device (faster on CPU and CUDA)
    fold_norm: str = "auto"  # batch norm folded into the convolutions (auto: on; faster)
    compile: bool = False  # torch.compile the model (pays off on long runs on a GPU)
    prefetch: int | str = "auto"  # batches read ahead of / written behind inference (0: serial)
    normalize: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.8)
    scale: float | None = None
    offset: float | None = None
    level: int = 0
    axes: str | None = None
    allow_missing_chunks: bool = False
    save_probabilities: bool = False
    probability_dtype: str = "float16"
    tissue: str = "none"  # skip output tiles without tissue (low-resolution mask)
    tissue_threshold: float | None = None  # for tissue "fixed": on the 0..1 tissue-ness feature
    tissue_level: int | None = None  # pyramid level the mask is made from (default: <= 1024 px)
    tissue_margin: int = 0  # px of glass kept around tissue, beyond one mask pixel
    instances: str = "none"  # object ids across chunk borders: connected | watershed
    # objects where the foreground probability exceeds this (None: where argmax is not
    # background); needs the saved probabilities
    instance_threshold: float | None = None
    # watershed: least distance between two nuclei's centres, in px. Of 3, 5, 7, 9 and 12, 7
    # scores within 0.003 of the best object F1 both on generated held-out images (0.932) and
    # on the shipped real one (0.901; 5 gave 0.929 and 0.820)
    min_distance: int = 7
    table: str = "none"  # per-object measurements: parquet | csv
    scheduler: str | None = None
    resources: dict[str, float] | None = None  # asked of distributed workers by inference tasks
    workers: int | None = None  # local run: one per GPU on CUDA, else 1
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["percentiles"] = list(self.percentiles)
        return data

    def tile_and_chunk(self, ndim: int) -> tuple[int, int]:
        tile = self.tile or (1024 if ndim == 2 else 128)
        chunk = self.chunk or min(512 if ndim == 2 else 64, tile)
        return tile, chunk


# Expected type per option; (type, None) means the value may also be null.
_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str, type(None)),
    "halo": (int, type(None)),
    "align": (int, type(None)),
    "force_halo": (bool,),
    "tile": (int, type(None)),
    "chunk": (int, type(None)),
    "batch_size": (int, str),
    "batches_per_task": (int,),
    "device": (str,),
    "precision": (str,),
    "channels_last": (str,),
    "fold_norm": (str,),
    "compile": (bool,),
    "prefetch": (int, str),
    "normalize": (str,),
    "percentiles": (list, tuple),
    "scale": (float, int, type(None)),
    "offset": (float, int, type(None)),
    "level": (int,),
    "axes": (str, type(None)),
    "allow_missing_chunks": (bool,),
    "save_probabilities": (bool,),
    "probability_dtype": (str,),
    "tissue": (str,),
    "tissue_threshold": (float, int, type(None)),
    "tissue_level": (int, type(None)),
    "tissue_margin": (int,),
    "instances": (str,),
    "instance_threshold": (float, int, type(None)),
    "min_distance": (int,),
    "table": (str,),
    "scheduler": (str, type(None)),
    "resources": (dict, type(None)),
    "workers": (int, type(None)),
    "overwrite": (bool,),
}
assert set(_TYPES) == {f.name for f in fields(SegmentOptions)}
_ON_OFF = ("channels_last", "fold_norm")  # auto | on | off
_POSITIVE = ("align", "tile", "chunk", "batch_size", "batches_per_task", "workers", "min_distance")


def _check(key: str, value: Any, source: str | None) -> Any:
    """Validate one option value and return it in its canonical form."""
    where = source or f"--{key.replace('_', '-')}"

    def bad(problem: str) -> TilesegError:
        return TilesegError(where, f"{key}: {problem}")

    if key in _ON_OFF and isinstance(value, bool):
        value = "on" if value else "off"  # YAML 1.1 reads on/off (and yes/no) as booleans
    types = _TYPES[key]
    # bool is an int subclass: reject True for an int option explicitly.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise bad(f"expected {names}, got {value!r}")
    if key in ("halo",) and value is not None and value < 0:
        raise bad("must be >= 0")
    if key in ("batch_size", "prefetch") and isinstance(value, str):
        if value != "auto":
            raise bad(f"must be a number or auto, got {value!r}")
        return value
    if key == "instance_threshold" and value is not None:
        if not 0 < value < 1:
            raise bad(f"must be between 0 and 1, got {value!r}")
        return float(value)
    if key == "tissue_threshold" and value is not None:
        if not 0 <= value < 1:
            raise bad(f"must be >= 0 and < 1, got {value!r}")
        return float(value)
    if key in _POSITIVE:
        if value is not None and value < 1:
            raise bad("must be >= 1")
    if key in ("level", "prefetch", "tissue_level", "tissue_margin") and (value or 0) < 0:
        raise bad("must be >= 0")
    choices = {
        "normalize": NORMALIZE,
        "precision": PRECISION,
        "channels_last": CHANNELS_LAST,
        "fold_norm": FOLD_NORM,
        "probability_dtype": PROBABILITY_DTYPES,
        "tissue": TISSUE,
        "instances": INSTANCES,
        "table": TABLES,
    }
    if key in choices and value not in choices[key]:
        raise bad(f"must be one of {', '.join(choices[key])}, got {value!r}")
    if key == "device" and not (value in ("auto", "cpu") or value.startswith("cuda")):
        raise bad(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    if key == "percentiles":
        if len(value) != 2 or not all(isinstance(v, int | float) for v in value):
            raise bad("must be two numbers [low, high]")
        lo, hi = float(value[0]), float(value[1])
        if not 0 <= lo < hi <= 100:
            raise bad("need 0 <= low < high <= 100")
        return (lo, hi)
    if key == "resources" and value is not None:
        if not all(isinstance(k, str) and isinstance(v, int | float) and v > 0
                   for k, v in value.items()):  # fmt: skip
            raise bad("must map resource names to positive numbers, e.g. {GPU: 1}")
        return {k: float(v) for k, v in value.items()}
    if key in ("scale", "offset") and value is not None:
        return float(value)
    if key == "axes" and value is not None:
        axes = value.upper()
        if len(set(axes)) != len(axes) or not set(axes) <= set("TCZYXS"):
            raise bad(f"axes must be letters from TCZYXS without repeats, got {value!r}")
        return axes
    return value


def options_from_mapping(
    data: dict[str, Any], *, base: SegmentOptions | None = None, source: str | None = None
) -> SegmentOptions:
    """Apply a mapping of option values (from YAML or flags) on top of ``base``."""
    known = {f.name for f in fields(SegmentOptions)}
    for key in data:
        if key not in known:
            known_list = ", ".join(sorted(known))
            raise TilesegError(source, f"unknown option {key!r} (known: {known_list})")
    checked = {key: _check(key, value, source) for key, value in data.items()}
    options = replace(base or SegmentOptions(), **checked)
    if options.table != "none" and options.instances == "none":
        raise TilesegError(source or "--table", "table: per-object tables need --instances")
    if options.instance_threshold is not None and not (
        options.instances != "none" and options.save_probabilities
    ):
        raise TilesegError(
            source or "--instance-threshold",
            "instance_threshold: thresholds the saved probabilities: needs --instances and "
            "--save-probabilities",
        )
    if options.tissue == "fixed" and options.tissue_threshold is None:
        raise TilesegError(
            source or "--tissue", "tissue: fixed needs a threshold (--tissue-threshold)"
        )
    if options.tissue in ("otsu", "triangle") and options.tissue_threshold is not None:
        raise TilesegError(
            source or "--tissue-threshold",
            f"tissue_threshold: {options.tissue} finds its own threshold; a fixed one needs "
            "--tissue fixed",
        )
    if options.normalize == "fixed" and options.scale is None:
        raise TilesegError(source or "--normalize", "normalize: fixed needs a scale (--scale)")
    return options


def read_yaml_mapping(path: str | os.PathLike[str], *, what: str = "config") -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is an empty one), with one-line errors."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TilesegError(path, f"cannot read {what} ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TilesegError(path, f"invalid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TilesegError(path, f"{what} must be a mapping of option: value")
    return data


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into a mapping of options (validated by the caller)."""
    data = read_yaml_mapping(path)
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    # One file may also hold other commands' sections (e.g. `train:`); `segment:` is ours.
    if isinstance(data.get("segment"), dict):
        data = {str(k).replace("-", "_"): v for k, v in data["segment"].items()}
    return data


def resolve_options(
    *, config: str | os.PathLike[str] | None, flags: dict[str, Any]
) -> SegmentOptions:
    """Defaults, then the config file, then the flags that were given (not None)."""
    options = SegmentOptions()
    if config is not None:
        options = options_from_mapping(load_config(config), base=options, source=os.fspath(config))
    given = {k: v for k, v in flags.items() if v is not None}
    return options_from_mapping(given, base=options)
