#!/usr/bin/env python
"""Benchmark ``segpipe infer`` on nnU-Net v2 trained model folders against ``nnUNetv2_predict`` itself.

Proves that segpipe, handed an nnU-Net results folder (``Dataset…/<Trainer>__<Plans>__<configuration>/``
with dataset.json, plans.json and fold_0/checkpoint_final.pth), gives nnU-Net's answer:

1. two datasets in nnU-Net raw format under ``--work/raw``: ``hippocampus`` (Dataset901: the first 60
   labelled MSD cases of ../shared/data/hippocampus train, the next 15 are imagesTs/labelsTs; linked, not
   copied) and ``ct`` (Dataset902: 30 + 8 synthetic CT-like cases of ~64×64×20 voxels, small because CPU
   training is the cost; seed 0; two labelled organs, an unlabelled bone; spacing ±15 % around 0.8×0.8×3 mm
   so nnU-Net resamples every case, separately along z; every other case with flipped x/y directions);
2. ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` per plans (``nnUNetPlans``; ``nnUNetResEncUNetMPlans``
   with ``-pl nnUNetPlannerResEncM``), once;
3. fold 0 of the real ``nnUNetTrainer``, 1 epoch of ``--iterations`` iterations on the CPU, the plans' batch
   size capped to ``--max-batch`` (2; ResEnc M plans 45 for hippocampus, and inference ignores it; the model
   folder's plans.json shows the cap); ``--skip-train`` keeps existing checkpoint_final.pth files and trains
   only missing ones;
4. per model folder, TTA on then off, the two sides interleaved (who goes first alternates):
   ``nnUNetv2_predict … -f 0 -device cpu -npp 1 -nps 1`` and ``python -m segpipe infer imagesTs -m <model
   folder> folds=0 tta=… -q`` (plus any ``--segpipe-set key=value``), each timed as a process tree (wall,
   peak RSS sampled every 0.1 s), OMP_NUM_THREADS=2; nnUNetv2_predict sets torch's threads to the core
   count, so on more than 2 cores both sides run under ``taskset -c 0,1``;
5. per case: voxel agreement of the two label maps (target ≥ 99.9 %), each side's foreground Dice (mean
   over labels 1..K) against labelsTs (target: |ΔDice| ≤ 0.002), both outputs' geometry against the input's.
   A side that fails is reported with its output tail; the other side's figures are still computed.

    python tools/bench_nnunet_models.py --nnunet-python ../nnunet-venv/bin/python --json out.json
    python tools/bench_nnunet_models.py --nnunet-python ../nnunet-venv/bin/python --skip-train --datasets ct

Without ``--nnunet-python`` (or when it cannot import nnunetv2) it says why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plan import run_measured  # noqa: E402

HIPPO = REPO.parent / "shared" / "data" / "hippocampus"
DATASETS = {"hippocampus": (901, "Dataset901_Hippocampus"), "ct": (902, "Dataset902_SyntheticCT")}
PLANNERS = {
    "nnUNetPlans": "ExperimentPlanner",
    "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
    "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL",
}
THREADS = 2
INTERVAL = 0.1
VAL_ITERATIONS = 5
AGREE_TARGET = 99.9  # % of voxels per case
DDICE_TARGET = 0.002  # |Dice difference| per case
HIPPO_SPLIT = (60, 15)
CT_SPLIT, CT_SPACING = (30, 8), (0.8, 0.8, 3.0)  # x, y, z mm (the median; each case varies)

TRAIN_DRIVER = r"""
import json, sys, time
import torch
name, plans_id, config, iters, val_iters, threads, max_batch = sys.argv[1:8]
torch.set_num_threads(int(threads))
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
base = join(nnUNet_preprocessed, name)
plans = load_json(join(base, plans_id + ".json"))
plans["continue_training"] = False  # nnUNetTrainer.__init__ pops it (run_training.py sets it)
conf = plans["configurations"][config]
if int(max_batch) > 0 and conf.get("batch_size", 0) > int(max_batch):  # inference ignores the batch size
    print(f"batch size {conf['batch_size']} of the plans capped to {max_batch} for CPU training")
    conf["batch_size"] = int(max_batch)
trainer = nnUNetTrainer(plans=plans, configuration=config, fold=0, dataset_json=load_json(join(base, "dataset.json")),
                        device=torch.device("cpu"))
trainer.num_epochs = 1
trainer.num_iterations_per_epoch = int(iters)
trainer.num_val_iterations_per_epoch = int(val_iters)
t0 = time.perf_counter()
trainer.run_training()
print("RESULT " + json.dumps({"train_s": round(time.perf_counter() - t0, 1), "output_folder": trainer.output_folder,
                              "ema_fg_dice": float(trainer.logger.get_value("ema_fg_dice", step=-1)),
                              "patch_size": list(trainer.configuration_manager.patch_size),
                              "batch_size": trainer.configuration_manager.batch_size}))
"""


def say(text: str) -> None:
    print(text, flush=True)


def nnunet_env(work: Path) -> dict[str, str]:
    env = {f"nnUNet_{k}": str(work / k) for k in ("raw", "preprocessed", "results")}
    env.update(nnUNet_compile="False", nnUNet_n_proc_DA=str(THREADS), nnUNet_def_n_proc=str(THREADS))
    return {**os.environ, **env, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}


def cpu_pin() -> list[str]:
    """``taskset -c 0,1`` where the machine has more cores than THREADS (nnU-Net uses them all otherwise)."""
    return ["taskset", "-c", "0,1"] if (os.cpu_count() or 1) > THREADS and shutil.which("taskset") else []


def nnunet_missing(python: Path | None) -> str | None:
    """Why nnU-Net's side cannot run, or None."""
    if python is None:
        return "no --nnunet-python given"
    if not python.exists():
        return f"{python} does not exist"
    r = subprocess.run([str(python), "-c", "import nnunetv2"], capture_output=True, text=True)
    return f"{python} cannot import nnunetv2 ({(r.stderr.strip().splitlines() or ['?'])[-1]})" if r.returncode else None


def write_dataset_json(root: Path, channel: str, labels: list[str], n_train: int) -> None:
    desc = {"channel_names": {"0": channel}, "labels": {name: i for i, name in enumerate(labels)}}
    desc.update(numTraining=n_train, file_ending=".nii.gz")
    (root / "dataset.json").write_text(json.dumps(desc, indent=1))


def make_hippocampus(root: Path) -> None:
    """Link a fixed subset of the labelled MSD cases: the first 60 (sorted) train, the next 15 test."""
    msd = json.loads((HIPPO / "dataset.json").read_text())
    cases = sorted(p.name[: -len(".nii.gz")] for p in (HIPPO / "labelsTr").glob("*.nii.gz"))
    n_train, n_test = HIPPO_SPLIT
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases[: n_train + n_test]):
        split = "Tr" if i < n_train else "Ts"
        os.symlink(HIPPO / "imagesTr" / f"{case}.nii.gz", root / f"images{split}" / f"{case}_0000.nii.gz")
        os.symlink(HIPPO / "labelsTr" / f"{case}.nii.gz", root / f"labels{split}" / f"{case}.nii.gz")
    labels = [msd["labels"][str(i)] for i in range(len(msd["labels"]))]
    write_dataset_json(root, msd["modality"]["0"], labels, n_train)


def _ellipsoid(grid: tuple[np.ndarray, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def ct_case(rng: np.random.Generator, sp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like (z, y, x) volume in HU (int16) at spacing ``sp`` (z, y, x), ~60×51×51 mm, and its labels:
    1 a ~100 HU organ, 2 a ~170 HU organ (opposite sides of a ~40 HU body ellipse with a fat rim), an
    unlabelled ~650 HU bone, air elsewhere."""
    shape = tuple(int(n) for n in np.round(np.array([60.0, 51.0, 51.0]) * rng.uniform(0.9, 1.1, 3) / sp))
    grid = tuple(np.arange(n)[(slice(None),) + (None,) * (2 - a)] * s for a, (n, s) in enumerate(zip(shape, sp)))
    extent = np.array(shape) * sp
    body_c = extent / 2 + rng.uniform(-3, 3, 3) * [0, 1, 1]
    body_r = np.array([1e6, extent[1] * rng.uniform(0.32, 0.4), extent[2] * rng.uniform(0.38, 0.46)])
    body = _ellipsoid(grid, body_c, body_r)
    inner = _ellipsoid(grid, body_c, body_r - [0, 3, 3])
    img = np.where(body, np.where(inner, 40.0, -90.0), -1000.0)
    organs = []
    for side, radii_mm, hu in ((-1, (7, 10), 100.0), (1, (4, 7), 170.0)):
        r = np.array([rng.uniform(8, 16), *rng.uniform(*radii_mm, 2)])
        shift = [rng.uniform(-0.2, 0.2) * extent[0], rng.uniform(-4, 4), side * rng.uniform(0.45, 0.55) * body_r[2]]
        c = body_c + shift
        organs.append((_ellipsoid(grid, c, r) & inner, hu + rng.normal(0, 8)))
    bone_c = body_c + [0, body_r[1] * rng.uniform(0.55, 0.7), rng.uniform(-2, 2)]
    bone = _ellipsoid(grid, bone_c, np.array([1e6, *rng.uniform(4, 6, 2)]))
    img[bone] = 650.0 + rng.normal(0, 40)
    lab = np.zeros(shape, np.uint8)
    for k, (mask, hu) in enumerate(organs, start=1):
        img[mask & ~bone] = hu
        lab[mask & ~bone] = k
    img += rng.normal(0, 15, shape)
    return np.clip(np.round(img), -1024, 3071).astype(np.int16), lab


def make_ct(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_train, n_test = CT_SPLIT
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_test):  # spacing ±15 % around CT_SPACING: nnU-Net resamples every case
        split, case = ("Tr" if i < n_train else "Ts"), f"ct_{i:03d}"
        spacing = [float(v) for v in np.round(np.array(CT_SPACING) * rng.uniform(0.85, 1.15, 3)[[0, 0, 1]], 3)]
        img, lab = ct_case(rng, np.array(spacing[::-1]))
        origin = (float(rng.uniform(-200, -150)), float(rng.uniform(-200, -150)), float(rng.uniform(-400, 0)))
        for arr, path in ((img, f"images{split}/{case}_0000.nii.gz"), (lab, f"labels{split}/{case}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(spacing)
            im.SetOrigin(origin)
            im.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1) if i % 2 else (1, 0, 0, 0, 1, 0, 0, 0, 1))
            sitk.WriteImage(im, str(root / path), useCompression=True)
    write_dataset_json(root, "CT", ["background", "organ_a", "organ_b"], n_train)


def prepare(python: Path, work: Path, spec: tuple[str, str, str]) -> dict[str, Any] | None:
    """Raw dataset (once) and ``nnUNetv2_plan_and_preprocess`` for the plans (once); its figures."""
    dataset, plans, config = spec
    did, name = DATASETS[dataset]
    root = work / "raw" / name
    if not (root / "dataset.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_hippocampus(root) if dataset == "hippocampus" else make_ct(root)
    plans_file = work / "preprocessed" / name / f"{plans}.json"
    if plans_file.is_file():  # ResEnc's 3d_fullres reuses nnUNetPlans' data_identifier (nnUNetPlans_3d_fullres)
        ident = json.loads(plans_file.read_text())["configurations"][config]["data_identifier"]
        if (plans_file.parent / ident).is_dir():
            return None
    cmd = [str(python.parent / "nnUNetv2_plan_and_preprocess"), "-d", str(did), "-c", config, "-pl", PLANNERS[plans]]
    cmd += ["-np", str(THREADS), "-npfp", str(THREADS)]
    say("$ " + " ".join(cmd))
    r = run_measured(cmd, env=nnunet_env(work), interval=INTERVAL)
    if r["returncode"] != 0:
        raise RuntimeError(f"plan_and_preprocess failed (exit {r['returncode']}):\n{r['output_tail']}")
    say(f"  plan_and_preprocess {name} {plans}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    return {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}


def train(python: Path, work: Path, spec: tuple[str, str, str], *, iterations: int, max_batch: int) -> dict[str, Any]:
    """Fold 0 of the real nnUNetTrainer, one epoch of ``iterations`` iterations of at most ``max_batch``, CPU."""
    driver = work / "train_nnunet_driver.py"
    driver.write_text(TRAIN_DRIVER)
    args = [DATASETS[spec[0]][1], *spec[1:], str(iterations), str(VAL_ITERATIONS), str(THREADS), str(max_batch)]
    cmd = [*cpu_pin(), str(python), str(driver), *args]
    say("$ " + " ".join(cmd))
    r = run_measured(cmd, env=nnunet_env(work), interval=INTERVAL)
    if r["returncode"] != 0:
        raise RuntimeError(f"training failed (exit {r['returncode']}):\n{r['output_tail']}")
    line = next(ln for ln in r["output_tail"].splitlines() if ln.startswith("RESULT "))
    out = {**json.loads(line[len("RESULT ") :]), "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}
    say(
        f"  trained {'/'.join(spec)}: {out['train_s']} s training ({out['wall_s']:.0f} s wall, peak RSS "
        f"{out['peak_rss_mb']:.0f} MB), patch {out['patch_size']} batch {out['batch_size']}, "
        f"EMA pseudo-Dice {out['ema_fg_dice']:.3f}"
    )
    return out


def predict(side: str, python: Path, work: Path, spec: tuple[str, str, str], *, tta: bool, extra: list[str]) -> dict:
    """One timed prediction of imagesTs by ``side`` ("nnunet" or "segpipe") into a fresh folder."""
    dataset, plans, config = spec
    did, name = DATASETS[dataset]
    images = work / "raw" / name / "imagesTs"
    out = work / "pred" / f"{name}__{plans}__{config}__tta{int(tta)}" / side
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if side == "nnunet":
        cmd = [str(python.parent / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", str(did)]
        cmd += ["-c", config, "-p", plans, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"]
        cmd += ["--disable_progress_bar"] + ([] if tta else ["--disable_tta"])
        env, cwd = nnunet_env(work), None
    else:
        cmd = [
            sys.executable,
            "-m",
            "segpipe",
            "infer",
            str(images),
            "-m",
            str(model_folder(work, spec)),
            "-o",
            str(out),
        ]
        cmd += ["folds=0", f"tta={str(tta).lower()}", *extra, "-q"]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "SEGPIPE_WORK": str(work / "segpipe_work")}
        env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
        cwd = work
    say("$ " + " ".join(cmd))
    r = run_measured([*cpu_pin(), *cmd], env=env, cwd=cwd, interval=INTERVAL)
    say(f"  {side}: exit {r['returncode']}, {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    return {**r, "out": str(out), "command": cmd}


def fg_dice(pred: np.ndarray, ref: np.ndarray, n_labels: int) -> float:
    """Mean over labels 1..n_labels-1 of Dice (1.0 where both are empty)."""
    scores = []
    for k in range(1, n_labels):
        p, r = pred == k, ref == k
        denom = int(p.sum()) + int(r.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return float(np.mean(scores))


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    pairs = ((a.GetSpacing(), b.GetSpacing()), (a.GetOrigin(), b.GetOrigin()), (a.GetDirection(), b.GetDirection()))
    return a.GetSize() == b.GetSize() and all(np.allclose(x, y, rtol=0, atol=1e-5) for x, y in pairs)


def compare(raw: Path, outs: dict[str, Path | None], n_labels: int) -> list[dict[str, Any]]:
    """Per test case: each available side's Dice and geometry check, and their voxel agreement."""
    rows = []
    for img_path in sorted((raw / "imagesTs").glob("*_0000.nii.gz")):
        case = img_path.name[: -len("_0000.nii.gz")]
        image = sitk.ReadImage(str(img_path))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / f"{case}.nii.gz"))).astype(np.int64)
        row: dict[str, Any] = {"case": case}
        arrays = {}
        for side, folder in outs.items():
            path = None if folder is None else folder / f"{case}.nii.gz"
            if path is None or not path.is_file():
                row[f"{side}_missing"] = True
                continue
            pred = sitk.ReadImage(str(path))
            row[f"{side}_geometry_ok"] = same_geometry(pred, image)
            arrays[side] = sitk.GetArrayFromImage(pred).astype(np.int64)
            row[f"{side}_fg_voxels"] = int(np.count_nonzero(arrays[side]))
            row[f"dice_{side}"] = fg_dice(arrays[side], ref, n_labels) if arrays[side].shape == ref.shape else None
        if len(arrays) == 2 and arrays["nnunet"].shape == arrays["segpipe"].shape:
            row["agreement_pct"] = 100.0 * float(np.mean(arrays["nnunet"] == arrays["segpipe"]))
            if row["dice_nnunet"] is not None and row["dice_segpipe"] is not None:
                row["abs_ddice"] = abs(row["dice_nnunet"] - row["dice_segpipe"])
        rows.append(row)
    return rows


def summarize(cases: list[dict[str, Any]], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def vals(key: str) -> list[float]:
        return [c[key] for c in cases if c.get(key) is not None]

    s: dict[str, Any] = {"cases": len(cases)}
    for side, r in runs.items():
        s[side] = {k: r[k] for k in ("wall_s", "peak_rss_mb", "returncode")}
        s[side]["geometry_ok"] = sum(bool(c.get(f"{side}_geometry_ok")) for c in cases)
        s[side]["missing"] = sum(bool(c.get(f"{side}_missing")) for c in cases)
        s[side]["cases_with_foreground"] = sum(bool(c.get(f"{side}_fg_voxels")) for c in cases)
        s[side]["dice_mean"] = float(np.mean(vals(f"dice_{side}"))) if vals(f"dice_{side}") else None
    agree, dd = vals("agreement_pct"), vals("abs_ddice")
    s["agreement_min"] = min(agree) if agree else None
    s["agreement_mean"] = float(np.mean(agree)) if agree else None
    s["max_abs_ddice"] = max(dd) if dd else None
    complete = len(agree) == len(dd) == s["segpipe"]["geometry_ok"] == len(cases) > 0
    s["passed"] = bool(complete and min(agree) >= AGREE_TARGET and max(dd) <= DDICE_TARGET)
    return s


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def print_table(results: list[dict[str, Any]]) -> None:
    say(
        f"\n| dataset | plans | config | TTA | cases | agreement min / mean % (target ≥ {AGREE_TARGET}) "
        f"| Dice nnU-Net | Dice segpipe | max abs ΔDice (target ≤ {DDICE_TARGET}) | nnUNetv2_predict s / MB "
        "| segpipe infer s / MB | geometry ok nnU-Net / segpipe | verdict |"
    )
    say("|" + "---|" * 13)
    for res in results:
        s = res["summary"]
        nn, sp = s["nnunet"], s["segpipe"]

        def timing(side: dict[str, Any]) -> str:
            ok = side["returncode"] == 0
            return f"{side['wall_s']:.1f} / {side['peak_rss_mb']:.0f}" if ok else f"FAILED (exit {side['returncode']})"

        verdict = "pass" if s["passed"] else "FAIL"
        if s["passed"] and nn["cases_with_foreground"] < s["cases"]:  # agreement on empty maps proves little
            verdict += f" (nnU-Net found foreground in {nn['cases_with_foreground']}/{s['cases']} cases only)"
        say(
            f"| {res['dataset']} | {res['plans']} | {res['config']} | {'on' if res['tta'] else 'off'} | {s['cases']} "
            f"| {_f(s['agreement_min'], '.3f')} / {_f(s['agreement_mean'], '.3f')} | {_f(nn['dice_mean'], '.4f')} "
            f"| {_f(sp['dice_mean'], '.4f')} | {_f(s['max_abs_ddice'], '.4f')} | {timing(nn)} | {timing(sp)} "
            f"| {nn['geometry_ok']} / {sp['geometry_ok']} | {verdict} |"
        )
    for res in results:
        for side in ("nnunet", "segpipe"):
            if res["summary"][side]["returncode"] != 0:
                say(
                    f"\n{side} failed on {res['dataset']} {res['plans']} tta={res['tta']}; output tail:\n"
                    + res["tails"][side]
                )


def model_folder(work: Path, spec: tuple[str, str, str]) -> Path:
    dataset, plans, config = spec
    return work / "results" / DATASETS[dataset][1] / f"nnUNetTrainer__{plans}__{config}"


def bench_model(python: Path, work: Path, spec: tuple[str, str, str], *, order: int, extra: list[str]) -> list[dict]:
    """Both sides, TTA on then off, interleaved (the side that goes first alternates)."""
    raw = work / "raw" / DATASETS[spec[0]][1]
    n_labels = len(json.loads((raw / "dataset.json").read_text())["labels"])
    results = []
    for i, tta in enumerate((True, False)):
        sides = ("nnunet", "segpipe") if (order + i) % 2 == 0 else ("segpipe", "nnunet")
        runs = {side: predict(side, python, work, spec, tta=tta, extra=extra) for side in sides}
        outs = {s: (Path(r["out"]) if r["returncode"] == 0 else None) for s, r in runs.items()}
        cases = compare(raw, {"nnunet": outs["nnunet"], "segpipe": outs["segpipe"]}, n_labels)
        res = dict(zip(("dataset", "plans", "config"), spec), tta=tta, model_folder=str(model_folder(work, spec)))
        res.update(summary=summarize(cases, runs), per_case=cases, commands={s: r["command"] for s, r in runs.items()})
        results.append({**res, "tails": {s: r["output_tail"] for s, r in runs.items()}})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnunet-python", type=Path, default=None, help="a Python with nnunetv2 installed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nnbench"), help="scratch: raw, preprocessed, results")
    ap.add_argument("--iterations", type=int, default=250, help="training iterations (one epoch) per model")
    ap.add_argument("--max-batch", type=int, default=2, help="cap the plans' batch size for training (0: keep)")
    ap.add_argument("--datasets", default="hippocampus,ct", help="comma-separated: hippocampus, ct")
    ap.add_argument("--plans", default="nnUNetPlans,nnUNetResEncUNetMPlans", help="comma-separated plans identifiers")
    ap.add_argument("--configs", default="3d_fullres", help="comma-separated configurations")
    ap.add_argument("--skip-train", action="store_true", help="reuse existing checkpoints (train only missing ones)")
    ap.add_argument("--train-only", action="store_true", help="plan and train the models, predict nothing")
    ap.add_argument("--segpipe-set", action="append", default=[], metavar="KEY=VALUE", help="extra segpipe setting")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = ap.parse_args(argv)
    why = nnunet_missing(args.nnunet_python)
    if why:
        say(f"skipped: {why}")
        return 0
    python, work = args.nnunet_python.absolute(), args.work.absolute()
    report: dict[str, Any] = {"work": str(work), "iterations": args.iterations, "max_batch": args.max_batch}
    report.update(preprocess={}, training={}, results=[])
    plans_list, datasets, configs = (getattr(args, k).split(",") for k in ("plans", "datasets", "configs"))
    if not set(plans_list) <= set(PLANNERS) or not set(datasets) <= set(DATASETS):
        raise SystemExit(f"plans must be among {sorted(PLANNERS)}, datasets among {sorted(DATASETS)}")
    work.mkdir(parents=True, exist_ok=True)
    for n, spec in enumerate((d, p, c) for p in plans_list for d in datasets for c in configs):
        key = "/".join(spec)
        if spec[0] == "hippocampus" and not (HIPPO / "labelsTr").is_dir():
            say(f"skipped {key}: no hippocampus data at {HIPPO} (see ../shared/data/README.md)")
            continue
        try:
            report["preprocess"][key] = prepare(python, work, spec)
            if not (args.skip_train and (model_folder(work, spec) / "fold_0" / "checkpoint_final.pth").is_file()):
                report["training"][key] = train(
                    python, work, spec, iterations=args.iterations, max_batch=args.max_batch
                )
        except RuntimeError as exc:  # nnU-Net's planning or training failed: no model to compare on
            say(f"skipped {key}: {exc}")
            report.setdefault("errors", {})[key] = str(exc)
            continue
        if args.train_only:
            continue
        report["results"] += bench_model(python, work, spec, order=n, extra=args.segpipe_set)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    if args.json and args.train_only:
        args.json.write_text(json.dumps(report, indent=1))
    print_table(report["results"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
