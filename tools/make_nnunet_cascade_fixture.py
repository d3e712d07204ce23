"""Make the nnU-Net v2 3-D cascade test fixture in tests/data/nnunet/cascade/ with nnU-Net's own code.

segpipe runs nnU-Net v2 trained model folders with its own inference, including nnU-Net's two-stage cascade
(3d_lowres, then 3d_cascade_fullres fed the image plus the one-hot encoded lowres segmentation). This script writes a
small, genuine cascade: it

1. synthesises a tiny raw dataset (MR-like, one channel "MRI", labels 0-2) under WORK/nnUNet_raw, with images large
   enough that, under a small GPU-memory target, nnU-Net's ExperimentPlanner plans 3d_lowres and
   3d_cascade_fullres itself (the 3d_fullres patch covers < 25 % of the median image),
2. runs nnU-Net's fingerprint extraction and planning, shrinks the networks of 3d_lowres and 3d_fullres in the plans
   (3d_cascade_fullres inherits from 3d_fullres), writes a splits_final.json whose fold 0 trains and validates on
   every case (so that the lowres validation writes predicted_next_stage for every training case) and runs nnU-Net's
   preprocessing of 3d_lowres and 3d_fullres,
3. trains nnUNetTrainer 3d_lowres fold 0 for a few short CPU epochs, runs its perform_actual_validation (which
   writes the lowres predictions the cascade trains on), then trains 3d_cascade_fullres fold 0 the same way
   (the trainer's own save_checkpoint writes fold_0/checkpoint_final.pth),
4. copies both model folders to OUT/Dataset910_Cascade/, writes one unseen input case to OUT/input/ and predicts it
   with nnUNetPredictor (tile_step_size 0.5, Gaussian, CPU, perform_everything_on_device False): 3d_lowres, then
   3d_cascade_fullres with folder_with_segs_from_prev_stage pointing at the lowres output, without mirroring
   (expected_lowres, expected_notta) and with mirroring in both stages (expected_lowres_tta, expected_tta),
5. checks and prints the label counts, the checkpoints' keys and types and the cascade plans entry after
   inheritance, and writes OUT/README.md.

Run it with nnU-Net's environment (nnunetv2 2.8.1 was used; CPU only, 10-15 minutes on 2 cores):

    /work/nnunet-venv/bin/python tools/make_nnunet_cascade_fixture.py [--out tests/data/nnunet/cascade]
        [--work /tmp/nnfix_cascade]

WORK is scratch (its nnUNet_raw, nnUNet_preprocessed, nnUNet_results and pred folders are wiped); OUT is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 910
DATASET_NAME = f"Dataset{DATASET_ID:03d}_Cascade"
CASE_ID = "case_900"  # the input case; the training cases are case_000 ...
LOWRES, FULLRES, CASCADE = "3d_lowres", "3d_fullres", "3d_cascade_fullres"
TRAINER, PLANS = "nnUNetTrainer", "nnUNetPlans"
GPU_MEMORY_TARGET_GB = 0.05  # small enough that the 3d_fullres patch covers < 25 % of the median image
N_TRAIN = 6
EPOCHS = {LOWRES: 10, CASCADE: 12}
ITERATIONS = 20


@dataclass
class Case:
    """One synthetic case: image and label map in numpy order (z, y, x), geometry in SimpleITK order (x, y, z)."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Net:
    """The small network written into a plans configuration; the planner's patch size, kernel sizes and strides
    are kept (it must have planned len(features) stages)."""

    features: list[int]
    n_conv: list[int]
    n_conv_decoder: list[int]


NETS = {LOWRES: Net([4, 8, 16], [2, 2, 2], [1, 1]), FULLRES: Net([4, 8, 16], [2, 2, 2], [1, 1])}


# ----------------------------------------------------------------------------------------------------------------
# synthetic images


def _ellipsoid(shape, spacing_zyx, center_mm, radii_mm) -> np.ndarray:
    """A boolean ellipsoid; center and radii in mm along numpy axes (z, y, x)."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    acc = np.zeros(shape, dtype=np.float64)
    for g, sp, c, r in zip(grids, spacing_zyx, center_mm, radii_mm):
        acc = acc + (((g + 0.5) * sp - c) / r) ** 2
    return acc <= 1.0


def make_case(rng: np.random.Generator, test: bool) -> Case:
    """MR-like: zero outside an ellipsoidal body, an organ (1) holding a lesion (2); about 64 mm per side.

    Training cases have 1 mm voxels; the test case has 1.25 mm voxels (so the cascade resamples both the image and
    the lowres segmentation up to the 3d_fullres spacing), a flipped direction and an origin away from 0.
    """
    sp = (1.25, 1.25, 1.25) if test else (1.0, 1.0, 1.0)
    shape = (52, 52, 52) if test else tuple(int(v) for v in rng.integers(60, 73, size=3))
    ext = np.array(shape) * np.array(sp)
    body = _ellipsoid(shape, sp, ext / 2, ext * rng.uniform(0.38, 0.44, size=3))
    c_org = ext / 2 + rng.uniform(-0.06, 0.06, size=3) * ext
    organ = _ellipsoid(shape, sp, c_org, ext * rng.uniform(0.2, 0.25, size=3)) & body
    lesion = _ellipsoid(shape, sp, c_org + rng.uniform(-3.0, 3.0, size=3), np.full(3, rng.uniform(9.0, 11.0))) & organ
    img = np.where(body, 100.0, 0.0) + np.where(organ, 160.0, 0.0) + np.where(lesion, 180.0, 0.0)
    img = np.where(body, img + rng.normal(0.0, 6.0, size=shape), 0.0)
    label = organ.astype(np.uint8) + lesion.astype(np.uint8)
    image = np.rint(img).astype(np.int16)
    if test:
        return Case(image, label, sp, (31.0, 42.5, -18.75), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return Case(image, label, sp)


def write_case(case: Case, folder: Path, case_id: str, label_folder: Path | None = None) -> Path:
    """Write the image as <case_id>_0000.nii.gz (and the label map as <case_id>.nii.gz); returns the image path."""
    import SimpleITK as sitk

    def write(arr: np.ndarray, path: Path) -> None:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(case.spacing)
        img.SetOrigin(case.origin)
        img.SetDirection(case.direction)
        sitk.WriteImage(img, str(path), useCompression=True)

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case_id}_0000.nii.gz"
    write(case.image, path)
    if label_folder is not None:
        label_folder.mkdir(parents=True, exist_ok=True)
        write(case.label, label_folder / f"{case_id}.nii.gz")
    return path


def make_raw_dataset(raw_root: Path) -> None:
    """The raw training set in nnU-Net's layout: N_TRAIN synthetic cases plus dataset.json."""
    folder = raw_root / DATASET_NAME
    rng = np.random.default_rng(DATASET_ID)
    for i in range(N_TRAIN):
        write_case(make_case(rng, False), folder / "imagesTr", f"case_{i:03d}", folder / "labelsTr")
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": N_TRAIN,
        "file_ending": ".nii.gz",
        "name": "Cascade",
        "description": "synthetic segpipe test fixture, made by tools/make_nnunet_cascade_fixture.py",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4))


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net planning, preprocessing, training


def plan(pre: Path) -> Path:
    """nnU-Net's fingerprint and ExperimentPlanner (small GPU-memory target); returns the plans file."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plans_identifier = plan_experiments([DATASET_ID], "ExperimentPlanner", gpu_memory_target_in_gb=GPU_MEMORY_TARGET_GB)
    plans_file = pre / f"{plans_identifier}.json"
    configurations = json.loads(plans_file.read_text())["configurations"]
    if LOWRES not in configurations or CASCADE not in configurations:
        raise RuntimeError(f"nnU-Net planned no cascade (configurations {list(configurations)}); lower the target")
    return plans_file


def shrink_plans(plans_file: Path) -> dict:
    """Make the networks of 3d_lowres and 3d_fullres tiny (fewer features and convolutions; nnU-Net's keys, the
    planner's patch size, kernels and strides); returns the planner's original values, for the record."""
    plans = json.loads(plans_file.read_text())
    planned = {}
    for name, net in NETS.items():
        arch = plans["configurations"][name]["architecture"]["arch_kwargs"]
        if arch["n_stages"] != len(net.features):
            raise RuntimeError(f"{name}: nnU-Net planned {arch['n_stages']} stages, expected {len(net.features)}")
        planned[name] = {k: arch[k] for k in ("features_per_stage", "n_conv_per_stage", "n_conv_per_stage_decoder")}
        arch["features_per_stage"] = net.features
        arch["n_conv_per_stage"] = net.n_conv
        arch["n_conv_per_stage_decoder"] = net.n_conv_decoder
    plans_file.write_text(json.dumps(plans, indent=4))
    return planned


def write_splits(pre: Path) -> None:
    """Fold 0 trains and validates on every case, so the lowres validation predicts every cascade training case."""
    cases = sorted(
        p.name[: -len(".nii.gz")]
        for p in (pre.parent.parent / "nnUNet_raw" / DATASET_NAME / "labelsTr").glob("*.nii.gz")
    )
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases, "val": cases}], indent=4))


def preprocess_all(plans_file: Path) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    preprocess(
        [DATASET_ID],
        plans_file.stem,
        configurations=(LOWRES, FULLRES),
        num_processes=(1, 1),
        show_progress_bar=False,
    )


def train(pre: Path, configuration: str, seed: int, validate: bool) -> Path:
    """A few short epochs of nnUNetTrainer fold 0 on the CPU (run_training ends with the trainer's
    save_checkpoint(fold_0/checkpoint_final.pth)); with validate, also perform_actual_validation, which for 3d_lowres
    writes predicted_next_stage/3d_cascade_fullres. Returns the trainer's output folder base."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (nnU-Net's data loading draws from numpy's global generator)
    torch.manual_seed(seed)
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    plans["continue_training"] = False  # what nnunetv2.run.run_training.get_trainer_from_args adds
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = nnUNetTrainer(
        plans=plans, configuration=configuration, fold=0, dataset_json=dataset_json, device=torch.device("cpu")
    )
    trainer.num_epochs = EPOCHS[configuration]
    trainer.num_iterations_per_epoch = ITERATIONS
    trainer.num_val_iterations_per_epoch = 2
    n_proc_da = os.environ["nnUNet_n_proc_DA"]
    os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process: reproducible, and enough for tiny patches
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        trainer.run_training()
        if validate:
            trainer.perform_actual_validation(False)
    finally:
        os.environ["nnUNet_n_proc_DA"] = n_proc_da
    return Path(trainer.output_folder_base)


def copy_model(trained: Path, model_dir: Path) -> None:
    """A model folder as nnU-Net's predictor reads it: dataset.json, plans.json, fold_0/checkpoint_final.pth."""
    (model_dir / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(trained / name, model_dir / name)
    shutil.copy2(trained / "fold_0" / "checkpoint_final.pth", model_dir / "fold_0" / "checkpoint_final.pth")


# ----------------------------------------------------------------------------------------------------------------
# prediction


def predict(model_dir: Path, image: Path, out_truncated: Path, tta: bool, prev_stage: Path | None = None) -> Path:
    """nnUNetPredictor (fold 0) on the image, given the previous stage's folder for the cascade; returns the map."""
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
        str(model_dir), use_folds=(0,), checkpoint_name="checkpoint_final.pth"
    )
    out_truncated.parent.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(
        [[str(image)]],
        [str(out_truncated)],
        save_probabilities=True,
        overwrite=True,
        folder_with_segs_from_prev_stage=None if prev_stage is None else str(prev_stage),
    )
    return out_truncated.with_name(out_truncated.name + ".nii.gz")


def build_models(work: Path) -> tuple[Path, Path, dict]:
    """Raw data, plans, preprocessing and the two trained stages; returns their output folders and the planner's
    original network values."""
    make_raw_dataset(work / "nnUNet_raw")
    pre = work / "nnUNet_preprocessed" / DATASET_NAME
    plans_file = plan(pre)
    planned = shrink_plans(plans_file)
    write_splits(pre)
    preprocess_all(plans_file)
    lowres = train(pre, LOWRES, 1000 * DATASET_ID, validate=True)
    cases = sorted(json.loads((pre / "splits_final.json").read_text())[0]["train"])
    written = sorted(p.name.split(".")[0] for p in (lowres / "predicted_next_stage" / CASCADE).glob("*.b2nd"))
    if written != cases:
        raise RuntimeError(f"the lowres validation wrote predicted_next_stage for {written}, expected {cases}")
    cascade = train(pre, CASCADE, 1000 * DATASET_ID + 1, validate=False)
    return lowres, cascade, planned


def make_expected(out: Path, work: Path, models: dict[str, Path]) -> dict:
    """The input case and nnU-Net's predictions of it: lowres, then cascade given the lowres map, with and without
    mirroring; plus (not kept) the cascade given an all-background previous stage, to show the channels matter."""
    import SimpleITK as sitk

    test_case = make_case(np.random.default_rng(DATASET_ID + 5000), True)
    image = write_case(test_case, out / "input", CASE_ID)
    summary: dict = {"input_shape_zyx": list(test_case.image.shape), "input_spacing_xyz": list(test_case.spacing)}
    for tag, tta in (("notta", False), ("tta", True)):
        lowres_dir = work / "pred" / f"lowres_{tag}"
        lowres_map = predict(models[LOWRES], image, lowres_dir / CASE_ID, tta)
        cascade_map = predict(models[CASCADE], image, work / "pred" / f"cascade_{tag}" / CASE_ID, tta, lowres_dir)
        lowres_name = "expected_lowres_tta.nii.gz" if tta else "expected_lowres.nii.gz"
        shutil.copy2(lowres_map, out / lowres_name)
        shutil.copy2(cascade_map, out / f"expected_{tag}.nii.gz")
        summary[lowres_name] = _map_summary(lowres_map, test_case.label)
        summary[f"expected_{tag}.nii.gz"] = _map_summary(cascade_map, test_case.label)
        summary[f"cascade_vs_lowres_differing_voxels_{tag}"] = int(
            (
                sitk.GetArrayFromImage(sitk.ReadImage(str(lowres_map)))
                != sitk.GetArrayFromImage(sitk.ReadImage(str(cascade_map)))
            ).sum()
        )
    # sensitivity: the same cascade given an all-background previous stage
    empty_dir = work / "pred" / "empty_prev"
    empty_dir.mkdir(parents=True, exist_ok=True)
    empty = sitk.Image(sitk.ReadImage(str(out / "expected_lowres.nii.gz")))
    empty = sitk.Multiply(empty, 0)
    sitk.WriteImage(empty, str(empty_dir / f"{CASE_ID}.nii.gz"), useCompression=True)
    no_prev = predict(models[CASCADE], image, work / "pred" / "cascade_empty_prev" / CASE_ID, False, empty_dir)
    summary["cascade_with_empty_previous_stage"] = _label_counts(no_prev)
    summary["cascade_with_empty_previous_stage_differing_voxels"] = int(
        (
            sitk.GetArrayFromImage(sitk.ReadImage(str(no_prev)))
            != sitk.GetArrayFromImage(sitk.ReadImage(str(out / "expected_notta.nii.gz")))
        ).sum()
    )
    return summary


# ----------------------------------------------------------------------------------------------------------------
# checks, summary, README, driver


def _label_counts(path: Path) -> dict[int, int]:
    import SimpleITK as sitk

    values, counts = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _map_summary(path: Path, truth: np.ndarray) -> dict:
    """Label counts, Dice against the synthetic truth and how many voxels sit near a decision boundary."""
    import SimpleITK as sitk

    counts = _label_counts(path)
    if len(counts) < 3:
        raise RuntimeError(f"{path.name}: expected labels 0, 1 and 2, got {counts}")
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    dice = {}
    for v in (1, 2):
        a, b = pred == v, truth == v
        dice[v] = round(float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)), 3)
    top2 = np.sort(np.load(path.with_suffix("").with_suffix(".npz"))["probabilities"].astype(np.float64), axis=0)[-2:]
    margin = top2[1] - top2[0]
    near = {"lt_1e-3": int((margin < 1e-3).sum()), "lt_1e-2": int((margin < 1e-2).sum())}
    return {"labels": counts, "dice_vs_truth": dice, "near_boundary": near}


def _types(obj, found: set[str]) -> set[str]:
    """The qualified names of every type inside a nested checkpoint object (containers walked)."""
    found.add(f"{type(obj).__module__}.{type(obj).__qualname__}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _types(k, found)
            _types(v, found)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _types(v, found)
    return found


def describe_checkpoint(path: Path) -> dict:
    """Top-level keys, the types in each value, the non-tensor values and the first convolution's weight shape."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    plain = {
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.str",
        "builtins.int",
        "builtins.float",
        "builtins.bool",
        "builtins.NoneType",
        "torch.Tensor",
    }
    weights = ckpt["network_weights"]
    first = next(k for k in weights if k.endswith(".weight") and weights[k].ndim == 5)
    return {
        "size_bytes": path.stat().st_size,
        "keys": list(ckpt),
        "non_plain_types": {k: sorted(_types(v, set()) - plain) for k, v in ckpt.items() if _types(v, set()) - plain},
        "scalars": {k: v for k, v in ckpt.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "init_args_keys": sorted(ckpt.get("init_args", {})),
        "state_dict_entries": len(weights),
        # decoder.encoder.* and *.all_modules.N.* are aliases of encoder.* and *.conv / *.norm (shared storage)
        "unique_parameters": int(sum({v.data_ptr(): v.numel() for v in weights.values()}.values())),
        "first_conv": [first, list(weights[first].shape)],
    }


def describe_plans(model_dir: Path) -> dict:
    """The raw 3d_lowres and 3d_cascade_fullres entries, the cascade's entry after nnU-Net resolves inheritance and
    the cascade network's number of input channels as nnU-Net determines it."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((model_dir / "plans.json").read_text())
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    pm = PlansManager(plans)
    keys = (
        "data_identifier",
        "spacing",
        "patch_size",
        "median_image_size_in_voxels",
        "batch_size",
        "batch_dice",
        "normalization_schemes",
        "use_mask_for_norm",
        "resampling_fn_data",
        "resampling_fn_data_kwargs",
        "resampling_fn_seg",
        "resampling_fn_seg_kwargs",
        "resampling_fn_probabilities",
        "resampling_fn_probabilities_kwargs",
        "inherits_from",
        "previous_stage",
        "next_stage",
    )
    resolved = pm.get_configuration(CASCADE).configuration
    return {
        "transpose_forward": plans["transpose_forward"],
        "configurations": list(plans["configurations"]),
        LOWRES: {k: plans["configurations"][LOWRES].get(k) for k in keys},
        FULLRES: {k: plans["configurations"][FULLRES].get(k) for k in keys},
        f"{CASCADE} (raw)": plans["configurations"][CASCADE],
        f"{CASCADE} (resolved)": {k: resolved.get(k) for k in keys},
        "cascade_num_input_channels": determine_num_input_channels(pm, CASCADE, dataset_json),
        "foreground_labels": [int(v) for v in pm.get_label_manager(dataset_json).foreground_labels],
        "arch_kwargs": {c: plans["configurations"][c]["architecture"]["arch_kwargs"] for c in (LOWRES, FULLRES)},
    }


def describe_cascade_input(out: Path, model_dir: Path) -> dict:
    """What nnU-Net's preprocessor (run_case with seg_file, as the predictor calls it) makes of the input and the
    previous stage's map for the cascade: shapes, the map's values after crop and resampling, the one-hot channels,
    and how far the normalised image moves because of the map (ZScore's mask is seg >= 0, so previous-stage
    foreground outside the image's nonzero mask joins the normalisation mask)."""
    import SimpleITK as sitk
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(model_dir / "plans.json"))
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    cm = pm.get_configuration(CASCADE)
    preprocessor = cm.preprocessor_class(verbose=False)
    image, prev = [str(out / "input" / f"{CASE_ID}_0000.nii.gz")], str(out / "expected_lowres.nii.gz")
    data, seg, props = preprocessor.run_case(image, prev, pm, cm, dataset_json)
    data_alone, seg_alone, _ = preprocessor.run_case(image, None, pm, cm, dataset_json)
    inside = seg_alone[0] >= 0  # the nonzero mask, preprocessed
    change = np.abs(data - data_alone)[0]
    onehot = convert_labelmap_to_one_hot(seg[0], pm.get_label_manager(dataset_json).foreground_labels, data.dtype)
    raw = sitk.GetArrayFromImage(sitk.ReadImage(image[0]))[None]
    low = sitk.GetArrayFromImage(sitk.ReadImage(prev))
    return {
        "bbox_used_for_cropping": [[int(a), int(b)] for a, b in props["bbox_used_for_cropping"]],
        "shape_after_cropping": [int(v) for v in props["shape_after_cropping_and_before_resampling"]],
        "preprocessed_shape": list(data.shape),
        "seg_values_after_preprocessing": {int(v): int(c) for v, c in zip(*np.unique(seg, return_counts=True))},
        "onehot_channel_sums": [int(c.sum()) for c in onehot],
        "lowres_foreground_outside_nonzero_mask": int(((low > 0) & ~create_nonzero_mask(raw)).sum()),
        "max_abs_change_inside_nonzero_mask": float(change[inside].max()),
        "max_abs_change_outside_nonzero_mask": float(change[~inside].max()),
    }


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_readme(out: Path, summary: dict) -> None:
    from importlib.metadata import version

    import torch

    plans = summary["plans"]
    low, cas = plans[LOWRES], plans[f"{CASCADE} (resolved)"]
    ci = summary["cascade_input"]
    maps = ("expected_lowres.nii.gz", "expected_notta.nii.gz", "expected_lowres_tta.nii.gz", "expected_tta.nii.gz")
    lines = [
        "# nnU-Net v2 cascade fixture",
        "",
        "A genuine nnU-Net v2 3-D cascade (3d_lowres, then 3d_cascade_fullres) for segpipe's tests of running nnU-Net",
        "model folders: written by nnU-Net's own planning (ExperimentPlanner with gpu_memory_target_in_gb "
        f"{GPU_MEMORY_TARGET_GB}, so that",
        "it plans the cascade itself), preprocessing, training (nnUNetTrainer, tiny networks, a few CPU epochs on",
        "synthetic data; the cascade was trained on the lowres stage's own validation predictions) and prediction",
        "code. Do not edit by hand; regenerate with (nnU-Net's environment, CPU only, 10-15 minutes):",
        "",
        "    /work/nnunet-venv/bin/python tools/make_nnunet_cascade_fixture.py --out tests/data/nnunet/cascade \\",
        "        --work /tmp/nnfix_cascade",
        "",
        f"Made with nnunetv2 {version('nnunetv2')}, dynamic_network_architectures "
        f"{version('dynamic_network_architectures')}, batchgenerators {version('batchgenerators')}, "
        f"torch {torch.__version__}.",
        "",
        f"- `{DATASET_NAME}/{TRAINER}__{PLANS}__{LOWRES}/` and `{DATASET_NAME}/{TRAINER}__{PLANS}__{CASCADE}/`: the",
        "  two model folders (dataset.json, plans.json, fold_0/checkpoint_final.pth); plans.json is the same file in",
        f"  both and holds every configuration ({', '.join(plans['configurations'])}); 3d_cascade_fullres is",
        f'  `{json.dumps(plans[f"{CASCADE} (raw)"])}` and 3d_lowres has `"next_stage": "{CASCADE}"`.',
        f"- `input/{CASE_ID}_0000.nii.gz`: one unseen MR-like case, {summary['input_shape_zyx']} voxels (z, y, x),",
        f"  spacing {summary['input_spacing_xyz']} (x, y, z), flipped direction, origin away from 0, zeros around",
        "  the body.",
        "- nnU-Net's `nnUNetPredictor` outputs for it (fold 0, tile_step_size 0.5, Gaussian, CPU,",
        "  perform_everything_on_device False): `expected_lowres.nii.gz` (3d_lowres, use_mirroring False),",
        "  `expected_notta.nii.gz` (3d_cascade_fullres with folder_with_segs_from_prev_stage holding",
        "  expected_lowres, use_mirroring False), `expected_lowres_tta.nii.gz` and `expected_tta.nii.gz` (the same",
        "  with use_mirroring True in both stages).",
        "",
        "| configuration | spacing | patch_size | resampling_fn_seg (kwargs) | network |",
        "|---|---|---|---|---|",
    ]
    for name, cfg in ((LOWRES, low), (CASCADE, cas)):
        arch = plans["arch_kwargs"][LOWRES if name == LOWRES else FULLRES]
        lines.append(
            f"| {name} | {[round(v, 4) for v in cfg['spacing']]} | {cfg['patch_size']} "
            f"| {cfg['resampling_fn_seg']} ({cfg['resampling_fn_seg_kwargs']}) "
            f"| PlainConvUNet {arch['features_per_stage']}, strides {arch['strides']} |"
        )
    lines += ["", "| map | labels {value: voxels} | Dice vs synthetic truth |", "|---|---|---|"]
    lines += [f"| {m} | {summary[m]['labels']} | {summary[m]['dice_vs_truth']} |" for m in maps]
    lines += [
        "",
        f"The cascade network takes {plans['cascade_num_input_channels']} input channels: the image and one",
        f"channel per foreground label {plans['foreground_labels']} (nnU-Net's convert_labelmap_to_one_hot of the",
        "previous stage's map after it went through the preprocessor with the image: transpose, crop to the",
        "image's nonzero bounding box (background outside the nonzero mask becomes -1), resampling to the",
        "3d_fullres spacing with resampling_fn_seg).",
        "",
        f"For this input: crop bbox {ci['bbox_used_for_cropping']}, preprocessed shape {ci['preprocessed_shape']},",
        f"previous-stage map values after preprocessing {ci['seg_values_after_preprocessing']}, one-hot channel",
        f"sums {ci['onehot_channel_sums']}. The map also changes the image's normalisation: ZScoreNormalization",
        "with use_mask_for_norm normalises over `seg >= 0`, and the lowres map has",
        f"{ci['lowres_foreground_outside_nonzero_mask']} foreground voxels outside the image's nonzero mask, so the",
        "normalised image differs from the one preprocessed without a previous stage by up to",
        f"{ci['max_abs_change_inside_nonzero_mask']:.4f} inside the nonzero mask and up to",
        f"{ci['max_abs_change_outside_nonzero_mask']:.4f} outside it (the zeros under that foreground are normalised",
        "instead of left at 0; the cubic resampling spreads both).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "nnunet" / "cascade")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnfix_cascade"))
    args = parser.parse_args(argv)
    work, out = args.work.resolve(), args.out.resolve()
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "pred"):
        shutil.rmtree(work / sub, ignore_errors=True)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / var)
    os.environ["nnUNet_compile"] = "False"
    os.environ["nnUNet_n_proc_DA"] = str(min(2, os.cpu_count() or 1))  # the planner sets torch's threads to it
    os.environ["nnUNet_def_n_proc"] = "1"  # the validation's export pool
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lowres, cascade, planned = build_models(work)
    shutil.rmtree(out, ignore_errors=True)
    models = {}
    for name, trained in ((LOWRES, lowres), (CASCADE, cascade)):
        models[name] = out / DATASET_NAME / f"{TRAINER}__{PLANS}__{name}"
        copy_model(trained, models[name])
    if (models[LOWRES] / "plans.json").read_bytes() != (models[CASCADE] / "plans.json").read_bytes():
        raise RuntimeError("the two stages' plans.json differ")
    summary = make_expected(out, work, models)
    summary["plans"] = describe_plans(models[CASCADE])
    summary["cascade_input"] = describe_cascade_input(out, models[CASCADE])
    summary["planned_networks_before_shrinking"] = planned
    summary["checkpoints"] = {n: describe_checkpoint(m / "fold_0" / "checkpoint_final.pth") for n, m in models.items()}
    write_readme(out, summary)
    summary["fixture_bytes"] = _du(out)
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
