"""Reliability: memory under load, measured the way the benchmarks measure it, at a size the suite affords.

`tools/bench_infer.py --soak` (200 real images) and `tools/bench_preprocess_memory.py` (volumes of
~60×300×300 voxels) give the figures the README quotes; these tests run the same measurements
small (the benchmarks' own snippet and RSS sampler) so that every CI run checks the behaviour.
Memory, unlike time, does not depend on the machine's speed: the bounds hold on any machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from segpipe.demo_data import generate_demo_dataset

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def _tool(name: str) -> ModuleType:
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_rss_stays_flat_over_a_long_infer_batch(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    """One `infer` batch of 60 cases: after 10 cases of warm-up the process's RSS grows by less than 50 MB."""
    bench = _tool("bench_infer")
    model, good = tiny_model
    sources = sorted(good.parents[1].glob("images*/*.nii.gz"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(60):
        os.symlink(sources[i % len(sources)], images / f"case{i:03d}.nii.gz")
    cmd = [sys.executable, "-c", bench.SEGPIPE_SOAK_SNIPPET, str(model), str(images), str(tmp_path / "out"), "1"]
    run = bench.run_measured(cmd, env=_env(), cwd=REPO)
    assert run["returncode"] == 0, run["output_tail"]
    line = next(x for x in run["output_tail"].splitlines() if x.startswith("RESULT "))
    rss = [float(r) for r in json.loads(line[len("RESULT ") :])["rss_after_case"]]
    assert len(rss) == 60
    growth = max(rss[9:]) - rss[9]
    assert growth < bench.SOAK_BOUND_MB, f"RSS grew by {growth:.1f} MB after warm-up: {rss}"


@pytest.mark.slow
def test_preprocess_peak_rss_does_not_grow_with_the_number_of_cases(tmp_path: Path) -> None:
    """`preprocess` of 16 cases peaks within 40 MB of 4 cases (one worker): the cache is written case by case."""
    bench = _tool("bench_plan")
    peaks = {}
    for n in (4, 16):
        data = generate_demo_dataset(tmp_path / f"Demo{n}", num_cases=n, num_test=0)
        work = tmp_path / f"work{n}"
        plan = [sys.executable, "-m", "segpipe", "plan", str(data), f"work_dir={work}", "configurations=[3d_fullres]"]
        assert bench.run_measured([*plan, "num_workers=1"], env=_env(), cwd=REPO)["returncode"] == 0
        cmd = [sys.executable, "-m", "segpipe", "preprocess", f"work_dir={work}", "num_workers=1"]
        run = bench.run_measured(cmd, env=_env(), cwd=REPO)
        assert run["returncode"] == 0, run["output_tail"]
        peaks[n] = run["peak_rss_mb"]
    assert peaks[16] - peaks[4] < 40.0, peaks
