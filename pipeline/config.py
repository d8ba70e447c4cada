"""Options of ``tileseg segment``: defaults, YAML config files, validation.

Precedence: built-in defaults < YAML config file < command-line flags. Every problem is a
:class:`~pipeline.errors.TilesegError` naming the config file (or the flag) and the key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from pipeline.errors import TilesegError

__all__ = [
    "CHANNELS_LAST",
    "EXPORTS",
    "FOLD_NORM",
    "INSTANCES",
    "NORMALIZE",
    "PRECISION",
    "PROBABILITY_DTYPES",
    "SECTIONS",
    "SERIAL_CORES",
    "STAIN",
    "TABLES",
    "TISSUE",
    "Option",
    "SegmentOptions",
    "declared",
    "load_config",
    "load_yaml_config",
    "option",
    "options_from_mapping",
    "options_table",
    "parse_channels",
    "read_yaml_mapping",
    "resolve_options",
]

NORMALIZE = ("none", "percentile", "fixed")
STAIN = ("auto", "hematoxylin", "normalize", "none")
PRECISION = ("auto", "fp32", "bf16", "fp16")
CHANNELS_LAST = ("auto", "on", "off")
FOLD_NORM = ("auto", "on", "off")
PROBABILITY_DTYPES = ("float16", "float32")
TISSUE = ("none", "otsu", "triangle", "fixed")
INSTANCES = ("none", "connected", "watershed")
TABLES = ("none", "parquet", "csv")
EXPORTS = ("geojson", "geoparquet")
LABELS_AT = ("model", "input")
# On a CPU of at most this many cores, ``prefetch: auto`` runs the stages serially (worker.py).
SERIAL_CORES = 4


_NONE = type(None)
SECTIONS = ("model", "input", "tiling", "compute", "output", "tissue", "objects", "execution")


@dataclass(frozen=True)
class Option:
    """How one option is given and checked: its declaration, read by the config loader, the
    validation, the command line and the option table in the docs alike."""

    help: str
    section: str
    types: tuple[type, ...]
    choices: tuple[Any, ...] = ()
    minimum: float | None = None  # inclusive
    below: float | None = None  # exclusive upper bound
    # value | switch (--x/--no-x) | auto-int | auto-float | many (repeatable) | pair | resource
    flag: str = "value"
    metavar: str | None = None
    canonical: Callable[[Any], Any] | None = None  # the value's canonical form, once checked


def option(default: Any, help: str, section: str, types: tuple[type, ...], **kw: Any) -> Any:
    """A :class:`SegmentOptions` field declared with its :class:`Option`."""
    return field(default=default, metadata={"option": Option(help, section, types, **kw)})


def _axes(value: str) -> str:
    axes = value.upper()
    if len(set(axes)) != len(axes) or not set(axes) <= set("TCZYXS"):
        raise ValueError(f"axes must be letters from TCZYXS without repeats, got {value!r}")
    return axes


def parse_channels(value: Any) -> str:
    """``--channels``'s canonical form: channel indices or names separated by commas (in YAML
    also a list, or one index).

    Raises
    ------
    ValueError
        For an empty list or an empty item.
    """
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    parts = [str(item).strip() for item in items]
    if not parts or not all(parts):
        raise ValueError(f"must be channel indices or names separated by commas, got {value!r}")
    return ",".join(parts)


def _device(value: str) -> str:
    if not (value in ("auto", "cpu") or value.startswith("cuda")):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def _percentiles(value: Any) -> tuple[float, float]:
    if len(value) != 2 or not all(isinstance(v, int | float) for v in value):
        raise ValueError("must be two numbers [low, high]")
    lo, hi = float(value[0]), float(value[1])
    if not 0 <= lo < hi <= 100:
        raise ValueError("need 0 <= low < high <= 100")
    return (lo, hi)


def _exports(value: Any) -> tuple[str, ...]:
    bad = [v for v in value if v not in EXPORTS]
    if bad:
        raise ValueError(f"must be among {', '.join(EXPORTS)}, got {bad[0]!r}")
    return tuple(sorted(set(value)))


def _resources(value: dict[Any, Any] | None) -> dict[str, float] | None:
    if value is None:
        return None
    if not all(isinstance(k, str) and isinstance(v, int | float) and v > 0
               for k, v in value.items()):  # fmt: skip
        raise ValueError("must map resource names to positive numbers, e.g. {GPU: 1}")
    return {k: float(v) for k, v in value.items()}


def _probability(value: float) -> float:
    if not 0 < value < 1:
        raise ValueError(f"must be between 0 and 1, got {value!r}")
    return float(value)


def _mpp(value: float) -> float:
    if not 0 < value < 1e4:
        raise ValueError(f"must be a pixel size in µm > 0, got {value!r}")
    return float(value)


def _object_size(value: float | str) -> float | str:
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"must be a diameter in px > 0 or auto, got {value!r}")
        return value
    if not 0 < value < 1e6:
        raise ValueError(f"must be a diameter in px > 0 or auto, got {value!r}")
    return float(value)


def _diameter(value: float) -> float:
    if not 0 < value < 1e6:
        raise ValueError(f"must be a diameter in px > 0, got {value!r}")
    return float(value)


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class SegmentOptions:
    """Everything that decides how an image is segmented (and is recorded as provenance).

    Each field is declared once, with its help, section, type and bounds (:class:`Option`):
    the YAML keys, their validation, the command-line flags and the docs' option table all
    come from here.
    """

    model: str | None = option(
        None, "model: .safetensors (built-in U-Net), TorchScript .pt, .onnx, or a bioimage.io "
        "rdf.yaml or .zip (default: the shipped model for the image)", "model", (str, _NONE),
        metavar="PATH",
    )  # fmt: skip
    halo: int | None = option(
        None, "context per side in px (TorchScript models; else from the model file)", "model",
        (int, _NONE), minimum=0, metavar="N",
    )  # fmt: skip
    align: int | None = option(
        None, "tile origin alignment (TorchScript models; else from the model file)", "model",
        (int, _NONE), minimum=1, metavar="N",
    )  # fmt: skip
    model_object_size: float | None = option(
        None, "object diameter in px the model was trained at, for a model that records none "
        "(TorchScript, ONNX, bioimage.io) or in place of its record: --object-size brings "
        "objects to it", "model", (float, int, _NONE), canonical=_diameter, metavar="PX",
    )  # fmt: skip
    force_halo: bool = option(
        False, "use --halo even below the model's measured receptive field (tiles are then "
        "not exact)", "model", (bool,), flag="switch",
    )  # fmt: skip
    tile: int | None = option(
        None, "output tile side in px, a multiple of the chunk and of the model's alignment "
        "(default 1024 in 2D, 128 in 3D; an image whose one window is no larger than a batch "
        "of those is one tile)", "tiling", (int, _NONE), minimum=1, metavar="N",
    )  # fmt: skip
    chunk: int | None = option(
        None, "output Zarr chunk side in px (default 512 in 2D, 64 in 3D)", "tiling",
        (int, _NONE), minimum=1, metavar="N",
    )  # fmt: skip
    batch_size: int | str = option(
        "auto", "tiles per forward pass, or auto: the largest batch that fits the free GPU "
        "memory (at most 16), 4 on the CPU; a resumed run keeps the batch size it began with",
        "compute", (int, str), minimum=1, flag="auto-int", metavar="N",
    )  # fmt: skip
    batches_per_task: int = option(
        4, "batches per task, at most (fewer on small images, for progress and parallelism)",
        "compute", (int,), minimum=1, metavar="N",
    )  # fmt: skip
    device: str = option(
        "auto", "auto (CUDA if present), cpu, cuda or cuda:N", "compute", (str,),
        canonical=_device, metavar="D",
    )  # fmt: skip
    precision: str = option(
        "auto", "auto: bf16 autocast on CUDA from compute capability 8.0, fp16 before, fp32 "
        "on the CPU", "compute", (str,), choices=PRECISION,
    )  # fmt: skip
    channels_last: str = option(
        "auto", "channels-last memory layout (auto: on; faster on CPU and CUDA, exact "
        "either way)", "compute", (str,), choices=CHANNELS_LAST,
    )  # fmt: skip
    fold_norm: str = option(
        "auto", "fold eval-mode batch norms into the convolutions before them (auto: on; "
        "built-in U-Nets)", "compute", (str,), choices=FOLD_NORM,
    )  # fmt: skip
    compile: bool = option(
        False, "torch.compile the model once per worker (pays off on long GPU runs)", "compute",
        (bool,), flag="switch",
    )  # fmt: skip
    prefetch: int | str = option(
        "auto", f"batches read ahead of and written behind inference (auto: 0, the stages in "
        f"turn, in a local CPU run on up to {SERIAL_CORES} cores, else 2)", "compute",
        (int, str), minimum=0, flag="auto-int", metavar="N",
    )  # fmt: skip
    normalize: str = option(
        "percentile", "intensity normalisation, computed once per image: percentile (to 0..1), "
        "none, fixed (--scale, --offset)", "input", (str,), choices=NORMALIZE,
    )  # fmt: skip
    percentiles: tuple[float, float] = option(
        (1.0, 99.8), "low and high percentile mapped to 0 and 1", "input", (list, tuple),
        flag="pair", metavar=("LOW", "HIGH"), canonical=_percentiles,
    )  # fmt: skip
    scale: float | None = option(
        None, "fixed normalisation: x * scale + offset", "input", (float, int, _NONE),
        canonical=_float,
    )  # fmt: skip
    offset: float | None = option(
        None, "fixed normalisation: x * scale + offset", "input", (float, int, _NONE),
        canonical=_float,
    )  # fmt: skip
    channels: str | None = option(
        None, "the image's channels the model is given, in its order: indices or names from "
        "the file (OME-XML, NGFF omero labels; red, green, blue for RGB), e.g. DAPI or 2 or "
        "DAPI,CD45 (default: all; for a one-channel model, the one channel named as a nuclear "
        "stain, e.g. DAPI or Hoechst)", "input", (str, int, list, _NONE),
        canonical=parse_channels, metavar="LIST",
    )  # fmt: skip
    stain: str = option(
        "auto", "RGB brightfield (H&E), fitted once per slide: to its haematoxylin channel, or "
        "Macenko-normalised to reference stains (auto: hematoxylin for 8-bit RGB brightfield "
        "into a one-channel model, normalize for RGB brightfield into an RGB model)", "input",
        (str,), choices=STAIN,
    )  # fmt: skip
    level: int = option(0, "input pyramid level to segment", "input", (int,), minimum=0)
    mpp: float | None = option(
        None, "segment at this pixel size in µm (the nearest finer level, resampled)", "input",
        (float, int, _NONE), canonical=_mpp, metavar="UM",
    )  # fmt: skip
    object_size: float | str | None = option(
        None, "typical object diameter in input px (at --mpp, if given), or auto: estimated per "
        "image with the model; the image is resampled so that objects have the size the model "
        "segments at (the upper quartile of its training objects' diameters)", "input",
        (float, int, str, _NONE), flag="auto-float", canonical=_object_size, metavar="PX",
    )  # fmt: skip
    labels_at: str | None = option(
        None, "grid the labels are written on when the input is resampled: model (the grid "
        "segmented) or input (the image's own, nearest-neighbour); default: input with "
        "--object-size, else model; no effect when the input is not resampled", "output",
        (str, _NONE), choices=LABELS_AT,
    )  # fmt: skip
    axes: str | None = option(
        None, "input axes when the file does not say (plain Zarr/TIFF), e.g. YX, CYX, ZYX",
        "input", (str, _NONE), canonical=_axes,
    )  # fmt: skip
    allow_missing_chunks: bool = option(
        False, "read chunks missing from a Zarr input as fill values (default: refuse, a "
        "missing chunk usually means a broken copy)", "input", (bool,), flag="switch",
    )  # fmt: skip
    save_probabilities: bool = option(
        False, "also write per-class probabilities", "output", (bool,), flag="switch"
    )
    probability_dtype: str = option(
        "float16", "dtype of the saved probabilities", "output", (str,),
        choices=PROBABILITY_DTYPES,
    )  # fmt: skip
    tissue: str = option(
        "none", "skip output tiles without tissue, from a low-resolution mask: none, otsu, "
        "triangle, fixed (--tissue-threshold)", "tissue", (str,), choices=TISSUE,
    )  # fmt: skip
    tissue_threshold: float | None = option(
        None, "--tissue fixed: tissue where the 0..1 tissue-ness exceeds T", "tissue",
        (float, int, _NONE), minimum=0, below=1, canonical=_float, metavar="T",
    )  # fmt: skip
    tissue_level: int | None = option(
        None, "pyramid level the tissue mask is made from (default: the first of at most "
        "1024 px per side)", "tissue", (int, _NONE), minimum=0, metavar="L",
    )  # fmt: skip
    tissue_margin: int = option(
        0, "glass kept around tissue, in px beyond one mask pixel", "tissue", (int,),
        minimum=0, metavar="PX",
    )  # fmt: skip
    instances: str = option(
        "none", "object ids in labels/instances, unique across chunk borders: none, "
        "connected, watershed", "objects", (str,), choices=INSTANCES,
    )  # fmt: skip
    instance_threshold: float | None = option(
        None, "objects where the foreground probability exceeds P (needs "
        "--save-probabilities; default: where the label is not background)", "objects",
        (float, int, _NONE), canonical=_probability, metavar="P",
    )  # fmt: skip
    # Of 3, 5, 7, 9 and 12 px, 7 scores within 0.003 of the best object F1 both on generated
    # held-out images and on the shipped real one (5 is much worse on the real one).
    min_distance: int = option(
        7, "watershed: least distance between two objects' centres in px of the grid segmented "
        "(labels upsampled to the input's grid are split on that grid)", "objects", (int,),
        minimum=1, metavar="N",
    )  # fmt: skip
    min_area: int = option(
        0, "foreground specks smaller than N px of the labels written are left out before "
        "objects are found (on the grid split on, the same area there); 0 keeps all",
        "objects", (int,), minimum=0, metavar="PX",
    )  # fmt: skip
    table: str = option(
        "none", "per-object measurements in OUTPUT/objects.<format> (needs --instances)",
        "objects", (str,), choices=TABLES,
    )  # fmt: skip
    export: tuple[str, ...] = option(
        (), "object polygons for QuPath (geojson) or GeoPandas (geoparquet) in "
        "OUTPUT/objects.<format> (needs --instances; repeatable)", "objects", (list, tuple),
        flag="many", choices=EXPORTS, canonical=_exports, metavar="FORMAT",
    )  # fmt: skip
    scheduler: str | None = option(
        None, "address of an existing Dask scheduler (default: embedded, local)", "execution",
        (str, _NONE), metavar="ADDR",
    )  # fmt: skip
    resources: dict[str, float] | None = option(
        None, "worker resources each inference task asks of the --scheduler's workers, e.g. "
        "GPU=1 (repeatable)", "execution", (dict, _NONE), flag="resource",
        canonical=_resources, metavar="NAME=N",
    )  # fmt: skip
    workers: int | None = option(
        None, "parallel tasks in a local run (default: 2 per GPU on CUDA, else 1)",
        "execution", (int, _NONE), minimum=1, metavar="N",
    )  # fmt: skip
    overwrite: bool = option(
        False, "replace an existing tileseg output (otherwise a complete one of the same "
        "input, model and config is skipped, an interrupted one resumed, any other refused)",
        "execution", (bool,), flag="switch",
    )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["percentiles"] = list(self.percentiles)
        data["export"] = list(self.export)
        return data

    def tile_and_chunk(self, ndim: int) -> tuple[int, int]:
        tile = self.tile or (1024 if ndim == 2 else 128)
        chunk = self.chunk or min(512 if ndim == 2 else 64, tile)
        return tile, chunk

    def section(self, name: str) -> Mapping[str, Any]:
        """The options of one section (one of ``SECTIONS``), read-only, in declaration order."""
        if name not in SECTIONS:
            raise ValueError(f"no section {name!r} (sections: {', '.join(SECTIONS)})")
        values = {k: getattr(self, k) for k, (_, opt) in declared().items() if opt.section == name}
        return MappingProxyType(values)


def declared(cls: type = SegmentOptions) -> dict[str, tuple[Field[Any], Option]]:
    """Every option of ``cls`` with its declaration, in declaration order."""
    return {f.name: (f, f.metadata["option"]) for f in fields(cls)}


def _check(key: str, value: Any, source: str | None) -> Any:
    """Validate one option value against its declaration; return its canonical form."""
    where = source or f"--{key.replace('_', '-')}"
    _, opt = declared()[key]

    def bad(problem: str) -> TilesegError:
        return TilesegError(where, f"{key}: {problem}")

    if opt.choices == ("auto", "on", "off") and isinstance(value, bool):
        value = "on" if value else "off"  # YAML 1.1 reads on/off (and yes/no) as booleans
    # bool is an int subclass: reject True for an int option explicitly.
    if not isinstance(value, opt.types) or (isinstance(value, bool) and bool not in opt.types):
        names = " or ".join("null" if t is _NONE else t.__name__ for t in opt.types)
        raise bad(f"expected {names}, got {value!r}")
    if opt.flag == "auto-int" and isinstance(value, str):
        if value != "auto":
            raise bad(f"must be a number or auto, got {value!r}")
        return value
    if value is not None and not _in_bounds(value, opt):
        bounds = [f">= {opt.minimum:g}"] if opt.minimum is not None else []
        bounds += [f"< {opt.below:g}, got {value!r}"] if opt.below is not None else []
        raise bad(f"must be {' and '.join(bounds)}")
    if opt.choices and opt.flag != "many" and value is not None and value not in opt.choices:
        raise bad(f"must be one of {', '.join(opt.choices)}, got {value!r}")
    if opt.canonical is not None and value is not None:
        try:
            return opt.canonical(value)
        except ValueError as exc:
            raise bad(str(exc)) from None
    return value


def _in_bounds(value: float, opt: Option) -> bool:
    return (opt.minimum is None or value >= opt.minimum) and (
        opt.below is None or value < opt.below
    )


def options_table() -> str:
    """The Markdown table of every option, from the declarations (in docs/cli.md)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for name, (f, opt) in declared().items():
        shown = "—" if f.default in (None, ()) else f"`{f.default}`"
        choices = f" ({', '.join(map(str, opt.choices))})" if opt.choices else ""
        rows.append(f"| `--{name.replace('_', '-')}` | {shown} | {opt.help}{choices} |")
    return "\n".join(rows) + "\n"


def options_from_mapping(
    data: dict[str, Any], *, base: SegmentOptions | None = None, source: str | None = None
) -> SegmentOptions:
    """Apply a mapping of option values (from YAML or flags) on top of ``base``: flat keys, or
    keys nested in their sections (``tiling: {tile: 512}``; see ``SECTIONS``)."""
    data = _flatten(data, source)
    known = {f.name for f in fields(SegmentOptions)}
    for key in data:
        if key not in known:
            known_list = ", ".join(sorted(known))
            raise TilesegError(source, f"unknown option {key!r} (known: {known_list})")
    checked = {key: _check(key, value, source) for key, value in data.items()}
    options = replace(base or SegmentOptions(), **checked)
    if options.table != "none" and options.instances == "none":
        raise TilesegError(source or "--table", "table: per-object tables need --instances")
    if options.export and options.instances == "none":
        raise TilesegError(source or "--export", "export: object polygons need --instances")
    if options.min_area and options.instances == "none":
        raise TilesegError(source or "--min-area", "min_area: leaves specks out of --instances")
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
    if options.mpp is not None and options.level != 0:
        raise TilesegError(source or "--mpp", "mpp: picks the pyramid level itself; drop --level")
    if options.normalize == "fixed" and options.scale is None:
        raise TilesegError(source or "--normalize", "normalize: fixed needs a scale (--scale)")
    return options


def _flatten(data: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """Flat option keys from a mapping that may nest them in their sections. A section's key
    whose value is a mapping is that section (``model`` and ``tissue`` are options too, but
    never mappings); a key given twice, or in another section than its own, is refused."""
    options = declared()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        # An empty section (every key commented out) reads as null.
        empty = value is None and key not in options
        nested = key in SECTIONS and (isinstance(value, Mapping) or empty)
        items = (value or {}).items() if nested else [(key, value)]
        for name, item in items:
            name = str(name).replace("-", "_")
            where = f"{key}.{name}" if nested else name
            if nested and (name not in options or options[name][1].section != key):
                own = ", ".join(k for k, (_, opt) in options.items() if opt.section == key)
                problem = f"not an option of section {key} (its options: {own})"
                raise TilesegError(source, f"{where}: {problem}")
            if name in flat:
                raise TilesegError(source, f"{where}: given twice")
            flat[name] = item
    return flat


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


def load_yaml_config(
    path: str | os.PathLike[str], *, command: str | None = None, what: str = "config"
) -> dict[str, Any]:
    """The one reader of YAML config files (``tileseg segment``, ``train`` and directory runs):
    the file's mapping, or the part under ``command:`` when the file has one (one file may hold
    several commands' configs), with ``-`` in its top-level keys read as ``_``. What the keys
    mean, and refusing unknown ones, is the caller's: :func:`options_from_mapping`,
    :func:`pipeline.training.train.config_from_mapping`, ``flows.core.load_directory_config``.
    """
    data = read_yaml_mapping(path, what=what)
    if command is not None and isinstance(data.get(command), dict):
        data = data[command]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``tileseg segment`` YAML config into a mapping of options (validated by the
    caller, :func:`options_from_mapping`): flat keys or sections, or either under ``segment:``."""
    return load_yaml_config(path, command="segment")


def resolve_options(
    *, config: str | os.PathLike[str] | None, flags: dict[str, Any]
) -> SegmentOptions:
    """Defaults, then the config file, then the flags that were given (not None)."""
    options = SegmentOptions()
    if config is not None:
        options = options_from_mapping(load_config(config), base=options, source=os.fspath(config))
    given = {k: v for k, v in flags.items() if v is not None}
    return options_from_mapping(given, base=options)
