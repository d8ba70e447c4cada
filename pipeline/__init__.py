"""tileseg: exact overlap-tile U-Net segmentation of gigapixel images into OME-Zarr.

The Python API, imported lazily so that ``import pipeline`` (and the command line) starts
fast::

    import pipeline
    result = pipeline.segment("slide.tif", "slide.zarr", instances="watershed")
    result = pipeline.segment(numpy_array, "out.zarr", axes="YX")
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("tileseg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "segment": "pipeline.api",
    "SegmentResult": "pipeline.engine.driver",
    "SegmentOptions": "pipeline.config",
    "open_image": "pipeline.io.readers",
    "load_model": "pipeline.models",
    "ModelSpec": "pipeline.models",
    "label_instances": "pipeline.objects.instances",
    "measure_objects": "pipeline.objects.measure",
    "TilesegError": "pipeline.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
