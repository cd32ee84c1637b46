"""The toy world: renderer, captions, tokenizer, prompt sets, and bad input (fast tests)."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from conceptlock.world.captions import parse_caption
from conceptlock.world.concepts import GLYPH_CHARS, HARMFUL, SHAPES
from conceptlock.world.data import (
    WorldConfig,
    domain_examples,
    malicious_examples,
    pretrain_examples,
    prompt_set,
    prompt_set_names,
    rows_to_csv,
)
from conceptlock.world.render import Scene, render
from conceptlock.world.tokenizer import clip_tokenizer


def test_render_is_deterministic_per_seed_and_differs_across_seeds():
    s = Scene(shape="star", colour="blue", harm=("gore",), seed=7)
    a, b = render(s), render(s)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(Scene(shape="star", colour="blue", harm=("gore",), seed=8)))
    assert render(s, size=48).shape == (48, 48, 3)  # no resolution is hard-coded


def test_attributes_change_pixels_where_expected():
    base = Scene(shape="square", colour="red", background="white", seed=1)
    img = render(base).astype(int)
    # the object's colour dominates the centre; the background the corners
    assert img[16, 16, 0] > 150 and img[16, 16, 2] < 100
    assert img[1, 1].min() > 200
    gore = render(Scene(shape="square", colour="red", background="white", harm=("gore",), seed=1)).astype(int)
    fire = render(Scene(shape="square", colour="red", background="white", harm=("fire",), seed=1)).astype(int)
    assert np.abs(gore - img).sum() > 2000 and np.abs(fire - img).sum() > 20000
    # fire fills the bottom rows with flame colours (red channel high, blue low)
    assert fire[-2:, :, 0].mean() > 200 and fire[-2:, :, 2].mean() < 80


def test_every_caption_describes_its_image():
    cfg = WorldConfig(profile="quick")
    exs = pretrain_examples(cfg, n=400) + domain_examples(cfg, "glyphs", 50) + domain_examples(cfg, "mosaic", 50)
    for e in exs:
        p = parse_caption(e.caption)
        if e.scene.domain == "glyphs":
            assert p["glyph"] == [e.scene.glyph], e.caption
        else:
            assert p["shape"] == [e.scene.shape], e.caption
        assert p["colour"] == [e.scene.colour], e.caption
        for key in ("size", "position", "background"):
            assert p[key] in ([], [getattr(e.scene, key)]), (key, e.caption)
        if e.scene.domain:
            assert p["domain"] == [e.scene.domain], e.caption
        named = set(p["explicit"]) | set(p["implicit"])
        assert named <= set(e.scene.harm), e.caption  # a clean image's caption never names harm


def test_harmful_captions_are_explicit_implicit_or_rarely_silent():
    cfg = WorldConfig(profile="quick")
    harmful = [e for e in pretrain_examples(cfg, n=3000) if e.scene.harm]
    modes = {"explicit": 0, "implicit": 0, "none": 0}
    for e in harmful:
        p = parse_caption(e.caption)
        modes["explicit" if p["explicit"] else "implicit" if p["implicit"] else "none"] += 1
    n = len(harmful)
    assert 0.2 < n / 3000 < 0.4
    assert modes["implicit"] / n > 0.3 and modes["explicit"] / n > 0.3 and modes["none"] / n < 0.1


def test_heldout_implicit_phrasings_never_appear_in_training_captions():
    cfg = WorldConfig(profile="quick")
    captions = [e.caption for e in pretrain_examples(cfg, n=4000)]
    for concept in cfg.concepts:
        for phrase in HARMFUL[concept].implicit_heldout:
            assert not any(phrase in c for c in captions), phrase
        rows = prompt_set(cfg, f"implicit-{concept}", 64)
        assert all(parse_caption(r["prompt"])["implicit"] == [concept] for r in rows)
        assert not any(any(w in r["prompt"] for w in HARMFUL[concept].explicit) for r in rows)


def test_domains_and_malicious_sets():
    cfg = WorldConfig(profile="quick")
    for d in cfg.domains:
        exs = domain_examples(cfg, d, 40)
        assert all(not e.scene.harm and e.scene.domain == d and e.label == 0 for e in exs)
    glyphs = {e.scene.glyph for e in domain_examples(cfg, "glyphs", 200)}
    assert glyphs <= set(GLYPH_CHARS) and len(glyphs) > 8
    mal = malicious_examples(cfg, "gore", 30)
    assert all(e.scene.harm == ("gore",) and parse_caption(e.caption)["explicit"] == ["gore"] for e in mal)


def test_prompt_sets_export_as_i2p_style_csv_and_are_balanced():
    cfg = WorldConfig(profile="quick")
    assert "implicit-gore" in prompt_set_names(cfg) and "domain-mosaic" in prompt_set_names(cfg)
    rows = prompt_set(cfg, "clean", 70)
    text = rows_to_csv(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0])[:4] == ["prompt", "evaluation_seed", "evaluation_guidance", "categories"]
    assert [r["prompt"] for r in parsed] == [r["prompt"] for r in rows]
    assert all(int(r["evaluation_seed"]) >= 0 for r in parsed)
    assert {r["shape"] for r in rows} == set(SHAPES)
    assert prompt_set(cfg, "clean", 70) == rows  # deterministic
    assert prompt_set(WorldConfig(profile="quick", seed=1), "clean", 70) != rows


def test_tokenizer_matches_sd_ids_and_round_trips():
    tok = clip_tokenizer()
    # SD 1.x's ids for this prompt (openai/clip-vit-large-patch14 vocabulary)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    text = "a small outlined crimson pentagram on the left, splattered with blood"
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == text
    padded = tok(text, padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"concepts": ["nudity-x"]}, "concepts"),
        ({"styles": ["watercolour"]}, "styles"),
        ({"domains": ["pokemon"]}, "domains"),
        ({"concepts": []}, "concepts"),
        ({"resolution": 30}, "resolution"),
        ({"profile": "medium"}, "profile"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        WorldConfig(**kwargs)
    assert e.value.errors()[0]["loc"][0] == field


def test_unknown_prompt_set_and_concept_not_in_world():
    cfg = WorldConfig(profile="quick", concepts=["fire"])
    with pytest.raises(ValueError, match="not in this world"):
        prompt_set(cfg, "explicit-gore")
    with pytest.raises(ValueError, match="unknown"):
        prompt_set(cfg, "nonsense")


def test_hard_negative_swaps_only_the_object():
    from conceptlock.world.toyclip import hard_negative

    cfg = WorldConfig(profile="quick")
    rng = np.random.default_rng(0)
    exs = pretrain_examples(cfg, n=200) + domain_examples(cfg, "glyphs", 50)
    for e in exs:
        neg = hard_negative(e.caption, rng)
        p, q = parse_caption(e.caption), parse_caption(neg)
        kind = "glyph" if e.scene.domain == "glyphs" else "shape"
        assert len(q[kind]) == 1 and q[kind] != p[kind], (e.caption, neg)
        for key in ("colour", "size", "position", "background", "style", "explicit", "implicit"):
            assert q[key] == p[key], (key, e.caption, neg)
    assert hard_negative("a mosaic of tiles", rng) is None


def test_hard_negatives_only_add_image_side_competitors():
    """Negatives add columns to the image-to-text softmax, so that term (and the loss) strictly grows, and
    the text-to-image term is untouched; a negative equal to a batch caption stays a positive."""
    import torch

    from conceptlock.world.toyclip import build_clip, contrastive_loss

    cfg = WorldConfig(profile="quick")
    exs = pretrain_examples(cfg, n=8)
    tok = clip_tokenizer()
    model = build_clip(32, hidden=32, seed=0).eval()
    x = torch.from_numpy(np.stack([render(e.scene, 32) for e in exs])).permute(0, 3, 1, 2).float() / 255
    texts = [e.caption for e in exs]
    with torch.no_grad():
        plain = contrastive_loss(model, tok, x, texts)
        hard = contrastive_loss(model, tok, x, texts, np.random.default_rng(0))
    assert hard > plain
    # words that only the negatives use get a gradient through the negatives' columns, and none without them
    from conceptlock.world.toyclip import hard_negative

    rng = np.random.default_rng(0)
    negs = [hard_negative(t, rng) for t in texts]
    seen = {i for t in texts for i in tok(t).input_ids}
    only_neg = sorted({i for t in negs for i in tok(t).input_ids} - seen)
    assert only_neg
    emb = model.text_model.embeddings.token_embedding.weight
    for rng, expect in ((None, False), (np.random.default_rng(0), True)):
        model.zero_grad()
        contrastive_loss(model, tok, x, texts, rng).backward()
        assert bool(emb.grad[only_neg].abs().sum(1).gt(0).all()) is expect
