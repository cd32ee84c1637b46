"""The full world's weights, shipped inside the package, so `pip install` gives a ready default.

`conceptlock world build --profile full` stays the seeded way to rebuild them; `ship_world` packs a
built world into `conceptlock/world/shipped/` (weights stored as float16 safetensors to fit the
package, judged again after that round trip so the shipped report card describes the shipped
weights), and `materialise` unpacks it into a world folder (float32 again, data sets and prompt
sets re-rendered from the recorded config, which is deterministic). The shipped `world.json`
records the build's config hash, so a shipped world and a fresh build of the same config are the
same cache entry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConceptlockError

WEIGHT_DIRS = ("pipeline", "clip", "judges")


def shipped_dir() -> Path:
    return Path(str(resources.files("conceptlock.world").joinpath("shipped")))


def shipped_meta() -> dict | None:
    p = shipped_dir() / "world.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _convert_tree(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Copy a folder, rewriting every floating safetensors tensor to `dtype`."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors":
            sd = load_file(str(f))
            sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
            save_file(sd, str(dst / rel), metadata={"format": "pt"})
        else:
            shutil.copy2(f, dst / rel)


def materialise(dest: str | Path, log=print) -> Path:
    """Unpack the shipped world into `dest` (atomically). Data sets are re-rendered from the config."""
    from .build import WORLD_FORMAT, write_data_sets
    from .data import WorldConfig, prompt_set, prompt_set_names, rows_to_csv

    meta = shipped_meta()
    if meta is None:
        raise ConceptlockError("this installation ships no world weights; run `conceptlock world build`")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ConceptlockError(f"{dest}: already exists; refusing to overwrite it (choose another --out or remove it)")
    cfg = WorldConfig(**meta["config"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    try:
        log(f"unpacking the shipped world (config {meta['config_hash']}) into {dest}")
        for d in WEIGHT_DIRS:
            _convert_tree(shipped_dir() / d, tmp / d, torch.float32)
        (tmp / "prompts").mkdir()
        budget = cfg.resolved_budget()
        for name in prompt_set_names(cfg):
            (tmp / "prompts" / f"{name}.csv").write_text(rows_to_csv(prompt_set(cfg, name, budget.eval_per_set)))
        write_data_sets(tmp, cfg)
        assert meta["format"] == WORLD_FORMAT
        (tmp / "world.json").write_text(json.dumps({**meta, "source": "shipped"}, indent=1))
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ship_world(world: str | Path, dest: str | Path | None = None) -> Path:
    """Pack a built world for shipping: float16 weights, report card re-measured on them."""
    from .build import read_world, report_card
    from .data import WorldConfig

    world = Path(world)
    meta = read_world(world)
    cfg = WorldConfig(**meta["config"])
    dest = Path(dest) if dest else shipped_dir()
    # packed straight into a sibling temp folder, swapped in whole at the end: a packing that fails half-way
    # leaves the previous shipped world as it was, and nothing is copied twice
    dest.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory() as td:
            back = Path(td)
            for d in WEIGHT_DIRS:
                _convert_tree(world / d, new / d, torch.float16)
                _convert_tree(new / d, back / d, torch.float32)
            shutil.copytree(world / "prompts", back / "prompts")
            card = report_card(back, cfg)
        shipped = {**meta, "card": card, "card_before_fp16": meta["card"], "shipped_dtype": "float16"}
        (new / "world.json").write_text(json.dumps(shipped, indent=1))
        if dest.exists():
            dest.rename(old)
        new.rename(dest)
    finally:
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest
