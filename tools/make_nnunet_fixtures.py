"""Make the nnU-Net v2 test fixtures in tests/data/nnunet/ with nnU-Net's own code.

segpipe can run nnU-Net v2 trained model folders with its own inference. CI has no nnU-Net installed, so the unit
tests use small, genuine nnU-Net artefacts checked into the repository. This script writes them. For each fixture it

1. synthesises a tiny raw dataset (a few cases) under WORK/nnUNet_raw,
2. runs nnU-Net's fingerprint extraction, experiment planning (the default planner or nnUNetPlannerResEncM) and,
   after shrinking the network of the configuration it uses in the plans (three stages, 4-16 features, a small
   patch), nnU-Net's preprocessing,
3. trains nnUNetTrainer for a few short epochs per fold on the CPU (nnUNetTrainer.run_training, which saves
   fold_N/checkpoint_final.pth with the trainer's own save_checkpoint),
4. copies the model folder (dataset.json, plans.json, fold_N/checkpoint_final.pth) to OUT/<name>/model/,
   writes one unseen input case to OUT/<name>/input/ and predicts it with nnUNetPredictor from that model folder
   (all its folds; tile_step_size 0.5, Gaussian weighting, CPU) with and without mirroring, giving
   OUT/<name>/expected_tta.nii.gz and OUT/<name>/expected_notta.nii.gz,
5. writes OUT/README.md, which lists the fixtures.

The fixtures:

- plain3d_zscore: PlainConvUNet 3d_fullres, one MR-like channel (ZScoreNormalization, use_mask_for_norm true; the
  image has a zero border and a zero hole inside the body), labels 0-2, two folds; the input has an oblique
  direction and an origin away from 0.
- resenc3d_ct_aniso: ResidualEncoderUNet 3d_fullres (nnUNetPlannerResEncM plans), one CT channel
  (CTNormalization), spacing 3.5 x 0.7 x 0.7 mm with the coarse axis along x, so transpose_forward is [2, 0, 1];
  the input's spacing differs from the plan's, so nnU-Net resamples it (with separate z) on the way in and out.
- plain2d: the 2d configuration of a plain plan, RescaleTo01Normalization (channel name "rescale_to_0_1"),
  an input whose in-plane spacing differs from the plan's.
- regions: a region-based (BraTS-like) model, two channels, labels {"whole": [1, 2, 3], "core": [2, 3],
  "enhancing": [3]} with regions_class_order [1, 2, 3].

Run it with nnU-Net's environment (nnunetv2 2.8.1 was used; CPU only; training dominates: 15-40 minutes on
2 busy cores):

    /work/nnunet-venv/bin/python tools/make_nnunet_fixtures.py [--out tests/data/nnunet] [--work /tmp/nnfix]
        [--only NAME ...] [--readme-only]

WORK is scratch (it is wiped per fixture); OUT/<name>/ is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASE_ID = "case_900"  # the identifier of the input case; the training cases are case_000 ...


@dataclass
class Case:
    """One synthetic case: channel arrays and label map in numpy order (z, y, x), geometry in SimpleITK order."""

    channels: list[np.ndarray]
    label: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Shrink:
    """The small network written into the plans' configuration (all per stage, numpy order after transpose)."""

    features: list[int]
    kernels: list[list[int]]
    strides: list[list[int]]
    patch_size: list[int]
    n_conv: list[int]
    n_conv_decoder: list[int]
    batch_size: int = 2


@dataclass
class Fixture:
    name: str
    dataset_id: int
    planner: str
    configuration: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]
    make_case: Callable[[np.random.Generator, bool], Case]
    shrink: Shrink
    folds: tuple[int, ...] = (0,)
    regions_class_order: list[int] | None = None
    n_train: int = 5
    epochs: int = 8
    iterations: int = 25
    about: str = ""

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"


# ----------------------------------------------------------------------------------------------------------------
# synthetic images


def _ellipsoid(shape, spacing_zyx, center_mm, radii_mm) -> np.ndarray:
    """A boolean ellipsoid; center and radii in mm along numpy axes (z, y, x)."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    acc = np.zeros(shape, dtype=np.float64)
    for g, sp, c, r in zip(grids, spacing_zyx, center_mm, radii_mm):
        acc = acc + ((g * sp - c) / r) ** 2
    return acc <= 1.0


def _jitter(rng: np.random.Generator, extent_mm, frac: float = 0.08) -> np.ndarray:
    """A random center near the middle of an extent (mm, numpy order)."""
    extent = np.asarray(extent_mm, dtype=np.float64)
    return extent / 2 + rng.uniform(-frac, frac, size=extent.shape) * extent


def _oblique_direction(angle_deg: float) -> tuple[float, ...]:
    """A rotation about z by angle_deg composed with a flip of y: a proper, non-identity direction."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    flip = np.diag([1.0, -1.0, -1.0])
    return tuple(float(v) for v in (rot @ flip).ravel())


def mr_case(rng: np.random.Generator, test: bool) -> Case:
    """MR-like: zero outside an ellipsoidal body, organ (1) with a lesion (2), an exactly-zero hole in the organ."""
    shape = (40, 40, 40) if test else tuple(int(v) for v in rng.integers(36, 45, size=3))
    sp = (1.0, 1.0, 1.0)
    ext = np.array(shape) * np.array(sp)
    body = _ellipsoid(shape, sp, ext / 2, ext * rng.uniform(0.36, 0.42, size=3))
    c_org = _jitter(rng, ext)
    organ = _ellipsoid(shape, sp, c_org, ext * rng.uniform(0.2, 0.26, size=3)) & body
    c_les = c_org + rng.uniform(-2.5, 2.5, size=3)
    lesion = _ellipsoid(shape, sp, c_les, np.full(3, rng.uniform(5.0, 6.5))) & organ
    hole = _ellipsoid(shape, sp, c_les + np.array([0.0, 0.0, 8.0]), np.full(3, 2.0)) & organ & ~lesion
    img = np.where(body, 100.0, 0.0) + np.where(organ, 200.0, 0.0) + np.where(lesion, 200.0, 0.0)
    img = np.where(body, img + rng.normal(0.0, 12.0, size=shape), 0.0)
    img[hole] = 0.0
    label = organ.astype(np.uint8) + lesion.astype(np.uint8)
    if test:
        return Case([img.astype(np.int16)], label, (1.0, 1.0, 1.0), (-20.5, 31.25, 12.0), _oblique_direction(25.0))
    return Case([img.astype(np.int16)], label, (1.0, 1.0, 1.0))


def ct_case(rng: np.random.Generator, test: bool) -> Case:
    """CT-like, coarse along x: zero padding, air, a body (40 HU), organ (1, 90 HU), hypodense lesion (2, 10 HU)."""
    if test:
        sp_xyz = (3.0, 0.8, 0.8)
        shape = (40, 40, 14)
    else:
        sp_xyz = (float(rng.uniform(3.3, 3.7)), 0.7, 0.7)
        shape = (int(rng.integers(44, 50)), int(rng.integers(44, 50)), int(rng.integers(11, 14)))
    sp = sp_xyz[::-1]
    ext = np.array(shape) * np.array(sp)
    body = _ellipsoid(shape, sp, ext / 2, ext * np.array([0.38, 0.36, 0.45]))
    c_org = _jitter(rng, ext)
    organ = _ellipsoid(shape, sp, c_org, np.array([10.0, 9.0, 14.0]) * rng.uniform(0.9, 1.1, size=3)) & body
    lesion = _ellipsoid(shape, sp, c_org + rng.uniform(-1.5, 1.5, size=3), np.array([6.0, 6.0, 7.5])) & organ
    img = np.full(shape, -1000.0) + np.where(body, 1040.0, 0.0) + np.where(organ, 50.0, 0.0) - np.where(lesion, 80, 0)
    img = img + rng.normal(0.0, 8.0, size=shape)
    pad = 2
    img[:pad], img[-pad:], img[:, :pad], img[:, -pad:] = 0.0, 0.0, 0.0, 0.0
    label = organ.astype(np.uint8) + lesion.astype(np.uint8)
    label[:pad], label[-pad:], label[:, :pad], label[:, -pad:] = 0, 0, 0, 0
    img = np.rint(img).astype(np.int16)
    if test:
        return Case([img], label, sp_xyz, (105.0, -80.0, -310.5), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return Case([img], label, sp_xyz)


def micro2d_case(rng: np.random.Generator, test: bool) -> Case:
    """A stack of 2D slices (thick along z): a bright disc (1) with a dark nucleus (2) on a dim background, zeros
    around; 8-bit intensities."""
    sp_xyz = (0.8, 0.8, 2.0) if test else (0.9, 0.9, 2.0)
    shape = (8, 48, 48) if test else (int(rng.integers(6, 10)), int(rng.integers(40, 49)), int(rng.integers(40, 49)))
    sp = sp_xyz[::-1]
    ext = np.array(shape) * np.array(sp)
    field_ = np.zeros(shape, dtype=bool)
    field_[:, 3:-3, 3:-3] = True
    c = _jitter(rng, ext, 0.1)
    cell = _ellipsoid(shape, sp, c, np.array([40.0, 10.0, 12.0]) * rng.uniform(0.9, 1.1, size=3))
    nucleus = _ellipsoid(shape, sp, c + rng.uniform(-1.5, 1.5, size=3), np.array([40.0, 5.5, 6.0])) & cell
    img = 40.0 + np.where(cell, 120.0, 0.0) - np.where(nucleus, 90.0, 0.0) + rng.normal(0.0, 8.0, size=shape)
    img = np.where(field_, np.clip(img, 1, 255), 0.0)
    label = (cell & field_).astype(np.uint8) + (nucleus & field_).astype(np.uint8)
    origin = (3.5, -7.0, 40.0) if test else (0.0, 0.0, 0.0)
    return Case([np.rint(img).astype(np.uint8)], label, sp_xyz, origin)


def brats_case(rng: np.random.Generator, test: bool) -> Case:
    """BraTS-like: skull-stripped brain (zeros outside), a tumour with edema (1), necrosis (2) and an enhancing
    rim (3); channels T1c and FLAIR."""
    shape = (36, 36, 36) if test else tuple(int(v) for v in rng.integers(34, 41, size=3))
    sp = (1.0, 1.0, 1.0)
    ext = np.array(shape) * np.array(sp)
    brain = _ellipsoid(shape, sp, ext / 2, ext * rng.uniform(0.38, 0.44, size=3))
    c = _jitter(rng, ext, 0.1)
    r = rng.uniform(0.9, 1.15)
    whole = _ellipsoid(shape, sp, c, np.array([9.0, 10.0, 9.5]) * r) & brain
    core = _ellipsoid(shape, sp, c, np.array([6.5, 7.0, 6.5]) * r) & brain
    necrosis = _ellipsoid(shape, sp, c, np.array([4.0, 4.5, 4.0]) * r) & brain
    label = np.zeros(shape, dtype=np.uint8)
    label[whole], label[core], label[necrosis] = 1, 3, 2
    t1c = np.select([label == 3, label == 2, label == 1, brain], [420.0, 110.0, 190.0, 210.0], 0.0)
    flair = np.select([label == 1, label >= 2, brain], [420.0, 300.0, 200.0], 0.0)
    chans = [np.where(brain, ch + rng.normal(0.0, 10.0, size=shape), 0.0).astype(np.int16) for ch in (t1c, flair)]
    if test:
        return Case(chans, label, sp, (90.0, 126.0, -72.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return Case(chans, label, sp)


FIXTURES = [
    Fixture(
        name="plain3d_zscore",
        about=(
            "PlainConvUNet 3d_fullres, one MR-like channel, ZScoreNormalization with use_mask_for_norm: the image"
            " is zero outside an ellipsoidal body and has an exactly-zero hole (25 voxels) inside the organ, "
            "which nnU-Net's crop-to-nonzero fills, so it is normalised with the body. Labels organ (1) and "
            "lesion (2). Two folds (ensemble). Input direction oblique (rotated 25 degrees about z, y and z "
            "flipped), origin away from 0."
        ),
        dataset_id=901,
        planner="ExperimentPlanner",
        configuration="3d_fullres",
        channel_names={"0": "MRI"},
        labels={"background": 0, "organ": 1, "lesion": 2},
        make_case=mr_case,
        shrink=Shrink([4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [32, 32, 32], [2, 2, 2], [2, 2]),
        folds=(0, 1),
    ),
    Fixture(
        name="resenc3d_ct_aniso",
        about=(
            "ResidualEncoderUNet 3d_fullres (nnUNetPlannerResEncM plans, shrunk), one CT channel (CTNormalization"
            " with the fingerprint's percentiles), coarse axis along x (training spacing about 3.5 x 0.7 x 0.7 "
            "mm), so transpose_forward is [2, 0, 1] and transpose_backward [1, 2, 0]. The input (3.0 x 0.8 x 0.8 "
            "mm, direction diag(-1, -1, 1)) differs from the plan's spacing, so nnU-Net resamples it in and the "
            "logits back out, with separate z (anisotropy above 3). Two voxels of zero padding at the y and z "
            "borders (air is -1000 inside them). Labels organ (1) and hypodense lesion (2)."
        ),
        dataset_id=902,
        planner="nnUNetPlannerResEncM",
        configuration="3d_fullres",
        channel_names={"0": "CT"},
        labels={"background": 0, "organ": 1, "lesion": 2},
        make_case=ct_case,
        shrink=Shrink(
            [4, 8, 16],
            [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            [12, 32, 32],
            [1, 2, 2],
            [1, 1],
        ),
        epochs=10,
        iterations=30,
    ),
    Fixture(
        name="plain2d",
        about=(
            "The 2d configuration of a default plan (PlainConvUNet, Conv2d), one 8-bit channel named "
            "`rescale_to_0_1`, so the planner chose RescaleTo01Normalization. A stack of 8 slices; in-plane "
            "spacing 0.8 mm against the plan's 0.9 mm, so the slices are resampled (axis 0 keeps its spacing). "
            "Zero in-plane border. Labels cell (1) and nucleus (2)."
        ),
        dataset_id=903,
        planner="ExperimentPlanner",
        configuration="2d",
        channel_names={"0": "rescale_to_0_1"},
        labels={"background": 0, "cell": 1, "nucleus": 2},
        make_case=micro2d_case,
        shrink=Shrink([4, 8, 16], [[3, 3]] * 3, [[1, 1], [2, 2], [2, 2]], [48, 48], [2, 2, 2], [2, 2], batch_size=4),
        epochs=10,
        iterations=40,
    ),
    Fixture(
        name="regions",
        about=(
            "Region-based (BraTS-like) PlainConvUNet 3d_fullres: two channels (T1c, FLAIR; ZScoreNormalization, "
            "use_mask_for_norm), dataset.json labels {background: 0, whole: [1, 2, 3], core: [2, 3], enhancing: "
            "[3]} with regions_class_order [1, 2, 3]; the network has three sigmoid outputs. Zero outside the "
            "brain. Input direction diag(-1, -1, 1), origin away from 0."
        ),
        dataset_id=904,
        planner="ExperimentPlanner",
        configuration="3d_fullres",
        channel_names={"0": "T1c", "1": "FLAIR"},
        labels={"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]},
        regions_class_order=[1, 2, 3],
        make_case=brats_case,
        shrink=Shrink([4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [32, 32, 32], [2, 2, 2], [2, 2]),
        epochs=10,
        iterations=30,
    ),
]


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net steps


def _write_case(case: Case, folder: Path, case_id: str, label_folder: Path | None = None) -> list[Path]:
    import SimpleITK as sitk

    def write(arr: np.ndarray, path: Path) -> None:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(case.spacing)
        img.SetOrigin(case.origin)
        img.SetDirection(case.direction)
        sitk.WriteImage(img, str(path), useCompression=True)

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ch in enumerate(case.channels):
        paths.append(folder / f"{case_id}_{i:04d}.nii.gz")
        write(ch, paths[-1])
    if label_folder is not None:
        label_folder.mkdir(parents=True, exist_ok=True)
        write(case.label, label_folder / f"{case_id}.nii.gz")
    return paths


def make_raw_dataset(fx: Fixture, raw_root: Path) -> None:
    """The raw training set: n_train synthetic cases plus dataset.json, in nnU-Net's raw layout."""
    folder = raw_root / fx.dataset_name
    rng = np.random.default_rng(fx.dataset_id)
    for i in range(fx.n_train):
        _write_case(fx.make_case(rng, False), folder / "imagesTr", f"case_{i:03d}", folder / "labelsTr")
    dataset_json: dict = {
        "channel_names": fx.channel_names,
        "labels": fx.labels,
        "numTraining": fx.n_train,
        "file_ending": ".nii.gz",
        "name": fx.name,
        "description": "synthetic segpipe test fixture, made by tools/make_nnunet_fixtures.py",
    }
    if fx.regions_class_order is not None:
        dataset_json["regions_class_order"] = fx.regions_class_order
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4))


def shrink_plans(fx: Fixture, plans_file: Path) -> None:
    """Replace the used configuration's network by a tiny one (nnU-Net's own keys, new values)."""
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"][fx.configuration]
    s = fx.shrink
    arch = cfg["architecture"]["arch_kwargs"]
    arch["n_stages"] = len(s.features)
    arch["features_per_stage"] = s.features
    arch["kernel_sizes"] = s.kernels
    arch["strides"] = s.strides
    arch["n_blocks_per_stage" if "n_blocks_per_stage" in arch else "n_conv_per_stage"] = s.n_conv
    arch["n_conv_per_stage_decoder"] = s.n_conv_decoder
    cfg["patch_size"] = s.patch_size
    cfg["batch_size"] = s.batch_size
    divisor = np.prod(np.array(s.strides), axis=0)
    if any(p % d for p, d in zip(s.patch_size, divisor)):
        raise ValueError(f"{fx.name}: patch size {s.patch_size} is not divisible by the strides' product {divisor}")
    plans_file.write_text(json.dumps(plans, indent=4))


def plan_and_preprocess(fx: Fixture, work: Path) -> str:
    """nnU-Net's fingerprint, planning and (after shrinking) preprocessing; returns the plans identifier."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([fx.dataset_id], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plans_identifier = plan_experiments([fx.dataset_id], fx.planner)
    shrink_plans(fx, work / "nnUNet_preprocessed" / fx.dataset_name / f"{plans_identifier}.json")
    preprocess(
        [fx.dataset_id],
        plans_identifier,
        configurations=(fx.configuration,),
        num_processes=(1,),
        show_progress_bar=False,
    )
    return plans_identifier


def train_fold(fx: Fixture, work: Path, plans_identifier: str, fold: int) -> Path:
    """A few short epochs of nnUNetTrainer on the CPU; returns the trainer's output folder base."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    seed = 1000 * fx.dataset_id + fold
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (nnU-Net's data loading draws from numpy's global generator)
    torch.manual_seed(seed)
    pre = work / "nnUNet_preprocessed" / fx.dataset_name
    plans = json.loads((pre / f"{plans_identifier}.json").read_text())
    plans["continue_training"] = False  # what nnunetv2.run.run_training.get_trainer_from_args adds
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = nnUNetTrainer(
        plans=plans, configuration=fx.configuration, fold=fold, dataset_json=dataset_json, device=torch.device("cpu")
    )
    trainer.num_epochs = fx.epochs
    trainer.num_iterations_per_epoch = fx.iterations
    trainer.num_val_iterations_per_epoch = 2
    n_proc_da = os.environ["nnUNet_n_proc_DA"]
    os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process: reproducible, and enough for tiny patches
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        trainer.run_training()  # ends with save_checkpoint(fold_N/checkpoint_final.pth)
    finally:
        os.environ["nnUNet_n_proc_DA"] = n_proc_da
    return Path(trainer.output_folder_base)


def copy_model(fx: Fixture, trained: Path, model_dir: Path) -> None:
    """The model folder as nnU-Net's predictor reads it: dataset.json, plans.json, fold_N/checkpoint_final.pth."""
    model_dir.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(trained / name, model_dir / name)
    for fold in fx.folds:
        (model_dir / f"fold_{fold}").mkdir()
        shutil.copy2(
            trained / f"fold_{fold}" / "checkpoint_final.pth", model_dir / f"fold_{fold}" / "checkpoint_final.pth"
        )


def predict(fx: Fixture, model_dir: Path, inputs: list[Path], out_truncated: Path, tta: bool) -> Path:
    """nnUNetPredictor on the input with all the fixture's folds; returns the written label map."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=tta,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(model_dir), use_folds=fx.folds, checkpoint_name="checkpoint_final.pth"
    )
    out_truncated.parent.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(
        [[str(p) for p in inputs]], [str(out_truncated)], save_probabilities=True, overwrite=True
    )
    return out_truncated.with_name(out_truncated.name + ".nii.gz")


# ----------------------------------------------------------------------------------------------------------------
# checks, summary, driver


def _label_counts(path: Path) -> dict[int, int]:
    import SimpleITK as sitk

    values, counts = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _min_margin(npz: Path, regions: bool) -> dict[str, int]:
    """How many voxels sit near a decision boundary (a hint for how exact a re-implementation must be)."""
    probs = np.load(npz)["probabilities"].astype(np.float64)
    if regions:
        margin = np.abs(probs - 0.5).min(axis=0)
    else:
        top2 = np.sort(probs, axis=0)[-2:]
        margin = top2[1] - top2[0]
    return {"lt_1e-3": int((margin < 1e-3).sum()), "lt_1e-2": int((margin < 1e-2).sum())}


def _dice(pred_path: Path, truth: np.ndarray) -> dict[int, float]:
    import SimpleITK as sitk

    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_path)))
    out = {}
    for v in np.unique(truth[truth > 0]):
        a, b = pred == v, truth == v
        out[int(v)] = round(float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)), 3)
    return out


def summarize(fx: Fixture, dest: Path) -> dict:
    """What the README lists, read back from the fixture folder itself."""
    import SimpleITK as sitk

    plans = json.loads((dest / "model" / "plans.json").read_text())
    cfg = plans["configurations"][fx.configuration]
    image = sitk.ReadImage(str(dest / "input" / f"{CASE_ID}_0000.nii.gz"))
    return {
        "name": fx.name,
        "configuration": fx.configuration,
        "folds": sorted(int(p.name.split("_")[1]) for p in (dest / "model").glob("fold_*")),
        "plans_name": plans["plans_name"],
        "network": cfg["architecture"]["network_class_name"].rsplit(".", 1)[-1],
        "normalization": cfg["normalization_schemes"],
        "use_mask_for_norm": cfg["use_mask_for_norm"],
        "spacing": [round(v, 4) for v in cfg["spacing"]],
        "transpose_forward": plans["transpose_forward"],
        "input_size_xyz": list(image.GetSize()),
        "input_spacing_xyz": [round(v, 4) for v in image.GetSpacing()],
        "labels_tta": _label_counts(dest / "expected_tta.nii.gz"),
        "labels_notta": _label_counts(dest / "expected_notta.nii.gz"),
    }


def run_fixture(fx: Fixture, out: Path, work: Path) -> dict:
    """Everything for one fixture; returns its summary plus how close the predictions sit to decision boundaries
    and how well they match the synthetic truth."""
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "pred"):
        shutil.rmtree(work / sub / fx.dataset_name, ignore_errors=True)
    make_raw_dataset(fx, work / "nnUNet_raw")
    plans_identifier = plan_and_preprocess(fx, work)
    trained = None
    for fold in fx.folds:
        trained = train_fold(fx, work, plans_identifier, fold)
    dest = out / fx.name
    shutil.rmtree(dest, ignore_errors=True)
    copy_model(fx, trained, dest / "model")
    test_case = fx.make_case(np.random.default_rng(fx.dataset_id + 5000), True)
    inputs = _write_case(test_case, dest / "input", CASE_ID)
    extra: dict = {}
    for tag, tta in (("tta", True), ("notta", False)):
        written = predict(fx, dest / "model", inputs, work / "pred" / fx.dataset_name / tag / CASE_ID, tta)
        shutil.copy2(written, dest / f"expected_{tag}.nii.gz")
        if len(_label_counts(written)) < 2:
            raise RuntimeError(f"{fx.name}: the {tag} prediction holds one label only")
        npz = written.with_name(f"{CASE_ID}.npz")
        extra[f"near_boundary_{tag}"] = _min_margin(npz, fx.regions_class_order is not None)
        extra[f"dice_vs_truth_{tag}"] = _dice(written, test_case.label)
    return {**summarize(fx, dest), **extra}


def _fmt_counts(counts: dict[int, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


def write_readme(out: Path) -> None:
    """OUT/README.md, from the fixture folders present in OUT."""
    from importlib.metadata import version

    import torch

    lines = [
        "# nnU-Net v2 fixtures",
        "",
        "Genuine nnU-Net v2 artefacts for segpipe's tests of running nnU-Net model folders: written by nnU-Net's own",
        "planning, preprocessing, training and prediction code (tiny networks, a few CPU epochs on synthetic data).",
        "Do not edit by hand; regenerate with (nnU-Net's environment, CPU only, 15-40 minutes on 2 cores):",
        "",
        "    /work/nnunet-venv/bin/python tools/make_nnunet_fixtures.py --out tests/data/nnunet --work /tmp/nnfix",
        "",
        f"Made with nnunetv2 {version('nnunetv2')}, dynamic_network_architectures "
        f"{version('dynamic_network_architectures')}, torch {torch.__version__}.",
        "",
        "Each `<name>/` holds `model/` (an nnU-Net results folder for one configuration: dataset.json, plans.json,",
        "fold_N/checkpoint_final.pth), `input/case_900_000X.nii.gz` (one unseen case) and the label maps nnU-Net's",
        "`nnUNetPredictor` wrote for it with all the model's folds (tile_step_size 0.5, Gaussian, CPU,",
        "perform_everything_on_device False): `expected_tta.nii.gz` (use_mirroring True) and `expected_notta.nii.gz`.",
        "",
        "| fixture | configuration | network (plans) | normalization (use_mask_for_norm) | folds "
        "| input size, spacing (x, y, z) | plan spacing, transpose_forward | labels TTA | labels no TTA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fx in FIXTURES:
        if not (out / fx.name / "model").is_dir():
            continue
        s = summarize(fx, out / fx.name)
        lines.append(
            f"| {s['name']} | {s['configuration']} | {s['network']} ({s['plans_name']}) "
            f"| {', '.join(s['normalization'])} ({', '.join(str(m) for m in s['use_mask_for_norm'])}) "
            f"| {', '.join(str(f) for f in s['folds'])} | {s['input_size_xyz']}, {s['input_spacing_xyz']} "
            f"| {s['spacing']}, {s['transpose_forward']} | {_fmt_counts(s['labels_tta'])} "
            f"| {_fmt_counts(s['labels_notta'])} |"
        )
    lines += ["", "Labels: `value: voxel count` in the expected maps. Plan spacings are rounded here.", ""]
    lines += [f"- `{fx.name}`: {fx.about}" for fx in FIXTURES if (out / fx.name / "model").is_dir()]
    lines += [
        "",
        "Notes:",
        "",
        "- The expected maps are uint8 with the input's size, spacing, origin and direction (nnU-Net's SimpleITKIO).",
        "  `nnUNetv2_predict_from_modelfolder -i <name>/input -m <name>/model -f <folds> -step_size 0.5 -device cpu`",
        "  (with `--disable_tta` for the no-TTA map) reproduces them exactly.",
        "- The checkpoints are what `nnUNetTrainer.save_checkpoint` writes: network_weights, optimizer_state,",
        "  grad_scaler_state (None on CPU), logging, _best_ema, current_epoch, init_args (plans, configuration, fold,",
        "  dataset_json, device), trainer_name, inference_allowed_mirroring_axes. `logging` and `_best_ema` hold",
        "  numpy float32 scalars, so `torch.load(..., weights_only=True)` refuses them unless",
        "  `numpy._core.multiarray.scalar`, `numpy.dtype` and `numpy.dtypes.Float32DType` are allow-listed (so do",
        "  real nnU-Net checkpoints);",
        "  init_args['device'] is a torch.device (allowed). network_weights repeats the encoder's tensors under",
        "  `decoder.encoder.` and the conv blocks' under `.all_modules.` (nnU-Net's own state_dict).",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "nnunet")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnfix"))
    parser.add_argument("--only", nargs="*", default=None, help="fixture names to (re)make; default all")
    parser.add_argument("--readme-only", action="store_true", help="only rewrite OUT/README.md")
    args = parser.parse_args(argv)
    work, out = args.work.resolve(), args.out.resolve()
    unknown = set(args.only or ()) - {fx.name for fx in FIXTURES}
    if unknown:
        parser.error(f"unknown fixtures: {sorted(unknown)}")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / var)
    os.environ["nnUNet_compile"] = "False"
    os.environ["nnUNet_n_proc_DA"] = str(min(2, os.cpu_count() or 1))  # the planner sets torch's threads to it
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out.mkdir(parents=True, exist_ok=True)
    chosen = [] if args.readme_only else [fx for fx in FIXTURES if args.only is None or fx.name in args.only]
    summaries = [run_fixture(fx, out, work) for fx in chosen]
    write_readme(out)
    print(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
