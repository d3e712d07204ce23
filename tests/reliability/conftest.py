"""Shared fixtures of the reliability suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import segpipe
from segpipe.demo_data import generate_demo_dataset


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model folder with a small random-weight 3d_fullres network of the demo plan, and a good test image.

    Random weights are enough where the question is what happens around the network (files,
    failures, faults), and they cost no training.
    """
    from segpipe.inference.model import Member, Model, export_model
    from segpipe.networks import build_network
    from segpipe.planning import load_plan
    from segpipe.training.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("tiny_model")
    data = generate_demo_dataset(tmp / "Demo", num_cases=3, num_test=1)
    planned = segpipe.plan(
        data, work_dir=tmp / "work", configurations=["3d_fullres"], base_features=4, max_features_3d=16
    )
    plan = load_plan(planned["plans_path"])
    torch.manual_seed(0)
    net = build_network(plan.config("3d_fullres"), plan.in_channels, plan.num_classes, deep_supervision=True)
    weights = tmp / "fold_0.pt"
    save_checkpoint(weights, {"model": net.state_dict()})
    model = export_model(Model(plan, [Member("3d_fullres", "0", weights)]), tmp / "model")
    return model, next((data / "imagesTs").glob("*.nii.gz"))
