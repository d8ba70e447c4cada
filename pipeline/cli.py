"""The ``tileseg`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import __version__
from pipeline.errors import TilesegError

EXIT_USAGE = 2


def _segment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment an image (or a directory of images) into OME-Zarr labels",
        description="Segment INPUT with a fully convolutional model into the OME-Zarr OUTPUT. "
        "INPUT may be a directory: then OUTPUT is a directory with one <stem>.zarr per image.",
    )
    p.add_argument("input", help="image file (TIFF/OME-TIFF/SVS), Zarr/OME-Zarr, or a directory")
    p.add_argument("output", help="output .zarr (or directory, when INPUT is a directory)")
    p.add_argument("--config", help="YAML file with any of these options (flags override it)")
    p.add_argument("--model", help=".safetensors model or TorchScript .pt (default: built-in)")
    p.add_argument("--halo", type=int, help="context per side in pixels (TorchScript models)")
    p.add_argument("--align", type=int, help="tile origin alignment (TorchScript models)")
    p.add_argument("--tile", type=int, help="output tile size in pixels (multiple of the chunk)")
    p.add_argument("--chunk", type=int, help="output chunk size in pixels")
    p.add_argument("--batch-size", type=int, help="tiles per forward pass")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--normalize", choices=["none", "percentile", "fixed"])
    p.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"))
    p.add_argument("--scale", type=float, help="fixed normalisation: x * scale + offset")
    p.add_argument("--offset", type=float)
    p.add_argument("--level", type=int, help="pyramid level of the input to segment")
    p.add_argument("--axes", help="axes of the input when they cannot be read (e.g. YX, CYX)")
    p.add_argument(
        "--save-probabilities", action="store_true", default=None, help="also save probabilities"
    )
    p.add_argument("--probability-dtype", choices=["float16", "float32"])
    p.add_argument("--scheduler", help="address of an existing Dask scheduler")
    p.add_argument("--workers", type=int, help="parallel tasks in the local run")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace OUTPUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


_FLAG_KEYS = (
    "model", "halo", "align", "tile", "chunk", "batch_size", "device", "precision", "normalize",
    "percentiles", "scale", "offset", "level", "axes", "save_probabilities",
    "probability_dtype", "scheduler", "workers", "overwrite",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tileseg", description="Exact overlap-tile U-Net segmentation of gigapixel images."
    )
    parser.add_argument("--version", action="version", version=f"tileseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _segment_parser(sub)
    return parser


def _segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.config import resolve_options
    from pipeline.readers import find_images, image_stem
    from pipeline.segment import segment_image

    flags = {key: getattr(args, key) for key in _FLAG_KEYS}
    if flags["percentiles"] is not None:
        flags["percentiles"] = list(flags["percentiles"])
    options = resolve_options(config=args.config, flags=flags)
    source = Path(args.input)
    if source.is_dir() and not _is_zarr(source):
        images = find_images(source)
        if not images:
            raise TilesegError(source, "no images found in this directory")
        outputs = [Path(args.output) / f"{image_stem(p)}.zarr" for p in images]
        Path(args.output).mkdir(parents=True, exist_ok=True)
    else:
        images, outputs = [source], [Path(args.output)]
    failures = 0
    for image, output in zip(images, outputs, strict=True):
        bar = tqdm(
            total=100, desc=image.name, unit="%", disable=args.no_progress, file=sys.stderr,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
        )  # fmt: skip

        def progress(done: int, total: int, bar: tqdm = bar) -> None:
            bar.update(100 * done / total - bar.n)

        try:
            result = segment_image(image, output, options, progress=progress)
        except TilesegError as exc:
            bar.close()
            if len(images) == 1:
                raise
            print(f"tileseg: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        bar.close()
        shape = "x".join(map(str, result.spatial_shape))
        print(
            f"{image}: {shape} px, {result.tiles} tiles, {result.seconds:.1f} s, "
            f"{result.megapixels_per_second:.2f} MP/s -> {result.output}"
        )
    if failures:
        print(f"tileseg: {failures} of {len(images)} images failed", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _is_zarr(path: Path) -> bool:
    return any((path / name).exists() for name in (".zgroup", ".zarray", "zarr.json"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "segment":
            return _segment(args)
    except TilesegError as exc:
        print(f"tileseg: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tileseg: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
