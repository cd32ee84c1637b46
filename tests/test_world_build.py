"""Building the world: caching, atomicity, bad input, vanilla diffusers loading, quick thresholds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import micro_config
from typer.testing import CliRunner

from conceptlock.cli import app
from conceptlock.pipelines import ConceptlockError
from conceptlock.world import build as build_mod
from conceptlock.world.build import build_world, read_world, world_is_valid


def test_second_build_is_a_noop(micro_world):
    stamp = (micro_world / "world.json").stat().st_mtime_ns
    logs = []
    assert build_world(micro_config(), micro_world, log=logs.append) == micro_world
    assert (micro_world / "world.json").stat().st_mtime_ns == stamp
    assert "up to date" in logs[0]


def test_world_folder_has_every_artefact(micro_world):
    meta = read_world(micro_world)
    assert meta["config_hash"] == micro_config().config_hash()
    for rel in [
        "pipeline/model_index.json",
        "clip/config.json",
        "judges/detector.safetensors",
        "judges/attributes.json",
        "prompts/clean.csv",
        "prompts/implicit-gore.csv",
        "data/domain-mosaic/metadata.jsonl",
        "data/malicious-gore/metadata.jsonl",
        "data/lcfd-gore/metadata.jsonl",
    ]:
        assert (micro_world / rel).is_file(), rel
    rows = [json.loads(line) for line in (micro_world / "data/lcfd-gore/metadata.jsonl").read_text().splitlines()]
    assert {r["class"] for r in rows} == {1, 2}
    assert all((micro_world / "data/lcfd-gore" / r["file_name"]).is_file() for r in rows)
    assert not list(micro_world.rglob("*.bin")) and not list(micro_world.rglob("*.pt"))  # safetensors only


def test_corrupt_or_changed_cache_is_detected_and_rebuilt(micro_world, tmp_path):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(micro_world, copy)
    assert world_is_valid(copy, micro_config())
    assert not world_is_valid(copy, micro_config(seed=5))  # another config: not reused
    meta = json.loads((copy / "world.json").read_text())
    meta["config_hash"] = "0" * 16
    (copy / "world.json").write_text(json.dumps(meta))
    assert not world_is_valid(copy, micro_config())
    (copy / "world.json").write_text("{not json")
    assert not world_is_valid(copy, micro_config())
    build_world(micro_config(), copy, log=lambda *a: None)
    assert world_is_valid(copy, micro_config())
    (copy / "judges" / "detector.safetensors").unlink()  # a missing weight file also invalidates
    assert not world_is_valid(copy, micro_config())


def test_interrupted_build_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "report_card", boom)
    out = tmp_path / "world"
    with pytest.raises(KeyboardInterrupt):
        build_world(micro_config(), out, log=lambda *a: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is cleaned up too


def test_refuses_to_overwrite_a_folder_that_is_not_a_world(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConceptlockError, match="refusing to overwrite"):
        build_world(micro_config(), out, log=lambda *a: None)
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_is_a_one_line_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ConceptlockError, match="--out"):
        build_world(micro_config(), ro / "w", log=lambda *a: None)


def test_out_under_a_file_is_a_one_line_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConceptlockError, match="--out"):
        build_world(micro_config(), f / "w", log=lambda *a: None)


def test_cli_bad_input_names_the_field():
    r = CliRunner().invoke(app, ["world", "build", "--concepts", "nudityx", "--profile", "quick"])
    assert r.exit_code == 2 and "--concepts" in r.output and "nudityx" in r.output
    r = CliRunner().invoke(app, ["world", "build", "--profile", "medium"])
    assert r.exit_code == 2 and "--profile" in r.output


def test_cli_info_prints_the_card(micro_world):
    r = CliRunner().invoke(app, ["world", "info", str(micro_world)])
    assert r.exit_code == 0, r.output
    assert "detector AUROC" in r.output and "clean prompt fidelity" in r.output


def test_vanilla_diffusers_loads_and_samples_without_conceptlock(micro_world):
    code = (
        "import sys, numpy as np\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"p = StableDiffusionPipeline.from_pretrained({str(micro_world / 'pipeline')!r})\n"
        "im = p('a red circle', num_inference_steps=2, output_type='np').images\n"
        "assert im.shape == (1, 32, 32, 3) and np.isfinite(im).all()\n"
        "assert 'conceptlock' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path("/"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.slow
def test_quick_world_meets_quick_thresholds(quick_world):
    from conceptlock.world.card import evaluate_card

    meta = read_world(quick_world)
    rows = evaluate_card(meta["card"], "gore", "quick")
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    # every rate carries its sample size and a 95% interval around it
    for r in rows:
        if r["n"]:
            assert r["n"] >= 64 and r["ci95"][0] <= r["measured"] <= r["ci95"][1]
