"""Reliability: bad datasets through `segpipe check` and `segpipe plan`.

Each entry of :data:`BAD_DATASETS` is one named case: how a small valid dataset is broken, and
the words the one-line error must contain. For every case both commands must exit non-zero with
that error naming the file, and `plan` must leave no fingerprint, plan or summary behind.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segpipe import cli
from segpipe.demo_data import generate_demo_dataset

CASE = "demo_001"


def _img(root: Path, case: str = CASE) -> Path:
    return root / "imagesTr" / f"{case}.nii.gz"


def _lab(root: Path, case: str = CASE) -> Path:
    return root / "labelsTr" / f"{case}.nii.gz"


def _rewrite(path: Path, fn: Callable[[np.ndarray], np.ndarray], dtype: type | None = None) -> None:
    nii = nib.load(str(path))
    data = fn(np.asarray(nii.dataobj))
    out = nib.Nifti1Image(data.astype(dtype or data.dtype), nii.affine)
    nib.save(out, str(path))


def _desc(root: Path, fn: Callable[[dict], None]) -> None:
    p = root / "dataset.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def geometry_mismatch(root: Path) -> None:
    _rewrite(_lab(root), lambda a: a[:, :, :-3])


def undeclared_label(root: Path) -> None:
    _rewrite(_lab(root), lambda a: np.where(a == 1, 7, a))


def non_integer_label(root: Path) -> None:
    _rewrite(_lab(root), lambda a: a.astype(np.float32) * 0.5, np.float32)


def nan_voxels(root: Path) -> None:
    def put(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[1, 2, 3] = np.nan
        return a

    _rewrite(_img(root), put, np.float32)


def inf_voxels(root: Path) -> None:
    def put(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[0, 0, 0] = np.inf
        return a

    _rewrite(_img(root), put, np.float32)


def constant_image(root: Path) -> None:
    _rewrite(_img(root), lambda a: np.zeros_like(a))


def image_2d(root: Path) -> None:
    nii = nib.load(str(_img(root)))
    nib.save(nib.Nifti1Image(np.asarray(nii.dataobj)[:, :, 0].copy(), nii.affine), str(_img(root)))


def image_4d(root: Path) -> None:
    nii = nib.load(str(_img(root)))
    a = np.asarray(nii.dataobj)
    nib.save(nib.Nifti1Image(np.stack([a, a], axis=-1), nii.affine), str(_img(root)))


def missing_image_file(root: Path) -> None:
    _img(root).unlink()


def truncated_gzip(root: Path) -> None:
    raw = _img(root).read_bytes()
    _img(root).write_bytes(raw[: len(raw) // 2])


def zero_byte_file(root: Path) -> None:
    _img(root).write_bytes(b"")


def huge_nifti2(path: Path) -> None:
    """A valid NIfTI-2 header declaring 100000³ int16 voxels (2 PB) over 64 bytes of data."""
    header = nib.Nifti2Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((100000, 100000, 100000))
    header["vox_offset"] = 548
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * (4 + 64)))


def huge_header(root: Path) -> None:
    huge_nifti2(_img(root))


def empty_image(root: Path) -> None:
    nii = nib.load(str(_img(root)))
    nib.save(nib.Nifti1Image(np.zeros((0, 10, 10), np.int16), nii.affine), str(_img(root)))


def missing_channel_file(root: Path) -> None:
    """The dataset declares two channels; every case has one."""
    _desc(root, lambda d: d.update(modality={"0": "CT", "1": "MR"}))


def file_link_leaves_dataset(root: Path) -> None:
    outside = root.parent / "elsewhere" / f"{CASE}.nii.gz"
    outside.parent.mkdir()
    shutil.copy(_img(root), outside)
    _img(root).unlink()
    _img(root).symlink_to(outside)


def folder_link_leaves_dataset(root: Path) -> None:
    outside = root.parent / "shared_labels"
    shutil.move(str(root / "labelsTr"), outside)
    (root / "labelsTr").symlink_to(outside, target_is_directory=True)


def no_training_cases(root: Path) -> None:
    _desc(root, lambda d: d.update(training=[], numTraining=0))


def labels_wrong_type(root: Path) -> None:
    _desc(root, lambda d: d.update(labels=["background", "organ"]))


def training_wrong_type(root: Path) -> None:
    _desc(root, lambda d: d.update(training="imagesTr"))


def duplicate_case_ids(root: Path) -> None:
    _desc(root, lambda d: d["training"].append(dict(d["training"][1])))


def path_escapes_dataset(root: Path) -> None:
    outside = root.parent / "outside.nii.gz"
    shutil.copy(_img(root), outside)
    _desc(root, lambda d: d["training"][1].update(image="../outside.nii.gz"))


def absolute_path(root: Path) -> None:
    _desc(root, lambda d: d["training"][1].update(image=str(_img(root).resolve())))


def no_dataset_json(root: Path) -> None:
    (root / "dataset.json").unlink()


def dataset_json_not_json(root: Path) -> None:
    (root / "dataset.json").write_text('{"labels": {"0": "background"}, "training": [')


@dataclass(frozen=True)
class Bad:
    name: str
    behaviour: str  # what segpipe does, for the reliability table
    breaks: Callable[[Path], None]
    words: tuple[str, ...]  # the error line contains each (case-insensitive)


BAD_DATASETS = [
    Bad("geometry_mismatch", "refused: image and label grids differ", geometry_mismatch, (CASE, "shape")),
    Bad("undeclared_label_value", "refused: label value not in dataset.json", undeclared_label, (CASE, "7")),
    Bad("non_integer_label", "refused: label values must be integers", non_integer_label, (CASE, "integer")),
    Bad("nan_voxels", "refused: NaN voxels in the image", nan_voxels, (CASE, "nan")),
    Bad("inf_voxels", "refused: inf voxels in the image", inf_voxels, (CASE, "inf")),
    Bad("constant_image", "refused: a blank (constant) image", constant_image, (CASE,)),
    Bad("image_2d", "refused: a 2-D image in a 3-D dataset", image_2d, (CASE,)),
    Bad("image_4d_single_channel", "refused: a 4-D image for one declared channel", image_4d, (CASE,)),
    Bad("empty_image", "refused: an image with an empty axis (no voxels)", empty_image, (CASE, "empty")),
    Bad("missing_channel_file", "refused: a declared channel missing", missing_channel_file, ("channel",)),
    Bad("missing_image_file", "refused: an image named in dataset.json is missing", missing_image_file, (CASE,)),
    Bad("truncated_gzip", "refused: a truncated compressed file", truncated_gzip, (CASE,)),
    Bad("zero_byte_file", "refused: an empty file", zero_byte_file, (CASE,)),
    Bad(
        "huge_header",
        "refused before allocation: a header claiming 100000³ voxels",
        huge_header,
        (CASE, "100000, 100000, 100000"),
    ),
    Bad("labels_wrong_type", "refused: dataset.json labels is not a mapping", labels_wrong_type, ("labels",)),
    Bad("training_wrong_type", "refused: dataset.json training is not a list", training_wrong_type, ("training",)),
    Bad("duplicate_case_ids", "refused: two training entries with one case id", duplicate_case_ids, (CASE,)),
    Bad("path_escapes_dataset", "refused: a `../` path leaving the dataset", path_escapes_dataset, ("outside",)),
    Bad(
        "file_link_leaves_dataset",
        'refused: a case file that is a link outside the dataset (unless `"external_links": true`)',
        file_link_leaves_dataset,
        (CASE, "outside the dataset", "external_links"),
    ),
    Bad(
        "folder_link_leaves_dataset",
        "refused: a dataset sub-folder that is a link outside it",
        folder_link_leaves_dataset,
        ("labelsTr", "shared_labels", "outside the dataset"),
    ),
    Bad(
        "no_training_cases", "refused: no labelled case; the message says what 5 folds need", no_training_cases, ("5",)
    ),
    Bad("absolute_path", "refused: an absolute path in dataset.json", absolute_path, (CASE,)),
    Bad("no_dataset_json", "refused: no dataset.json and no known layout", no_dataset_json, ("dataset",)),
    Bad("dataset_json_not_json", "refused: dataset.json is not valid JSON", dataset_json_not_json, ("dataset.json",)),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("good") / "Good", num_cases=3, num_test=0)


@pytest.mark.parametrize("bad", BAD_DATASETS, ids=[b.name for b in BAD_DATASETS])
def test_bad_dataset(bad: Bad, good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "Good"
    shutil.copytree(good, root)
    bad.breaks(root)
    work = tmp_path / "work"
    for command in (["check", str(root)], ["plan", str(root), f"work_dir={work}"]):
        code = cli.main(command)
        captured = capsys.readouterr()
        # `check` reports a finding as a row of its table (stdout, exit 1); `plan` as an error line (stderr)
        said = (captured.out if command[0] == "check" and code == 1 else captured.err).strip()
        assert code != 0, f"{command[0]} accepted {bad.name}"
        for word in bad.words:
            assert word.lower() in said.lower(), f"{command[0]}, {bad.name}: {word!r} not in {said!r}"
        assert "Traceback" not in captured.err, captured.err
    leftovers = [p.name for p in (work / "Good").glob("*")] if (work / "Good").exists() else []
    assert not {"fingerprint.json", "plans.json", "plan_summary.md"} & set(leftovers), leftovers
