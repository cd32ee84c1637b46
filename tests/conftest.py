"""Shared fixtures: a micro world (seconds, for mechanics) and the quick world (built once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MICRO_BUDGET = dict(
    n_train=300, vae_steps=3, clip_steps=3, judge_steps=3, unet_steps=3, unet_batch=8, eval_per_set=8, eval_steps=2
)


def micro_config(**kw):
    from conceptlock.world.data import Budget, WorldConfig

    return WorldConfig(profile="quick", budget=Budget(**MICRO_BUDGET), **kw)


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> Path:
    """A world with every file of a real one but almost no training: for plumbing tests."""
    from conceptlock.world.build import build_world

    return build_world(micro_config(), tmp_path_factory.mktemp("micro") / "world", log=lambda *a: None)


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory) -> Path:
    """The quick-profile world, built once per test run (about 2 minutes on 2 cores).

    Set CONCEPTLOCK_TEST_WORLD to reuse a folder across runs; it is rebuilt if its config differs.
    """
    from conceptlock.world.build import build_world
    from conceptlock.world.data import WorldConfig

    out = os.environ.get("CONCEPTLOCK_TEST_WORLD")
    folder = Path(out) if out else tmp_path_factory.mktemp("quick") / "world"
    return build_world(WorldConfig(profile="quick"), folder, log=lambda *a: None)


def write_image_folder(root: Path, n: int = 4, res: int = 32, text: str = "a picture {i}") -> Path:
    """A diffusers-style image folder of random RGB images with metadata.jsonl rows {file_name, text}."""
    import json

    import numpy as np
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text.format(i=i)}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root
