"""Planner rules on hand-written fingerprints, the nnU-Net match on hippocampus, determinism, settings."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import HIPPOCAMPUS, SKIP_HOW

from segpipe.errors import ConfigError, StateError
from segpipe.planning import (
    CONFIGURATIONS,
    SCHEMA_VERSION,
    Plan,
    PlanSettings,
    did_you_mean,
    estimate_gpu_bytes,
    load_plan,
    make_plan,
    plan_summary_rows,
    plans_json,
    run_planning,
    save_plan,
    target_spacing,
    topology,
)


def fingerprint(spacings, shapes, *, channels=None, labels=None, intensity=None, relative_size=1.0, name="hand"):
    """A hand-written fingerprint with just what the planner reads."""
    channels = channels or {"0": "MRI"}
    return {
        "dataset": name,
        "channel_names": channels,
        "labels": labels or {"0": "background", "1": "a", "2": "b"},
        "median_relative_size_after_crop": relative_size,
        "foreground_intensity_per_channel": intensity or {},
        "cases": [
            {"spacing": list(map(float, s)), "shape_after_crop": list(map(int, sh))} for s, sh in zip(spacings, shapes)
        ],
    }


def hippocampus_like(n=208):
    rng = np.random.default_rng(0)
    shapes = [(36 + d, 50 + e, 35 + f) for d, e, f in rng.integers(-3, 4, size=(n, 3))]
    shapes[0] = (36, 50, 35)
    return fingerprint([(1.0, 1.0, 1.0)] * n, shapes)


def anisotropic(coarse_last=False, n=20):
    """0.7 × 0.7 × 5 mm slices (a few at 4 mm), 24 × 256 × 256 voxels."""
    zs = [5.0] * (n - 4) + [4.0] * 4
    sp = [(z, 0.7, 0.7) for z in zs]
    sh = [(24, 256, 256)] * n
    if coarse_last:
        sp = [s[::-1] for s in sp]
        sh = [s[::-1] for s in sh]
    return fingerprint(sp, sh)


# ---------------------------------------------------------------------------- rules
def test_isotropic_matches_nnunet_rules():
    plan = make_plan(hippocampus_like())
    full = plan.configurations["3d_fullres"]
    assert plan.target_spacing == [1.0, 1.0, 1.0] and plan.transpose_forward == [0, 1, 2]
    assert full.patch_size == [40, 56, 40]
    assert full.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert full.kernel_sizes == [[3, 3, 3]] * 4
    assert full.features == [32, 64, 128, 256]
    assert full.batch_size == 7  # the 5%-of-dataset cap decides here (memory allows far more)
    assert "5%" in full.notes[-1]
    two = plan.configurations["2d"]
    assert two.patch_size == [56, 40] and two.batch_size == 292 and two.dims == 2
    assert not two.resample_slices
    assert "3d_lowres" not in plan.configurations and "2.5d" not in plan.configurations
    assert set(plan.skipped) == {"3d_lowres", "3d_cascade_fullres", "2.5d"}
    assert plan.normalization[0].scheme == "zscore" and not plan.normalization[0].use_mask


def test_anisotropy_rule_and_25d_offered():
    plan = make_plan(anisotropic())
    assert plan.anisotropic and plan.anisotropic_axis == 0
    # 10th percentile of the slice spacing (4 mm), not the median (5 mm)
    assert plan.target_spacing == pytest.approx([4.0, 0.7, 0.7])
    full = plan.configurations["3d_fullres"]
    assert full.kernel_sizes[0] == [1, 3, 3] and full.strides[1] == [1, 2, 2]
    assert "2.5d" in plan.configurations
    z25 = plan.configurations["2.5d"]
    assert z25.architecture == "unet25d" and z25.attention
    assert z25.spacing[0] == pytest.approx(5.0)  # native (median) slice spacing
    # 2D convolutions for longer than nnU-Net's 3d_fullres: it is not a renamed 3d_fullres
    assert sum(k[0] == 1 for k in z25.kernel_sizes) > sum(k[0] == 1 for k in full.kernel_sizes)
    assert (z25.kernel_sizes, z25.strides, z25.spacing) != (full.kernel_sizes, full.strides, full.spacing)
    assert plan.configurations["vnet"].kernel_sizes[0] == [1, 5, 5]


def test_coarse_axis_is_transposed_first():
    plan = make_plan(anisotropic(coarse_last=True))
    assert plan.transpose_forward == [2, 0, 1] and plan.transpose_backward == [1, 2, 0]
    assert plan.anisotropic_axis == 2
    assert plan.target_spacing == pytest.approx([0.7, 0.7, 4.0])  # array order
    full = plan.configurations["3d_fullres"]
    assert full.spacing == pytest.approx([4.0, 0.7, 0.7])  # network order
    assert full.median_shape[0] == round(24 * 5 / 4) or full.median_shape[0] == 30


def test_target_spacing_rule_edges():
    # p10 below the largest other spacing → just above it
    sp = np.array([[5.0, 1.0, 1.0]] * 8 + [[0.5, 1.0, 1.0]] * 2)
    sh = np.array([[20, 200, 200]] * 10)
    t, axis = target_spacing(sp, sh)
    assert axis == 0 and t[0] == pytest.approx(1.0 + 1e-5)
    # coarse spacing but enough voxels along that axis → no rule
    t, axis = target_spacing(sp, np.array([[150, 200, 200]] * 10))
    assert axis is None and t[0] == 5.0


def test_topology_function():
    strides, kernels, patch, divisor = topology([1.0, 1.0, 1.0], [36, 50, 35])
    assert patch == [40, 56, 40] and divisor == [8, 8, 8] and len(strides) == 4
    # an axis alone must be ≥ 12 to pool (nnU-Net's 3 × min edge)
    strides, _, _, divisor = topology([5.0, 0.7, 0.7], [10, 8, 8])
    assert divisor[0] == 1


def test_tiny_images_get_three_stages():
    plan = make_plan(fingerprint([(1, 1, 1)] * 5, [(6, 10, 12)] * 5))
    for cfg in plan.configurations.values():
        assert cfg.num_stages >= 3
        for p, k in zip(cfg.patch_size, np.prod(cfg.strides, axis=0)):
            assert p % k == 0


def test_huge_images_shrink_patch_and_plan_lowres():
    fp = fingerprint([(0.8, 0.7, 0.7)] * 30, [(600, 512, 512)] * 30)
    t0 = time.perf_counter()
    plan = make_plan(fp)
    assert time.perf_counter() - t0 < 3.0
    budget = 8 * 2**30
    full = plan.configurations["3d_fullres"]
    assert full.batch_size == 2 and full.estimated_gpu_bytes <= budget
    assert any("shrunk" in n for n in full.notes)
    assert max(full.patch_size) < 256
    low = plan.configurations["3d_lowres"]
    assert all(a > b for a, b in zip(low.spacing, full.spacing))
    assert low.estimated_gpu_bytes <= budget
    assert np.prod(low.patch_size) / np.prod(low.median_shape) >= 0.25 * 0.9
    # more memory → a larger patch, never a smaller one
    big = make_plan(fp, PlanSettings(gpu_memory_gb=40)).configurations["3d_fullres"]
    assert np.prod(big.patch_size) > np.prod(full.patch_size)
    for cfg in plan.configurations.values():
        assert estimate_gpu_bytes(cfg, 1, 3, cfg.batch_size) == cfg.estimated_gpu_bytes <= budget


def test_multichannel_ct_and_mr_normalization():
    intensity = {
        "0": {"mean": 80.0, "std": 120.0, "percentile_00_5": -900.0, "percentile_99_5": 1400.0},
        "1": {"mean": 300.0, "std": 50.0, "percentile_00_5": 10.0, "percentile_99_5": 600.0},
    }
    fp = fingerprint(
        [(2.5, 0.8, 0.8)] * 10,
        [(80, 200, 200)] * 10,
        channels={"0": "CT", "1": "T2"},
        intensity=intensity,
        relative_size=0.6,
    )
    plan = make_plan(fp)
    ct, mr = plan.normalization
    assert (ct.scheme, ct.clip, ct.mean, ct.std, ct.use_mask) == ("ct", [-900.0, 1400.0], 80.0, 120.0, False)
    assert mr.scheme == "zscore" and mr.use_mask  # cropping kept < 75 % of the image
    assert plan.in_channels == 2 and plan.num_classes == 3
    override = make_plan(fp, PlanSettings.from_mapping({"normalization": {"T2": "none", "0": "zscore"}}))
    assert [n.scheme for n in override.normalization] == ["zscore", "none"]
    with pytest.raises(ConfigError, match="unknown channel"):
        make_plan(fp, PlanSettings(normalization={"PET": "ct"}))


def test_25d_slab_mode():
    plan = make_plan(anisotropic(), PlanSettings(context_slices=2, configurations=["2.5d"]))
    cfg = plan.configurations["2.5d"]
    assert list(plan.configurations) == ["2.5d"]
    assert cfg.dims == 2 and cfg.input_slices == 5 and cfg.attention and not cfg.resample_slices


def test_target_spacing_override_and_configuration_choice():
    plan = make_plan(hippocampus_like(20), PlanSettings(target_spacing=[2.0, 2.0, 2.0], configurations=["3d_fullres"]))
    assert list(plan.configurations) == ["3d_fullres"]
    assert plan.configurations["3d_fullres"].spacing == [2.0, 2.0, 2.0]
    assert plan.configurations["3d_fullres"].median_shape == pytest.approx([18, 25, 18], abs=1)
    with pytest.raises(ConfigError, match="3d_lowres does not apply") as exc:
        make_plan(hippocampus_like(20), PlanSettings(configurations=["3d_lowres"]))
    assert "applicable: 2d, 3d_fullres, vnet" in str(exc.value)
    with pytest.raises(ConfigError, match="2.5d does not apply"):
        make_plan(hippocampus_like(20), PlanSettings(configurations=["2.5d"]))


def test_too_little_memory_is_a_config_error():
    with pytest.raises(ConfigError, match="too small"):
        make_plan(hippocampus_like(20), PlanSettings(gpu_memory_gb=0.5, configurations=["3d_fullres"]))


# ---------------------------------------------------------------------------- settings
def test_settings_from_mapping_validates():
    s = PlanSettings.from_mapping(
        {"gpu_memory_gb": "24", "configurations": "3d_fullres,2d", "target_spacing": None, "amp": "false"}
    )
    assert s.gpu_memory_gb == 24.0 and s.configurations == ["3d_fullres", "2d"] and s.amp is False
    assert PlanSettings.from_mapping(None) == PlanSettings()
    with pytest.raises(ConfigError, match="unknown planner setting.*gpu_mem") as exc:
        PlanSettings.from_mapping({"gpu_mem": 8})
    assert "gpu_memory_gb" in str(exc.value)  # lists the valid settings
    with pytest.raises(ConfigError, match="unknown configuration '3d'") as exc:
        PlanSettings.from_mapping({"configurations": ["3d"]})
    assert ", ".join(CONFIGURATIONS) in str(exc.value)
    for bad in (
        {"gpu_memory_gb": -1},
        {"gpu_memory_gb": "lots"},
        {"target_spacing": [1, 1]},
        {"base_features": 2.5},
        {"max_dataset_fraction": 2},
        {"normalization": {"0": "minmax"}},
        {"configurations": []},
        {"amp": "maybe"},
    ):
        with pytest.raises(ConfigError):
            PlanSettings.from_mapping(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3d_fullres", ["3d_fullres"]),  # a plain string is one name, not the characters '3', 'd', ...
        ("3d_fullres,2d", ["3d_fullres", "2d"]),
        (" 3d_fullres , 2d ", ["3d_fullres", "2d"]),
        ("[3d_fullres, 2d]", ["3d_fullres", "2d"]),
        (["3d_fullres"], ["3d_fullres"]),
        (("2d", "3d_fullres,vnet"), ["2d", "3d_fullres", "vnet"]),
        (["2d", "2d"], ["2d"]),
    ],
)
def test_configurations_as_string_or_list(value, expected):
    assert PlanSettings.from_mapping({"configurations": value}).configurations == expected


def test_configurations_string_plans_only_those():
    plan = make_plan(anisotropic(), PlanSettings.from_mapping({"configurations": "3d_fullres"}))
    assert list(plan.configurations) == ["3d_fullres"]
    plan = make_plan(anisotropic(), PlanSettings.from_mapping({"configurations": "3d_fullres,2d"}))
    assert list(plan.configurations) == ["2d", "3d_fullres"]


def test_unknown_configuration_hint_names_each_candidate_once():
    with pytest.raises(ConfigError, match="unknown configuration '3d_fulres'") as exc:
        PlanSettings.from_mapping({"configurations": "3d_fulres"})
    hint = exc.value.hint or ""
    assert hint.startswith("did you mean 3d_fullres")
    assert hint.count("3d_fullres") == 2  # the suggestion once, the valid list once
    assert ", ".join(CONFIGURATIONS) in hint


def test_did_you_mean_deduplicates():
    names = ["configuration", "configuration", "configurations", "planner.configurations", "configurations"]
    close = did_you_mean("configuratio", names)
    assert close == list(dict.fromkeys(close)) and close[:2] == ["configuration", "configurations"]
    assert did_you_mean("zzz", names) == []


def test_unknown_setting_refused_with_valid_list_and_suggestion():
    with pytest.raises(ConfigError, match="unknown planner setting.*configuration") as exc:
        PlanSettings.from_mapping({"configuration": "2d"})
    hint = exc.value.hint or ""
    assert hint.startswith("did you mean configurations?") and hint.count("did you mean") == 1
    assert "valid settings: " + ", ".join(PlanSettings.fields()) in hint
    for run_option in ("force", "num_workers", "work_dir"):  # the caller's to honour, never dropped here
        with pytest.raises(ConfigError, match=f"unknown planner setting.*{run_option}"):
            PlanSettings.from_mapping({run_option: 1})


def test_target_spacing_forms():
    assert PlanSettings.from_mapping({"target_spacing": "3,1,1"}).target_spacing == [3.0, 1.0, 1.0]
    assert PlanSettings.from_mapping({"target_spacing": "[3, 1, 1]"}).target_spacing == [3.0, 1.0, 1.0]
    assert PlanSettings.from_mapping({"target_spacing": 2}).target_spacing == [2.0, 2.0, 2.0]
    for bad in ("3,1", "a,b,c", [True, 1, 1], "3,0,1"):
        with pytest.raises(ConfigError, match="target_spacing"):
            PlanSettings.from_mapping({"target_spacing": bad})


def test_anisotropy_threshold_is_one_constant():
    import segpipe.planning.planner as planner_mod
    from segpipe.planning import settings as settings_mod

    assert planner_mod.ANISOTROPY_THRESHOLD is settings_mod.ANISOTROPY_THRESHOLD == 3.0
    assert PlanSettings().anisotropy_threshold == settings_mod.ANISOTROPY_THRESHOLD


# ---------------------------------------------------------------------------- artefacts
def test_plan_roundtrip_and_byte_identical_save(tmp_path):
    fp = anisotropic()
    plan = make_plan(fp)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    a = save_plan(plan, tmp_path / "a" / "plans.json")
    b = save_plan(make_plan(fp), tmp_path / "b" / "plans.json")
    assert a.read_bytes() == b.read_bytes() == plans_json(plan).encode()
    assert not [p for p in a.parent.iterdir() if p.name != "plans.json"]
    d = json.loads(a.read_text())
    assert d["schema_version"] == SCHEMA_VERSION
    assert "class" not in a.read_text().lower().replace("classes", "")  # data only, no class paths
    cfg = d["configurations"]["3d_fullres"]
    for key in (
        "spacing",
        "patch_size",
        "batch_size",
        "strides",
        "kernel_sizes",
        "features",
        "architecture",
        "num_stages",
        "deep_supervision_outputs",
        "estimated_gpu_bytes",
    ):
        assert key in cfg
    assert load_plan(a) == plan and load_plan(a.parent) == plan
    d["schema_version"] = 999
    a.write_text(json.dumps(d))
    with pytest.raises(StateError, match="schema version"):
        load_plan(a)
    with pytest.raises(StateError, match="no plan"):
        load_plan(tmp_path / "missing.json")
    for broken, why in (
        ("", "empty plan"),
        ('{"schema_version": 1', "corrupt plan"),
        ("[1, 2]", "corrupt plan"),
        ('{"schema_version": 1}', "incomplete plan"),
    ):
        a.write_text(broken)
        with pytest.raises(StateError, match=why) as exc:
            load_plan(a)
        assert str(a) in str(exc.value) and "segpipe plan" in (exc.value.hint or "")


def test_summary_rows():
    rows = plan_summary_rows(make_plan(anisotropic()))
    assert [r["configuration"] for r in rows] == ["2d", "3d_fullres", "2.5d", "vnet"]
    assert {"spacing", "patch", "batch", "stages", "strides", "kernels"} <= set(rows[0])
    assert rows[0]["spacing"] == [0.7, 0.7]  # 2d: in-plane only


# ---------------------------------------------------------------------------- real data
@pytest.mark.realdata
@pytest.mark.slow
def test_hippocampus_matches_nnunet(tmp_path):
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real data not found at {HIPPOCAMPUS}: {SKIP_HOW}")
    from segpipe.io.datasets import load_dataset

    ds = load_dataset(HIPPOCAMPUS)
    result = run_planning(ds, tmp_path, PlanSettings())
    plan, path = result.plan, result.plans_path
    assert path == tmp_path / ds.name / "plans.json" and (tmp_path / ds.name / "fingerprint.json").is_file()
    assert result.plan_summary_path.is_file() and result.dataset_report_path.is_file()
    full = plan.configurations["3d_fullres"]
    assert full.spacing == [1.0, 1.0, 1.0]
    assert full.patch_size == [40, 56, 40]
    assert full.num_stages == 4 and full.strides == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert full.kernel_sizes == [[3, 3, 3]] * 4
    assert full.batch_size == 7  # nnU-Net: 7
    assert plan.configurations["2d"].patch_size == [56, 40] and plan.configurations["2d"].batch_size == 292
    first = path.read_bytes()
    plan2, path2 = run_planning(ds, tmp_path, PlanSettings())  # cached fingerprint, same bytes (unpacks as before)
    assert path2.read_bytes() == first and plan2 == plan
