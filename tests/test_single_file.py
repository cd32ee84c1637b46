"""Single-file checkpoints: a pipeline exported in the original SD layout loads back through the single-file path
(diffusers' from_single_file) with identical weights, scheduler and images; the CLI writes and reads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conceptlock.cli import app
from conceptlock.errors import ConceptlockError
from conceptlock.pipelines import MODEL_CONFIG_ENV, load_pipeline, save_pipeline, tiny_pipeline
from conceptlock.single_file import export_single_file, ldm_state_dict

torch.set_num_threads(1)


def _image(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a red cat", num_inference_steps=2, guidance_scale=5.0, generator=g, output_type="np").images[0]


@pytest.mark.parametrize("arch,prediction_type", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_export_then_single_file_load_is_exact(tmp_path, arch, prediction_type):
    pipe = tiny_pipeline(0, arch=arch, prediction_type=prediction_type)
    folder = save_pipeline(pipe, tmp_path / "folder")
    sd = ldm_state_dict(pipe)
    # the original layout's three prefixes, and nothing left in diffusers' naming
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert not any(".down_blocks." in k or ".resnets." in k for k in sd if k.startswith("model.diffusion_model."))
    f = export_single_file(pipe, tmp_path / "model.safetensors")
    back = load_pipeline(f, config=folder)
    for comp in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, comp).state_dict(), getattr(back, comp).state_dict()
        assert set(a) == set(b), comp
        assert all(torch.equal(a[k], b[k]) for k in a), comp
    assert back.scheduler.config.prediction_type == prediction_type
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_image(pipe), _image(back))


def test_export_refuses_overwrite_wrong_suffix_and_sdxl(tmp_path):
    pipe = tiny_pipeline(0)
    f = export_single_file(pipe, tmp_path / "m.safetensors")
    with pytest.raises(ConceptlockError, match="already exists"):
        export_single_file(pipe, f)
    assert export_single_file(pipe, f, overwrite=True) == f
    with pytest.raises(ConceptlockError, match=r"must end in \.safetensors"):
        export_single_file(pipe, tmp_path / "m.ckpt")
    with pytest.raises(ConceptlockError, match="SDXL is not supported"):
        export_single_file(tiny_pipeline(0, arch="sdxl"), tmp_path / "xl.safetensors")
    assert not (tmp_path / "xl.safetensors").exists() and not list(tmp_path.glob(".*tmp*"))


def test_cli_export_and_model_config_for_a_single_file(tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_CONFIG_ENV, "")  # restored after the test; the CLI option sets it
    folder = save_pipeline(tiny_pipeline(0), tmp_path / "base")
    runner = CliRunner()
    help_ = runner.invoke(app, ["export", "--help"], terminal_width=200)
    assert help_.exit_code == 0 and "conceptlock export --model" in help_.output
    out = tmp_path / "release" / "model.safetensors"
    res = runner.invoke(app, ["export", "--model", str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file()
    again = runner.invoke(app, ["export", "--model", str(folder), "--out", str(out)])
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    # a command reading --model FILE with the global --model-config (offline: configs from the folder)
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed,evaluation_guidance,categories\na red cat,3,5.0,clean\n")
    args = ["--model-config", str(folder), "evaluate", "--model", str(out), "--prompts", str(prompts)]
    args += ["--metrics", "nudenet", "--out", str(tmp_path / "ev"), "--steps", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "ev" / "images").glob("*.png"))) == 1
