"""tileseg: exact overlap-tile U-Net segmentation of gigapixel images into OME-Zarr."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tileseg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
