"""Run by tests/test_infer_ddp.py: ``segpipe infer ... trainer=ddp devices=2`` (gloo, CPU) on the CLI.

Lightning starts the second process by running this script again (LOCAL_RANK=1 in its
environment). Each process records the files segpipe wrote from it, what the CLI printed and its
exit code in ``RECORD/rank<r>.json``, and exits with that code.
Usage: ``python infer_ddp_probe.py RECORD infer INPUT ...`` (the CLI's arguments after RECORD).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

from segpipe import cli
from segpipe.inference import batch


def main() -> int:
    record, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    written: list[str] = []
    for name in ("write_image", "write_json"):
        original = getattr(batch, name)

        def recording(path, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            written.append(Path(path).name)
            return _original(path, *args, **kwargs)

        setattr(batch, name, recording)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(argv)
    text = json.dumps({"rank": rank, "code": code, "written": written, "stdout": printed.getvalue()})
    (record / f"rank{rank}.json.tmp").write_text(text)
    (record / f"rank{rank}.json.tmp").rename(record / f"rank{rank}.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
