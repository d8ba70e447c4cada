"""The ``tileseg`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import NoReturn

from pipeline import __version__
from pipeline.config import SECTIONS, declared
from pipeline.errors import TilesegError

__all__ = ["build_parser", "main"]

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
    _option_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--profile", action="store_true", help="print each image's seconds per phase at the end"
    )


def _option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per declared option (:class:`pipeline.config.Option`), grouped by section;
    unset (None) unless given, so that a config file's value stays in force."""
    groups = {name: parser.add_argument_group(f"{name} options") for name in SECTIONS}
    for name, (_, opt) in declared().items():
        kwargs: dict = {"help": opt.help, "metavar": opt.metavar, "dest": name}
        if opt.flag == "switch":
            kwargs = {"help": opt.help, "dest": name, "action": _OnOff}
        elif opt.flag == "auto-int":
            kwargs["type"] = _int_or_auto
        elif opt.flag == "auto-float":
            kwargs["type"] = _float_or_auto
        elif opt.flag == "pair":
            kwargs.update(type=float, nargs=2)
        elif opt.flag == "resource":
            kwargs.update(type=_resource, action="append")
        elif opt.flag == "many":
            kwargs.update(choices=opt.choices, action="append")
        elif opt.choices:
            kwargs.update(choices=opt.choices, metavar=None)
        elif str in opt.types:
            pass  # text on the command line too (a YAML file may give a number or a list)
        elif float in opt.types:
            kwargs["type"] = float
        elif int in opt.types:
            kwargs["type"] = int
        groups[opt.section].add_argument(f"--{name.replace('_', '-')}", **kwargs)


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


def _float_or_auto(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
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
        "--channels",
        help="the images' channels the model is given, by name or index (NAME|INDEX,...), as "
        "tileseg segment --channels reads them; the model records them and segment reads them",
    )
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
    from pipeline.engine.driver import segment_image
    from pipeline.engine.profile import profile_table
    from pipeline.engine.scale import scale_note
    from pipeline.io.readers import find_images, image_stem
    from pipeline.runtime.heap import heap_hint

    flags = {key: getattr(args, key) for key in declared()}
    if flags["percentiles"] is not None:
        flags["percentiles"] = list(flags["percentiles"])
    if flags["resources"] is not None:
        flags["resources"] = dict(flags["resources"])
    options = resolve_options(config=args.config, flags=flags)
    source = Path(args.input)
    if source.is_dir() and not _is_one_image(source):
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
        if result.nonfinite_pixels:
            n = result.nonfinite_pixels
            print(f"tileseg: warning: {image}: {n} pixels are NaN or infinite: they were "
                  "segmented as 0 after normalisation", file=sys.stderr)  # fmt: skip
        shape = "x".join(map(str, result.spatial_shape))
        if result.skipped:
            print(f"{image}: already complete with the same input, model and config -> "
                  f"{result.output} (skipped)")  # fmt: skip
            continue
        resumed = f", resumed {result.resumed_tasks} done tasks" if result.resumed_tasks else ""
        scaled = scale_note(result.record.get("resample"))
        print(
            f"{image}: {shape} px, {result.tiles} tiles, {result.seconds:.1f} s, "
            f"{result.megapixels_per_second:.2f} MP/s{resumed}{scaled} -> {result.output}"
        )
        off_main_heap += int(result.timings.get("tasks_off_main_heap", 0))
        if args.profile:
            print(profile_table(result.timings))
    if off_main_heap:
        print(heap_hint(off_main_heap), file=sys.stderr)
    if failures:
        print(f"tileseg: {failures} of {len(images)} images failed", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.cli.demo import run_demo
    from pipeline.config import options_from_mapping

    if args.size < 256:
        raise TilesegError("--size", f"size {args.size} is too small (at least 256)")
    given = {"model": args.model, "device": args.device, "workers": args.workers}
    options = options_from_mapping({k: v for k, v in given.items() if v is not None})
    run_demo(
        args.dir, size=args.size, seed=args.seed, options=options, progress=not args.no_progress
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipeline.training.train import TrainConfig, load_train_config, train, with_overrides

    if args.synthetic and (args.images or args.masks):
        raise TilesegError("--synthetic", "give --images/--masks or --synthetic, not both")
    config = load_train_config(args.config) if args.config else TrainConfig()
    flags = (
        "images", "masks", "synthetic", "allow_missing_chunks", "channels", "epochs",
        "steps_per_epoch", "batch_size", "device",
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


def _is_one_image(path: Path) -> bool:
    """A Zarr store, or a DICOM-WSI folder: one image, not a directory of them."""
    from pipeline.io.slides import dicom_folder_file

    zarr = any((path / name).exists() for name in (".zgroup", ".zarray", "zarr.json"))
    return zarr or dicom_folder_file(path) is not None


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
