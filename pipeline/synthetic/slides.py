"""Synthetic slides written to files: tiled pyramidal OME-TIFF images and their ground truth.

Holds :func:`write_synthetic_slide`, :func:`pyramid_shapes`, :func:`write_pyramid` (any
tile source into a pyramidal OME-TIFF) and the tiling and TIFF helpers. The
image content comes from :mod:`pipeline.synthetic.render`, whose public names (the config,
:func:`render_block`, :func:`synthetic_pair`) are re-exported here so that one import gives both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.synthetic.render import SyntheticConfig, _render, render_block, synthetic_pair

__all__ = [
    "SyntheticConfig",
    "pyramid_shapes",
    "render_block",
    "synthetic_pair",
    "write_pyramid",
    "write_synthetic_slide",
]

_DEFAULT_CONFIG = SyntheticConfig()  # frozen: safe as a shared argument default


# ---------------------------------------------------------------------------- writing


def pyramid_shapes(shape: tuple[int, int], levels: int | None = None) -> list[tuple[int, int]]:
    """Level shapes, each half (rounded up) of the previous, until the smaller side < 1024."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while (len(shapes) < levels) if levels is not None else min(shapes[-1]) >= 1024:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _tiles(
    cfg: SyntheticConfig,
    shape,
    tile: int,
    scale: int,
    pool,
    workers: int,
    *,
    labels: bool = False,
    bar=None,
) -> Iterator[np.ndarray]:
    """Row-major tiles of one level, rendered as tile-high chunks on a thread pool."""
    h, w = shape
    step = tile * max(1, 2048 // tile)  # chunk width bounds memory independently of slide size
    blocks = [(y, x) for y in range(0, h, tile) for x in range(0, w, step)]

    def job(y: int, x: int) -> np.ndarray:
        bh, bw = min(tile, h - y), min(step, w - x)
        sub = max(16, 2048 // scale)  # bounds the level-0 area (and objects) of one render call
        out = None
        for yy in range(0, bh, sub):
            for xx in range(0, bw, sub):
                part = _render(
                    cfg,
                    (y + yy, x + xx),
                    (min(sub, bh - yy), min(sub, bw - xx)),
                    scale,
                    image=not labels,
                )[0 if not labels else 1]
                if out is None:
                    out = np.empty((bh, bw, *part.shape[2:]), part.dtype)
                out[yy : yy + part.shape[0], xx : xx + part.shape[1]] = part
        return out

    futures = [pool.submit(job, *b) for b in blocks[: 2 * workers]]
    for i in range(len(blocks)):
        data = futures[i].result()
        futures[i] = None  # release finished chunks
        if i + 2 * workers < len(blocks):
            futures.append(pool.submit(job, *blocks[i + 2 * workers]))
        if bar is not None:  # before yielding: tifffile stops pulling after the last tile
            bar.update(data.shape[0] * data.shape[1])
        yield from (data[:, x : x + tile] for x in range(0, data.shape[1], tile))


def _write_tiff_level(tif, tiles, shape, dtype, tile: int, size: float, comp: dict, **kw) -> None:
    rgb = len(shape) == 3
    meta = {
        "axes": "YXS" if rgb else "YX",
        "PhysicalSizeX": size,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": size,
        "PhysicalSizeYUnit": "µm",
    }
    tif.write(
        tiles,
        shape=shape,
        dtype=dtype,
        tile=(tile, tile),
        resolutionunit="CENTIMETER",
        photometric="rgb" if rgb else "minisblack",
        resolution=(1e4 / size, 1e4 / size),
        **{"metadata": meta, **kw, **comp},
    )


def write_pyramid(
    tif,
    shapes: list[tuple[int, int]],
    level_tiles: Callable[[int, int, int], Iterator[np.ndarray]],
    *,
    dtype,
    tile: int,
    pixel_size: float,
    comp: dict,
    channels: tuple[int, ...] = (),
) -> None:
    """One pyramidal image into an open OME ``TiffWriter``: level 0 with its SubIFDs, then the
    sub-resolutions. ``level_tiles(k, h, w)`` yields level k's row-major tiles."""
    for k, (h, w) in enumerate(shapes):
        kw = {"subifds": len(shapes) - 1} if k == 0 else {"subfiletype": 1}
        if k:
            kw["metadata"] = None  # sub-resolutions belong to the level-0 image
        _write_tiff_level(
            tif, level_tiles(k, h, w), (h, w, *channels), dtype, tile, pixel_size * 2**k, comp,
            **kw,
        )  # fmt: skip


def write_synthetic_slide(
    path: str | os.PathLike[str],
    *,
    shape: tuple[int, int] = (8192, 8192),
    config: SyntheticConfig = _DEFAULT_CONFIG,
    tile: int = 512,
    levels: int | None = None,
    truth_path: str | os.PathLike[str] | None = None,
    pixel_size: float = 0.5,
    progress: bool = False,
    compression: str | None = "zlib",
    workers: int | None = None,
) -> None:
    """Write a tiled, pyramidal BigTIFF OME-TIFF (SubIFD levels) block by block.

    Every level is rendered independently at its own scale (see :func:`render_block`), in chunks
    of one tile row by <= 2048 px on ``workers`` threads, so memory does not grow with the slide.
    ``truth_path`` receives the level-0 instance labels as a tiled OME-TIFF, or as a Zarr v3
    array if it ends with ``.zarr``. ``compression``: a tifffile codec name (zlib: level 1) or
    None; zlib-1 costs little (tiles are encoded on the same threads) and halves the file.
    """
    import tifffile

    if tile % 16 or tile <= 0:
        raise ValueError(f"tile must be a positive multiple of 16, not {tile}")
    shapes = pyramid_shapes(shape, levels)
    workers = workers or min(4, os.cpu_count() or 1)
    # tifffile buffers up to 512 MiB of tiles for parallel encoding by default: cap it
    comp = {"compression": compression, "maxworkers": workers, "buffersize": 2**25}
    if compression in ("zlib", "deflate"):
        comp["compressionargs"] = {"level": 1}  # higher levels are much slower on noisy data
    extra = (3,) if config.kind == "he" else ()
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(h * w for h, w in shapes) + (shape[0] * shape[1] if truth_path else 0)
        bar = tqdm(total=total, unit="px", unit_scale=True, desc=Path(path).name)
    try:
        with ThreadPoolExecutor(workers) as pool:
            with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
                write_pyramid(
                    tif, shapes,
                    lambda k, h, w: _tiles(config, (h, w), tile, 2**k, pool, workers, bar=bar),
                    dtype=config.out_dtype, tile=tile, pixel_size=pixel_size, comp=comp,
                    channels=extra,
                )  # fmt: skip
            if truth_path is None:
                return
            # a labels-only pass: much cheaper than the image and keeps memory bounded
            tiles = _tiles(config, shape, tile, 1, pool, workers, labels=True, bar=bar)
            if str(truth_path).rstrip("/").endswith(".zarr"):
                import zarr

                arr = zarr.create_array(
                    store=str(truth_path),
                    shape=shape,
                    chunks=(tile, tile),
                    dtype="uint32",
                    fill_value=0,
                    overwrite=True,
                )
                nx = -(-shape[1] // tile)
                for i, t in enumerate(tiles):
                    y, x = (i // nx) * tile, (i % nx) * tile
                    arr[y : y + t.shape[0], x : x + t.shape[1]] = t
            else:
                with tifffile.TiffWriter(truth_path, bigtiff=True, ome=True) as tif:
                    _write_tiff_level(tif, tiles, shape, np.uint32, tile, pixel_size, comp)
    finally:
        if bar is not None:
            bar.close()
