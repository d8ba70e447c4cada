"""Objects across chunk borders: instance labels, per-object measurements, polygons."""
