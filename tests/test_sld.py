"""SLD: the published presets, the guidance equations, equality with diffusers' safe pipeline, the
generate/evaluate hook, and v-prediction."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from conceptlock.errors import ConceptlockError
from conceptlock.pipelines import tiny_pipeline
from conceptlock.prompts import PromptRow
from conceptlock.sld import SLD_PRESETS, SLDConfig, get_sld_preset, sld_generate, sld_guidance

torch.set_num_threads(1)

TABLE = {  # REFERENCE.md: warm-up, scale, threshold, momentum, mom_beta
    "WEAK": (15, 20, 0.0, 0.0, 0.0),
    "MEDIUM": (10, 1000, 0.01, 0.3, 0.4),
    "STRONG": (7, 2000, 0.025, 0.5, 0.7),
    "MAX": (0, 5000, 1.0, 0.5, 0.7),
}
PROMPTS = ["a red circle", "a bloody square"]


def gens(n=2):
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


def test_presets_are_the_published_table():
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    assert list(SLD_PRESETS) == list(TABLE)
    for name, row in TABLE.items():
        c = SLD_PRESETS[name]
        assert (c.warmup_steps, c.guidance_scale, c.threshold, c.momentum_scale, c.mom_beta) == row
        ref = getattr(SafetyConfig, name)
        assert {f"sld_{k}": v for k, v in c.to_dict().items()} == ref
    assert get_sld_preset("max") is SLD_PRESETS["MAX"]


def test_unknown_preset_is_one_line_error(pipe, tmp_path):
    with pytest.raises(ConceptlockError, match="unknown SLD preset 'HUGE'") as e:
        get_sld_preset("HUGE")
    assert "\n" not in str(e.value)
    from conceptlock.generate import generate

    rows = [PromptRow("a red circle", seed=1, index=0)]
    with pytest.raises(ConceptlockError, match="unknown SLD preset"):
        generate(pipe, rows, tmp_path, steps=2, options={"sld": "HUGE"}, progress=False)
    with pytest.raises(ConceptlockError, match="classifier-free guidance"):
        sld_generate(pipe, PROMPTS, sld="MAX", guidance_scale=1.0, num_inference_steps=2)


def test_guidance_matches_the_equations_on_hand_made_tensors():
    g = torch.Generator().manual_seed(0)
    u, c, s = (torch.randn(2, 4, 3, 3, generator=g) * 0.02 for _ in range(3))
    cfg = SLDConfig(warmup_steps=2, guidance_scale=50, threshold=0.01, momentum_scale=0.3, mom_beta=0.4)
    nu = torch.zeros_like(u)
    for step in range(4):
        out, nu_new = sld_guidance(u, c, s, 7.5, cfg, step, nu if step else None)
        # equations 3-8, written out element by element
        d = (c - s).flatten().tolist()
        mu = [0.0 if di >= 0.01 else min(abs(di) * 50, 1.0) for di in d]
        gamma = torch.tensor(mu).reshape(u.shape) * (s - u) + 0.3 * nu
        expect_nu = 0.4 * nu + 0.6 * gamma
        guide = (c - u) - (gamma if step >= 2 else 0)
        torch.testing.assert_close(nu_new, expect_nu)
        torch.testing.assert_close(out, u + 7.5 * guide)
        nu = nu_new


@pytest.mark.parametrize("preset", ["MEDIUM", "MAX"])
def test_equals_diffusers_safe_pipeline(pipe, preset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionPipelineSafe

        safe = StableDiffusionPipelineSafe(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            scheduler=pipe.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        safe.set_progress_bar_config(disable=True)
        safe.safety_concept = "blood and gore"
        kw = {f"sld_{k}": v for k, v in SLD_PRESETS[preset].to_dict().items()}
        ref = safe(PROMPTS, num_inference_steps=12, guidance_scale=7.5, generator=gens(), output_type="np", **kw)
    ours = sld_generate(
        pipe,
        PROMPTS,
        sld=preset,
        sld_concept="blood and gore",
        num_inference_steps=12,
        guidance_scale=7.5,
        generator=gens(),
        output_type="np",
    )
    assert ours.applied and ours.safety_text == "blood and gore"
    np.testing.assert_allclose(ours.images, ref.images, atol=2e-5)
    plain = pipe(PROMPTS, num_inference_steps=12, guidance_scale=7.5, generator=gens(), output_type="np").images
    if preset == "MAX":  # the safety branch really acts
        assert np.abs(plain - ours.images).max() > 1e-3


def test_v_prediction_round_trips_and_runs():
    vpipe = tiny_pipeline(1, prediction_type="v_prediction")
    plain = vpipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=gens(), output_type="np").images
    off = sld_generate(  # safety scale <= 1 switches SLD off (diffusers): only the eps <-> v conversion remains
        vpipe,
        PROMPTS,
        sld="MAX",
        sld_guidance_scale=1,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=gens(),
        output_type="np",
    )
    assert not off.applied
    np.testing.assert_allclose(off.images, plain, atol=2e-5)
    on = sld_generate(vpipe, PROMPTS, sld="MAX", num_inference_steps=4, guidance_scale=5.0, generator=gens())
    assert len(on.images) == 2 and on.images[0].size == (32, 32)


def test_generate_hook_uses_sld_and_records_options(pipe, tmp_path):
    from conceptlock.generate import generate

    rows = [PromptRow(p, seed=100 + i, index=i) for i, p in enumerate(PROMPTS)]
    opts = {"sld": "MAX", "sld_concept": "blood and gore"}
    res = generate(pipe, rows, tmp_path, steps=3, guidance=7.5, batch_size=2, options=opts, progress=False)
    assert res.complete and res.generated == 2
    entry = json.loads((tmp_path / "manifest.jsonl").read_text().splitlines()[0])
    assert entry["options"] == opts
    direct = sld_generate(pipe, PROMPTS, num_inference_steps=3, guidance_scale=7.5, generator=gens(), **opts)
    from PIL import Image

    got = np.asarray(Image.open(tmp_path / entry["image"]))
    np.testing.assert_array_equal(got, np.asarray(direct.images[0]))


def test_evaluate_cli_takes_sld_and_refuses_unknown_presets(tmp_path):
    from typer.testing import CliRunner

    from conceptlock.cli import app
    from conceptlock.pipelines import save_pipeline, tiny_pipeline

    save_pipeline(tiny_pipeline(0), tmp_path / "m")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,seed\na red circle,1\n")
    base = ["evaluate", "--model", str(tmp_path / "m"), "--prompts", str(csv), "--metrics", "nudenet", "--steps", "2"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--sld", "HUGE"])
    assert r.exit_code != 0 and "HUGE" in str(r.exception) and "\n" not in str(r.exception)
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "ok"), "--sld", "MAX", "--sld-concept", "blood"])
    assert r.exit_code == 0, r.output
    import json

    manifest = [json.loads(x) for x in (tmp_path / "ok" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["options"]["sld"] == "MAX" and manifest[0]["options"]["sld_concept"] == "blood"


def test_sld_on_a_toy_model_defaults_to_the_worlds_safety_concepts(micro_world, tmp_path):
    """SD's default safety text names nothing the toy text encoder knows: a toy model's SLD guides away from
    its world's harmful concepts unless --sld-concept says otherwise."""
    import json

    from conceptlock.commands.evaluate import run_evaluate
    from conceptlock.world import safety_text
    from conceptlock.world.concepts import HARMFUL

    text = safety_text(micro_world)
    assert text and HARMFUL["gore"].safety_text in text
    kw = dict(
        prompts=micro_world / "prompts" / "clean.csv",
        metrics=[f"toy_harm:world={micro_world}"],
        model=micro_world / "pipeline",
    )
    run_evaluate(tmp_path / "a", steps=2, limit=1, progress=False, options={"sld": "MAX"}, **kw)
    run_evaluate(tmp_path / "b", steps=2, limit=1, progress=False, options={"sld": "MAX", "sld_concept": "x"}, **kw)
    opts = [json.loads((tmp_path / d / "manifest.jsonl").read_text().splitlines()[0])["options"] for d in "ab"]
    assert opts[0]["sld_concept"] == text and opts[1]["sld_concept"] == "x"


def test_sld_on_sdxl_off_equals_the_pipeline_and_on_moves_away():
    """SDXL's SLD runs on the packed conditioning: with the safety scale <= 1 it is exactly
    StableDiffusionXLPipeline's sampling; switched on, the images change."""
    from conceptlock.pipelines import tiny_pipeline

    xl = tiny_pipeline(seed=4, arch="sdxl")
    plain = xl(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=gens(), output_type="np").images
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    off = sld_generate(xl, PROMPTS, sld="MAX", sld_guidance_scale=1, generator=gens(), **kw)
    assert not off.applied
    np.testing.assert_allclose(off.images, plain, atol=2e-5)
    on = sld_generate(xl, PROMPTS, sld="MAX", sld_concept="blood", generator=gens(), **kw)
    assert on.applied and np.abs(on.images - plain).max() > 1e-3
