"""Which of an image's channels a model is given: ``--channels``, or the one nuclear stain.

A fluorescence image usually holds several channels (a nuclear stain beside markers), and a
nuclei model takes one. ``--channels`` names them, by index or by the name the file gives
(OME-XML ``Channel/@Name``, NGFF ``omero`` labels, ImageJ labels; red, green and blue for the
samples of RGB pixels), in the order the model takes them. Without it, a one-channel model on
an image of several channels gets the one channel whose name is a nuclear stain
(:data:`NUCLEAR_STAIN`), and an image with none or several such is refused, with its channels
listed. The choice is part of the image (:meth:`~pipeline.io.readers.LazyImage.with_channels`):
everything that reads it sees only the channels chosen.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.config import parse_channels
from pipeline.errors import TilesegError
from pipeline.io.readers import LazyImage

__all__ = [
    "NUCLEAR_STAIN",
    "auto_channel",
    "channel_listing",
    "channel_record",
    "nuclear_channels",
    "select_channels",
]

# Names of DNA stains, as microscopes and converters write them ("DAPI", "DAPI (405)",
# "Hoechst 33342", "H33258", "DRAQ5", "SiR-DNA", "PI", "TO-PRO-3", "Nuclei"): matched anywhere
# in a channel's name, not inside a longer word.
NUCLEAR_STAIN = re.compile(
    r"(?<![a-z])(?:dapi|hoechst|h\s*-?\s*33(?:342|258)|draq\s*-?\s*[57]|sir\s*-?\s*dna"
    r"|propidium(?:\s*-?\s*iodide)?|to\s*-?\s*pro\s*-?\s*3|nucle(?:i|us|ar))(?![a-z])"
    r"|(?<![a-z0-9])pi(?![a-z0-9])",
    re.IGNORECASE,
)
_SAMPLE_ALIASES = {"r": "red", "g": "green", "b": "blue"}


def channel_listing(image: LazyImage, channels: tuple[int, ...] | None = None) -> str:
    """The file's channels (or those of ``channels``) as ``0 FITC, 1 DAPI``."""
    names = image.file_channel_names
    chosen = range(len(names)) if channels is None else channels
    return ", ".join(f"{c} {names[c] or '(no name)'}" for c in chosen)


def select_channels(image: LazyImage, requested: str | None) -> LazyImage:
    """``image`` reading the channels ``--channels requested`` names (``image`` itself when
    None): indices or names of the file's channels, matched without regard to case; a name
    may also be words of one channel's name (``DAPI`` for ``DAPI (405)``).

    Raises
    ------
    TilesegError
        For a name no channel has or several have, or an index outside the channels, with the
        channels listed.
    """
    if requested is None:
        return image
    return image.with_channels(tuple(_channel_index(image, item, requested)
                                     for item in parse_channels(requested).split(",")))  # fmt: skip


def _channel_index(image: LazyImage, item: str, requested: str) -> int:
    names = [n.casefold() for n in image.file_channel_names]
    if item.isdigit():
        found = [int(item)] if int(item) < len(names) else []
        problem = f"no channel {item}"
    else:
        key = item.casefold()
        if key not in names and "red" in names:  # the samples of RGB pixels: R, G, B too
            key = _SAMPLE_ALIASES.get(key, key)
        found = [c for c, name in enumerate(names) if name == key]
        if not found:  # a word of the name: DAPI for "DAPI (405)"
            word = re.compile(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])")
            found = [c for c, name in enumerate(names) if word.search(name)]
        problem = f"no channel named {item!r}" if not found else f"{item!r} names several"
    if len(found) != 1:
        raise TilesegError(
            image.path,
            f"--channels {requested}: {problem} (channels: {channel_listing(image)}); give "
            "channel names or indices",
        )
    return found[0]


def nuclear_channels(image: LazyImage) -> list[int]:
    """The image's channels whose names are nuclear stains (:data:`NUCLEAR_STAIN`)."""
    return [c for c, n in enumerate(image.channel_names) if NUCLEAR_STAIN.search(n)]


def auto_channel(
    image: LazyImage,
    *,
    requested: str | None,
    model_channels: int | None,
    model: str,
    trained: str | None = None,
) -> LazyImage:
    """The channels a model of ``model_channels`` input channels is given when nothing maps the
    image's colours (no stain step): those ``--channels`` chose (``requested``), which must be
    as many; else those the model was ``trained`` on (``tileseg train --channels``, by the same
    names or indices); else, for a one-channel model, the one channel named as a nuclear stain.

    Raises
    ------
    TilesegError
        For ``--channels`` choosing another number of channels than the model takes, an image
        without the channels the model was trained on, or an image of several channels for a
        one-channel model without one nuclear stain among them.
    """
    count = image.n_channels
    if model_channels is None or count == model_channels:
        return image
    if requested is not None:
        raise TilesegError(
            image.path,
            f"--channels {requested} chooses {count} channel(s) "
            f"({channel_listing(image, image.spec.channels)}) but the model ({model}) takes "
            f"{model_channels}",
        )
    if trained is not None and image.spec.channels is None:
        try:
            return select_channels(image, trained)
        except TilesegError:
            raise TilesegError(
                image.path,
                f"the model was trained on channels {trained}, which this image does not have "
                f"(channels: {channel_listing(image)}); give --channels NAME|INDEX",
            ) from None
    if model_channels != 1 or image.spec.channels is not None:
        return image  # a count the model does not take: refused with the rest of the checks
    nuclear = nuclear_channels(image)
    if len(nuclear) == 1:
        return image.with_channels((nuclear[0],))
    why = (
        "none is named as a nuclear stain (DAPI, Hoechst, DRAQ5, ...)"
        if not nuclear
        else f"{len(nuclear)} are named as nuclear stains"
    )
    raise TilesegError(
        image.path,
        f"{count} channels ({channel_listing(image)}) and the model ({model}) takes 1: {why}; "
        "choose it with --channels NAME|INDEX",
    )


def channel_record(
    image: LazyImage, requested: str | None, *, trained: str | None = None
) -> dict[str, Any] | None:
    """What the provenance record says of the channels read: which, their names, and why
    (``--channels``, the channels the model was ``trained`` on, or the nuclear stain); None
    when all of them are."""
    selected = image.spec.channels
    if selected is None:
        return None
    names = image.file_channel_names
    how = (
        f"--channels {requested}"
        if requested is not None
        else f"the model's training channels: {trained}"
        if trained is not None
        else "auto: named as a nuclear stain"
    )
    return {"indices": list(selected), "names": [names[c] for c in selected], "chosen": how}
