"""Shipping a world's weights in the package and unpacking them into a ready world folder."""

from __future__ import annotations

import pytest
from conftest import micro_config
from safetensors import safe_open

from conceptlock.errors import ConceptlockError
from conceptlock.world import shipped
from conceptlock.world.build import build_world, read_world, world_is_valid


def _dtypes(path):
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_ship_then_unpack_gives_a_valid_world_of_the_same_config(micro_world, tmp_path, monkeypatch):
    packed = shipped.ship_world(micro_world, tmp_path / "shipped")
    unet = packed / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    assert _dtypes(unet) == {"F16"}  # stored small
    assert not (packed / "data").exists()  # data sets are re-rendered, not shipped
    meta = read_world(packed)
    assert meta["config_hash"] == micro_config().config_hash() and "card_before_fp16" in meta

    monkeypatch.setattr(shipped, "shipped_dir", lambda: packed)
    out = shipped.materialise(tmp_path / "world", log=lambda *a: None)
    assert world_is_valid(out, micro_config())
    assert _dtypes(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors") == {"F32"}
    assert (out / "data" / "malicious-gore" / "metadata.jsonl").is_file()
    assert read_world(out)["source"] == "shipped"
    # the same config hash: building that config into the folder is a no-op
    logs = []
    build_world(micro_config(), out, log=logs.append)
    assert "up to date" in logs[0]
    with pytest.raises(ConceptlockError, match="refusing to overwrite"):
        shipped.materialise(out, log=lambda *a: None)


def test_no_shipped_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "shipped_dir", lambda: tmp_path / "none")
    with pytest.raises(ConceptlockError, match="world build"):
        shipped.materialise(tmp_path / "w", log=lambda *a: None)


def test_reshipping_swaps_the_folder_in_whole_and_a_failure_keeps_the_old_one(micro_world, tmp_path, monkeypatch):
    import conceptlock.world.build as build

    dest = tmp_path / "pkg" / "shipped"
    monkeypatch.setattr(build, "report_card", lambda world, cfg: {"run": 1})
    shipped.ship_world(micro_world, dest)
    (dest / "stale.txt").write_text("from an older packing")
    monkeypatch.setattr(build, "report_card", lambda world, cfg: {"run": 2})
    shipped.ship_world(micro_world, dest)
    assert read_world(dest)["card"] == {"run": 2} and not (dest / "stale.txt").exists()

    def broken(world, cfg):
        raise RuntimeError("judging failed")

    monkeypatch.setattr(build, "report_card", broken)
    with pytest.raises(RuntimeError, match="judging failed"):
        shipped.ship_world(micro_world, dest)
    assert read_world(dest)["card"] == {"run": 2}  # the last good packing, untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["shipped"]  # no temp folders left
