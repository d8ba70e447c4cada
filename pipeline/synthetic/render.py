"""Rendering of synthetic fluorescence-nuclei and H&E-like images with exact ground truth.

Holds the slide parameters (:class:`SyntheticConfig`), the random fields, the nuclei and their
rasterisation, and :func:`render_block` / :func:`synthetic_pair`; writing whole slides to files is
in :mod:`pipeline.synthetic.slides`.

Everything is a deterministic function of global level-0 coordinates, so any block of any pyramid
level can be rendered on its own in bounded memory:

* nuclei come from a coarse grid of placement cells; each cell's candidates are drawn from an RNG
  seeded by ``(seed, cell index)``, thinned by smooth density/tissue fields and by a Matérn-II
  hard-core rule against the neighbouring cells' candidates (so a cell's objects never depend on
  which block asks for them), plus occasional touching "doublets";
* smooth fields (tissue, clusters, illumination, chromatin and stroma texture) are hashed value
  noise on lattices anchored at the level-0 origin;
* only the shot/read noise depends on the block (seeded by seed, scale and block origin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["SyntheticConfig", "render_block", "synthetic_pair"]

_BOOST = 2.0  # peak of the cluster field relative to its mean: candidate over-sampling factor
_MAX_CAND = 63  # candidates per cell: index bits of an id are 1..63, doublet partners 64..126
# object table columns
_Y, _X, _A, _B, _TH, _H2, _H3, _H4, _P2, _P3, _P4, _BRIGHT, _SOFT, _ID = range(14)
_NCOL = 14
_HEMA = np.array([0.650, 0.704, 0.286], np.float32)  # Ruifrok-Johnston stain OD vectors
_EOSIN = np.array([0.072, 0.990, 0.105], np.float32)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic slide (lengths in level-0 pixels).

    ``density`` is the mean number of candidate nuclei per placement cell in tissue; clustering
    varies it spatially (x0.1 .. x2) and overlap thinning removes some candidates.
    Photon/ADU knobs apply to fluorescence; ``noise=False`` gives the block-independent image.
    """

    kind: str = "fluorescence"
    seed: int = 0
    cell: int = 64
    density: float = 6.0
    radius: tuple[float, float] = (4.0, 14.0)
    dtype: str = "uint16"
    tissue: bool = True
    tissue_fraction: float = 0.75  # share of the slide covered by tissue when ``tissue``
    tissue_scale: float = 1500.0  # size of tissue/empty regions
    cluster_scale: float = 300.0  # size of dense/sparse nuclei regions
    aspect: float = 1.8  # max major/minor axis ratio
    irregularity: float = 0.05  # amplitude of boundary harmonics (relative radius)
    separation: float = 0.8  # hard-core distance as a fraction of r1 + r2 (<1: slight overlaps)
    doublets: float = 0.12  # probability that a nucleus gets a touching partner
    texture: float = 0.45  # chromatin texture contrast
    psf_sigma: float = 1.0  # Gaussian PSF sigma
    illumination: float = 0.2  # relative amplitude of the slide-wide illumination field
    noise: bool = True  # shot + read noise (the only block-dependent part)
    photons: float = 400.0  # mean nuclear signal (photoelectrons)
    background: float = 30.0  # tissue autofluorescence (photoelectrons)
    read_noise: float = 2.0  # electrons rms
    offset: float = 100.0  # camera offset (ADU)
    gain: float = 1.0  # ADU per electron (uint16); uint8 is rescaled to keep nuclei mid-range
    # appearance knobs of real nuclei; the defaults render the original slides unchanged
    brightness_spread: float = 0.35  # sd of log nucleus brightness (dim and bright in one image)
    condensed: float = 0.04  # share of small bright (mitotic/apoptotic) nuclei
    condensed_brightness: float = 2.5  # their brightness relative to a typical nucleus
    defocus: float = 0.0  # share of nuclei out of focus (edge blur ~ a third of the radius)
    spots: float = 0.0  # contrast of bright chromocentres (x the nucleus signal)
    nucleoli: float = 0.0  # depth of dark nucleoli (0..1)
    texture_scale: float = 1.0  # size of chromatin texture, spots and nucleoli (x default)
    gradient: float = 0.0  # additive background ramp across ~1000 px (x background)
    # H&E appearance: stain OD vectors (None: Ruifrok-Johnston's), stain amounts (x default),
    # glass brightness, and JPEG quality (0: none; like the noise, JPEG's 8 px blocks depend
    # on the block origin)
    stain_vectors: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    stain_amounts: tuple[float, float] = (1.0, 1.0)
    white: float = 238.0
    jpeg: int = 0
    # H&E tissue that is not nuclei (the defaults draw none of it): dermis-like regions of
    # collagen bundles (share of the tissue), red blood cells (density), haematoxylin in
    # cytoplasm and keratin (OD), small pale vacuoles (density) and patchy eosin (log spread)
    collagen: float = 0.0
    red_cells: float = 0.0
    cytoplasm: float = 0.0
    vacuoles: float = 0.0
    eosin_spread: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", (float(self.radius[0]), float(self.radius[1])))
        if self.kind not in ("fluorescence", "he"):
            raise ValueError(f"kind must be 'fluorescence' or 'he', not {self.kind!r}")
        if self.dtype not in ("uint8", "uint16"):
            raise ValueError(f"dtype must be 'uint8' or 'uint16', not {self.dtype!r}")
        if not 0 < self.radius[0] <= self.radius[1]:
            raise ValueError(f"invalid radius range {self.radius}")
        if not 0 < self.tissue_fraction < 1:
            raise ValueError(f"tissue_fraction must be in (0, 1), not {self.tissue_fraction}")
        if not 0 < self.density <= 20:
            raise ValueError(f"density must be in (0, 20], not {self.density}")
        if self.aspect < 1 or self.cell < 2 * self.separation * self.radius[1]:
            raise ValueError("need aspect >= 1 and cell >= 2 * separation * radius max")
        knobs = (self.brightness_spread, self.condensed, self.defocus, self.spots, self.gradient)
        if min(knobs) < 0 or not 0 <= self.nucleoli <= 1 or self.texture_scale <= 0:
            raise ValueError("appearance knobs must be >= 0, nucleoli <= 1, texture_scale > 0")
        he_ok = min(self.stain_amounts) > 0 and 0 < self.white <= 255 and 0 <= self.jpeg <= 100
        if not he_ok:
            raise ValueError("need stain_amounts > 0, white in (0, 255], jpeg in 0..100")
        tissue_knobs = (self.red_cells, self.cytoplasm, self.vacuoles, self.eosin_spread)
        if not 0 <= self.collagen <= 1 or min(tissue_knobs) < 0:
            raise ValueError("need collagen in [0, 1] and non-negative H&E tissue knobs")
        if self.stain_vectors is not None:
            vectors = tuple(tuple(float(v) for v in row) for row in self.stain_vectors)
            if len(vectors) != 2 or any(len(v) != 3 or min(v) < 0 for v in vectors):
                raise ValueError("stain_vectors: two non-negative RGB OD vectors")
            object.__setattr__(self, "stain_vectors", vectors)

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype("uint8" if self.kind == "he" else self.dtype)

    @property
    def reach(self) -> float:
        """How far (level-0 px) an object's pixels can lie outside its placement cell."""
        r = self.radius[1] * math.sqrt(self.aspect) * (1 + 5.5 * self.irregularity) + 6
        return r + 2.1 * self.radius[1]  # doublet partners sit up to ~1.05 (r1 + r2) away


# ---------------------------------------------------------------------------- random fields


def _zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1  # SeedSequence entropy must be non-negative


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_zigzag(seed), *map(_zigzag, keys)]))


def _hash01(key: int | np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) value per integer lattice point (splitmix64 of the coordinates)."""
    h = np.atleast_1d(iy).astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h = h ^ (np.atleast_1d(ix).astype(np.int64).view(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
    h = h ^ np.asarray(key, np.uint64)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((h ^ (h >> np.uint64(31))) >> np.uint64(40)).astype(np.float32) * np.float32(2**-24)


def _key(cfg: SyntheticConfig, tag: int, octave: int = 0) -> int:
    return ((_zigzag(cfg.seed) * 1_000_003 + tag * 101 + octave) * 0x632BE59BD9B4E019) % 2**64


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3 - 2 * t)


def _axis(coords: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    # lattice index (relative to the first used row), smoothstep weight, first index, count
    g = coords / spacing
    i0 = np.floor(g).astype(np.int64)
    lo = int(i0.min())
    return i0 - lo, _smooth(g - i0).astype(np.float32), lo, int(i0.max()) - lo + 2


def _fbm_points(
    cfg: SyntheticConfig, tag: int, y: np.ndarray, x: np.ndarray, spacing: float, octaves: int
) -> np.ndarray:
    """Level-0 :func:`_fbm` at scattered points, all octaves and corners in one hash call."""
    sp = (spacing / 2.0 ** np.arange(octaves))[:, None]
    gy, gx = y[None, :] / sp, x[None, :] / sp
    iy, ix = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
    fy, fx = _smooth(gy - iy), _smooth(gx - ix)
    v = np.empty((4, *iy.shape), np.float32)
    for o in range(octaves):  # the key differs per octave
        cy = np.stack([iy[o], iy[o], iy[o] + 1, iy[o] + 1])
        cx = np.stack([ix[o], ix[o] + 1, ix[o], ix[o] + 1])
        v[:, o] = _hash01(_key(cfg, tag, o), cy, cx)
    val = (v[0] * (1 - fx) + v[1] * fx) * (1 - fy) + (v[2] * (1 - fx) + v[3] * fx) * fy
    w = 0.5 ** np.arange(octaves)
    return (w @ val) / w.sum()


def _fbm(cfg: SyntheticConfig, tag: int, ys, xs, spacing, octaves: int, *, scale: int = 1):
    """Fractal value noise in [0, 1] (mean 0.5) on the grid ``ys x xs`` (level-0 coordinates).

    ``spacing`` is a lattice pitch or a (y, x) pair of pitches (streaky, fibre-like noise).
    Octaves finer than 2 px of level ``scale`` fade to their mean: they would only alias.
    """
    sy, sx = spacing if isinstance(spacing, tuple) else (spacing, spacing)
    total = np.zeros((len(ys), len(xs)), np.float32)
    norm, const = 2 - 0.5 ** (octaves - 1), 0.0
    for o in range(octaves):
        w = min(1.0, max(0.0, 2 * min(sy, sx) / 2**o / scale - 1)) * 0.5**o / norm
        const += (0.5**o / norm - w) * 0.5
        if w > 0:  # separable bilinear interpolation of the lattice (smoothstep weights)
            iy, fy, ly, ny = _axis(ys, sy / 2**o)
            ix, fx, lx, nx = _axis(xs, sx / 2**o)
            v = np.float32(w) * _hash01(
                _key(cfg, tag, o), np.arange(ly, ly + ny)[:, None], np.arange(lx, lx + nx)[None, :]
            )
            rows = v[:, ix] + (v[:, ix + 1] - v[:, ix]) * fx
            total += rows[iy]
            total += (rows[1:] - rows[:-1])[iy] * fy[:, None]
    total += np.float32(const)
    return total


@lru_cache(maxsize=64)
def _tissue_threshold(cfg: SyntheticConfig) -> float:
    # a 3-octave fBm is roughly normal around 0.5 with sd ~0.144
    return 0.5 - 0.144 * NormalDist().inv_cdf(cfg.tissue_fraction) if cfg.tissue else -1.0


# ---------------------------------------------------------------------------- objects


# uniform streams per candidate (hash keys); normals use Box-Muller on two streams
_U_Y, _U_X, _U_R1, _U_R2, _U_ASP, _U_TH, _U_COND, _U_SOFT, _U_MARK, _U_KEEP = range(10)
_U_HARM, _U_PHASE, _U_BRIGHT, _U_PAIR = 10, 16, 19, 21  # 6, 3, 2 and 4 streams
_U_FOCUS = 25  # later streams: earlier ones keep their keys, so old slides stay the same
_NSTREAM = 26


def _uniforms(cfg: SyntheticConfig, cy: np.ndarray, cx: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(n, _NSTREAM) uniforms of candidate ``k`` of cell (cy, cx): a pure function of seed+cell."""
    keys = np.array([_key(cfg, 100 + j) for j in range(_NSTREAM)], np.uint64)
    return _hash01(keys[None, :], cy[:, None], (cx * 1024 + k)[:, None])


def _normal(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    return np.sqrt(-2 * np.log1p(-u1.astype(np.float64))) * np.cos(2 * np.pi * u2)


def _candidates(cfg: SyntheticConfig, cys: np.ndarray, cxs: np.ndarray) -> np.ndarray:
    """Candidate nuclei of the given cells after density/tissue thinning (+ Matérn mark column).

    Rows are ordered by (cell row, cell column, index in cell): the drawing order.
    """
    lam = cfg.density * _BOOST
    count_u = _hash01(_key(cfg, 99), cys, cxs).astype(np.float64)
    kk = np.arange(_MAX_CAND)
    cdf = np.cumsum(np.exp(kk * math.log(lam) - lam - np.array([math.lgamma(i + 1) for i in kk])))
    n = np.minimum(np.searchsorted(cdf, count_u), _MAX_CAND)  # inverse-CDF Poisson draw
    cy, cx = np.repeat(cys, n), np.repeat(cxs, n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    u = _uniforms(cfg, cy, cx, k).astype(np.float64)
    lo, hi = cfg.radius
    r = lo + (hi - lo) * ((u[:, _U_R1] + u[:, _U_R2]) / 2) ** 1.15
    condensed = u[:, _U_COND] < cfg.condensed  # small bright mitotic/apoptotic nuclei
    r = np.where(condensed, lo + 0.3 * (r - lo), r)
    aspect = 1 + (cfg.aspect - 1) * u[:, _U_ASP] ** 1.5
    obj = np.empty((len(k), _NCOL + 1))
    obj[:, _Y] = (cy + u[:, _U_Y]) * cfg.cell
    obj[:, _X] = (cx + u[:, _U_X]) * cfg.cell
    obj[:, _A], obj[:, _B] = r * np.sqrt(aspect), r / np.sqrt(aspect)
    obj[:, _TH] = np.pi * u[:, _U_TH]
    for j, col in enumerate((_H2, _H3, _H4)):
        g = _normal(u[:, _U_HARM + 2 * j], u[:, _U_HARM + 2 * j + 1])
        obj[:, col] = np.minimum(np.abs(g), 2.5) * cfg.irregularity * (1.0, 0.7, 0.5)[j]
        obj[:, _P2 + j] = 2 * np.pi * u[:, _U_PHASE + j]
    g = _normal(u[:, _U_BRIGHT], u[:, _U_BRIGHT + 1])
    obj[:, _BRIGHT] = np.exp(cfg.brightness_spread * g)
    obj[:, _BRIGHT] *= np.where(condensed, cfg.condensed_brightness, 1.0)
    obj[:, _SOFT] = 0.5 + 2.5 * u[:, _U_SOFT] ** 4  # mostly in focus, a few blurry
    if cfg.defocus > 0:  # out of the focal plane: an edge blurred over a third of the radius
        blur = 0.5 + 2.5 * u[:, _U_SOFT] ** 4 + 0.35 * r * (0.5 + u[:, _U_SOFT])
        obj[:, _SOFT] = np.where(u[:, _U_FOCUS] < cfg.defocus, blur, obj[:, _SOFT])
    # id = 128 * code(cell) + index: Szudzik pairing keeps ids small (< 128 (n+1)^2 on a slide of
    # n x n cells); cell indices wrap every 4096 cells so ids always fit uint32
    a, b = (cy + 1) % 4096, (cx + 1) % 4096
    obj[:, _ID] = np.where(a < b, b * b + a, a * a + a + b) * 128 + k + 1
    obj[:, _NCOL] = u[:, _U_MARK]
    y, x = obj[:, _Y], obj[:, _X]
    p = np.clip(_fbm_points(cfg, 2, y, x, cfg.cluster_scale, 2) * 3.5 - 0.9, 0.1, _BOOST)
    keep = u[:, _U_KEEP] * _BOOST < p
    if cfg.tissue:
        keep &= _fbm_points(cfg, 3, y, x, cfg.tissue_scale, 3) > _tissue_threshold(cfg)
    extra = [u[:, _U_PAIR : _U_PAIR + 4], cy[:, None], cx[:, None]]
    return np.concatenate([obj, *extra], axis=1)[keep]


def _objects(cfg: SyntheticConfig, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    """Objects of all cells whose objects may reach the level-0 window [y0, y1) x [x0, x1).

    Matérn-II thinning: a candidate is dropped if a candidate (kept or not) of its own or a
    neighbouring cell lies closer than ``separation * (r1 + r2)`` and has a smaller mark, so a
    cell's survivors only depend on its 3x3 neighbourhood, never on the window.
    """
    c, m = cfg.cell, cfg.reach
    cy0, cy1 = math.floor((y0 - m) / c), math.floor((y1 + m) / c) + 1
    cx0, cx1 = math.floor((x0 - m) / c), math.floor((x1 + m) / c) + 1
    cys, cxs = np.mgrid[cy0 - 1 : cy1 + 1, cx0 - 1 : cx1 + 1].reshape(2, -1)
    cand = _candidates(cfg, cys, cxs)
    req = np.sqrt(cand[:, _A] * cand[:, _B])
    pairs = cKDTree(cand[:, [_Y, _X]]).query_pairs(
        2 * cfg.separation * cfg.radius[1], output_type="ndarray"
    )
    i, j = pairs[:, 0], pairs[:, 1]
    close = np.hypot(*(cand[i][:, [_Y, _X]] - cand[j][:, [_Y, _X]]).T) < cfg.separation * (
        req[i] + req[j]
    )
    loser = np.where(cand[i, _NCOL] > cand[j, _NCOL], i, j)[close]
    keep = np.ones(len(cand), bool)
    keep[loser] = False
    cell_y, cell_x = cand[:, -2], cand[:, -1]
    keep &= (cell_y >= cy0) & (cell_y < cy1) & (cell_x >= cx0) & (cell_x < cx1)
    if cfg.collagen > 0:  # few cells among the collagen bundles of a dermis (after the
        # hard-core rule, so that the other nuclei stay as they are)
        y, x, ids = cand[:, _Y], cand[:, _X], cand[:, _ID].astype(np.int64)
        dermis = _dermis(cfg, _fbm_points(cfg, 22, y, x, 500.0, 2))
        keep &= _hash01(_key(cfg, 45), ids, np.zeros_like(ids)) > 0.75 * dermis
    obj, u, cell = cand[keep, :_NCOL], cand[keep, _NCOL + 1 : -2], cand[keep, -2:]
    # touching doublets (e.g. daughter cells): a partner about touching its parent
    pair = u[:, 0] < cfg.doublets
    partner, u = obj[pair].copy(), u[pair]
    cell = np.concatenate([cell, cell[pair]])
    r_p = np.sqrt(partner[:, _A] * partner[:, _B])
    r_new = np.clip(r_p * (0.75 + 0.3 * u[:, 1]), *cfg.radius)
    dist = (0.85 + 0.2 * u[:, 2]) * (r_p + r_new)
    ang = 2 * np.pi * u[:, 3]
    partner[:, _Y] += dist * np.sin(ang)
    partner[:, _X] += dist * np.cos(ang)
    partner[:, _A] *= r_new / r_p
    partner[:, _B] *= r_new / r_p
    partner[:, _TH] = ang + np.pi / 2  # daughters lie side by side across the division axis
    partner[:, _P2 : _P4 + 1] += 1.0
    partner[:, _ID] += _MAX_CAND
    obj = np.concatenate([obj, partner])
    # drawing order: cells row-major, then index within the cell (partners after primaries)
    return obj[np.lexsort((obj[:, _ID] % 128, cell[:, 1], cell[:, 0]))]


def _rasterize(
    obj: np.ndarray, scale: int, origin: tuple[int, int], shape: tuple[int, int], image: bool
) -> tuple[np.ndarray | None, np.ndarray]:
    """Paint objects into a block of level ``scale``: stain amount (float32) and labels.

    Shapes are evaluated in unclipped boxes from global coordinates, batched by box size, so a
    pixel's value never depends on the block; painting follows drawing order (later wins).
    """
    h, w = shape
    amount = np.zeros(shape, np.float32) if image else None
    labels = np.zeros(shape, np.uint32)
    s = float(scale)
    cy = (obj[:, _Y] - (s - 1) / 2) / s  # level-s pixel k has its centre at k*s + (s-1)/2
    cx = (obj[:, _X] - (s - 1) / 2) / s
    a, b = obj[:, _A] / s, obj[:, _B] / s
    soft = np.maximum(obj[:, _SOFT] / s, 0.5)
    ext = np.ceil(np.maximum(a, b) * (1 + obj[:, _H2 : _H4 + 1].sum(axis=1)) + soft).astype(int)
    ext += 1
    y0 = np.floor(cy).astype(np.int64) - ext - origin[0]  # box corner in block pixels
    x0 = np.floor(cx).astype(np.int64) - ext - origin[1]
    vis = (y0 < h) & (y0 + 2 * ext >= 0) & (x0 < w) & (x0 + 2 * ext >= 0)
    boxes: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for e in np.unique(ext[vis]):
        idx = np.flatnonzero(vis & (ext == e))
        off = np.arange(-e, e + 1, dtype=np.float64)
        dy = ((np.floor(cy[idx])[:, None] + off) - cy[idx][:, None])[:, :, None]
        dx = ((np.floor(cx[idx])[:, None] + off) - cx[idx][:, None])[:, None, :]
        o = obj[idx][:, :, None, None]
        ct, st = np.cos(o[:, _TH]), np.sin(o[:, _TH])
        p = (dx * ct + dy * st) / a[idx][:, None, None]
        q = (dy * ct - dx * st) / b[idx][:, None, None]
        rho, phi = np.hypot(p, q), np.arctan2(q, p)
        bound = (
            1 + o[:, _H2] * np.cos(2 * phi - o[:, _P2]) + o[:, _H3] * np.cos(3 * phi - o[:, _P3])
        )
        bound += o[:, _H4] * np.cos(4 * phi - o[:, _P4])
        prof = None
        if image:  # soft (defocus) edge and slightly domed profile
            sharp = (np.sqrt(a[idx] * b[idx]) / soft[idx])[:, None, None]
            edge = np.clip((bound - rho) * sharp + 0.5, 0, 1)
            prof = (o[:, _BRIGHT] * edge * (1 - 0.25 * np.minimum(rho, 1) ** 2)).astype(np.float32)
        for j, i in enumerate(idx):
            boxes[i] = (rho[j] <= bound[j], None if prof is None else prof[j])
    for i in np.flatnonzero(vis):
        inside, prof = boxes[i]
        ya, xa, n = int(y0[i]), int(x0[i]), inside.shape[0]
        dst = slice(max(ya, 0), min(ya + n, h)), slice(max(xa, 0), min(xa + n, w))
        src = slice(dst[0].start - ya, dst[0].stop - ya), slice(dst[1].start - xa, dst[1].stop - xa)
        labels[dst][inside[src]] = int(obj[i, _ID])
        if amount is not None:
            amount[dst] += prof[src]
    return amount, labels


# ---------------------------------------------------------------------------- rendering


def _chromatin(cfg: SyntheticConfig, nuclei, amount, ys, xs, s: int) -> np.ndarray:
    """Bright chromocentres and dark nucleoli on top of the chromatin texture: a dim nucleus
    with a few bright spots is one object, not a set of spots."""
    ts = cfg.texture_scale
    if cfg.spots > 0:  # sparse blobs a few px across (x texture_scale)
        blob = np.clip((_fbm(cfg, 14, ys, xs, 5.0 * ts, 2, scale=s) - 0.66) / 0.12, 0, 1)
        nuclei = nuclei + cfg.spots * amount * blob**2
    if cfg.nucleoli > 0:  # one or two larger dark patches per nucleus
        hole = np.clip((_fbm(cfg, 15, ys, xs, 9.0 * ts, 2, scale=s) - 0.64) / 0.1, 0, 1)
        nuclei = nuclei * (1 - cfg.nucleoli * hole)
    return nuclei


def render_block(
    config: SyntheticConfig, *, origin: tuple[int, int], shape: tuple[int, int], scale: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Render image and instance labels of one block.

    Parameters
    ----------
    config
        Slide parameters.
    origin, shape
        Block position and size (Y, X) in the pixels of pyramid level ``scale``.
    scale
        Downsampling factor of the level (1, 2, 4, ...); the same objects at scaled coordinates.

    Returns
    -------
    image : (Y, X) ``config.dtype`` for fluorescence, (Y, X, 3) uint8 for ``kind="he"``.
    labels : (Y, X) uint32 instance ids (0 = background); ``labels > 0`` is the semantic mask.
    """
    return _render(config, origin, shape, scale, image=True)  # type: ignore[return-value]


def _render(
    cfg: SyntheticConfig,
    origin: tuple[int, int],
    shape: tuple[int, int],
    scale: int,
    *,
    image: bool,
) -> tuple[np.ndarray | None, np.ndarray]:
    if scale < 1 or shape[0] < 0 or shape[1] < 0:
        raise ValueError(f"invalid block: origin={origin} shape={shape} scale={scale}")
    s = int(scale)
    sigma = math.sqrt(cfg.psf_sigma**2 + (s * s - 1) / 12) / s  # PSF plus pixel-binning blur
    m = int(4 * sigma + 0.5) + 1 if image else 0  # margin so the blur is seamless
    ext_origin = (int(origin[0]) - m, int(origin[1]) - m)
    ext_shape = (int(shape[0]) + 2 * m, int(shape[1]) + 2 * m)
    ys = np.arange(ext_origin[0], ext_origin[0] + ext_shape[0]) * s + (s - 1) / 2
    xs = np.arange(ext_origin[1], ext_origin[1] + ext_shape[1]) * s + (s - 1) / 2
    obj = _objects(cfg, ys[0] - s, ys[-1] + s, xs[0] - s, xs[-1] + s) if len(ys) * len(xs) else []
    amount, labels = _rasterize(np.asarray(obj).reshape(-1, _NCOL), s, ext_origin, ext_shape, image)
    labels = labels[m : m + shape[0], m : m + shape[1]]
    if not image:
        return None, labels
    if not amount.size:
        return np.zeros((*shape, 3) if cfg.kind == "he" else shape, cfg.out_dtype), labels

    if cfg.tissue:
        t = _fbm(cfg, 3, ys, xs, cfg.tissue_scale, 3, scale=s) - _tissue_threshold(cfg)
        tissue = np.clip(t / 0.03 + 0.5, 0, 1).astype(np.float32)  # soft tissue border
    else:
        tissue = np.float32(1)
    illum = 1 + cfg.illumination * (2 * _fbm(cfg, 5, ys, xs, 4000.0, 1) - 1)
    ts = cfg.texture_scale
    chroma = _fbm(cfg, 6, ys, xs, 6.0 * ts, 3, scale=s)
    spots = np.maximum(_fbm(cfg, 7, ys, xs, 3.0 * ts, 1, scale=s) - 0.7, 0) * 4  # chromocentres
    nuclei = amount * (1 + cfg.texture * (2 * (chroma - 0.5) * 1.6 + spots))
    nuclei = _chromatin(cfg, nuclei, amount, ys, xs, s)
    stroma = _fbm(cfg, 8, ys, xs, 48.0, 4, scale=s)
    rng = _rng(cfg.seed, 9, s, *origin)

    if cfg.kind == "fluorescence":
        sig = cfg.photons * nuclei + cfg.background * tissue * (0.4 + 1.2 * stroma)
        if cfg.gradient > 0:  # uneven background (scattered light, out-of-focus haze)
            ramp = _fbm(cfg, 16, ys, xs, 1000.0, 1)
            sig = sig + cfg.gradient * cfg.background * 1.5 * ramp
        sig = ndimage.gaussian_filter(sig * illum, sigma, mode="nearest", truncate=4.0)
        sig = sig[m : m + shape[0], m : m + shape[1]]
        if cfg.noise:  # Gaussian approximation of Poisson shot + read noise, averaged over s*s
            sd = np.sqrt(np.maximum(sig, 0) + cfg.read_noise**2) / s
            sig = sig + sd * rng.standard_normal(sig.shape, dtype=np.float32)
        adu = cfg.offset + cfg.gain * sig
        if cfg.dtype == "uint8":
            adu = adu * (200 / (cfg.offset + 2 * cfg.gain * cfg.photons))
        out = np.clip(np.rint(adu), 0, np.iinfo(cfg.out_dtype).max).astype(cfg.out_dtype)
        return out, labels

    # wavy collagen fibres: horizontal and vertical streaks blended by a smooth orientation field
    turn = np.clip((_fbm(cfg, 11, ys, xs, 160.0, 2) - 0.5) * 4 + 0.5, 0, 1)
    fibre = turn * _fbm(cfg, 12, ys, xs, (4.0, 40.0), 2, scale=s)
    fibre += (1 - turn) * _fbm(cfg, 13, ys, xs, (40.0, 4.0), 2, scale=s)
    lumen = np.clip((_fbm(cfg, 10, ys, xs, 120.0, 4, scale=s) - 0.7) / 0.03, 0, 1)
    eosin = tissue * (0.12 + 0.4 * stroma + 0.2 * fibre) * (1 - 0.9 * lumen)
    hema = 0.04 * tissue
    h_vec, e_vec = _stain_vectors(cfg)
    red = None
    if _has_he_tissue(cfg):
        eosin, hema, red = _he_tissue(cfg, eosin, hema, tissue, ys, xs, s)
    eosin = eosin + 0.4 * np.minimum(amount, 1)
    hema = hema + 1.3 * nuclei
    od = (cfg.stain_amounts[0] * hema)[..., None] * h_vec
    od += (cfg.stain_amounts[1] * eosin)[..., None] * e_vec
    if red is not None:  # haemoglobin plus eosin: orange-red, with blue absorbed too
        od += (cfg.stain_amounts[1] * red)[..., None] * (e_vec + _RED_CELL)
    rgb = (cfg.white * (1 + 0.25 * (illum[..., None] - 1))) * np.exp(-od)  # milder light variation
    rgb = ndimage.gaussian_filter(rgb, (sigma, sigma, 0), mode="nearest", truncate=4.0)
    rgb = rgb[m : m + shape[0], m : m + shape[1]]
    if cfg.noise:
        rgb += (2.5 / s) * rng.standard_normal(rgb.shape, dtype=np.float32)
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if cfg.jpeg and rgb.size:  # a scanner's lossy tiles: blocking and colour subsampling
        import imagecodecs

        rgb = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(rgb, level=cfg.jpeg))
    return rgb, labels


# ---------------------------------------------------------------------------- H&E tissue

_RED_CELL = np.array([0.0, 0.15, 0.55], np.float32)  # red cells' OD beyond eosin's
_RED_PITCH = 28.0  # lattice of red-cell sites (level-0 px): one cell at most per site


def _has_he_tissue(cfg: SyntheticConfig) -> bool:
    knobs = (cfg.collagen, cfg.red_cells, cfg.cytoplasm, cfg.vacuoles, cfg.eosin_spread)
    return max(knobs) > 0


def _he_tissue(
    cfg: SyntheticConfig,
    eosin: np.ndarray,
    hema: np.ndarray,
    tissue: np.ndarray | np.float32,
    ys: np.ndarray,
    xs: np.ndarray,
    s: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Eosin and haematoxylin of everything in H&E tissue that is not a nucleus, and the
    red cells' stain: the look-alikes a nuclei model must learn to leave out."""
    if cfg.eosin_spread > 0:  # eosin density varies across the section
        eosin = eosin * np.exp(cfg.eosin_spread * (2 * _fbm(cfg, 17, ys, xs, 250.0, 2) - 1))
    if cfg.cytoplasm > 0:  # granular cytoplasm: grey-purple, darker than glass, not a nucleus
        grain = _fbm(cfg, 18, ys, xs, 7.0, 2, scale=s) - 0.5
        dense = tissue * cfg.cytoplasm * (0.25 + _fbm(cfg, 19, ys, xs, 90.0, 2) + 0.6 * grain)
        hema, eosin = hema + dense, eosin + 0.4 * dense
    if cfg.collagen > 0:
        dermis, bundle = _collagen(cfg, ys, xs)
        dermis = dermis * tissue
        lift = np.exp(cfg.eosin_spread * (2 * _fbm(cfg, 20, ys, xs, 400.0, 1) - 1))
        eosin = eosin * (1 - dermis) + dermis * (0.03 + (0.7 + 0.6 * lift) * bundle)
        hema = hema * (1 - dermis) + dermis * bundle * (0.04 + 0.15 * cfg.cytoplasm)
    if cfg.vacuoles > 0:  # small empty holes in the tissue: glass through it
        cut = 0.78 - 0.06 * min(cfg.vacuoles, 2.0)
        hole = np.clip((_fbm(cfg, 21, ys, xs, 16.0, 2, scale=s) - cut) / 0.025, 0, 1)
        eosin, hema = eosin * (1 - 0.9 * hole), hema * (1 - 0.9 * hole)
    red = _red_cells(cfg, ys, xs) * tissue if cfg.red_cells > 0 else None
    return eosin, hema, red


def _dermis(cfg: SyntheticConfig, field: np.ndarray) -> np.ndarray:
    """Dermis weight (0..1) from its smooth field: ``collagen`` of the tissue above the cut."""
    cut = 0.5 - 0.15 * NormalDist().inv_cdf(min(max(cfg.collagen, 1e-3), 0.999))
    return np.clip((field - cut) / 0.04 + 0.5, 0, 1)


def _collagen(
    cfg: SyntheticConfig, ys: np.ndarray, xs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Dermis-like regions and, in them, collagen bundles: long, wavy, streaked pink bands
    with glass between them, in three directions blended by smooth fields."""
    dermis = _dermis(cfg, _fbm(cfg, 22, ys, xs, 500.0, 2))
    y, x = np.meshgrid(ys.astype(np.float64), xs.astype(np.float64), indexing="ij")
    y, x = y.ravel(), x.ravel()
    wave = 60.0 * (_fbm_points(cfg, 23, y, x, 160.0, 2) - 0.5)
    turn = _hash01(_key(cfg, 24), np.zeros(1), np.zeros(1))[0] * np.pi
    bands, weights = [], []
    for k in range(3):
        th = turn + k * np.pi / 3
        along, across = y * np.cos(th) + x * np.sin(th), x * np.cos(th) - y * np.sin(th) + wave
        core = _fbm_points(cfg, 25 + k, along / 130.0, across / 24.0, 1.0, 2)
        streak = _fbm_points(cfg, 28 + k, along / 30.0, across / 2.5, 1.0, 1)
        bands.append(np.clip((core - 0.5) / 0.03, 0, 1) * (0.65 + 0.6 * streak))
        weights.append(np.exp(12.0 * _fbm_points(cfg, 31 + k, y, x, 350.0, 2)))
    bundle = sum(b * w for b, w in zip(bands, weights, strict=True)) / sum(weights)
    return dermis, bundle.reshape(len(ys), len(xs)).astype(np.float32)


def _red_cells(cfg: SyntheticConfig, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Red blood cells: discs 10..15 px across with a paler centre, at most one per lattice
    site, crowded where a smooth 'vessel' field is high and a few on their own."""
    iy, ix = np.floor(ys / _RED_PITCH).astype(np.int64), np.floor(xs / _RED_PITCH).astype(np.int64)
    sy, sx = np.unique(iy), np.unique(ix)
    site_y, site_x = np.meshgrid(sy, sx, indexing="ij")
    u = [_hash01(_key(cfg, 40 + j), site_y, site_x) for j in range(4)]
    r = 5.0 + 2.5 * u[3]
    room = _RED_PITCH - 2 * r - 1
    cy, cx = (
        site_y * _RED_PITCH + r + 0.5 + room * u[1],
        site_x * _RED_PITCH + r + 0.5 + room * u[2],
    )
    vessel = _fbm_points(cfg, 44, cy.ravel(), cx.ravel(), 110.0, 2).reshape(cy.shape)
    vessel = np.clip((vessel - 0.6) / 0.05, 0, 1)
    present = u[0] < np.minimum(1.0, cfg.red_cells * (0.02 + 0.6 * vessel))
    row, col = np.ix_(iy - sy[0], ix - sx[0])  # each pixel's site
    r, cy, cx = r[row, col], cy[row, col], cx[row, col]
    d = np.hypot(ys[:, None] - cy, xs[None, :] - cx) / r
    disc = np.clip((1 - d) * r + 0.5, 0, 1) * (1 - 0.35 * np.exp(-4 * d * d))
    return (1.4 * present[row, col] * disc).astype(np.float32)


def _stain_vectors(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Unit haematoxylin and eosin OD vectors of the slide."""
    if cfg.stain_vectors is None:
        return _HEMA, _EOSIN
    h, e = (np.asarray(v, np.float32) for v in cfg.stain_vectors)
    return h / np.linalg.norm(h), e / np.linalg.norm(e)


def synthetic_pair(
    shape: tuple[int, int],
    *,
    config: SyntheticConfig | None = None,
    origin: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Image and instance labels of a small level-0 region held in memory (crops, tests)."""
    return render_block(config or SyntheticConfig(), origin=origin, shape=shape)
