"""Time vs tissue fraction: ``segment_image`` with ``tissue="otsu"`` on slides of one size where
tissue covers only a share f of the area and the rest is empty glass.

The synthetic generator's own ``tissue_fraction`` places tissue by smooth noise, so the share it
gives on one slide is only roughly f. Here the share is exact: a band of the top f of the rows is
rendered as all-tissue and the rest as the generator's empty glass (its camera offset and read
noise, rendered from a config whose tissue threshold no noise value reaches), block by block
while writing a tiled pyramidal OME-TIFF, so memory stays bounded at any size.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from children import SEGMENT, run_child

FRACTIONS = (0.25, 0.5, 1.0)


def write_partial_slide(path: Path, *, size: int, fraction: float, tile: int = 512) -> None:
    """A size x size fluorescence slide whose rows ``y < fraction * size`` hold tissue."""
    import tifffile

    from pipeline.synthetic.slides import (
        SyntheticConfig,
        pyramid_shapes,
        render_block,
        write_pyramid,
    )

    tissue = SyntheticConfig(seed=1, tissue=False)  # tissue everywhere
    # 1e-9: a tissue threshold of 0.5 + 6 sd of the tissue noise, which never reaches it
    glass = dataclasses.replace(tissue, tissue=True, tissue_fraction=1e-9)
    edge = fraction * size  # level-0 row where the glass begins

    def block(scale: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        # rows by their centre in level-0 pixels (pixel k of level s is centred at k*s + (s-1)/2)
        rows = (np.arange(y, y + h) * scale + (scale - 1) / 2) < edge
        shape = (h, w)
        if rows.all() or not rows.any():
            config = tissue if rows.all() else glass
            return render_block(config, origin=(y, x), shape=shape, scale=scale)[0]
        out = render_block(glass, origin=(y, x), shape=shape, scale=scale)[0]
        out[rows] = render_block(tissue, origin=(y, x), shape=shape, scale=scale)[0][rows]
        return out

    def tiles(pool: ThreadPoolExecutor, scale: int, h: int, w: int) -> Iterator[np.ndarray]:
        for y in range(0, h, tile):  # one row of tiles at a time: bounded memory
            row = [(scale, y, x, min(tile, h - y), min(tile, w - x)) for x in range(0, w, tile)]
            yield from pool.map(lambda b: block(*b), row)

    comp = {"compression": "zlib", "compressionargs": {"level": 1}}
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    with pool, tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        write_pyramid(
            tif, pyramid_shapes((size, size)), lambda k, h, w: tiles(pool, 2**k, h, w),
            dtype=tissue.out_dtype, tile=tile, pixel_size=0.5, comp=comp,
        )  # fmt: skip


SLIDE = """
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from tissue_fraction import write_partial_slide
write_partial_slide(Path(sys.argv[1]), size=int(sys.argv[2]), fraction=float(sys.argv[3]))
print("{}")
"""


def time_vs_tissue(
    out: Path,
    *,
    size: int,
    model: str,
    device: str,
    tile: int,
    batch_size: int | str,
    workers: int,
) -> dict:
    """Segment one slide per tissue fraction; seconds relative to the all-tissue slide."""
    out = out.resolve()  # children run in the repository root
    rows = []
    for f in FRACTIONS:
        src = out / f"tissue-{size}-{f:g}.ome.tif"
        if not src.exists():
            print(f"generating {src} ...", file=sys.stderr, flush=True)
            run_child(SLIDE, str(src), str(size), str(f))
        ans, _ = run_child(
            SEGMENT, str(src), str(out / "tissue.zarr"), model, device, str(tile),
            str(batch_size), str(workers), "otsu",
        )  # fmt: skip
        tissue = ans["tissue"] or {}
        rows.append({"fraction": f, "measured_fraction": tissue.get("fraction"),
                     "mask_note": tissue.get("note", ""), **ans})  # fmt: skip
    full = rows[-1]["seconds"]
    for r in rows:
        r["relative_seconds"] = r["seconds"] / full
    return {"size": size, "rows": rows}


def table(result: dict) -> list[str]:
    """The tissue part as Markdown lines."""
    lines = [
        "| tissue share f | measured (mask) | tiles inferred | seconds | relative to f = 1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        measured = "n/a" if r["measured_fraction"] is None else f"{r['measured_fraction']:.3f}"
        lines.append(
            f"| {r['fraction']:g} | {measured} | {r['tiles_inferred']}/{r['tiles']} "
            f"| {r['seconds']:.2f} | {r['relative_seconds']:.2f} |"
        )
    return lines
