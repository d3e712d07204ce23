"""Run by tests/test_training.py: trains the tiny demo plan with trainer=ddp devices=2 (gloo, CPU).

Lightning starts the second process by running this script again (LOCAL_RANK=1 in its
environment). Each process records the batches it trained on, the files segpipe wrote from it and
a digest of its final weights in ``OUT/rank<r>.json``. Usage: ``python ddp_probe.py WORK OUT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from segpipe.planning import PlanConfig, load_plan
from segpipe.training import callbacks, fit
from segpipe.training.module import SegmentationModule

TINY = {
    "patch_size": [8, 16, 16],
    "batch_size": 2,
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "features": [4, 8, 16],
    "n_conv_encoder": [2, 2, 2],
    "n_conv_decoder": [2, 2],
}


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.set_num_threads(1)
    plan = load_plan(work / "demo" / "plans.json")
    plan.configurations["3d_fullres"] = PlanConfig.from_dict({**plan.configurations["3d_fullres"].to_dict(), **TINY})
    batches: list[str] = []
    written: list[str] = []
    digest: dict[str, str] = {}

    step = SegmentationModule.training_step

    def recording_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        batches.append(hashlib.sha1(batch["image"].numpy().tobytes()).hexdigest())
        return step(self, batch, batch_idx)

    SegmentationModule.training_step = recording_step  # type: ignore[method-assign]
    for module, name in ((callbacks, "save_checkpoint"), (fit, "write_json"), (callbacks, "write_text")):
        original = getattr(module, name)

        def recording(path, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            written.append(Path(path).name)
            return _original(path, *args, **kwargs)

        setattr(module, name, recording)
    end = callbacks.RunCheckpoint.on_train_end

    def weights_at_end(self, trainer, module):  # type: ignore[no-untyped-def]
        state = module.network.state_dict()
        digest["weights"] = hashlib.sha1(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
        digest["global_rank"] = str(trainer.global_rank)
        return end(self, trainer, module)

    callbacks.RunCheckpoint.on_train_end = weights_at_end  # type: ignore[method-assign]
    settings = {
        "epochs": 2,
        "iterations_per_epoch": 3,
        "val_batches": 2,
        "num_workers": 0,
        "trainer": {"name": "ddp", "devices": 2, "num_nodes": 1},
        "device": "cpu",
        "progress": False,
        "tensorboard": False,
    }
    result = fit.fit(plan, "3d_fullres", 4, work_dir=work, settings=settings, overwrite=True)
    record = {"rank": rank, "batches": batches, "written": written, **digest, "result": result}
    (out / f"rank{rank}.json").write_text(json.dumps(record, default=str))


if __name__ == "__main__":
    main()
