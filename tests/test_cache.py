"""The preprocessing cache: entries validated before reuse, no colliding file names, stale entries
removed; registries refuse unknown names; the data module takes its numbers from the plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segpipe.errors import ConfigError, DataError, StateError
from segpipe.geometry import Geometry
from segpipe.io.datasets import load_dataset
from segpipe.io.image import write_image
from segpipe.preprocessing import (
    NORMALIZERS,
    Cache,
    ChannelNorm,
    PreprocessSpec,
    normalize,
    preprocess_dataset,
    sampled_crc32,
)

ZSCORE = (ChannelNorm("zscore"),)
SPEC = PreprocessSpec(spacing=(2.5, 1.0, 1.0), normalization=ZSCORE)


def _case(seed: int, shape: tuple[int, int, int] = (6, 12, 10)) -> tuple[np.ndarray, np.ndarray, Geometry]:
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[1:4, 2:7, 3:8] = 1
    label[3:5, 7:10, 5:9] = 2
    return image, label, Geometry(shape=shape, spacing=(4.0, 0.8, 0.8))


def make_dataset(root: Path, ids: list[str]) -> Path:
    """An nnU-Net-layout dataset with the given case ids (one channel, labels 0-2)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, cid in enumerate(ids):
        image, label, geo = _case(i)
        write_image(root / "imagesTr" / f"{cid}_0000.nii.gz", image, geo)
        write_image(root / "labelsTr" / f"{cid}.nii.gz", label, geo)
    desc = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


# ---------------------------------------------------------------------------- validation before reuse
def test_damaged_entries_are_rebuilt_not_reused(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "ds", [f"case_{i}" for i in range(5)]))
    cdir = tmp_path / "cache"
    first = preprocess_dataset(ds, SPEC, cdir, num_workers=1)
    assert len(first.processed) == 5 and not first.rebuilt
    cache = Cache(cdir)
    assert cache.cases() == [f"case_{i}" for i in range(5)] and cache.validate() == {}
    good = {cid: cache.load(cid, mmap=False) for cid in cache.cases()}

    img0 = cache.image_path("case_0")
    img0.write_bytes(img0.read_bytes()[: img0.stat().st_size // 2])  # truncated
    cache.image_path("case_1").write_bytes(b"")  # emptied
    cache.label_path("case_2").unlink()  # label deleted: must not turn into an unlabelled case
    lab3 = cache.label_path("case_3")  # same size, other bytes: only the checksum can tell
    raw = bytearray(lab3.read_bytes())
    raw[-1] ^= 0xFF
    lab3.write_bytes(bytes(raw))

    logs: list[str] = []
    again = preprocess_dataset(ds, SPEC, cdir, num_workers=1, log=logs.append)
    assert sorted(again.rebuilt) == ["case_0", "case_1", "case_2", "case_3"]
    assert "truncated" in again.rebuilt["case_0"] and "label" in again.rebuilt["case_2"]
    assert "checksum" in again.rebuilt["case_3"]
    assert again.processed == ["case_0", "case_1", "case_2", "case_3"] and again.reused == ["case_4"]
    assert any("rebuilding 4 damaged cache entries" in m for m in logs)
    assert cache.validate() == {}
    for cid, (image, label, _) in good.items():
        image2, label2, _ = cache.load(cid)
        assert label2 is not None, f"{cid} lost its label"
        np.testing.assert_array_equal(image2, image)
        np.testing.assert_array_equal(label2, label)
    third = preprocess_dataset(ds, SPEC, cdir, num_workers=1)
    assert len(third.reused) == 5 and not third.processed and not third.rebuilt


def test_check_reasons_and_damaged_load(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    image, label, _ = _case(0)
    cache.write("a", image[None], label, {"version": 2, "key": "k"})
    assert cache.check("a", key="k", labelled=True) is None
    assert cache.check("a", key="other") == "plan or source files changed"
    assert cache.check("b") == "missing"
    assert cache.check("a", labelled=False) == "cached with a label the case no longer has"
    cache.properties_path("a").write_text("{not json")
    assert "unreadable" in cache.check("a") and "a" not in cache
    cache.write("c", image[None], None, {"version": 2})
    assert cache.check("c", labelled=True) == "cached without its label"
    np.save(cache.image_path("c"), np.zeros((1, 2, 2, 2), dtype=np.float64))  # replaced by another array
    assert cache.check("c") is not None
    cache.image_path("c").write_bytes(b"")
    with pytest.raises(StateError, match="damaged"):
        cache.load("c")


def test_sampled_checksum_reads_ends_and_middle(tmp_path: Path) -> None:
    from segpipe.preprocessing.cache import EDGE_BLOCK, MIDDLE_BLOCK, MIDDLE_BLOCKS

    p = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes())
    p.write_bytes(bytes(data))
    before = sampled_crc32(p)
    span = len(data) - 2 * EDGE_BLOCK - MIDDLE_BLOCK
    middle = EDGE_BLOCK + span * 7 // (MIDDLE_BLOCKS + 1) + 100
    for offset in (0, len(data) - 1, middle):  # head, tail, inside a middle block
        changed = bytearray(data)
        changed[offset] ^= 1
        p.write_bytes(bytes(changed))
        assert sampled_crc32(p) != before, offset
    p.write_bytes(bytes(data))
    assert sampled_crc32(p) == before


# ---------------------------------------------------------------------------- file names
def test_case_ids_that_extend_each_other_do_not_collide(tmp_path: Path) -> None:
    """Cases ``X`` and ``X_seg`` once overwrote each other's files (X's label became X_seg's image).

    The dataset loader may refuse such ids on its own; the cache must not depend on that."""
    import dataclasses

    loaded = load_dataset(make_dataset(tmp_path / "ds", ["case_a", "case_b"]))
    renamed = [dataclasses.replace(c, id=new) for c, new in zip(loaded.cases, ["X", "X_seg"])]
    ds = dataclasses.replace(loaded, cases=renamed)
    cdir = tmp_path / "cache"
    res = preprocess_dataset(ds, SPEC, cdir, num_workers=1)
    assert res.processed == ["X", "X_seg"]
    cache = Cache(cdir)
    img_x, lab_x, props_x = cache.load("X")
    img_s, lab_s, props_s = cache.load("X_seg")
    assert props_x["case"] == "X" and props_s["case"] == "X_seg"
    assert lab_x is not None and lab_x.dtype == np.uint8 and set(np.unique(lab_x)) <= {0, 1, 2}
    assert lab_s is not None and set(np.unique(lab_s)) <= {0, 1, 2}
    assert not np.array_equal(np.asarray(img_x), np.asarray(img_s))  # two different cases, each its own
    assert preprocess_dataset(ds, SPEC, cdir, num_workers=1).reused == ["X", "X_seg"]


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "..", ""])
def test_case_id_that_cannot_name_a_folder_is_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(DataError, match="cannot name a cache folder"):
        Cache(tmp_path).case_dir(bad)


# ---------------------------------------------------------------------------- stale entries
def test_removed_case_leaves_the_cache_and_new_splits(tmp_path: Path) -> None:
    from segpipe.data import load_or_create_splits

    root = make_dataset(tmp_path / "ds", [f"case_{i}" for i in range(3)])
    cdir = tmp_path / "cache"
    preprocess_dataset(load_dataset(root), SPEC, cdir, num_workers=1)
    (cdir / "old_flat.npy").write_bytes(b"x")  # a file of the earlier flat layout
    (root / "imagesTr" / "case_2_0000.nii.gz").unlink()
    (root / "labelsTr" / "case_2.nii.gz").unlink()
    desc = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**desc, "numTraining": 2}))
    res = preprocess_dataset(load_dataset(root), SPEC, cdir, num_workers=1)
    assert res.removed == ["case_2"] and len(res.reused) == 2
    cache = Cache(cdir)
    assert cache.cases() == ["case_0", "case_1"] and not (cdir / "case_2").exists()
    assert not (cdir / "old_flat.npy").exists()
    splits = load_or_create_splits(tmp_path / "splits_final.json", cache.cases(), n_folds=2)
    assert "case_2" not in {c for f in splits for part in f.values() for c in part}
    # a splits file that still names the removed case is refused, not silently rewritten
    stale = tmp_path / "stale_splits.json"
    stale.write_text(json.dumps([{"train": ["case_0", "case_2"], "val": ["case_1"]}]))
    with pytest.raises(StateError, match="case_2"):
        load_or_create_splits(stale, cache.cases())


def test_explicit_case_subset_keeps_the_other_entries(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset(tmp_path / "ds", ["a", "b"]))
    cdir = tmp_path / "cache"
    preprocess_dataset(ds, SPEC, cdir, num_workers=1)
    res = preprocess_dataset(ds, SPEC, cdir, cases=ds.cases[:1], num_workers=1)
    assert res.removed == [] and Cache(cdir).cases() == ["a", "b"]


# ---------------------------------------------------------------------------- registries
def test_normalisation_registry_refuses_unknown_scheme_with_the_valid_list() -> None:
    from segpipe.planning import NORMALIZATION_SCHEMES

    assert set(NORMALIZERS) == set(NORMALIZATION_SCHEMES)
    with pytest.raises(ConfigError) as err:
        normalize(np.ones((1, 2, 2, 2), dtype=np.float32), (ChannelNorm("zscorr"),))
    assert "zscorr" in str(err.value) and all(name in err.value.hint for name in NORMALIZERS)


def test_network_registry_refuses_unknown_architecture_with_the_valid_list() -> None:
    from segpipe.networks import NETWORKS, build_network
    from segpipe.planning import ARCHITECTURES, PlanConfig

    assert set(NETWORKS) == set(ARCHITECTURES)
    cfg = PlanConfig(
        name="3d_fullres",
        architecture="resnet",
        dims=3,
        spacing=[1.0, 1.0, 1.0],
        median_shape=[16, 16, 16],
        patch_size=[16, 16, 16],
        batch_size=2,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        kernel_sizes=[[3, 3, 3]] * 3,
        features=[4, 8, 16],
        n_conv_encoder=[2, 2, 2],
        n_conv_decoder=[2, 2],
    )
    with pytest.raises(ConfigError) as err:
        build_network(cfg, 1, 2)
    assert "resnet" in str(err.value) and "3d_fullres" in str(err.value)
    assert all(name in err.value.hint for name in NETWORKS)


def test_one_anisotropy_constant() -> None:
    from segpipe.planning import ANISOTROPY_THRESHOLD
    from segpipe.preprocessing import separate_z_axis

    assert PreprocessSpec(spacing=(1.0, 1.0, 1.0), normalization=ZSCORE).separate_z_ratio == ANISOTROPY_THRESHOLD
    assert separate_z_axis((ANISOTROPY_THRESHOLD * 1.01, 1.0, 1.0)) == 0
    assert separate_z_axis((ANISOTROPY_THRESHOLD, 1.0, 1.0)) is None


# ---------------------------------------------------------------------------- plan -> data module
@pytest.mark.slow
def test_from_plan_takes_patch_batch_and_slab_from_the_plan(tmp_path: Path) -> None:
    """Plans a small anisotropic dataset with a 2.5-D slab, preprocesses it, builds each data module."""
    import segpipe
    from segpipe.data import SegDataModule
    from segpipe.planning import load_plan
    from segpipe.workspace import Workspace

    root = make_dataset(tmp_path / "Aniso", [f"case_{i}" for i in range(5)])
    work = tmp_path / "work"
    segpipe.plan(root, work_dir=work, configurations=["2d", "3d_fullres", "2.5d"], context_slices=2)
    segpipe.preprocess(root, work_dir=work)
    entry = Workspace.at(work).dataset("Aniso")
    plan = load_plan(entry.plans_path)
    for name in ("2d", "3d_fullres", "2.5d"):
        cfg = plan.config(name)
        dm = SegDataModule.from_plan(plan, name, 0, work_dir=work, num_workers=0, num_val_batches=1)
        assert dm.patch_size == tuple(cfg.patch_size) and dm.batch_size == cfg.batch_size
        assert dm.context_slices == cfg.context_slices
        batch = next(iter(dm.train_dataloader()))
        assert batch["image"].shape == (cfg.batch_size, cfg.input_slices, *cfg.patch_size)
    assert plan.config("2.5d").context_slices == 2
    assert entry.splits_path.is_file()
    with pytest.raises(ConfigError, match="3d_lowres"):
        SegDataModule.from_plan(plan, "3d_lowres", 0, work_dir=work)
    with pytest.raises(Exception, match="batch_size"):
        SegDataModule.from_plan(plan, "2d", 0, work_dir=work, batch_size=3)


def test_2d_shares_the_3d_cache_when_slices_need_no_resampling() -> None:
    from segpipe.planning import PlanSettings, make_plan
    from segpipe.preprocessing import spec_from_plan

    def fingerprint(z_spacings: list[float]) -> dict:
        cases = [{"spacing": [z, 1.0, 1.0], "shape_after_crop": [40, 96, 96]} for z in z_spacings]
        return {
            "dataset": "d",
            "cases": cases,
            "labels": {"0": "background", "1": "a"},
            "channel_names": {"0": "MR"},
            "median_relative_size_after_crop": 1.0,
        }

    same = make_plan(fingerprint([2.0] * 5), PlanSettings(configurations=["2d", "3d_fullres"]))
    assert same.config("2d").data_identifier == same.config("3d_fullres").data_identifier
    assert spec_from_plan(same, "2d") == spec_from_plan(same, "3d_fullres")  # one cache, one spec
    mixed = make_plan(fingerprint([1.5, 2.0, 2.0, 2.0, 3.0]), PlanSettings(configurations=["2d", "3d_fullres"]))
    assert mixed.config("2d").data_identifier != mixed.config("3d_fullres").data_identifier
    assert spec_from_plan(mixed, "2d") != spec_from_plan(mixed, "3d_fullres")


def test_cache_for_configuration_is_the_workspace_cache_dir(tmp_path: Path) -> None:
    from segpipe.planning import PlanSettings, make_plan
    from segpipe.workspace import Workspace

    fp = {
        "dataset": "d",
        "cases": [{"spacing": [2.0, 1.0, 1.0], "shape_after_crop": [40, 96, 96]}] * 5,
        "labels": {"0": "background", "1": "a"},
        "channel_names": {"0": "MR"},
        "median_relative_size_after_crop": 1.0,
    }
    plan = make_plan(fp, PlanSettings(configurations=["3d_fullres"]))
    ident = plan.config("3d_fullres").data_identifier
    assert Cache.for_configuration(tmp_path, plan, "3d_fullres").root == Workspace.at(tmp_path).dataset("d").cache_dir(
        ident
    )
    assert Cache.for_configuration(tmp_path, plan, "3d_fullres", dataset="e").root.parent.parent.name == "e"
    shutil.rmtree(tmp_path, ignore_errors=True)
