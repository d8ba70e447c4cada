"""A 2D model run plane by plane on a volume, presented to the engine as a 3D model.

A ``ZYX`` (or ``CZYX``) image with a 2D model is segmented the way Cellpose and StarDist 2D
segment stacks: every Z plane on its own. The adapter folds Z into the batch,
(N, C, Z, Y, X) -> (N·Z, C, Y, X), runs the 2D model, and unfolds its output, and its geometry
says the same to the tiler: no context along Z (halo 0, alignment 1, any number of planes).
The tiler, the tasks, the writers, the pyramid, resuming and exactness then work as for any 3D
model, and each plane of the output is the 2D model's whole-image pass of that plane. Objects
found afterwards are connected across planes (3D objects).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.geometry import ModelGeometry
from pipeline.models.files import LoadedModel

__all__ = [
    "PlaneWise",
    "module_ndim",
    "one_plane_model",
    "plane_geometry",
    "plane_model",
    "runs_plane_wise",
]


class PlaneWise(torch.nn.Module):
    """A 2D module applied to every Z plane of a (N, C, Z, Y, X) batch: (N, K, Z, Y', X')."""

    spatial_ndim = 2  # the dimensions the wrapped module's convolutions have

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, z, y, w = x.shape
        # (N, Z, C, Y, X) then one batch of planes: a view for a channels-last-3d input, whose
        # planes are then channels-last 2D images.
        planes = x.permute(0, 2, 1, 3, 4).reshape(n * z, c, y, w)
        out = self.inner(planes)
        return out.reshape(n, z, *out.shape[1:]).permute(0, 2, 1, 3, 4)


def plane_geometry(geometry: ModelGeometry) -> ModelGeometry:
    """The 3D geometry of a 2D model run plane by plane: nothing along Z, the model's in Y/X."""
    if geometry.ndim != 2:
        raise ValueError(f"plane-wise runs need a 2D model, not {geometry.ndim}D")
    return ModelGeometry(
        halo=(0, *geometry.halo),
        align=(1, *geometry.align),
        shrink=(0, *geometry.shrink),
        size_min=(1, *geometry.size_min),
        size_step=(1, *geometry.size_step),
    )


def plane_model(model: LoadedModel) -> LoadedModel:
    """``model`` (2D) as a 3D model that segments each Z plane on its own; its record says
    ``"planes": true``. The module is shared with ``model`` (predictors copy their own)."""
    return replace(
        model,
        module=PlaneWise(model.module),
        geometry=plane_geometry(model.geometry),
        info={**model.info, "planes": True},
    )


def one_plane_model(model: LoadedModel) -> LoadedModel:
    """The 2D model a plane-wise model runs on each plane (``model`` itself otherwise): what
    looks at one plane, such as the object-size estimate, runs."""
    if not isinstance(model.module, PlaneWise):
        return model
    g = model.geometry
    geometry = ModelGeometry(
        halo=g.halo[1:], align=g.align[1:], shrink=g.shrink[1:],
        size_min=g.size_min[1:], size_step=g.size_step[1:],
    )  # fmt: skip
    info = {k: v for k, v in model.info.items() if k != "planes"}
    return replace(model, module=model.module.inner, geometry=geometry, info=info)


def runs_plane_wise(model: LoadedModel, spatial_ndim: int) -> bool:
    """Whether a model meets an image it segments plane by plane: a 2D model, a 3D image."""
    return model.geometry.ndim == 2 and spatial_ndim == 3


def module_ndim(model: LoadedModel) -> int:
    """Spatial dimensions of the model's own layers (2 for a plane-wise model): the memory
    layout its weights take."""
    return PlaneWise.spatial_ndim if isinstance(model.module, PlaneWise) else model.geometry.ndim
