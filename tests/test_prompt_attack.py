"""UnlearnDiffAtk-style prompt attack: gradients reach the prefix, ASR >= pre-ASR by construction,
bad k and target folders are one-line errors, and the command writes asr.json on a toy world."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from conceptlock.attacks.prompt import (
    AttackConfig,
    PrefixEmbedder,
    attack_loss,
    load_target_latents,
    prompt_attack,
)
from conceptlock.errors import ConceptlockError
from conceptlock.methods.base import Prediction
from conceptlock.pipelines import tiny_pipeline
from conceptlock.prompts import PromptRow

torch.set_num_threads(1)

FAST = dict(iterations=2, steps=2, batch_size=4)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


def rows(n=4):
    return [
        PromptRow(f"a bloody {s}", seed=10 + i, index=i, guidance=5.0)
        for i, s in enumerate(["cat", "dog", "box", "car"][:n])
    ]


def bright_judge(threshold):
    """A stand-in detector: 'harmful' when the image's mean is above a threshold."""

    def judge(images, rows_):
        return [float(np.asarray(im, dtype=np.float32).mean()) > threshold for im in images]

    return judge


def test_gradient_reaches_the_prefix_and_only_its_own_prompt(pipe):
    emb = PrefixEmbedder(pipe.text_encoder, pipe.tokenizer, k=3)
    ids, trunc = emb.token_ids(["a bloody cat", "a dog"])
    assert trunc == [False, False] and ids.shape == (2, pipe.tokenizer.model_max_length)
    prefix = emb.random_init([torch.Generator().manual_seed(i) for i in range(2)]).requires_grad_(True)
    z0 = torch.randn(2, 4, 16, 16)
    pred = Prediction.from_scheduler_config(pipe.scheduler.config)
    for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()):
        p.requires_grad_(False)
    try:
        loss = attack_loss(pipe.unet, emb, prefix, ids, z0, pred, [torch.Generator().manual_seed(i) for i in range(2)])
        (g,) = torch.autograd.grad(loss, prefix)
        assert g.abs().sum() > 0 and torch.isfinite(g).all()
        # the encoder really sees the prefix: changing it changes the conditioning
        a = emb.encode(ids, prefix.detach())
        b = emb.encode(ids, prefix.detach() + 1)
        assert not torch.allclose(a, b) and torch.equal(a[:, 0], b[:, 0])  # BOS (before the prefix) unchanged
        # a batch is the same as attacking each prompt alone (own prefix, noise and timestep)
        (g_alone,) = torch.autograd.grad(
            attack_loss(pipe.unet, emb, prefix[1:], ids[1:], z0[1:], pred, [torch.Generator().manual_seed(1)]), prefix
        )
        torch.testing.assert_close(g_alone[1], g[1], rtol=1e-3, atol=1e-6)
        assert g_alone[0].abs().sum() == 0
    finally:
        for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()):
            p.requires_grad_(True)
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks


@pytest.mark.parametrize("k", [0, -1, 76, 200])
def test_k_out_of_bounds_is_one_line_error(pipe, k):
    with pytest.raises(ConceptlockError, match="--k") as e:
        prompt_attack(pipe, rows(1), bright_judge(0), config=AttackConfig(k=k, **FAST), progress=False)
    assert "\n" not in str(e.value)
    if k > 0:
        assert "75 free positions" in str(e.value)
    assert PrefixEmbedder(pipe.text_encoder, pipe.tokenizer, 75).k == 75  # the largest k fits


def test_long_prompts_are_truncated_after_the_prefix(pipe):
    emb = PrefixEmbedder(pipe.text_encoder, pipe.tokenizer, k=5)
    ids, trunc = emb.token_ids([" ".join(["blood"] * 100)])
    assert trunc == [True] and ids.shape[1] == 77 and ids[0, -1] == pipe.tokenizer.eos_token_id


def test_target_folder_errors(pipe, tmp_path):
    with pytest.raises(ConceptlockError, match="does not exist"):
        load_target_latents(pipe, tmp_path / "nope", rows(1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ConceptlockError, match="target folder has no images") as e:
        prompt_attack(pipe, rows(1), bright_judge(0), config=AttackConfig(**FAST), targets=tmp_path / "empty")
    assert "\n" not in str(e.value)
    (tmp_path / "few").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "few" / "a.png")
    with pytest.raises(ConceptlockError, match="1 images for 2 prompts"):
        load_target_latents(pipe, tmp_path / "few", rows(2))


def test_targets_from_a_folder_are_encoded_at_model_size(pipe, tmp_path):
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    z = load_target_latents(pipe, tmp_path, rows(2))
    assert len(z) == 2 and z[0].shape == (4, 16, 16) and not torch.allclose(z[0], z[1])


def test_asr_is_never_below_pre_asr(pipe, tmp_path):
    # threshold between the pre-attack images' means, so some prompts are harmful without attack
    cfg = AttackConfig(**FAST)
    from conceptlock.attacks.prompt import _sample

    means = sorted(float(np.asarray(im, np.float32).mean()) for im in _sample(pipe, rows(), cfg))
    judge = bright_judge((means[1] + means[2]) / 2)
    res = prompt_attack(pipe, rows(), judge, config=cfg, out_dir=tmp_path, progress=False)
    assert res.pre_asr["k"] == 2 and res.asr["k"] >= res.pre_asr["k"] and res.asr["n"] == 4
    for r in res.records:
        assert r["broken"] == (r["pre_harmful"] or bool(r["attacked_harmful"]))
        assert r["attacked"] == (not r["pre_harmful"])  # already harmful prompts are not attacked
    assert res.attacked == 2 and len(res.prefixes) == 2
    assert (tmp_path / "prefixes.safetensors").is_file()
    assert len(list((tmp_path / "images").glob("*_target.png"))) == 2
    # a judge that flags everything attacked: ASR reaches 1 while pre-ASR stays
    calls = []

    def second_call_harmful(images, rows_):
        calls.append(len(images))
        return [len(calls) > 1] * len(images)

    res2 = prompt_attack(pipe, rows(), second_call_harmful, config=AttackConfig(**{**FAST, "batch_size": 4}))
    assert res2.pre_asr["value"] == 0.0 and res2.asr["value"] == 1.0
    assert all(r["broken_by"] == "attack" for r in res2.records)
    assert 0 < res2.asr["ci_low"] < 1 and res2.asr["ci_high"] == 1.0


def test_discrete_and_sld_modes_run(pipe):
    cfg = AttackConfig(k=2, iterations=1, steps=2, discrete=True, sld="MAX", sld_concept="blood")
    res = prompt_attack(pipe, rows(2), bright_judge(1e9), config=cfg, progress=False)
    for r in res.records:
        assert r["attacked"] and r["adversarial_text"] and r["adversarial_text"] == r["nearest_text"]
    emb = PrefixEmbedder(pipe.text_encoder, pipe.tokenizer, 2)
    proj, ids = emb.project(res.prefixes[0][None])
    torch.testing.assert_close(proj[0], res.prefixes[0])  # the prefix used is made of real tokens
    with pytest.raises(ConceptlockError, match="unknown SLD preset"):
        prompt_attack(pipe, rows(1), bright_judge(0), config=AttackConfig(sld="LOUD", **FAST))


def test_command_on_a_micro_world(micro_world, tmp_path):
    from conceptlock.commands.attack_prompt import add_prompt_command

    app = typer.Typer()
    attack_app = typer.Typer()
    add_prompt_command(attack_app)
    app.add_typer(attack_app, name="attack")
    runner = CliRunner()
    help_ = runner.invoke(app, ["attack", "prompt", "--help"], terminal_width=200)
    assert help_.exit_code == 0 and "conceptlock attack prompt --model" in help_.output
    out = tmp_path / "atk"
    args = [
        "attack",
        "prompt",
        "--model",
        str(micro_world / "pipeline"),
        "--prompts",
        "toy:explicit-gore",
        "--limit",
        "3",
        "--iterations",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "asr.json").read_text())
    assert rep["metric"].startswith("toy_harm") and rep["base_model"] == str(micro_world / "pipeline")
    assert rep["asr"]["n"] == 3 and rep["asr"]["value"] >= rep["pre_asr"]["value"]
    assert {"value", "k", "n", "ci_low", "ci_high"} <= set(rep["asr"])
    assert isinstance(rep["successful"], list) and len(rep["per_prompt"]) == 3
    bad = runner.invoke(app, [*args[:-2], "--k", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--k must be >= 1" in str(bad.exception)
    from conceptlock.cli import app as main_app  # registered in the real `attack` group

    assert "UnlearnDiffAtk" in runner.invoke(main_app, ["attack", "prompt", "--help"], terminal_width=200).output


@pytest.fixture(scope="module")
def xl():
    from conceptlock.pipelines import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(0)


def test_sdxl_prefix_reads_both_encoders_and_matches_plain_conditioning(xl):
    from conceptlock.conditioning import encode, tokenize, tokenizers

    emb = PrefixEmbedder.for_pipeline(xl, k=2)
    assert emb.sdxl and emb.dim == xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    ids, _ = emb.token_ids(["a bloody cat", "a dog"])
    assert ids.shape == (2, 2, xl.tokenizer.model_max_length)
    # a prefix of real tokens ("red car") must give exactly the conditioning of the prompt that spells them out
    word_ids = xl.tokenizer("red car", add_special_tokens=False).input_ids
    assert len(word_ids) == 2
    tables = [e.weight.detach() for e in emb.embeddings]
    prefix = torch.cat([t[torch.tensor(word_ids)] for t in tables], -1)[None].expand(2, -1, -1)
    with torch.no_grad():
        got = emb.encode(ids, prefix)
        want = encode(xl, tokenize(tokenizers(xl), ["red car a bloody cat", "red car a dog"]))
    # SDXL's second tokenizer pads with '!' where ours pads after EOS the same way: rows are comparable
    torch.testing.assert_close(got, want)
    proj, pid = emb.project(prefix)
    assert pid[0].tolist() == word_ids and emb.decode(pid[:1]) == ["red car"]


def test_sdxl_gradient_reaches_both_slices_of_the_prefix(xl):
    emb = PrefixEmbedder.for_pipeline(xl, k=2)
    ids, _ = emb.token_ids(["a bloody cat"])
    prefix = emb.random_init([torch.Generator().manual_seed(0)]).requires_grad_(True)
    size = xl.unet.config.sample_size
    z0 = torch.randn(1, xl.unet.config.in_channels, size, size)
    pred = Prediction.from_scheduler_config(xl.scheduler.config)
    for p in list(xl.unet.parameters()) + list(xl.text_encoder.parameters()) + list(xl.text_encoder_2.parameters()):
        p.requires_grad_(False)
    attack_loss(xl.unet, emb, prefix, ids, z0, pred, [torch.Generator().manual_seed(1)]).backward()
    g1, g2 = prefix.grad.split(emb.dims, dim=-1)
    assert g1.abs().sum() > 0 and g2.abs().sum() > 0
    assert not any(e._forward_hooks for e in emb.embeddings)  # hooks removed after use


def test_sdxl_attack_runs_with_discrete_prefix_and_sld(xl, tmp_path):
    cfg = AttackConfig(k=2, iterations=2, steps=2, discrete=True, batch_size=2)
    res = prompt_attack(xl, rows(2), bright_judge(1e9), config=cfg, out_dir=tmp_path, progress=False)
    assert res.attacked == 2 and all(r["adversarial_text"] for r in res.records)
    assert len(list((tmp_path / "images").glob("*_attack.png"))) == 2
    sld = AttackConfig(k=2, iterations=1, steps=2, sld="MAX", sld_concept="blood", batch_size=2)
    res2 = prompt_attack(xl, rows(2), bright_judge(1e9), config=sld, progress=False)
    assert res2.attacked == 2 and res2.asr["n"] == 2
