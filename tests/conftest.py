"""Shared fixtures: the real-data folder (skip when absent) and synthetic datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from segpipe.geometry import Geometry
from segpipe.io.image import write_image

REPO = Path(__file__).resolve().parents[1]
# The real scans (README, "Development"): ../shared/data beside the repository, or wherever
# $SEGPIPE_TEST_DATA points. Tests that need them skip with this location in the reason.
SHARED_DATA = Path(os.environ.get("SEGPIPE_TEST_DATA") or REPO.parent / "shared" / "data")
HIPPOCAMPUS = SHARED_DATA / "hippocampus"
DICOM_DATA = SHARED_DATA / "dicom"
SKIP_HOW = "set $SEGPIPE_TEST_DATA to the folder holding hippocampus/ and dicom/ (README, 'Development')"


@pytest.fixture(scope="session")
def hippocampus() -> Path:
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real data not found at {HIPPOCAMPUS}: {SKIP_HOW}")
    return HIPPOCAMPUS


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo dataset, generated once per test session (read-only for tests)."""
    from segpipe.demo_data import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "SegpipeDemo")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model folder with a small random-weight 3d_fullres network of the demo plan, and a good test image.

    Random weights are enough where the question is what happens around the network (files,
    failures, faults), and they cost no training.
    """
    import torch

    import segpipe
    from segpipe.checkpoint import save_checkpoint
    from segpipe.demo_data import generate_demo_dataset
    from segpipe.inference.model import Member, Model, export_model
    from segpipe.networks import build_network
    from segpipe.planning import load_plan

    tmp = tmp_path_factory.mktemp("tiny_model")
    data = generate_demo_dataset(tmp / "Demo", num_cases=3, num_test=1)
    planned = segpipe.plan(
        data, work_dir=tmp / "work", configurations=["3d_fullres"], base_features=4, max_features_3d=16
    )
    plan = load_plan(planned["plans_path"])
    torch.manual_seed(0)
    net = build_network(plan.config("3d_fullres"), plan.in_channels, plan.num_classes, deep_supervision=True)
    weights = tmp / "fold_0.pt"
    save_checkpoint(weights, {"model": net.state_dict()})
    model = export_model(Model(plan, [Member("3d_fullres", "0", weights)]), tmp / "model")
    return model, next((data / "imagesTs").glob("*.nii.gz"))


def tiny_case(
    seed: int = 0, shape: tuple[int, int, int] = (6, 10, 12), spacing=(2.5, 0.8, 0.8), labels: int = 2
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[1:4, 2:6, 3:8] = 1
    if labels > 1:
        label[2:5, 6:9, 6:10] = 2
    geo = Geometry(shape=shape, spacing=spacing, origin=(1.0, -2.0, 3.0))
    return image, label, geo


def make_msd(root: Path, n: int = 3, *, channels: int = 1) -> Path:
    """A tiny MSD-layout dataset with ``n`` labelled cases and one test case."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    training = []
    for i in range(n):
        image, label, geo = tiny_case(i)
        img = np.stack([image * (c + 1) for c in range(channels)])
        write_image(root / "imagesTr" / f"case_{i:03d}.nii.gz", img, geo)
        write_image(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, geo)
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    image, _, geo = tiny_case(99)
    write_image(root / "imagesTs" / "case_099.nii.gz", image, geo)
    desc = {
        "name": "tiny",
        "modality": {str(c): f"MR{c}" for c in range(channels)},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": n,
        "training": training,
        "test": ["./imagesTs/case_099.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


def make_nnunet(root: Path, n: int = 3, *, channels: int = 2) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        image, label, geo = tiny_case(i)
        for c in range(channels):
            write_image(root / "imagesTr" / f"pt{i:02d}_{c:04d}.nii.gz", image + c, geo)
        write_image(root / "labelsTr" / f"pt{i:02d}.nii.gz", label, geo)
    desc = {
        "channel_names": {str(c): ["CT", "T2"][c % 2] for c in range(channels)},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


def make_case_folder(root: Path, n: int = 3, *, unlabelled: int = 1) -> Path:
    for i in range(n + unlabelled):
        image, label, geo = tiny_case(i)
        folder = root / f"patient{i}"
        write_image(folder / "t1.nii.gz", image, geo)
        write_image(folder / "t2.nrrd", image * 2, geo)
        if i < n:
            write_image(folder / "seg.nii.gz", label, geo)
    desc = {
        "layout": "case-folder",
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "image": ["t1.nii.gz", "t2.nrrd"],
        "label": "seg.nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return root
