"""Templated, paraphrased captions for toy-world scenes, and the parser that reads them back.

A caption always names the shape (or glyph) and the colour; size, style, position and background
are each mentioned or not at random, in one of several templates, with synonyms. A harmful overlay
is named explicitly, implied by a context phrase, or (rarely, as in web data) left unsaid.
`parse_caption` inverts the wording so tests can check that every caption describes its image.
"""

from __future__ import annotations

import re

import numpy as np

from .concepts import (
    BACKGROUNDS,
    COLOURS,
    DOMAINS,
    GLYPH_WORDS,
    HARMFUL,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
)
from .render import Scene

_BG_TEMPLATES = (" on a {bg} background", " against a {bg} backdrop", ", {bg} background")


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def object_phrase(scene: Scene, rng: np.random.Generator, p_attr: float = 0.5) -> str:
    """'a small outlined red star on the left on a sky background' with random omissions."""
    colour = _pick(rng, COLOURS[scene.colour])
    if scene.domain == "glyphs":
        noun = _pick(rng, GLYPH_WORDS[scene.glyph or "A"])
    else:
        noun = _pick(rng, SHAPES[scene.shape])
    adjs = []
    if rng.random() < p_attr:
        adjs.append(_pick(rng, SIZES[scene.size]))
    if scene.domain is None and rng.random() < p_attr:
        adjs.append(_pick(rng, STYLES[scene.style]))
    adjs.append(colour)
    head = " ".join(adjs + [noun])
    if scene.domain is not None:
        dword = _pick(rng, DOMAINS[scene.domain].style_words)
        head = f"{dword} of {article(head)} {head}" if rng.random() < 0.5 else f"{head} {dword}"
    phrase = f"{article(head)} {head}"
    if rng.random() < p_attr:
        phrase += " " + _pick(rng, POSITIONS[scene.position])
    if rng.random() < p_attr:
        phrase += _pick(rng, _BG_TEMPLATES).format(bg=_pick(rng, BACKGROUNDS[scene.background]))
    return phrase


def harm_phrase(concept: str, mode: str, rng: np.random.Generator) -> str:
    """The wording of a harmful concept: 'explicit', 'implicit' (train phrasings) or 'heldout'."""
    c = HARMFUL[concept]
    pool = {"explicit": c.explicit, "implicit": c.implicit_train, "heldout": c.implicit_heldout}[mode]
    return _pick(rng, pool)


def caption(scene: Scene, rng: np.random.Generator, harm_mode: str = "explicit", p_attr: float = 0.5) -> str:
    """One caption for `scene`. `harm_mode` words its harmful overlays (explicit|implicit|heldout|none)."""
    text = object_phrase(scene, rng, p_attr)
    if scene.harm and harm_mode != "none":
        phrases = [harm_phrase(h, harm_mode, rng) for h in scene.harm]
        joined = " and ".join(phrases)
        if rng.random() < 0.5:
            text = f"{text}, {joined}"
        else:
            text = f"{joined}: {text}"
    return text


def _find(text: str, table: dict[str, tuple[str, ...]]) -> list[str]:
    """Keys of `table` whose synonyms occur as whole words in `text` (longest synonyms first)."""
    found = []
    rest = " " + text.lower() + " "
    pairs = sorted(((syn, key) for key, syns in table.items() for syn in syns), key=lambda p: -len(p[0]))
    for syn, key in pairs:
        pat = r"(?<![a-z])" + re.escape(syn) + r"(?![a-z])"
        if re.search(pat, rest):
            rest = re.sub(pat, " ", rest)
            if key not in found:
                found.append(key)
    return found


def parse_caption(text: str) -> dict[str, list[str]]:
    """Attributes a caption states: {'shape': [...], 'colour': [...], ..., 'explicit': [...]}."""
    harm_explicit = {k: c.explicit for k, c in HARMFUL.items()}
    harm_implicit = {k: c.implicit_train + c.implicit_heldout for k, c in HARMFUL.items()}
    t = text.lower()
    out = {
        "explicit": _find(t, harm_explicit),
        "implicit": _find(t, harm_implicit),
    }
    # remove harm phrases before reading attributes, so 'blood red' style collisions cannot leak
    for table in (harm_explicit, harm_implicit):
        for syns in table.values():
            for s in sorted(syns, key=len, reverse=True):
                t = t.replace(s, " ")
    out.update(
        background=_find(re.sub(r"(?<![a-z])(background|backdrop)", "", t), BACKGROUNDS)
        if re.search("background|backdrop", t)
        else [],
    )
    bg_syn = [s for syns in BACKGROUNDS.values() for s in syns]
    t_nobg = t
    for s in sorted(bg_syn, key=len, reverse=True):
        t_nobg = re.sub(r"(?<![a-z])" + re.escape(s) + r" (background|backdrop)", " ", t_nobg)
    out.update(
        shape=_find(t_nobg, SHAPES),
        colour=_find(t_nobg, COLOURS),
        size=_find(t_nobg, SIZES),
        position=_find(t_nobg, POSITIONS),
        style=_find(t_nobg, STYLES),
        glyph=_find(t_nobg, GLYPH_WORDS),
        domain=_find(t_nobg, {k: d.style_words for k, d in DOMAINS.items()}),
    )
    return out
