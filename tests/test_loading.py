"""Model loading: hub ids offline, single-file checkpoints, local folders (issue #8)."""

from __future__ import annotations

import pytest

from conceptlock.errors import ConceptlockError
from conceptlock.pipelines import load_pipeline, save_pipeline, tiny_pipeline


def test_hub_id_offline_without_cache_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConceptlockError) as e:
        load_pipeline("conceptlock-tests/no-such-model", local_files_only=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "conceptlock-tests/no-such-model" in msg and "cache" in msg and "local diffusers pipeline folder" in msg
    assert "no such local folder" in msg  # a mistyped relative path reads as a hub id: say both


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin"])
def test_pickled_single_file_is_refused_before_reading(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"not even a pickle")
    with pytest.raises(ConceptlockError, match=r"must be \.safetensors"):
        load_pipeline(f)


def test_single_file_that_is_not_an_sd_checkpoint_fails_in_one_line(tmp_path):
    import torch
    from safetensors.torch import save_file

    f = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(f))
    with pytest.raises(ConceptlockError) as e:
        load_pipeline(f, local_files_only=True)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_local_folder_round_trip_and_missing_component(tmp_path):
    pipe = tiny_pipeline(seed=3)
    out = save_pipeline(pipe, tmp_path / "m")
    again = load_pipeline(out)
    w0 = next(pipe.unet.parameters())
    assert (next(again.unet.parameters()) == w0).all()
    import shutil

    shutil.rmtree(out / "vae")
    with pytest.raises(ConceptlockError, match="'vae' is missing"):
        load_pipeline(out)


def test_relative_path_that_does_not_exist_is_a_folder_error_not_a_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConceptlockError, match="does not exist"):
        load_pipeline("./nothing/here")


def test_pipeline_class_is_read_from_the_source(tmp_path):
    """An SDXL folder loads as StableDiffusionXLPipeline, an SD one as StableDiffusionPipeline; a single file is
    SDXL when it holds SDXL's second text embedder (original checkpoint key layout)."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from conceptlock.pipelines import _single_file_class, pipeline_class

    xl = save_pipeline(tiny_pipeline(seed=0, arch="sdxl"), tmp_path / "xl")
    sd = save_pipeline(tiny_pipeline(seed=0), tmp_path / "sd")
    assert pipeline_class(xl) is StableDiffusionXLPipeline and pipeline_class(sd) is StableDiffusionPipeline
    assert isinstance(load_pipeline(xl), StableDiffusionXLPipeline)
    t = torch.zeros(1)
    save_file({"conditioner.embedders.1.model.ln_final.weight": t}, str(tmp_path / "xl.safetensors"))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": t}, str(tmp_path / "sd.safetensors"))
    assert _single_file_class(tmp_path / "xl.safetensors", None) is StableDiffusionXLPipeline
    assert _single_file_class(tmp_path / "sd.safetensors", None) is StableDiffusionPipeline
    assert _single_file_class(tmp_path / "sd.safetensors", xl) is StableDiffusionXLPipeline  # --config decides
