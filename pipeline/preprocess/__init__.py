"""Per-image decisions applied identically to every tile: normalisation, stain separation,
resampling to a pixel size, tissue masks."""
