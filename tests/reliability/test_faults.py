"""Reliability: faults, hostile values and determinism around the workspace.

Each test is one case; its docstring's first line says the behaviour.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from segpipe import cli
from segpipe.demo_data import generate_demo_dataset
from segpipe.inference.batch_report import is_report_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("ds") / "Faults", num_cases=4, num_test=0)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _cache_files(work: Path) -> dict[str, bytes]:
    root = work / "Faults" / "cache"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_work_dir_that_is_a_file_is_refused(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A work_dir that is a file is refused with one line naming it, before any reading."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    code, _, err = _run(capsys, "plan", str(dataset), f"work_dir={blocker}")
    assert code != 0 and str(blocker) in err and "Traceback" not in err
    assert blocker.read_text() == "x"


def test_a_truncated_cache_file_is_detected_and_rebuilt(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cache file truncated by hand is found by the next `preprocess`, rebuilt, and equals the original."""
    work = tmp_path / "work"
    assert _run(capsys, "plan", str(dataset), f"work_dir={work}", "configurations=[3d_fullres]")[0] == 0
    assert _run(capsys, "preprocess", f"work_dir={work}")[0] == 0
    before = _cache_files(work)
    victim = next(p for p in (work / "Faults" / "cache").rglob("image.npy"))
    victim.write_bytes(victim.read_bytes()[:100])
    code, out, err = _run(capsys, "preprocess", f"work_dir={work}", "--json")
    assert code == 0, err
    step = json.loads(out)["configurations"]["3d_fullres"]
    case = victim.parent.name
    assert step["processed"] == [case] and case not in step["reused"] and len(step["reused"]) == 3
    assert "truncated" in step["rebuilt"][case]
    assert _cache_files(work) == before


def test_plan_and_preprocess_are_byte_identical_across_runs_and_worker_counts(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """plans.json and every cache file are byte-identical between a 1-worker and a 2-worker run."""
    outputs = []
    for workers in (1, 2):
        work = tmp_path / f"w{workers}"
        assert _run(capsys, "plan", str(dataset), f"work_dir={work}", f"num_workers={workers}")[0] == 0
        assert _run(capsys, "preprocess", f"work_dir={work}", f"num_workers={workers}")[0] == 0
        plans = (work / "Faults" / "plans.json").read_bytes()
        outputs.append((plans, _cache_files(work)))
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1].keys() == outputs[1][1].keys() and outputs[0][1] == outputs[1][1]


def test_config_interpolations_in_a_dataset_json_are_kept_as_text(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `${oc.env:…}` in a dataset.json label name stays text: nothing of a dataset is resolved as configuration."""
    root = tmp_path / "Hostile"
    shutil.copytree(dataset, root)
    desc = json.loads((root / "dataset.json").read_text())
    desc["labels"]["1"] = "${oc.env:HOME}"
    desc["modality"]["0"] = "${oc.decode:'1+1'}"
    (root / "dataset.json").write_text(json.dumps(desc))
    work = tmp_path / "work"
    code, _, err = _run(capsys, "plan", str(root), f"work_dir={work}", "configurations=[3d_fullres]")
    assert code == 0, err
    plans = json.loads((work / "Hostile" / "plans.json").read_text())
    assert plans["labels"]["1"] == "${oc.env:HOME}" and plans["channel_names"]["0"] == "${oc.decode:'1+1'}"


def test_prediction_is_identical_across_window_batch_sizes(tmp_path: Path) -> None:
    """The sliding window gives the same logits whether 1, 3 or all windows go through the network at once."""
    import torch

    from segpipe.inference import sliding_window_inference

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.Conv3d(4, 3, 1))
    image = torch.randn(1, 19, 23, 17)
    runs = [sliding_window_inference(image, net.eval(), (8, 8, 8), batch_size=b) for b in (1, 3, 1000)]
    for other in runs[1:]:
        assert other is not None and runs[0] is not None
        np.testing.assert_array_equal(other.argmax(0).numpy(), runs[0].argmax(0).numpy())
        torch.testing.assert_close(other, runs[0], rtol=1e-5, atol=1e-5)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_as_a_runs_checkpoint_is_refused_not_run(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train` resuming from a checkpoint that holds pickled code refuses it and never runs the code
    (and, before that, 4 cases for 5 folds are refused with the fix fold=all)."""
    import pickle

    work = tmp_path / "work"
    plan = ("plan", str(dataset), f"work_dir={work}", "configurations=[3d_fullres]", "base_features=4")
    assert _run(capsys, *plan, "max_features_3d=16")[0] == 0
    assert _run(capsys, "preprocess", f"work_dir={work}")[0] == 0
    # 4 cases make no 5 folds: said with the fix, then trained on all of them
    code, _, err = _run(capsys, "train", f"work_dir={work}", "fold=0", "epochs=1")
    assert code != 0 and "cannot make 5 folds from 4 case(s)" in err and "fold=all" in err, err
    train = ("train", f"work_dir={work}", "fold=all", "epochs=1", "iterations_per_epoch=1", "val_batches=1")
    assert _run(capsys, *train)[0] == 0
    run_dir = next((work / "Faults" / "runs" / "3d_fullres").iterdir())
    marker = tmp_path / "pwned"
    with open(run_dir / "last.pt", "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    code, _, err = _run(capsys, *train[:-3], "epochs=2", "iterations_per_epoch=1", "val_batches=1")
    assert code != 0 and "last.pt" in err and "could run code" in err and "Traceback" not in err, err
    assert not marker.exists()


def test_disk_full_while_preprocessing_leaves_only_complete_cases(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while writing the cache is one clear error (exit ≠ 0), and no partial case or temporary is left."""
    import errno

    from segpipe.preprocessing import Cache

    work = tmp_path / "work"
    assert _run(capsys, "plan", str(dataset), f"work_dir={work}", "configurations=[3d_fullres]")[0] == 0
    real_save = np.save
    calls = {"n": 0}

    def filling_up(file, arr, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:  # the second case's image
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", filling_up)
    code, _, err = _run(capsys, "preprocess", f"work_dir={work}", "num_workers=1")
    assert code != 0 and "space" in err.lower() and "Traceback" not in err, err
    monkeypatch.setattr(np, "save", real_save)
    cache_dir = next((work / "Faults" / "cache").iterdir())
    cache = Cache(cache_dir)
    assert not cache.validate()  # what is there is complete
    assert not [p for p in cache_dir.rglob("*") if ".tmp-" in p.name]
    assert _run(capsys, "preprocess", f"work_dir={work}")[0] == 0  # and the next run completes it
    assert len(Cache(cache_dir).cases()) == 4


@pytest.mark.slow
def test_kill_9_during_fingerprinting_and_preprocessing_then_the_same_commands_finish_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kill -9` of `plan` and of `preprocess` mid-way, then the same commands: outputs byte-identical to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = generate_demo_dataset(tmp_path / "Faults", num_cases=8, num_test=0)
    ref, work = tmp_path / "ref", tmp_path / "work"
    for command in (("plan", str(data)), ("preprocess",)):
        assert _run(capsys, *command, f"work_dir={ref}", "num_workers=1")[0] == 0

    def killed(command: tuple[str, ...], ready: Callable[[], bool]) -> None:
        argv = [sys.executable, "-m", "segpipe", *command, f"work_dir={work}", "num_workers=1"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    ds = work / "Faults"
    killed(("plan", str(data)), lambda: (ds / "source.json").is_file())  # claimed: fingerprinting under way
    assert not (ds / "plans.json").exists()
    assert _run(capsys, "plan", str(data), f"work_dir={work}", "num_workers=1")[0] == 0
    killed(("preprocess",), lambda: len(list((ds / "cache").glob("*/*/properties.json"))) >= 2)
    done_at_kill = len(list((ds / "cache").glob("*/*/properties.json")))
    assert done_at_kill < 8  # killed mid-way (polled every 50 ms; a case takes far longer)
    assert _run(capsys, "preprocess", f"work_dir={work}", "num_workers=1")[0] == 0
    for name in ("fingerprint.json", "plans.json"):
        assert (ds / name).read_bytes() == (ref / "Faults" / name).read_bytes(), name
    assert _cache_files(work) == _cache_files(ref)
    assert not [p.name for p in ds.rglob("*") if ".tmp-" in p.name or p.name.endswith(".old")]


def test_a_source_changed_after_planning_is_not_used_silently(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`preprocess` of a dataset whose files changed since `plan` says so (warning and JSON), and a fresh `plan` clears it."""
    import nibabel as nib

    root = tmp_path / "Faults"
    shutil.copytree(dataset, root)
    work = tmp_path / "work"
    assert _run(capsys, "plan", str(root), f"work_dir={work}", "configurations=[3d_fullres]")[0] == 0
    code, out, _ = _run(capsys, "preprocess", f"work_dir={work}", "--json")
    assert code == 0 and "dataset_changed_since_plan" not in json.loads(out)
    image = next((root / "imagesTr").glob("*.nii.gz"))
    nii = nib.load(str(image))
    nib.save(nib.Nifti1Image(np.asarray(nii.dataobj).astype(np.float32) * 3, nii.affine), str(image))
    code, out, err = _run(capsys, "preprocess", f"work_dir={work}", "--json")
    assert code == 0
    said = json.loads(out)["dataset_changed_since_plan"]
    assert "changed since" in said and "segpipe plan" in said  # also logged as a warning
    assert _run(capsys, "plan", str(root), f"work_dir={work}", "configurations=[3d_fullres]")[0] == 0
    code, out, err = _run(capsys, "preprocess", f"work_dir={work}", "--json")
    assert code == 0 and "dataset_changed_since_plan" not in json.loads(out)
    # a plan recorded by an earlier segpipe (another record of the files): said as such, not as a change
    fingerprint = work / "Faults" / "fingerprint.json"
    record = json.loads(fingerprint.read_text())
    record["source"] = {k: v for k, v in record["source"].items() if k != "scheme"} | {"sha256": "0" * 64}
    fingerprint.write_text(json.dumps(record))
    code, out, err = _run(capsys, "preprocess", f"work_dir={work}", "--json")
    assert code == 0 and "planned by an earlier segpipe" in json.loads(out)["dataset_changed_since_plan"]


def test_a_source_deleted_or_damaged_after_planning_stops_preprocess_and_train_naming_it(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A case file deleted after `plan` stops `preprocess` and `train` naming it; one truncated stops `preprocess` naming
    the case, keeping only complete cases."""
    from segpipe.preprocessing import Cache

    root = tmp_path / "Faults"
    shutil.copytree(dataset, root)
    work = tmp_path / "work"
    assert _run(capsys, "plan", str(root), f"work_dir={work}", "configurations=[3d_fullres]")[0] == 0
    image = root / "imagesTr" / "demo_001.nii.gz"
    kept = image.read_bytes()
    image.unlink()
    for command in (("preprocess",), ("train", "fold=all")):
        code, _, err = _run(capsys, *command, f"work_dir={work}")
        assert code == 3 and f"{image} does not exist" in err and "Traceback" not in err, err
    assert not (work / "Faults" / "cache").exists() or not any((work / "Faults" / "cache").rglob("*.npy"))
    image.write_bytes(kept[: len(kept) // 2])
    code, out, err = _run(capsys, "preprocess", f"work_dir={work}", "num_workers=1")
    assert code == 3 and "case demo_001" in err and str(image) in err and "cannot read" in err, err
    assert "changed since" in caplog.text  # the warning came first
    cache_dir = next((work / "Faults" / "cache").iterdir())
    cache = Cache(cache_dir)
    assert not cache.validate() and "demo_001" not in cache.cases()
    assert not [p for p in cache_dir.rglob("*") if ".tmp-" in p.name]


def test_temporaries_of_a_killed_run_are_removed_by_the_next_one(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Half-written temporaries a killed run left (over an hour old) are removed by the next `plan` / `infer`; a live writer's are kept."""
    import os
    import time

    from segpipe.inference.batch import prepare_output

    def plant(folder: Path, name: str, age_s: float, is_dir: bool = False) -> Path:
        p = folder / name
        if is_dir:
            p.mkdir(parents=True)
            (p / "image.npy").write_bytes(b"half")
        else:
            p.write_bytes(b"half")
        t = time.time() - age_s
        os.utime(p, (t, t))
        return p

    work = tmp_path / "work"
    assert _run(capsys, "plan", str(dataset), f"work_dir={work}", "configurations=[3d_fullres]")[0] == 0
    entry = work / "Faults"
    stale = [plant(entry, ".plans.tmp-0badf00d.json", 7200), plant(entry, ".fingerprint.tmp-0c0ffee0.json", 7200)]
    live = plant(entry, ".plans.tmp-12345678.json", 5)
    assert _run(capsys, "plan", str(dataset), f"work_dir={work}", "configurations=[3d_fullres]")[0] == 0
    assert not any(p.exists() for p in stale) and live.exists()
    out = tmp_path / "predictions"
    out.mkdir()
    stale = [plant(out, ".c0.tmp-aaaaaaaa.nii.gz", 7200), plant(out, ".c1.tmp-bbbbbbbb", 7200, is_dir=True)]
    keep = [plant(out, ".c2.tmp-cccccccc.nii.gz", 1), plant(out, "c3.nii.gz", 7200)]  # a finished case stays
    prepare_output(out, "nii.gz")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def test_two_commands_racing_on_one_workspace_are_told_apart_by_its_lock(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While `preprocess` holds a dataset, a second `plan`/`preprocess`/`train` on it fails at once naming the holder; trainings share it."""
    import subprocess
    import sys

    from segpipe.workspace import Workspace, dataset_lock

    work = tmp_path / "work"
    assert _run(capsys, "plan", str(dataset), f"work_dir={work}", "configurations=[3d_fullres]")[0] == 0
    entry = Workspace.at(work).dataset("Faults")

    def second(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "segpipe", *argv, f"work_dir={work}"], capture_output=True, text=True, timeout=300
        )

    with dataset_lock(entry, "preprocess"):
        for argv in (("plan", str(dataset)), ("preprocess",), ("train", "fold=all", "epochs=1")):
            r = second(*argv)
            assert r.returncode == 4 and "`segpipe preprocess` (process" in r.stderr, (argv, r.stderr)
            assert "is using this dataset" in r.stderr and "Traceback" not in r.stderr
    with dataset_lock(entry, "train", shared=True), dataset_lock(entry, "train", shared=True):
        r = second("preprocess")
        assert r.returncode != 0 and "`segpipe train`" in r.stderr, r.stderr
    assert _run(capsys, "preprocess", f"work_dir={work}")[0] == 0  # free again once the holders are gone


def _namespaces_work() -> bool:
    """Whether this machine lets a process mount read-only in its own user and mount namespace."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare (user and mount namespaces) for a read-only mount")
def test_a_read_only_work_dir_is_refused_at_once_and_a_read_only_model_still_segments(
    tiny_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """On a read-only mount, `plan` and `preprocess` fail at once (exit 4) naming the folder; `infer` reads a model from one, writes elsewhere."""
    import sys

    model, image = tiny_model
    mounted = tmp_path / "mounted"
    shutil.copytree(model.parent / "work", mounted / "work")  # a planned workspace
    shutil.copytree(model, mounted / "model")
    before = sorted(str(p.relative_to(mounted)) for p in mounted.rglob("*"))
    data = image.parents[1]
    py = shlex.quote(sys.executable)
    script = f"""
mount --bind {mounted} {mounted} && mount -o remount,ro,bind {mounted} {mounted} || exit 99
run() {{ name=$1; shift; "$@" > {tmp_path}/$name.out 2> {tmp_path}/$name.err; echo $? > {tmp_path}/$name.rc; }}
run plan {py} -m segpipe plan {data} work_dir={mounted}/new configurations=[3d_fullres]
run preprocess {py} -m segpipe preprocess {data} work_dir={mounted}/work
run infer {py} -m segpipe infer {image} -m {mounted}/model -o {tmp_path}/out tta=false
run infer_into {py} -m segpipe infer {image} -m {mounted}/model -o {mounted}/out tta=false
"""
    done = subprocess.run(
        ["unshare", "-rm", "bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr

    def said(name: str) -> tuple[int, str]:
        return int((tmp_path / f"{name}.rc").read_text()), (tmp_path / f"{name}.err").read_text()

    for name, folder in (("plan", mounted / "new"), ("preprocess", mounted / "work")):
        code, err = said(name)
        assert code == 4 and "not writable (Read-only file system)" in err and str(folder) in err, err
        assert "Traceback" not in err
    code, err = said("infer")
    assert code == 0, err
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir() if not is_report_file(p))
    assert outputs == [f"{image.name[:-7]}.json", image.name, f"{image.name[:-7]}_labels.json"]
    code, err = said("infer_into")
    assert code == 4 and "Read-only file system" in err and "-o OUT" in err and "Traceback" not in err, err
    assert sorted(str(p.relative_to(mounted)) for p in mounted.rglob("*")) == before


#: run inside a private mount namespace: a 320 kB tmpfs (a few cases with their overlays and the batch report) as the output folder, `infer` into it,
#: look at what is there, grow it, `infer` again; then a checkpoint saved onto a full disk
FULL_DISK_DRIVER = r"""
import json, subprocess, sys
from pathlib import Path
disk, model, images, report = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(disk)], check=True)
out = disk / "out"
infer = [sys.executable, "-m", "segpipe", "infer", images, "-o", str(out), "-m", model, "tta=false"]
first = subprocess.run(infer, capture_output=True, text=True)
from segpipe.io.image import read_image
listing = sorted(p.name for p in out.iterdir() if p.name not in ("report.html", "report_files"))
readable = {}
for p in out.glob("*.nii.gz"):
    try:
        readable[p.name] = read_image(p)[0].shape[1:] == read_image(Path(images) / p.name)[0].shape[1:]
    except Exception as exc:
        readable[p.name] = repr(exc)
subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
second = subprocess.run([*infer, "--json"], capture_output=True, text=True)
import torch
from segpipe.checkpoint import load_checkpoint, save_checkpoint
run = disk / "run"
run.mkdir()
save_checkpoint(run / "last.pt", {"epoch": 1, "model": {"w": torch.zeros(10)}})
subprocess.run(["mount", "-o", "remount,size=" + str(4096 * (len(list(disk.rglob("*"))) + 8)), str(disk)])
try:
    save_checkpoint(run / "last.pt", {"epoch": 2, "model": {"w": torch.randn(3_000_000)}}, keep_previous=True)
    saved = "no error"
except OSError as exc:
    saved = f"OSError {exc.errno}"
report.write_text(json.dumps({
    "first": [first.returncode, first.stderr[-3000:]], "listing": listing, "readable": readable,
    "second": [second.returncode, second.stdout, second.stderr[-3000:]],
    "checkpoint": saved, "epoch_kept": int(load_checkpoint(run / "last.pt")["epoch"]),
    "run_files": sorted(p.name for p in run.iterdir()),
}))
"""


@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare (user and mount namespaces) for a small tmpfs")
def test_a_full_disk_stops_a_batch_infer_and_a_checkpoint_save_with_a_clear_error_and_no_corrupt_file(
    tiny_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """On a real full disk (a 320 kB tmpfs) `infer` stops (exit 4, "no space left") keeping only complete cases, and a
    later run finishes; a checkpoint save fails with ENOSPC, leaving the last one intact."""
    import sys

    model, image = tiny_model
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted(image.parents[1].glob("images*/*.nii.gz"))
    for i in range(12):
        shutil.copy(sources[i % len(sources)], images / f"case_{i:02d}.nii.gz")
    disk = tmp_path / "disk"
    disk.mkdir()
    report = tmp_path / "report.json"
    argv = [sys.executable, "-c", FULL_DISK_DRIVER, str(disk), str(model), str(images), str(report)]
    done = subprocess.run(["unshare", "-rm", *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(report.read_text())
    code, err = r["first"]
    assert code == 4 and "no space left on the device writing" in err and "Traceback" not in err, err
    assert "finished work is kept" in err
    written = sorted(n[: -len(".json")] for n in r["listing"] if n.endswith(".json") and not n.endswith("_labels.json"))
    assert 0 < len(written) < 12, r["listing"]
    # every case there is complete (its report and a readable label map on the input's grid), nothing else
    expected = [f"{c}{ext}" for c in written for ext in (".json", ".nii.gz", "_labels.json")]
    assert r["listing"] == sorted(expected), r["listing"]
    assert r["readable"] == {f"{c}.nii.gz": True for c in written}, r["readable"]
    code, out, err = r["second"]
    assert code == 0, err
    second = json.loads(out)
    assert sorted(second["skipped"]) == written and len(second["written"]) == 12 - len(written)
    assert r["checkpoint"] == "OSError 28" and r["epoch_kept"] == 1 and r["run_files"] == ["last.pt"], r
