"""Reading images: lazy window readers over TIFF, Zarr/OME-Zarr and OpenSlide, the decoded-tile
cache."""
