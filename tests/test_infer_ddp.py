"""Batch prediction shared out among processes (``segpipe infer INPUT trainer=ddp devices=N``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_msd, tiny_case

import segpipe
from segpipe import cli
from segpipe.checkpoint import save_checkpoint
from segpipe.errors import ConfigError
from segpipe.geometry import Geometry
from segpipe.inference import Member, Model, Predictor, discover_inputs, export_model, infer_cases
from segpipe.inference.distributed import RankSampler, process_settings
from segpipe.io.image import read_image, write_image
from segpipe.networks import build_network
from segpipe.planning import load_plan

CONFIG = "3d_fullres"
GOOD = ["c0", "c1", "c2", "c3", "c4"]


# ---------------------------------------------------------------------------- sharing the cases out
def test_rank_sampler_gives_every_case_to_exactly_one_process() -> None:
    assert [list(RankSampler(5, rank=r, world=2)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert [len(RankSampler(5, rank=r, world=2)) for r in range(2)] == [3, 2]  # no padding to even out
    shares = [list(RankSampler(2, rank=r, world=3)) for r in range(3)]
    assert shares == [[0], [1], []]  # more processes than cases: one waits idle
    with pytest.raises(ValueError):
        RankSampler(4, rank=2, world=2)


def test_trainer_settings_are_checked_before_any_work(tmp_path: Path) -> None:
    assert process_settings({"name": "ddp", "devices": "4", "num_nodes": 2}) == {
        "name": "ddp",
        "devices": 4,
        "num_nodes": 2,
    }
    with pytest.raises(ConfigError) as err:
        segpipe.infer(tmp_path / "absent", devices=2)  # trainer=single is the default
    assert "trainer=single" in err.value.message and "trainer=ddp" in (err.value.hint or "")
    with pytest.raises(ConfigError) as err:
        segpipe.infer(tmp_path / "absent", trainer="ddp", device="cuda:1")
    assert "each process takes its own device" in err.value.message
    with pytest.raises(ConfigError):
        process_settings({"name": "ddp", "devices": 0})
    assert cli.main(["infer", str(tmp_path / "absent"), "num_nodes=2"]) == 2


# ---------------------------------------------------------------------------- two CPU processes
@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model folder with a small untrained network (fixed seed) and a folder of 6 cases, one of
    them all NaN."""
    root = tmp_path_factory.mktemp("infer_ddp")
    data = make_msd(root / "tiny", n=3)
    res = segpipe.plan(
        data,
        work_dir=root / "work",
        configurations=[CONFIG],
        base_features=4,
        max_features_3d=16,
        num_workers=1,
    )
    plan = load_plan(res["plans_path"])
    torch.manual_seed(0)
    net = build_network(plan.config(CONFIG), plan.in_channels, plan.num_classes, deep_supervision=True)
    weights = save_checkpoint(root / "fold_0.pt", {"model": net.state_dict()})
    model = export_model(Model(plan, [Member(CONFIG, "0", weights)]), root / "model")
    inputs = root / "inputs"
    inputs.mkdir()
    for i, case in enumerate(GOOD):
        image, _, geo = tiny_case(10 + i, shape=(6, 10 + i, 12))
        write_image(inputs / f"{case}.nii.gz", image, geo)
    nan = np.full((6, 10, 12), np.nan, dtype=np.float32)
    write_image(inputs / "c2_nan.nii.gz", nan, Geometry(shape=(6, 10, 12), spacing=(2.5, 0.8, 0.8)))
    return {"root": root, "model": model, "inputs": inputs}


def _ddp_infer(batch: dict[str, Path], out: Path, record: Path) -> tuple[int, list[dict], str]:
    """``segpipe infer`` with 2 CPU processes (through the probe): its exit code, each process's
    record, its stderr."""
    record.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    args = ["infer", str(batch["inputs"]), "-m", str(batch["model"]), "-o", str(out)]
    args += ["trainer=ddp", "devices=2", "device=cpu", "tta=false", "--json"]
    probe = [sys.executable, str(Path(__file__).with_name("infer_ddp_probe.py")), str(record), *args]
    done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=300, cwd=batch["root"])
    deadline = time.monotonic() + 60  # the second process may finish a moment after the first
    while not (record / "rank1.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (record / "rank0.json").exists() and (record / "rank1.json").exists(), done.stderr[-4000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    return done.returncode, ranks, done.stderr


@pytest.mark.slow
def test_two_processes_write_each_case_once_and_agree_with_one(batch: dict[str, Path], tmp_path: Path) -> None:
    # one process first: every case, into its own folder; c1 and c3 also count as done in `out`
    predictor = Predictor.from_model(batch["model"], device="cpu", tta=False)
    single = infer_cases(predictor, discover_inputs(batch["inputs"]), tmp_path / "single")
    assert single["written"] == GOOD and [f["case"] for f in single["failed"]] == ["c2_nan"]
    out = tmp_path / "out"
    out.mkdir()
    for case in ("c1", "c3"):
        for name in (f"{case}.nii.gz", f"{case}_labels.json", f"{case}.json"):  # every file its report names
            shutil.copy(tmp_path / "single" / name, out / name)

    code, ranks, stderr = _ddp_infer(batch, out, tmp_path / "record")
    # a case that cannot be segmented: exit 3 (as in one process) from every process, the others written
    assert code == 3 and [r["code"] for r in ranks] == [3, 3], stderr[-4000:]
    assert ranks[1]["stdout"] == ""  # process 0 prints the summary of the whole batch
    res = json.loads(ranks[0]["stdout"])
    assert res["rank"] == 0 and res["processes"] == 2
    assert res["cases"] == ["c0", "c1", "c2", "c2_nan", "c3", "c4"]
    assert res["written"] == ["c0", "c2", "c4"] and res["skipped"] == ["c1", "c3"]
    assert [f["case"] for f in res["failed"]] == ["c2_nan"] and "NaN" in res["failed"][0]["error"]
    # process r took cases r, r+2, r+4 of the six (in name order: c0 c1 c2 c2_nan c3 c4) and wrote
    # each file of its unfinished ones once; c2_nan failed before anything was written
    assert ranks[0]["written"] == ["c0.nii.gz", "c0.json", "c2.nii.gz", "c2.json"]  # c3: already done
    assert ranks[1]["written"] == ["c4.nii.gz", "c4.json"]  # c1: already done
    reports = {c: json.loads((out / f"{c}.json").read_text()) for c in GOOD}
    assert {c: r.get("rank") for c, r in reports.items()} == {"c0": 0, "c1": None, "c2": 0, "c3": None, "c4": 1}
    assert not (out / "c2_nan.nii.gz").exists() and not (out / "c2_nan.json").exists()
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert stderr.count("segmenting 6 case(s)") == 1 and "on 2 processes" in stderr  # process 0 speaks

    # the same label maps as one process, and the same identity: a re-run in one process skips them all
    for case in GOOD:
        ddp_label, ddp_geo = read_image(out / f"{case}.nii.gz")
        one_label, one_geo = read_image(tmp_path / "single" / f"{case}.nii.gz")
        np.testing.assert_array_equal(ddp_label, one_label)
        assert ddp_geo.same_grid(one_geo)
    stamps = {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in GOOD}
    again = infer_cases(predictor, discover_inputs(batch["inputs"]), out)
    assert again["skipped"] == GOOD and again["written"] == [] and [f["case"] for f in again["failed"]] == ["c2_nan"]
    assert {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in GOOD} == stamps
