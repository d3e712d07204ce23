"""The embedded default dataset: small, realistic, synthetic, deterministic.

``generate_demo_dataset(out)`` writes an MSD-layout dataset of 3-D MR-like volumes in a few
seconds. Each case is drawn in physical space (mm), so structures keep their size while the
voxel grid changes: the in-plane and slice spacing vary between cases (anisotropic), as do the
origin and the axis directions. Slices are 3–4.5 mm against ~1 mm in-plane, so the planner
applies nnU-Net's anisotropy rule and offers the 2.5D configuration. Three labelled structures of different sizes:

1. ``organ`` — a large ellipsoid, smoothly deformed by a random low-frequency displacement;
2. ``vessel`` — a tube of 2.5–3.5 mm radius along a smooth random curve;
3. ``lesion`` — a small sphere-like blob (4–6 mm radius) inside the organ.

Intensities: a body ellipse of soft tissue in air (zero), per-structure means, a smooth
multiplicative bias field (intensity inhomogeneity) and Gaussian noise. Everything is seeded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import UsageError
from .geometry import Geometry
from .io import jsonio
from .io.atomic import atomic_folder
from .io.image import write_image

LABELS = {0: "background", 1: "organ", 2: "vessel", 3: "lesion"}
DIRECTIONS = (
    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
)


def _smooth_field(
    rng: np.random.Generator, pts: tuple[np.ndarray, ...], scale_mm: float, n_waves: int = 4
) -> np.ndarray:
    """A smooth random scalar field (sum of low-frequency cosines) in [-1, 1]-ish."""
    out = np.zeros(np.broadcast_shapes(*(p.shape for p in pts)), dtype=np.float32)
    for _ in range(n_waves):
        k = rng.normal(size=3)
        k *= 2 * np.pi / (scale_mm * np.linalg.norm(k))
        phase = rng.uniform(0, 2 * np.pi)
        out += np.cos(k[0] * pts[0] + k[1] * pts[1] + k[2] * pts[2] + phase).astype(np.float32)
    return out / np.sqrt(n_waves / 2)


def make_case(
    seed: int,
    *,
    inplane_spacing: tuple[float, float] = (0.8, 1.2),
    slice_spacing: tuple[float, float] = (3.0, 4.5),
    fov_mm: tuple[float, float, float] = (64.0, 80.0, 80.0),
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One synthetic case: image float32 [Z, Y, X], label uint8 [Z, Y, X], geometry."""
    rng = np.random.default_rng(seed)
    sxy = float(rng.uniform(*inplane_spacing))
    sz = float(rng.uniform(*slice_spacing))
    fov = np.asarray(fov_mm) * rng.uniform(0.9, 1.1, size=3)
    shape = (int(round(fov[0] / sz)), int(round(fov[1] / sxy)), int(round(fov[2] / sxy)))
    direction = DIRECTIONS[seed % len(DIRECTIONS)]
    ox, oy, oz = (float(v) for v in rng.uniform(-20, 20, size=3))
    origin = (ox, oy, oz)
    geo = Geometry(shape=shape, spacing=(sz, sxy, sxy), origin=origin, direction=direction)

    # World coordinates (x, y, z) of every voxel, relative to the volume centre, as broadcastable grids.
    zi, yi, xi = (np.arange(n, dtype=np.float32) for n in shape)
    m = geo.index_to_world_matrix.astype(np.float32)
    centre = geo.index_to_world(np.asarray(shape, dtype=float)[None] / 2 - 0.5)[0].astype(np.float32)
    pts = tuple(
        m[a, 0] * zi[:, None, None] + m[a, 1] * yi[None, :, None] + m[a, 2] * xi[None, None, :] + m[a, 3] - centre[a]
        for a in range(3)
    )
    full = np.broadcast_shapes(*(p.shape for p in pts))
    x, y, z = (np.broadcast_to(p, full) for p in pts)
    half = np.asarray([fov[2], fov[1], fov[0]]) / 2  # x, y, z half extents

    # Smooth displacement shared by the structures (organ deformation, breathing-like).
    disp = [_smooth_field(rng, (x, y, z), 60.0) * 3.0 for _ in range(3)]
    xd, yd, zd = x + disp[0], y + disp[1], z + disp[2]

    body = (x / (0.95 * half[0])) ** 2 + (y / (0.85 * half[1])) ** 2 < 1.0
    axes = rng.uniform([14, 11, 9], [20, 16, 13])
    c_org = rng.uniform(-4, 4, size=3)
    organ = ((xd - c_org[0]) / axes[0]) ** 2 + ((yd - c_org[1]) / axes[1]) ** 2 + ((zd - c_org[2]) / axes[2]) ** 2 < 1.0

    # Vessel: a tube around a smooth curve running mostly along z.
    a1, a2, f1, f2 = rng.uniform(3, 8), rng.uniform(3, 8), rng.uniform(0.02, 0.05), rng.uniform(0.02, 0.05)
    cx0, cy0 = c_org[0] + rng.choice([-1, 1]) * (axes[0] + 4), c_org[1] + rng.uniform(-5, 5)
    cx = cx0 + a1 * np.sin(f1 * z + rng.uniform(0, 6))
    cy = cy0 + a2 * np.cos(f2 * z + rng.uniform(0, 6))
    radius = rng.uniform(2.5, 3.5)
    vessel = ((x - cx) ** 2 + (y - cy) ** 2 < radius**2) & body

    # Lesion: a small deformed sphere inside the organ.
    r_les = rng.uniform(4, 6)
    c_les = c_org + rng.uniform(-0.4, 0.4, size=3) * axes
    bump = 1 + 0.15 * _smooth_field(rng, (x, y, z), 15.0)
    lesion = ((xd - c_les[0]) ** 2 + (yd - c_les[1]) ** 2 + (zd - c_les[2]) ** 2) < (r_les * bump) ** 2
    lesion &= organ

    label = np.zeros(full, dtype=np.uint8)
    label[organ & body] = 1
    label[vessel] = 2
    label[lesion] = 3

    means = np.asarray([0.0, 110.0, 170.0, 250.0, 70.0], dtype=np.float32)  # air, tissue, organ, vessel, lesion
    cls = np.where(body, label.astype(np.int64) + 1, 0)
    image = means[cls]
    texture = 8.0 * _smooth_field(rng, (x, y, z), 8.0, n_waves=8)
    bias = 1.0 + 0.25 * _smooth_field(rng, (x, y, z), 120.0)
    noise = rng.normal(0.0, 12.0, size=full).astype(np.float32)
    image = np.where(body, (image + texture) * bias + noise, 0.0).astype(np.float32)
    image = np.clip(image, 0, None)
    return image, label, geo


def generate_demo_dataset(
    out: str | os.PathLike[str],
    *,
    num_cases: int = 12,
    num_test: int = 2,
    seed: int = 0,
    inplane_spacing: tuple[float, float] = (0.8, 1.2),
    slice_spacing: tuple[float, float] = (3.0, 4.5),
    fov_mm: tuple[float, float, float] = (64.0, 80.0, 80.0),
    name: str = "SegpipeDemo",
    overwrite: bool = False,
) -> Path:
    """Write the demo dataset (MSD layout) to ``out`` and return its path.

    ``imagesTr``/``labelsTr`` hold the ``num_cases`` labelled cases, ``imagesTs`` the ``num_test``
    test images and ``labelsTs`` their reference labels (for evaluation; training never reads them).
    The folder is built beside ``out`` and renamed into place, so an interrupted run leaves
    nothing half-written. An existing non-empty ``out`` is refused unless ``overwrite``.
    """
    target = Path(out).expanduser().resolve()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UsageError(f"{target}: folder exists and is not empty", hint="choose a new folder or pass --force")
    with atomic_folder(target) as tmp:
        (tmp / "imagesTr").mkdir(parents=True)
        (tmp / "labelsTr").mkdir()
        (tmp / "imagesTs").mkdir()
        training, test = [], []
        for i in range(num_cases + num_test):
            image, label, geo = make_case(
                seed * 1000 + i, inplane_spacing=inplane_spacing, slice_spacing=slice_spacing, fov_mm=fov_mm
            )
            cid = f"demo_{i:03d}"
            if i < num_cases:
                write_image(tmp / "imagesTr" / f"{cid}.nii.gz", image, geo)
                write_image(tmp / "labelsTr" / f"{cid}.nii.gz", label, geo)
                training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
            else:
                write_image(tmp / "imagesTs" / f"{cid}.nii.gz", image, geo)
                test.append(f"./imagesTs/{cid}.nii.gz")
                # the test cases' reference labels, for `segpipe evaluate` (training never reads them)
                (tmp / "labelsTs").mkdir(exist_ok=True)
                write_image(tmp / "labelsTs" / f"{cid}.nii.gz", label, geo)
        desc = {
            "name": name,
            "description": "Synthetic MR-like volumes generated by segpipe (deterministic, seeded)",
            "licence": "CC0",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {str(k): v for k, v in LABELS.items()},
            "numTraining": num_cases,
            "numTest": num_test,
            "training": training,
            "test": test,
            "segpipe_seed": seed,
        }
        (tmp / "dataset.json").write_text(jsonio.dumps(desc), encoding="utf-8")
    return target


def generate_dicom_demo_dataset(
    out: str | os.PathLike[str], *, num_cases: int = 3, num_test: int = 1, seed: int = 1, overwrite: bool = False
) -> Path:
    """Write a case-folder dataset whose images are DICOM series (MR, one file per slice).

    Each case is ``<out>/<case>/image/`` (a proper single-frame series written with pydicom,
    stored as uint16 with rescale slope/intercept) plus ``label.nii.gz`` on the same grid;
    test cases have no label file but a ``reference.nii.gz`` for evaluation. The geometry comes from the same generator as the
    NIfTI demo, so the series are anisotropic and some are flipped in-plane.
    """
    from .io.dicom import write_dicom_series

    target = Path(out).expanduser().resolve()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UsageError(f"{target}: folder exists and is not empty", hint="choose a new folder or pass --force")
    with atomic_folder(target) as tmp:
        for i in range(num_cases + num_test):
            image, label, geo = make_case(seed * 1000 + i)
            cid = f"dicom_{i:03d}"
            write_dicom_series(
                tmp / cid / "image",
                image,
                geo,
                modality="MR",
                series_description="segpipe demo T1",
                patient_id=f"DEMO{i:03d}",
                series_number=i + 1,
            )
            if i < num_cases:
                write_image(tmp / cid / "label.nii.gz", label, geo)
            else:  # a test case: its reference label for `segpipe evaluate`, not a training label
                write_image(tmp / cid / "reference.nii.gz", label, geo)
        desc = {
            "layout": "case-folder",
            "name": "SegpipeDemoDICOM",
            "description": "Synthetic MR-like DICOM series generated by segpipe (deterministic, seeded)",
            "channel_names": {"0": "MRI"},
            "labels": {v: k for k, v in LABELS.items()},
            "image": "image",
            "label": "label.nii.gz",
            "dicom": {"modality": "MR"},
        }
        (tmp / "dataset.json").write_text(jsonio.dumps(desc), encoding="utf-8")
    return target


#: the region dataset's nested regions (BraTS' convention): label 1 oedema, 2 necrotic core, 3 enhancing rim
REGIONS = {"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]}
REGION_CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}


def make_region_case(seed: int, shape: tuple[int, int, int] = (32, 40, 40)) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One BraTS-like case: 4 MR-like channels [4, Z, Y, X] and nested labels (oedema ⊃ enhancing rim ⊃
    necrosis) in a brain-like ellipsoid on a zero background, 1 mm isotropic."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.arange(n, dtype=np.float32) for n in shape)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    centre = np.array(shape, dtype=np.float32) / 2
    brain = ((zz - centre[0]) / (shape[0] * 0.45)) ** 2 + ((yy - centre[1]) / (shape[1] * 0.45)) ** 2
    brain = brain + ((xx - centre[2]) / (shape[2] * 0.45)) ** 2 <= 1.0
    c = centre + rng.uniform(-0.15, 0.15, 3).astype(np.float32) * np.array(shape, dtype=np.float32)
    r = float(rng.uniform(5.0, 7.0))
    dist = np.sqrt(((zz - c[0]) * 1.1) ** 2 + (yy - c[1]) ** 2 + ((xx - c[2]) * 0.9) ** 2)
    label = np.zeros(shape, dtype=np.uint8)
    label[(dist <= r * 1.9) & brain] = 1  # oedema
    label[dist <= r] = 3  # enhancing rim
    label[dist <= r * 0.55] = 2  # necrotic core
    # channel contrasts (T1, T1ce, T2, FLAIR) of tissue, oedema, necrosis, enhancing rim
    contrast = np.array([[100, 80, 60, 90], [100, 85, 70, 250], [80, 150, 180, 130], [90, 160, 120, 120]], np.float32)
    image = np.zeros((4, *shape), dtype=np.float32)
    for ch in range(4):
        means = contrast[ch][[0, 1, 2, 3]]
        tissue = np.choose(label, means)
        image[ch] = np.where(brain | (label > 0), tissue + rng.normal(0, 8, shape).astype(np.float32), 0.0)
    return image, label, Geometry(shape=shape, spacing=(1.0, 1.0, 1.0))


def generate_regions_dataset(
    out: str | os.PathLike[str], *, num_cases: int = 8, num_test: int = 2, seed: int = 0, overwrite: bool = False
) -> Path:
    """A BraTS-like region dataset in nnU-Net's layout: 4 channels per case, labels 1 oedema, 2 necrotic
    core, 3 enhancing rim, declared as nested regions (:data:`REGIONS`, ``regions_class_order`` [1, 2, 3]);
    ``labelsTs`` holds the test cases' references. Built beside ``out`` and renamed into place."""
    target = Path(out).expanduser().resolve()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UsageError(f"{target}: folder exists and is not empty", hint="choose a new folder or pass --force")
    with atomic_folder(target) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir(parents=True)
        for i in range(num_cases + num_test):
            image, label, geo = make_region_case(seed * 1000 + i)
            cid, split = f"brats_{i:03d}", ("Tr" if i < num_cases else "Ts")
            for ch in range(image.shape[0]):
                write_image(tmp / f"images{split}" / f"{cid}_{ch:04d}.nii.gz", image[ch], geo)
            write_image(tmp / f"labels{split}" / f"{cid}.nii.gz", label, geo)
        desc = {
            "name": target.name,
            "channel_names": REGION_CHANNELS,
            "labels": {"background": 0, **REGIONS},
            "regions_class_order": [1, 2, 3],
            "numTraining": num_cases,
            "file_ending": ".nii.gz",
        }
        # written in its own key order: regions_class_order pairs with the order of the regions in "labels"
        (tmp / "dataset.json").write_text(json.dumps(desc, indent=1), encoding="utf-8")
    return target
