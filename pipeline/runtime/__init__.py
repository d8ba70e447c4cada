"""Where and how tasks run: Dask (embedded or a cluster), per-process caches, CPU threads, the
heap."""
