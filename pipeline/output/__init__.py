"""The OME-Zarr output: layout and NGFF metadata, whole-chunk writes, the overview, provenance, the
output lock."""
