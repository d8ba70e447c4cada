"""Names and colours of the classes of a segmentation, shared by the NGFF labels metadata, the
probability channels and the exported polygons (QuPath classifications).

A model may declare its class names; otherwise class 0 is "background" and the others are
"foreground" (two classes) or "class 1", "class 2", ... (more).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["class_color", "class_names", "hex_color"]

# RGBA per class; class 0 (background) is transparent, so a viewer shows the image under it.
_COLORS = [
    (0, 0, 0, 0), (255, 64, 64, 255), (64, 200, 64, 255), (64, 128, 255, 255),
    (255, 200, 0, 255), (200, 64, 255, 255), (0, 220, 220, 255), (255, 128, 0, 255),
]  # fmt: skip


def class_names(classes: int, declared: Sequence[str] | None = None) -> tuple[str, ...]:
    """One name per class: the model's own when it declares one per class, else the defaults.

    Parameters
    ----------
    classes
        Number of classes (at least two names are returned: a label image has background and
        foreground even for a one-channel model).
    declared
        The model's class names, or None.
    """
    n = max(int(classes), 2)
    if declared is not None and len(declared) == n:
        return tuple(str(name) for name in declared)
    if n == 2:
        return ("background", "foreground")
    return ("background", *(f"class {k}" for k in range(1, n)))


def class_color(label: int) -> list[int]:
    """The RGBA colour of class ``label`` (the table repeats beyond its eight entries)."""
    return list(_COLORS[label % len(_COLORS)])


def hex_color(label: int) -> str:
    """The colour of class ``label`` as ``RRGGBB`` (NGFF ``omero`` channel colours)."""
    return "".join(f"{v:02X}" for v in class_color(label)[:3])
