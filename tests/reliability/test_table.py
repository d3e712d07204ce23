"""The README's reliability table is the one generated from this suite's own list."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "reliability_table.py"


def test_readme_lists_every_reliability_case() -> None:
    spec = importlib.util.spec_from_file_location("reliability_table", TOOL)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    generated = tool.table()
    assert "`geometry_mismatch`" in generated and "`intensities_near_1e33_normalise_to_unit_variance`" in generated
    assert tool.readme_table(tool.README.read_text(encoding="utf-8")) == generated, (
        "the README's reliability table is out of date: run python tools/reliability_table.py --write"
    )
