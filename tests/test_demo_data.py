"""The embedded demo dataset: deterministic, anisotropic, varied, and clean."""

from __future__ import annotations

import numpy as np

from segpipe import check, load_dataset, read_case
from segpipe.demo_data import generate_demo_dataset, make_case


def test_make_case_is_deterministic():
    a = make_case(3)
    b = make_case(3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(make_case(4)[1].shape, a[1].shape) or not np.array_equal(make_case(4)[1], a[1])


def test_demo_dataset_is_realistic(demo_dataset):
    ds = load_dataset(demo_dataset)
    assert ds.layout == "msd" and len(ds.cases) == 12 and len(ds.test_cases) == 2
    assert ds.labels == {0: "background", 1: "organ", 2: "vessel", 3: "lesion"}
    spacings, directions = [], set()
    for case in ds.cases:
        data = read_case(case, ds)
        spacings.append(data.geometry.spacing)
        directions.add(data.geometry.direction)
        counts = np.bincount(data.label.ravel(), minlength=4)
        assert (counts[1:] > 0).all(), f"{case.id}: every structure present"
        assert counts[1] > counts[2] and counts[1] > counts[3], "organ is the largest structure"
        assert data.image[0][data.label == 0].min() == 0  # air around the body
    sp = np.asarray(spacings)
    assert (sp[:, 0] / sp[:, 1] > 1.5).all(), "anisotropic: slices thicker than the in-plane spacing"
    assert sp[:, 0].std() > 0.1 and sp[:, 1].std() > 0.05, "spacing varies between cases"
    assert len(directions) > 1
    assert check(ds).ok


def test_generation_is_byte_identical(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", num_cases=2, num_test=0)
    b = generate_demo_dataset(tmp_path / "b", num_cases=2, num_test=0)
    for f in ["labelsTr/demo_001.nii.gz", "dataset.json"]:
        # gzip headers carry no timestamp from SimpleITK's writer; compare decoded content anyway
        assert (a / f).stat().st_size == (b / f).stat().st_size
    from segpipe import read_image

    np.testing.assert_array_equal(
        read_image(a / "imagesTr/demo_001.nii.gz")[0], read_image(b / "imagesTr/demo_001.nii.gz")[0]
    )


def test_dicom_demo_dataset_reads_like_any_other(tmp_path):
    from segpipe.demo_data import generate_dicom_demo_dataset

    root = generate_dicom_demo_dataset(tmp_path / "dcm", num_cases=2, num_test=1)
    ds = load_dataset(root)
    assert ds.layout == "case-folder" and [c.id for c in ds.cases] == ["dicom_000", "dicom_001"]
    assert [c.id for c in ds.test_cases] == ["dicom_002"]
    assert ds.cases[0].images[0].is_dir() and len(list(ds.cases[0].images[0].iterdir())) > 10
    data = read_case(ds.cases[1], ds)
    image, label, geo = make_case(1001)
    assert data.geometry.same_grid(geo), data.geometry.differences(geo)
    np.testing.assert_allclose(data.image[0], image, atol=image.max() / 60000)  # uint16 + rescale quantisation
    np.testing.assert_array_equal(data.label, label)
    assert check(root).ok
