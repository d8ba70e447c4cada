"""The ``tileseg`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import NoReturn

from pipeline import __version__
from pipeline.config import (
    CHANNELS_LAST,
    FOLD_NORM,
    INSTANCES,
    NORMALIZE,
    PRECISION,
    PROBABILITY_DTYPES,
    SERIAL_CORES,
    TABLES,
    TISSUE,
)
from pipeline.errors import TilesegError

EXIT_USAGE = 2


class _OnOff(argparse.BooleanOptionalAction):
    """``--x`` / ``--no-x``; unset (None) when neither is given, so a config file's value stays
    in force unless a flag says otherwise."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, default=None, **kwargs)


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
    p.add_argument(
        "--force-halo", action=_OnOff,
        help="use --halo even below the measured receptive field (tiles are then not exact)",
    )  # fmt: skip
    p.add_argument("--tile", type=int, help="output tile size in pixels (multiple of the chunk)")
    p.add_argument("--chunk", type=int, help="output chunk size in pixels")
    p.add_argument(
        "--batch-size", type=_int_or_auto,
        help="tiles per forward pass, or auto: from free GPU memory (4 on the CPU)",
    )  # fmt: skip
    p.add_argument("--batches-per-task", type=int, help="batches per task, at most (default 4)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISION)
    p.add_argument("--channels-last", choices=CHANNELS_LAST, help="channels-last layout (auto: on)")
    p.add_argument(
        "--fold-norm", choices=FOLD_NORM, help="fold batch norm into the convolutions (auto: on)"
    )
    p.add_argument("--compile", action=_OnOff, help="torch.compile the model (off by default)")
    p.add_argument(
        "--prefetch", type=_int_or_auto,
        help="batches read ahead of and written behind inference (auto: 0 on a CPU of up to "
        f"{SERIAL_CORES} cores, else 2; 0: serial)",
    )  # fmt: skip
    p.add_argument("--normalize", choices=NORMALIZE)
    p.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"))
    p.add_argument("--scale", type=float, help="fixed normalisation: x * scale + offset")
    p.add_argument("--offset", type=float)
    p.add_argument("--level", type=int, help="pyramid level of the input to segment")
    p.add_argument("--axes", help="axes of the input when they cannot be read (e.g. YX, CYX)")
    p.add_argument(
        "--allow-missing-chunks",
        action=_OnOff,
        help="read chunks missing from a Zarr input as fill values instead of failing",
    )
    p.add_argument("--save-probabilities", action=_OnOff, help="also save probabilities")
    p.add_argument("--probability-dtype", choices=PROBABILITY_DTYPES)
    p.add_argument(
        "--tissue",
        choices=TISSUE,
        help="skip output tiles without tissue, from a low-resolution mask (default none)",
    )
    p.add_argument(
        "--tissue-threshold", type=float, metavar="T",
        help="--tissue fixed: tissue where the 0..1 tissue-ness exceeds T",
    )  # fmt: skip
    p.add_argument(
        "--tissue-level", type=int, metavar="L",
        help="pyramid level to make the tissue mask from (default: the first of <= 1024 px)",
    )  # fmt: skip
    p.add_argument(
        "--tissue-margin", type=int, metavar="PX",
        help="glass kept around tissue in px, beyond one mask pixel (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--instances",
        choices=INSTANCES,
        help="also write object ids (labels/instances), unique across chunk borders",
    )
    p.add_argument(
        "--instance-threshold", type=float, metavar="P",
        help="objects where the foreground probability exceeds P (needs --save-probabilities; "
        "default: where the label is not background)",
    )  # fmt: skip
    p.add_argument(
        "--min-distance", type=int, metavar="N",
        help="watershed: least distance between two objects' centres in px (default 7)",
    )  # fmt: skip
    p.add_argument(
        "--table",
        choices=TABLES,
        help="per-object measurements (needs --instances), written to OUTPUT/objects.<format>",
    )
    p.add_argument("--scheduler", help="address of an existing Dask scheduler")
    p.add_argument(
        "--resources", type=_resource, action="append", metavar="NAME=N",
        help="worker resources each inference task asks of the --scheduler's workers, e.g. "
        "GPU=1 (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--workers",
        type=int,
        help="parallel tasks in a local run (default: 2 per GPU on CUDA, else 1)",
    )
    p.add_argument("--overwrite", action=_OnOff, help="replace OUTPUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


_FLAG_KEYS = (
    "model", "halo", "align", "force_halo", "tile", "chunk", "batch_size", "batches_per_task",
    "device",
    "precision", "channels_last", "fold_norm", "compile", "prefetch", "normalize",
    "percentiles", "scale", "offset", "level", "axes", "allow_missing_chunks", "save_probabilities",
    "probability_dtype", "tissue", "tissue_threshold", "tissue_level", "tissue_margin",
    "instances", "instance_threshold",
    "min_distance", "table", "scheduler", "resources", "workers", "overwrite",
)  # fmt: skip


def _resource(value: str) -> tuple[str, float]:
    name, sep, amount = value.partition("=")
    try:
        if not (sep and name.strip()):
            raise ValueError
        return name.strip(), float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N, e.g. GPU=1, got {value!r}") from None


def _int_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from None


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, like every other error (subcommands inherit this class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tileseg", description="Exact overlap-tile U-Net segmentation of gigapixel images."
    )
    parser.add_argument("--version", action="version", version=f"tileseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _segment_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="generate a synthetic slide with ground truth, segment it and report",
        description="Generate a synthetic nuclei slide (tiled pyramidal OME-TIFF) with ground "
        "truth, segment it with the default model (or --model), print size, time, throughput "
        "and foreground Dice, and write a QC overlay picture.",
    )
    demo.add_argument("--dir", default="demo-output", help="working directory (demo-output)")
    demo.add_argument("--size", type=int, default=8192, help="slide side in pixels (8192)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", help="model file instead of the default")
    demo.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--workers", type=int, help="parallel tasks")
    demo.add_argument("--no-progress", action="store_true")
    _train_parser(sub)
    _export_parser(sub)
    # Other packages add commands through this entry-point group (flows/ adds the Prefect
    # ones), so the library never imports them: each plugin's register(subparsers) adds its
    # parsers and sets `handler` on them with set_defaults(handler=function(args) -> int).
    for entry in entry_points(group="tileseg.commands"):
        entry.load()(sub)
    return parser


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the built-in U-Net on image/mask pairs or generated data",
        description="Train the built-in U-Net from image/mask pairs (masks: class or instance "
        "label images, matched to images by name) or from generated nuclei (--synthetic), with "
        "augmentation, a validation split and early stopping; write one .safetensors model "
        "with its config and training record. Options come from --config (see "
        "configs/train-default.yaml); flags override it.",
    )
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    p.add_argument("--config", help="YAML training recipe (flags override it)")
    p.add_argument("--images", help="directory of training images (TIFF/Zarr)")
    p.add_argument("--masks", help="directory of label masks named like the images")
    p.add_argument("--synthetic", action="store_true", help="train on generated nuclei images")
    p.add_argument(
        "--allow-missing-chunks", action=_OnOff,
        help="read chunks missing from a Zarr image as fill (masks always may omit empty chunks)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, help="maximum number of epochs")
    p.add_argument("--steps-per-epoch", type=int, help="optimiser steps per epoch")
    p.add_argument("--batch-size", type=int, help="crops per step")
    p.add_argument("--device", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, help="random seed of the whole run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.config import resolve_options
    from pipeline.heap import heap_hint
    from pipeline.readers import find_images, image_stem
    from pipeline.segment import segment_image

    flags = {key: getattr(args, key) for key in _FLAG_KEYS}
    if flags["percentiles"] is not None:
        flags["percentiles"] = list(flags["percentiles"])
    if flags["resources"] is not None:
        flags["resources"] = dict(flags["resources"])
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
    failures = off_main_heap = 0
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
        if result.skipped:
            print(f"{image}: already complete with the same input, model and config -> "
                  f"{result.output} (skipped)")  # fmt: skip
            continue
        resumed = f", resumed {result.resumed_tasks} done tasks" if result.resumed_tasks else ""
        print(
            f"{image}: {shape} px, {result.tiles} tiles, {result.seconds:.1f} s, "
            f"{result.megapixels_per_second:.2f} MP/s{resumed} -> {result.output}"
        )
        off_main_heap += int(result.timings.get("tasks_off_main_heap", 0))
    if off_main_heap:
        print(heap_hint(off_main_heap), file=sys.stderr)
    if failures:
        print(f"tileseg: {failures} of {len(images)} images failed", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.config import options_from_mapping
    from pipeline.demo import run_demo

    if args.size < 256:
        raise TilesegError("--size", f"size {args.size} is too small (at least 256)")
    given = {"model": args.model, "device": args.device, "workers": args.workers}
    options = options_from_mapping({k: v for k, v in given.items() if v is not None})
    run_demo(
        args.dir, size=args.size, seed=args.seed, options=options, progress=not args.no_progress
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipeline.train import TrainConfig, load_train_config, train, with_overrides

    if args.synthetic and (args.images or args.masks):
        raise TilesegError("--synthetic", "give --images/--masks or --synthetic, not both")
    config = load_train_config(args.config) if args.config else TrainConfig()
    flags = (
        "images", "masks", "synthetic", "allow_missing_chunks", "epochs", "steps_per_epoch",
        "batch_size", "device",
    )  # fmt: skip
    config = with_overrides(config, seed=args.seed, **{k: getattr(args, k) for k in flags})
    result = train(config, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    r = result.record
    print(
        f"{result.path}: {result.path.stat().st_size / 1e6:.1f} MB, {r['epochs']} epochs "
        f"(best {r['best_epoch']}{', stopped early' if r['stopped_early'] else ''}), "
        f"val loss {r['val_loss']:.4f}, val Dice {r['val_dice']:.4f}, {r['seconds']:.0f} s"
    )
    if "heldout" in r:
        h = r["heldout"]
        print(f"held-out Dice on {len(h['seeds'])} generated images: {h['pooled_dice']:.4f}")
    return 0


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-model", help="export a tileseg model for other tools (bioimage.io package)"
    )
    p.add_argument("model", help="a .safetensors model made by tileseg train")
    p.add_argument("out", help="the package to write (.zip)")
    p.add_argument("--format", choices=["bioimageio"], default="bioimageio")
    p.add_argument("--name", help="the model's name in the package (default: from the file)")
    p.add_argument("--author", default="tileseg user", help="the package's author")
    p.add_argument("--license", default="CC-BY-4.0", help="SPDX license id of the model")


def _export_model(args: argparse.Namespace) -> int:
    from pipeline.models.bioimageio_export import export_bioimageio

    out = export_bioimageio(
        args.model, args.out, name=args.name, author=args.author, license=args.license
    )
    print(f"{out}: bioimage.io package, {out.stat().st_size / 1e6:.1f} MB, validated")
    return 0


def _is_zarr(path: Path) -> bool:
    return any((path / name).exists() for name in (".zgroup", ".zarray", "zarr.json"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "segment":
            return _segment(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "train":
            return _train(args)
        if args.command == "export-model":
            return _export_model(args)
        if getattr(args, "handler", None) is not None:
            return args.handler(args)
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
