"""Synthetic multi-site nnU-Net v2 raw datasets, for tests, examples and benchmarks.

Every site images the same anatomy (a body, one organ = label 1, a few lesions = label 2)
but with its own scanner: voxel spacing and anisotropy, field of view (zero padding that
nnU-Net crops away), organ size, lesion count, case count, and intensities. The CT-like
channel is in fixed Hounsfield-like units (nnU-Net's CTNormalization uses the federation's
fingerprint), the MRI-like channel has an arbitrary per-site scale, offset and bias field
(ZScoreNormalization). Everything is a deterministic function of (seed, site, split, case).

Two tasks. "easy" (the default): one ellipsoidal organ and round bright lesions, so a site
alone learns it from a handful of cases. "hard": what more cases (and so other sites) help
with. Organs are rotated and lobulated and vary in size from case to case; lesions come in
three kinds (bright, dark, ring-enhancing) whose mix differs from site to site, so a site sees
fewer of its rarer kinds; a bright distractor structure (labelled background) often lies next to
the organ; the tissue has a smooth texture; and the scanners differ more (noise, contrast,
offsets). Its fourth site ("SiteD") is meant as a site no model trains on (hard_profiles).

Geometry is defined in millimetres, so a site with finer spacing gets larger images and
larger organs in voxels, as real scanners do. 2-D data is stored as 1 x H x W volumes with
a 999 mm slice spacing, the nnU-Net convention for 2-D NIfTI.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from scipy import ndimage

from .ffe import dataset_info, merge_dataset_info

FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "organ": 1, "lesion": 2}
CHANNELS = ("CT", "MRI")
DEFAULT_SIZE = {2: (48, 48), 3: (24, 32, 32)}  # voxels at the nominal spacing
NOMINAL_SPACING = {2: (999.0, 1.0, 1.0), 3: (3.0, 1.0, 1.0)}
DEFAULT_TRAIN_CASES = (6, 10, 4, 8, 5, 7)
TASKS = ("easy", "hard")
LESION_KINDS = ("bright", "dark", "ring")


def trainable_cases(i: int) -> int:
    """Site i's default training cases, at least 5: nnU-Net's 5-fold split (and init/join) need them."""
    return max(5, DEFAULT_TRAIN_CASES[i % len(DEFAULT_TRAIN_CASES)])

# Hand-picked scanners for the first sites, so that the federation is heterogeneous by
# construction (further sites are drawn at random): in-plane spacing (y, x), slice
# spacing (3-D), zero margin per side, organ scale, lesions per case, CT offset (HU),
# CT enhancement factor, CT noise (HU), MRI scale, MRI offset, MRI bias strength.
_SCANNERS = (
    ((1.0, 1.0), 3.0, 0.00, 1.00, (1, 2), 0.0, 1.0, 12.0, 400.0, 0.0, 0.10),
    ((0.75, 0.8), 2.0, 0.14, 1.25, (2, 4), 25.0, 1.6, 25.0, 2500.0, 300.0, 0.35),
    ((1.4, 1.3), 5.0, 0.06, 0.80, (1, 1), -30.0, 0.7, 8.0, 60.0, 10.0, 0.05),
)
# The hard task's scanners: the same fields, then the site's mix of lesion kinds (bright, dark,
# ring) and its tissue texture (HU). Half the lesions of each of the first three sites are of
# one kind; the fourth, the unseen site, sees all three alike on a scanner unlike the others.
# Calibrated so that a site's own few cases are not enough (docs/benchmark.md, study 2): the
# first calibration (80 % one kind, offsets of 25 HU, contrasts 0.8-1.25) let a site alone
# match pooled training at two of the three sites; sites that differ less make pooling pay.
_HARD_SCANNERS = (
    ((1.0, 1.0), 3.0, 0.00, 1.00, (1, 3), 0.0, 0.95, 20.0, 400.0, 0.0, 0.10, (0.5, 0.25, 0.25), 10.0),
    ((0.75, 0.8), 2.0, 0.14, 1.20, (1, 3), 12.0, 1.1, 22.0, 2500.0, 300.0, 0.35, (0.25, 0.5, 0.25), 10.0),
    ((1.4, 1.3), 5.0, 0.06, 0.90, (1, 2), -12.0, 0.9, 16.0, 60.0, 10.0, 0.05, (0.25, 0.25, 0.5), 8.0),
    ((0.9, 1.1), 4.0, 0.10, 1.10, (1, 2), 15.0, 1.1, 18.0, 900.0, 50.0, 0.20, (1 / 3, 1 / 3, 1 / 3), 10.0),
)


@dataclass(frozen=True)
class SiteProfile:
    """One site's scanner and population. Spacing and shape are in numpy (z, y, x) order."""

    name: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    margin: float  # fraction of each in-plane side outside the field of view (stored as 0)
    organ_scale: float
    lesions: tuple[int, int]  # min, max lesions per case
    ct_offset: float
    ct_contrast: float
    ct_noise: float
    mri_scale: float
    mri_offset: float
    mri_bias: float
    task: str = "easy"
    lesion_mix: tuple[float, float, float] = (1.0, 0.0, 0.0)  # P(bright), P(dark), P(ring): hard task
    texture: float = 0.0  # std of the smooth tissue texture (HU): hard task


def site_name(site_index: int) -> str:
    """SiteA, SiteB, ..., SiteZ, Site26, ..."""
    return f"Site{chr(65 + site_index)}" if site_index < 26 else f"Site{site_index}"


def _scanners(task: str) -> tuple:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    return _SCANNERS if task == "easy" else _HARD_SCANNERS


def site_profile(site_index: int, *, dim: int = 2, size: Sequence[int] | None = None,
                 seed: int = 0, task: str = "easy") -> SiteProfile:
    """The scanner of site `site_index` (deterministic)."""
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, not {dim}")
    scanners = _scanners(task)
    rng = np.random.default_rng([seed, site_index, 0])
    hard = {}
    if site_index < len(scanners):
        inplane, z, margin, organ, lesions, *intensity = scanners[site_index]
        if task == "hard":
            *intensity, mix, texture = intensity
            hard = dict(lesion_mix=tuple(mix), texture=float(texture))
    else:
        inplane = tuple(rng.uniform(0.7, 1.5, 2).round(2))
        z, margin, organ = round(rng.uniform(1.5, 5.0), 1), rng.uniform(0, 0.15), rng.uniform(0.8, 1.3)
        lesions = (1, int(rng.integers(1, 4)))
        intensity = [rng.uniform(-30, 30), rng.uniform(0.7, 1.6), rng.uniform(8, 25),
                     10 ** rng.uniform(1.5, 3.5), rng.uniform(0, 300), rng.uniform(0.05, 0.35)]
        if task == "hard":
            mix = rng.dirichlet([1.0, 1.0, 1.0])
            hard = dict(lesion_mix=tuple(float(m) for m in mix / mix.sum()), texture=float(rng.uniform(5, 12)))
    spacing = ((999.0,) if dim == 2 else (float(z),)) + tuple(float(s) for s in inplane)
    nominal_shape = (1,) + tuple(size or DEFAULT_SIZE[2]) if dim == 2 else tuple(size or DEFAULT_SIZE[3])
    # Same physical field of view everywhere: finer spacing, more voxels.
    shape = tuple(n if dim == 2 and axis == 0 else max(8, round(n * nom / sp))
                  for axis, (n, nom, sp) in enumerate(zip(nominal_shape, NOMINAL_SPACING[dim], spacing)))
    return SiteProfile(site_name(site_index), spacing, shape, float(margin), float(organ), tuple(lesions),
                       *(float(v) for v in intensity), task=task, **hard)


def scanners_digest(task: str) -> str:
    """A short digest of the task's hand-made scanners: it changes with every calibration of
    the task, so that results of two calibrations are never merged as one (benchmarks)."""
    return hashlib.sha256(repr(_scanners(task)).encode()).hexdigest()[:12]


def hard_profiles() -> int:
    """How many hand-made scanners the hard task has; the last is its unseen site."""
    return len(_HARD_SCANNERS)


def _ellipsoid(grid: list[np.ndarray], center, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _coordinates(p: SiteProfile):
    """(axes, grid, half extents): physical coordinates in mm, centred; 2-D uses only the
    in-plane axes (its slice coordinate is 0)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(p.shape, p.spacing)]
    grid = list(np.meshgrid(*axes, indexing="ij"))
    if p.shape[0] == 1:
        grid[0] = np.zeros_like(grid[0])
    half = [n * s / 2 for n, s in zip(p.shape, p.spacing)]
    return axes, grid, half


def _draw_case(p: SiteProfile, rng: np.random.Generator, channels: Sequence[str]):
    """One case: (list of channel arrays, label array), all of shape p.shape."""
    axes, grid, half = _coordinates(p)

    body_r = [h * rng.uniform(0.75, 0.9) for h in half]
    body = _ellipsoid(grid, [0.0] * 3, body_r)
    organ_r = [r * 0.55 * p.organ_scale * rng.uniform(0.85, 1.15) for r in body_r]
    organ_c = [r * rng.uniform(-0.2, 0.2) for r in body_r]
    organ = body & _ellipsoid(grid, organ_c, organ_r)
    label = organ.astype(np.uint8)
    min_r = min(r for r, n in zip(organ_r, p.shape) if n > 1)
    for _ in range(int(rng.integers(p.lesions[0], p.lesions[1] + 1))):
        centre = [c + r * rng.uniform(-0.5, 0.5) for c, r in zip(organ_c, organ_r)]
        radius = min_r * rng.uniform(0.25, 0.4)
        label[organ & _ellipsoid(grid, centre, [max(radius, s) for s in p.spacing])] = 2

    fov = _field_of_view(p, rng)
    label[~fov] = 0

    images = [_ct(p, rng, body, label) if c == "CT" else _mri(p, rng, grid, half, body, label)
              for c in channels]
    return [np.where(fov, im, 0).astype(im.dtype) for im in images], label


def _lobulated(grid, center, radii, rng) -> np.ndarray:
    """An ellipsoid rotated in-plane by a random angle, its in-plane boundary rippled by the
    2nd-4th angular harmonics (a lobulated organ): a different shape every case."""
    dz, dy, dx = (g - c for g, c in zip(grid, center))
    angle = rng.uniform(0, np.pi)
    u, v = dy * np.cos(angle) - dx * np.sin(angle), dy * np.sin(angle) + dx * np.cos(angle)
    rho = np.sqrt((dz / radii[0]) ** 2 + (u / radii[1]) ** 2 + (v / radii[2]) ** 2)
    phi = np.arctan2(u / radii[1], v / radii[2])
    boundary = 1 + sum(rng.uniform(0, 0.16) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    return rho <= boundary


def _smooth_noise(rng, shape, spacing, mm: float) -> np.ndarray:
    """Unit-std Gaussian noise smoothed over about `mm` millimetres (tissue texture)."""
    sigma = [0 if n == 1 else mm / s for n, s in zip(shape, spacing)]
    field = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), sigma)
    return field / max(field.std(), 1e-9)


def _add_lesions(p: SiteProfile, rng, axes, grid, organ, min_r, label, contrast) -> None:
    """Draw the case's lesions inside the organ, each of a kind drawn from the site's mix,
    into `label` (2) and `contrast` (HU-like, relative to tissue), in place."""
    inside = np.argwhere(organ)
    for _ in range(int(rng.integers(p.lesions[0], p.lesions[1] + 1)) if len(inside) else 0):
        kind = LESION_KINDS[rng.choice(3, p=p.lesion_mix)]
        centre = [ax[i] for ax, i in zip(axes, inside[rng.integers(len(inside))])]
        if p.shape[0] == 1:
            centre[0] = 0.0
        radius = min_r * rng.uniform(0.25, 0.45)
        radii = [max(radius, s) for s in p.spacing]
        lesion = organ & _ellipsoid(grid, centre, radii)
        label[lesion] = 2
        if kind == "bright":
            contrast[lesion] = p.ct_contrast * rng.uniform(90, 130)
        elif kind == "dark":
            contrast[lesion] = -p.ct_contrast * rng.uniform(20, 40)
        else:  # ring: an enhancing rim around a dark core
            core = lesion & _ellipsoid(grid, centre, [r * 0.55 for r in radii])
            contrast[lesion] = p.ct_contrast * rng.uniform(90, 130)
            contrast[core] = -p.ct_contrast * rng.uniform(10, 30)


def _draw_hard_case(p: SiteProfile, rng: np.random.Generator, channels: Sequence[str]):
    """One case of the hard task: (list of channel arrays, label array)."""
    axes, grid, half = _coordinates(p)
    flat = p.shape[0] == 1

    body_r = [h * rng.uniform(0.75, 0.9) for h in half]
    body = _ellipsoid(grid, [0.0] * 3, body_r)
    scale = p.organ_scale * rng.uniform(0.75, 1.25)
    organ_r = [r * 0.5 * scale * rng.uniform(0.8, 1.2) for r in body_r]
    organ_c = [0.0 if flat and axis == 0 else r * rng.uniform(-0.25, 0.25) for axis, r in enumerate(body_r)]
    organ = body & _lobulated(grid, organ_c, organ_r, rng)
    label = organ.astype(np.uint8)
    # contrast: HU-like difference to plain tissue (organ enhancement, lesions, distractor)
    contrast = np.zeros(p.shape)
    contrast[organ] = p.ct_contrast * rng.uniform(30, 60)
    min_r = min(r for r, n in zip(organ_r, p.shape) if n > 1)

    # a bright structure beside the organ, as bright as the organ, that is not the organ
    if rng.uniform() < 0.6:
        direction = rng.normal(0.0, 1.0, 3) * [0.0 if flat else 1.0, 1.0, 1.0]
        direction /= np.linalg.norm(direction)
        centre = [c + d * r * rng.uniform(1.1, 1.5) for c, d, r in zip(organ_c, direction, organ_r)]
        blob = body & ~organ & _ellipsoid(grid, centre, [max(min_r * rng.uniform(0.35, 0.6), s) for s in p.spacing])
        contrast[blob] = p.ct_contrast * rng.uniform(30, 60)

    _add_lesions(p, rng, axes, grid, organ, min_r, label, contrast)
    contrast += p.texture * _smooth_noise(rng, p.shape, p.spacing, 2.0) * body

    fov = _field_of_view(p, rng)
    label[~fov] = 0
    images = []
    for c in channels:
        if c == "CT":
            hu = np.where(body, 40.0 + contrast, -1000.0) + p.ct_offset + rng.normal(0.0, p.ct_noise, p.shape)
            hu = np.round(hu)
            hu[hu == 0] = 1
            images.append(hu.astype(np.int16))
        else:  # MRI-like: organ and bright lesions darker, dark lesions brighter than tissue
            images.append(_mri_signal(p, rng, grid, half, np.where(body, 0.8 - contrast / 250, 0.02)))
    return [np.where(fov, im, 0).astype(im.dtype) for im in images], label


def _field_of_view(p: SiteProfile, rng) -> np.ndarray:
    """In-plane zero margins, site-specific and slightly per case."""
    fov = np.ones(p.shape, dtype=bool)
    for axis in range(1, 3):
        cut = int(round(p.shape[axis] * p.margin * rng.uniform(0.8, 1.2)))
        if cut:
            index = [slice(None)] * 3
            index[axis] = np.r_[0:cut, p.shape[axis] - cut:p.shape[axis]]
            fov[tuple(index)] = False
    return fov


def _ct(p: SiteProfile, rng, body, label) -> np.ndarray:
    """Hounsfield-like: air -1000, soft tissue ~40, enhancing organ and lesion, int16."""
    tissue = 40.0
    hu = np.where(body, tissue, -1000.0)
    hu[label == 1] = tissue + p.ct_contrast * rng.uniform(40, 60)
    hu[label == 2] = tissue + p.ct_contrast * rng.uniform(110, 150)
    hu += p.ct_offset + rng.normal(0.0, p.ct_noise, hu.shape)
    hu = np.round(hu)
    hu[hu == 0] = 1  # 0 means "outside the field of view" to nnU-Net's cropping
    return hu.astype(np.int16)


def _mri(p: SiteProfile, rng, grid, half, body, label) -> np.ndarray:
    """Arbitrary units: site scale and offset, smooth multiplicative bias field, float32."""
    signal = np.where(body, 0.8, 0.02)
    signal[label == 1] = 0.55 * rng.uniform(0.9, 1.1)
    signal[label == 2] = 0.3 * rng.uniform(0.8, 1.2)
    return _mri_signal(p, rng, grid, half, signal)


def _mri_signal(p: SiteProfile, rng, grid, half, signal) -> np.ndarray:
    """The site's scale, offset, bias field and noise on a relative signal (0.02 outside the body)."""
    body = signal > 0.02
    slope = rng.normal(0.0, 1.0, 2)
    bias = np.exp(p.mri_bias * (slope[0] * grid[1] / half[1] + slope[1] * grid[2] / half[2]))
    mri = p.mri_scale * (signal * bias + rng.normal(0.0, 0.03, signal.shape)) + p.mri_offset * body
    return np.maximum(np.abs(mri), 1e-3).astype(np.float32)  # strictly > 0 inside the field of view


def _write(array: np.ndarray, spacing: Sequence[float], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing[::-1]])  # SimpleITK is (x, y, z)
    sitk.WriteImage(image, str(path), True)


def _dataset_json(name: str, channels: Sequence[str], n_train: int, description: str) -> dict:
    return {
        "name": name,
        "description": description,
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": dict(LABELS),
        "numTraining": n_train,
        "file_ending": FILE_ENDING,
    }


def make_site(raw_root: str | Path, dataset_id: int, site_index: int, *, n_train: int, n_test: int = 2,
              dim: int = 2, size: Sequence[int] | None = None, seed: int = 0,
              channels: Sequence[str] = ("CT",), name: str | None = None, task: str = "easy") -> Path:
    """Write one site's raw dataset `Dataset{id:03d}_{name}` under raw_root; return its folder.

    `size` is the image size at the nominal spacing ((H, W) for 2-D, (Z, Y, X) for 3-D); each
    site scales it to its own spacing. `channels` is taken from "CT" and "MRI", in order.
    `task` is "easy" or "hard" (module docstring). Case k is the same whatever n_train, so a
    larger n_train adds cases. Case identifiers start with the site name, so the pooled union
    has no collisions."""
    channels = tuple(c.upper() for c in channels)
    if not channels or any(c not in CHANNELS for c in channels):
        raise ValueError(f"channels must be taken from {CHANNELS}, not {channels}")
    p = site_profile(site_index, dim=dim, size=size, seed=seed, task=task)
    draw = _draw_case if task == "easy" else _draw_hard_case
    name = name or p.name
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for split, count, code in (("Tr", n_train, 1), ("Ts", n_test, 2)):
        (folder / f"images{split}").mkdir(parents=True, exist_ok=True)
        (folder / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for k in range(count):
            case = f"{name.lower()}_{k:03d}"
            images, label = draw(p, np.random.default_rng([seed, site_index, code, k]), channels)
            for c, image in enumerate(images):
                _write(image, p.spacing, folder / f"images{split}" / f"{case}_{c:04d}{FILE_ENDING}")
            _write(label, p.spacing, folder / f"labels{split}" / f"{case}{FILE_ENDING}")
    description = f"p2pfed synthetic site {site_index} (seed {seed}, {dim}-D{', hard task' if task == 'hard' else ''})"
    (folder / "dataset.json").write_text(json.dumps(_dataset_json(name, channels, n_train, description), indent=2))
    return folder


def make_federation(raw_roots_or_root: str | Path | Sequence[str | Path], n_sites: int = 3, *,
                    first_id: int = 101, n_train: int | Sequence[int] | None = None, n_test: int = 2,
                    dim: int = 2, size: Sequence[int] | None = None, seed: int = 0,
                    channels: Sequence[str] = ("CT",), task: str = "easy") -> list[Path]:
    """Sites 0..n_sites-1 as datasets first_id, first_id+1, ... Either one raw root for all
    sites, or one raw root per site. Case counts default to DEFAULT_TRAIN_CASES (cycled)."""
    roots = ([Path(raw_roots_or_root)] * n_sites if isinstance(raw_roots_or_root, (str, Path))
             else [Path(r) for r in raw_roots_or_root])
    counts = ([DEFAULT_TRAIN_CASES[i % len(DEFAULT_TRAIN_CASES)] for i in range(n_sites)] if n_train is None
              else [n_train] * n_sites if isinstance(n_train, int) else list(n_train))
    if len(roots) != n_sites or len(counts) != n_sites:
        raise ValueError("need one raw root and one case count per site (or a single value for all)")
    return [make_site(root, first_id + i, i, n_train=n, n_test=n_test, dim=dim, size=size, seed=seed,
                      channels=channels, task=task) for i, (root, n) in enumerate(zip(roots, counts))]


def make_pooled(site_dirs: Sequence[str | Path], raw_root: str | Path, dataset_id: int,
                name: str = "Pooled") -> Path:
    """The union of several site datasets as one raw dataset (the centralized baseline)."""
    site_dirs = [Path(d) for d in site_dirs]
    jsons = {d.name: json.loads((d / "dataset.json").read_text()) for d in site_dirs}
    merged = merge_dataset_info({site: dataset_info(dj) for site, dj in jsons.items()})
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for d in site_dirs:
            for f in sorted((d / sub).glob(f"*{FILE_ENDING}")):
                if (folder / sub / f.name).exists():
                    raise ValueError(f"case file {f.name} exists in two sites")
                shutil.copyfile(f, folder / sub / f.name)
    pooled = {"name": name, "description": "union of " + ", ".join(d.name for d in site_dirs), **merged}
    (folder / "dataset.json").write_text(json.dumps(pooled, indent=2))
    return folder
