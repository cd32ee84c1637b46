"""UCE: the closed form is the least-squares solution, preserve sets keep their outputs, bad input
is a one-line error, and `align --method uce` writes a reloadable pipeline in well under a second."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conceptlock.align import run_align
from conceptlock.errors import ConceptlockError
from conceptlock.methods.uce import _encode, cross_attention_kv, uce_edit, uce_solve
from conceptlock.pipelines import load_pipeline, save_pipeline, tiny_pipeline

torch.set_num_threads(1)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("lam,se,sp", [(0.5, 1.0, 0.1), (2.0, 3.0, 1.0)])
def test_closed_form_is_the_least_squares_solution(lam, se, sp):
    w = rand(6, 5, seed=1)
    ce, ve, cp = rand(3, 5, seed=2), rand(3, 6, seed=3), rand(4, 5, seed=4)
    got = uce_solve(w, ce, ve, cp, lam, se, sp)
    # min lam|W - W0|^2 + se sum |W c_e - v_e|^2 + sp sum |W c_p - W0 c_p|^2, as one stacked regression
    x = torch.cat([lam**0.5 * torch.eye(5, dtype=w.dtype), se**0.5 * ce, sp**0.5 * cp])
    y = torch.cat([lam**0.5 * w.T, se**0.5 * ve, sp**0.5 * (cp @ w.T)])
    want = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_preserve_directions_orthogonal_to_erase_keep_their_output_exactly():
    w = rand(4, 6, seed=5)
    basis = torch.linalg.qr(rand(6, 6, seed=6)).Q.T  # orthonormal rows
    ce, cp, other = basis[:2] * 3, basis[2:4] * 2, basis[4:] * 5
    ve = rand(2, 4, seed=7)
    got = uce_solve(w, ce, ve, cp, lam=0.5, erase_scale=1.0, preserve_scale=0.1)
    torch.testing.assert_close(cp @ got.T, cp @ w.T)  # preserved exactly
    torch.testing.assert_close(other @ got.T, other @ w.T)  # untouched directions too
    # erase rows move to their targets as lam -> 0
    strong = uce_solve(w, ce, ve, cp, lam=1e-8)
    torch.testing.assert_close(ce @ strong.T, ve, rtol=1e-5, atol=1e-5)


def _kv(pipe, text):
    emb, _ = _encode(pipe, [text])
    return {n: lin(emb[0]).detach() for n, lin in cross_attention_kv(pipe.unet)}


def test_edit_on_a_pipeline_maps_concept_to_guide_and_keeps_preserve_set():
    pipe = tiny_pipeline(0)
    before = {t: _kv(pipe, t) for t in ("bloody", "clean", "a red circle", "")}
    q_before = [m.weight.clone() for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_q")]
    rep = uce_edit(pipe, ["bloody"], "clean", ["a red circle"], lam=0.1, preserve_scale=1.0)
    after = {t: _kv(pipe, t) for t in before}
    assert rep["erase_residual_after"] < 0.5 * rep["erase_residual_before"]
    assert len(rep["layers"]) == 2 * len([n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")])

    def change(t):
        return sum(float((after[t][n] - before[t][n]).norm() / before[t][n].norm()) for n in before[t])

    assert change("a red circle") < 0.25 * change("bloody")
    assert change("") < 0.25 * change("bloody")  # the unconditional branch is preserved by default
    q_after = [m.weight for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_q")]
    assert all(torch.equal(a, b) for a, b in zip(q_before, q_after, strict=True))


@pytest.mark.parametrize(
    "erase,preserve,guide,match",
    [
        (["Bloody"], ["bloody "], "", "erase and preserve sets overlap: 'bloody'"),
        (["bloody", "gore"], ["a cat", "GORE"], "", "overlap: 'gore'"),
        (["bloody"], [], "bloody", "a guide is also erased"),
        ([], [], "", "at least one"),
    ],
)
def test_bad_sets_are_one_line_errors(erase, preserve, guide, match):
    pipe = tiny_pipeline(0)
    with pytest.raises(ConceptlockError, match=match) as e:
        uce_edit(pipe, erase, guide, preserve)
    assert "\n" not in str(e.value)
    with pytest.raises(ConceptlockError, match="tokens"):
        uce_edit(pipe, ["bloody"], tokens="every")


def test_last_token_mode_edits_fewer_vectors():
    tail = uce_edit(tiny_pipeline(0), ["bloody"], "clean")
    last = uce_edit(tiny_pipeline(0), ["bloody"], "clean", tokens="last")
    assert last["erase_vectors"] == 1 and tail["erase_vectors"] > 1


def test_align_method_uce_writes_a_reloadable_pipeline_fast(tmp_path):
    save_pipeline(tiny_pipeline(0), tmp_path / "base")
    res = run_align(
        "uce",
        tmp_path / "base",
        ["bloody"],
        tmp_path / "run",
        objective_kwargs={"guide": "clean", "preserve": ["a cat"]},
    )
    assert res.finished and res.artifact == tmp_path / "run" / "model"
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["method"] == "uce" and cfg["uce"]["preserve"] == ["a cat"] and cfg["uce"]["seconds"] < 1.0
    edited = load_pipeline(res.artifact)
    base = load_pipeline(tmp_path / "base")
    (name, lin), *_ = cross_attention_kv(edited.unet)
    assert not torch.equal(lin.weight, dict(base.unet.named_modules())[name].weight)
    with pytest.raises(ConceptlockError, match="already holds"):
        run_align("uce", tmp_path / "base", ["bloody"], tmp_path / "run")
    with pytest.raises(ConceptlockError, match="training-free: --steps"):
        run_align("uce", tmp_path / "base", ["bloody"], tmp_path / "run2", steps=10)
    with pytest.raises(ConceptlockError, match="overlap"):
        run_align("uce", tmp_path / "base", ["bloody"], tmp_path / "run3", objective_kwargs={"preserve": ["bloody"]})


def test_align_uce_in_a_toy_world_and_cli(micro_world, tmp_path):
    from conceptlock.cli import app
    from conceptlock.world.concepts import HARMFUL

    res = CliRunner().invoke(
        app,
        [
            "align",
            "--method",
            "uce",
            "--model",
            str(micro_world / "pipeline"),
            "--concept",
            "gore",
            "--out",
            str(tmp_path / "uce"),
            "--preserve",
            "a red circle",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "uce" / "config.json").read_text())
    h = HARMFUL["gore"]
    phrases = list(h.explicit) + list(h.implicit_train)
    erase, guides = cfg["uce"]["erase"], cfg["uce"]["guides"]
    assert erase[: len(phrases)] == phrases and set(guides[: len(phrases)]) == {h.guide}
    # in-context erasure: each neutral caption with a phrase as prefix and as suffix, guided to the bare caption
    assert cfg["contexts"] == 40 and len(erase) == len(phrases) + 80
    for e, g in zip(erase[len(phrases) :], guides[len(phrases) :], strict=True):
        assert g and "gore" not in g and (e.endswith(": " + g) or e.startswith(g + ", "))
        assert any(p in e for p in phrases)
    assert cfg["world"] == str(micro_world)
    res = CliRunner().invoke(
        app,
        ["align", "--method", "uce", "--model", str(micro_world / "pipeline"), "--concept", "gore"]
        + ["--out", str(tmp_path / "uce0"), "--uce-contexts", "0"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "uce0" / "config.json").read_text())["uce"]["erase"] == phrases
    help_ = CliRunner().invoke(app, ["align", "--help"], terminal_width=200)
    assert "uce" in help_.output and "--preserve" in help_.output


def test_preserved_contexts_keep_their_keys_closer_to_the_original(micro_world, tmp_path):
    """--uce-preserve-contexts N adds N of the world's clean captions (not the in-context ones) to the preserve set,
    and the edit then moves those captions' cross-attention keys less."""
    from conceptlock.methods.uce import neutral_captions

    kept = neutral_captions(16, micro_world, purpose="uce-preserve")
    assert len(kept) == 16 and not set(kept) & set(neutral_captions(40, micro_world))
    original = load_pipeline(micro_world / "pipeline")
    (_, lin0), *_ = cross_attention_kv(original.unet)
    emb, _ = _encode(original, kept)
    moved = {}
    for n in (0, 16):
        res = run_align(
            "uce",
            micro_world / "pipeline",
            ["gore"],
            tmp_path / f"uce{n}",
            objective_kwargs={"preserve_contexts": n, "preserve_scale": 1.0},
        )
        assert len(res.config["preserve"]) == n and res.config["preserve_contexts"] == n
        (_, lin), *_ = cross_attention_kv(load_pipeline(res.artifact).unet)
        with torch.no_grad():
            moved[n] = (lin(emb) - lin0(emb)).norm().item()
    assert moved[16] < 0.8 * moved[0]
    with pytest.raises(ConceptlockError, match="preserve_contexts must be >= 0"):
        run_align(
            "uce", micro_world / "pipeline", ["gore"], tmp_path / "bad", objective_kwargs={"preserve_contexts": -1}
        )


def test_in_context_erasure_moves_the_in_context_prompt_to_its_caption():
    """With contexts, 'PHRASE: caption' is mapped to the caption's keys; erasing the phrase alone does less."""
    from conceptlock.methods.uce import GENERIC_CONTEXTS, context_pairs

    e, g = context_pairs(["bloody"], 3, None)
    assert e == [
        f"bloody: {c}" if i % 2 == 0 else f"{c}, bloody"
        for i, c in enumerate(sum([[c, c] for c in GENERIC_CONTEXTS[:3]], []))
    ]
    assert g == sum([[c, c] for c in GENERIC_CONTEXTS[:3]], [])
    text, clean = f"bloody: {GENERIC_CONTEXTS[0]}", GENERIC_CONTEXTS[0]
    dist = {}
    for n in (0, 10):
        pipe = tiny_pipeline(0)
        ce, cg = context_pairs(["bloody"], n, None)
        uce_edit(pipe, ["bloody"] + ce, [""] + cg)
        (_, lin), *_ = cross_attention_kv(pipe.unet)
        (emb_e, last_e), (emb_c, last_c) = _encode(pipe, [text]), _encode(pipe, [clean])
        # the tail UCE edits: from the last word to the end, aligned from the end
        m = 77 - max(int(last_e[0]), int(last_c[0]))
        k_e, k_c = lin(emb_e[0, int(last_e[0]) :][:m]), lin(emb_c[0, int(last_c[0]) :][:m])
        dist[n] = (k_e - k_c).norm(dim=-1).mean().item()
    assert dist[10] < 0.85 * dist[0]  # measured 0.76x on this random model; far more on a trained one


def test_uce_as_a_safety_lora_is_the_edit_and_loads_in_vanilla_diffusers(tmp_path):
    """`--params lora:safety` writes the closed-form edit as a LoRA file: vanilla `load_lora_weights` on the base
    gives the edited model's UNet output; a truncated rank reports its error; the base weights stay W0."""
    from diffusers import StableDiffusionPipeline

    from conceptlock.methods.uce import uce_lora

    save_pipeline(tiny_pipeline(0), tmp_path / "base")
    kw = {"objective_kwargs": {"guide": "clean", "preserve": ["a cat"]}}
    full = run_align("uce", tmp_path / "base", ["bloody"], tmp_path / "full", **kw)
    lora = run_align("uce", tmp_path / "base", ["bloody"], tmp_path / "lora", params="lora:safety", **kw)
    assert lora.artifact == tmp_path / "lora" / "safety.safetensors" and lora.config["params"] == "lora:safety"
    info = lora.config["uce"]["lora"]
    assert info["rel_error_max"] <= 1e-3 and info["alpha"] == info["rank"]
    vanilla = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    vanilla.load_lora_weights(str(lora.artifact), adapter_name="safety")
    edited, base = load_pipeline(full.artifact), load_pipeline(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, edited.unet.config.in_channels, 8, 8, generator=g)
    emb, _ = _encode(edited, ["a bloody cat", "a cat"])
    with torch.no_grad():
        want, got, w0 = (p.unet(x, 10, emb).sample for p in (edited, vanilla, base))
    assert (want - w0).abs().max() > 1e-3  # the edit changes the output ...
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)  # ... and the LoRA is that edit

    cut = run_align("uce", tmp_path / "base", ["bloody"], tmp_path / "cut", params="lora:safety", rank=1, **kw)
    assert cut.config["uce"]["lora"]["rank"] == 1 and cut.config["uce"]["lora"]["rel_error_max"] > 1e-3
    pipe = load_pipeline(tmp_path / "base")
    uce_lora(pipe, "safety", erase=["bloody"], guide="clean", preserve=["a cat"])
    pipe.unet.disable_adapters()
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 10, emb).sample, w0)  # W0 restored under the adapter
    for bad, match in [
        ({"params": "noxattn"}, "cannot apply"),
        ({"rank": 2}, "--rank applies only with --params lora"),
        ({"params": "lora:safety", "alpha": 2.0}, "training-free: --alpha"),
        ({"params": "lora:safety", "rank": 0}, "--rank must be >= 1"),
    ]:
        with pytest.raises(ConceptlockError, match=match):
            run_align("uce", tmp_path / "base", ["bloody"], tmp_path / "bad", **bad)
