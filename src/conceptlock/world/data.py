"""World configuration, scene sampling, data sets and prompt sets.

`WorldConfig` is the single source of truth of a world: its hash names the cache, so a changed
field rebuilds and an unchanged one is a no-op. Every sampler takes an explicit numpy Generator
derived from the config seed and a purpose string, so data sets are reproducible independently
of one another (adding a prompt set never shifts the pretraining data).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .captions import caption, harm_phrase, object_phrase
from .concepts import (
    BACKGROUNDS,
    COLOURS,
    DOMAINS,
    GLYPH_CHARS,
    HARMFUL,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    check_concepts,
    check_domains,
    check_styles,
)
from .render import Scene, render

_HASH_COMPAT = {"judge_batch": 128}


class Budget(BaseModel):
    """How much compute a profile spends on each stage of the build."""

    model_config = ConfigDict(extra="forbid")
    n_train: int = 24000  # unique pretraining scenes
    vae_steps: int = 900
    # toy CLIP with hard negatives (full world, seed 0, 1024 held-out renders): zero-shot shape accuracy 35% at
    # 800 steps without them, 38% with them, 84% at 2400 steps with them (4 vision layers, 1200 steps: 69%)
    clip_steps: int = 2400
    # attribute judge, held-out shape accuracy (full world, seed 0): 92.9% at 600 steps, 96.9% at 1500 (~2.5 min)
    judge_steps: int = 1500
    judge_batch: int = 128
    # base model, clean-prompt fidelity (full world, seed 0, n=256): 39.8% at 2800 steps, 95.3% at 10,000
    # (benchmarks/base_model_steps.py). 10,000 steps cost ~35 min on 2 cores, which is why the package ships
    # the full world's weights (world/shipped.py) rather than asking every user to build them.
    unet_steps: int = 10000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    eval_per_set: int = 256  # generated images per prompt set in the report card
    eval_steps: int = 20  # sampler steps


PROFILES: dict[str, Budget] = {
    "full": Budget(),
    # CI-sized: 109 s wall for `world build --profile quick` on 2 cores (issue bar 120 s). Small batches, more
    # steps: the judges reach 62% held-out shape accuracy at 260 x 48 vs 49% at 100 x 128 in less time, and
    # batch 16 halves the base model's step cost, which dominates the build.
    "quick": Budget(
        n_train=4000,
        vae_steps=120,
        clip_steps=120,
        judge_steps=260,
        judge_batch=48,
        unet_steps=300,
        unet_batch=16,
        eval_per_set=64,
        eval_steps=8,
    ),
}


class WorldConfig(BaseModel):
    """Everything that determines a built world. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")
    profile: Literal["quick", "full"] = "full"
    seed: int = 0
    resolution: int = 32
    concepts: list[str] = Field(default_factory=lambda: ["gore", "fire"])
    styles: list[str] = Field(default_factory=lambda: ["solid", "outline"])
    domains: list[str] = Field(default_factory=lambda: ["mosaic", "glyphs"])
    p_harm: float = 0.3  # share of pretraining images carrying a harmful overlay
    # share of harmful images whose caption does not mention it (LAION's unlabelled nudity). At 0.04 the
    # 10,000-step base model drew gore for 3.9% [2.1, 7.0] of clean prompts (issue bar 2%); 0.01 keeps the
    # phenomenon at a quarter of the rate.
    p_unlabelled_harm: float = 0.01
    p_implicit: float = 0.45  # share of harmful captions that imply rather than name it
    guidance: float = 4.0
    budget: Budget | None = None

    @field_validator("concepts")
    @classmethod
    def _concepts(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("concepts: at least one harmful concept is needed")
        check_concepts(v)
        return v

    @field_validator("styles")
    @classmethod
    def _styles(cls, v: list[str]) -> list[str]:
        check_styles(v)
        return v

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        check_domains(v)
        return v

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: int) -> int:
        if v < 16 or v % 8:
            raise ValueError("resolution: must be a multiple of 8, at least 16")
        return v

    def resolved_budget(self) -> Budget:
        return self.budget or PROFILES[self.profile]

    def config_hash(self) -> str:
        d = self.model_dump()
        d["budget"] = self.resolved_budget().model_dump()
        # budget fields added after worlds were built (and shipped) stay out of the hash at the value those
        # builds used, so an existing world keeps its cache identity
        for k, v in _HASH_COMPAT.items():
            if d["budget"].get(k) == v:
                del d["budget"][k]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def rng_for(cfg: WorldConfig, purpose: str) -> np.random.Generator:
    """An independent, reproducible random stream per purpose."""
    h = int(hashlib.sha256(f"{cfg.seed}:{purpose}".encode()).hexdigest()[:16], 16)
    return np.random.default_rng(h)


def _choice(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def random_scene(
    rng: np.random.Generator,
    cfg: WorldConfig,
    harm: tuple[str, ...] = (),
    domain: str | None = None,
    shape: str | None = None,
    colour: str | None = None,
) -> Scene:
    return Scene(
        shape=shape or _choice(rng, SHAPES),
        colour=colour or _choice(rng, COLOURS),
        background=_choice(rng, BACKGROUNDS),
        size=_choice(rng, SIZES),
        position=_choice(rng, POSITIONS),
        style="solid" if domain else _choice(rng, cfg.styles),
        harm=harm,
        domain=domain,
        glyph=_choice(rng, GLYPH_CHARS) if domain == "glyphs" else None,
        seed=int(rng.integers(2**31)),
    )


@dataclass
class Example:
    scene: Scene
    caption: str
    label: int  # 0 clean, 1 harmful


def pretrain_examples(cfg: WorldConfig, n: int | None = None, purpose: str = "pretrain") -> list[Example]:
    """The pretraining set: the world *including* its harmful concepts, as LAION includes nudity."""
    rng = rng_for(cfg, purpose)
    n = n if n is not None else cfg.resolved_budget().n_train
    out = []
    for _ in range(n):
        harm: tuple[str, ...] = ()
        if rng.random() < cfg.p_harm:
            harm = (_choice(rng, cfg.concepts),)
        scene = random_scene(rng, cfg, harm=harm)
        if harm:
            r = rng.random()
            mode = (
                "none"
                if r < cfg.p_unlabelled_harm
                else ("implicit" if r < cfg.p_unlabelled_harm + cfg.p_implicit else "explicit")
            )
        else:
            mode = "none"
        out.append(Example(scene, caption(scene, rng, mode), int(bool(harm))))
    return out


def domain_examples(cfg: WorldConfig, domain: str, n: int, purpose: str = "domain") -> list[Example]:
    """A benign fine-tuning set: a new style or new objects, never harmful."""
    check_domains([domain], "domain")
    rng = rng_for(cfg, f"{purpose}:{domain}")
    out = []
    for _ in range(n):
        scene = random_scene(rng, cfg, domain=domain)
        out.append(Example(scene, caption(scene, rng, "none"), 0))
    return out


def malicious_examples(cfg: WorldConfig, concept: str, n: int, purpose: str = "malicious") -> list[Example]:
    """The malicious set: harmful-concept images with explicit captions."""
    check_concepts([concept], "concept")
    rng = rng_for(cfg, f"{purpose}:{concept}")
    out = []
    for _ in range(n):
        scene = random_scene(rng, cfg, harm=(concept,))
        out.append(Example(scene, caption(scene, rng, "explicit"), 1))
    return out


def render_examples(examples: list[Example], size: int) -> np.ndarray:
    return np.stack([render(e.scene, size) for e in examples]) if examples else np.zeros((0, size, size, 3), np.uint8)


# ---------------------------------------------------------------- prompt sets

PROMPT_SET_KINDS = ("clean", "explicit", "implicit", "implicit-train", "domain", "malicious")


def prompt_set_names(cfg: WorldConfig) -> list[str]:
    names = ["clean"]
    for c in cfg.concepts:
        names += [f"explicit-{c}", f"implicit-{c}", f"implicit-train-{c}"]
    names += [f"domain-{d}" for d in cfg.domains]
    return names


def prompt_set(cfg: WorldConfig, name: str, n: int = 256) -> list[dict]:
    """Rows of a toy prompt set in the I2P layout, plus ground-truth columns for fidelity.

    Sets: `clean`, `explicit-C`, `implicit-C` (held-out phrasings only), `implicit-train-C`
    (the phrasings pretraining used), `domain-D`. Shape and colour are balanced by cycling.
    """
    kind, _, arg = name.partition("-")
    if name.startswith("implicit-train-"):
        kind, arg = "implicit-train", name[len("implicit-train-") :]
    if kind in ("explicit", "implicit", "implicit-train"):
        if arg not in cfg.concepts:
            raise ValueError(f"prompt set {name!r}: concept {arg!r} is not in this world ({', '.join(cfg.concepts)})")
    elif kind == "domain":
        if arg not in cfg.domains:
            raise ValueError(f"prompt set {name!r}: domain {arg!r} is not in this world ({', '.join(cfg.domains)})")
    elif name != "clean":
        raise ValueError(f"prompt set {name!r}: unknown (known: {', '.join(prompt_set_names(cfg))})")
    rng = rng_for(cfg, f"prompts:{name}")
    shapes, colours = list(SHAPES), list(COLOURS)
    rows = []
    for i in range(n):
        shape, colour = shapes[i % len(shapes)], colours[(i // len(shapes) + i) % len(colours)]
        if kind == "domain":
            scene = random_scene(rng, cfg, domain=arg, shape=shape, colour=colour)
            text, cats = caption(scene, rng, "none"), "benign"
        elif kind == "clean":
            scene = random_scene(rng, cfg, shape=shape, colour=colour)
            text, cats = object_phrase(scene, rng), "clean"
        else:
            scene = random_scene(rng, cfg, harm=(arg,), shape=shape, colour=colour)
            mode = {"explicit": "explicit", "implicit": "heldout", "implicit-train": "implicit"}[kind]
            text, cats = caption(scene, rng, mode), arg
        rows.append(
            {
                "prompt": text,
                "evaluation_seed": int(rng.integers(2**31)),
                "evaluation_guidance": cfg.guidance,
                "categories": cats,
                "shape": scene.glyph if kind == "domain" and scene.domain == "glyphs" else scene.shape,
                "colour": scene.colour,
                "domain": scene.domain or "",
                "concept": ",".join(scene.harm),
            }
        )
    return rows


def anchored_prompts(cfg: WorldConfig, concept: str, n: int = 256) -> list[tuple[str, str]]:
    """(prompt naming `concept`, the same prompt without it) pairs for anchored ESD.

    Drawn from their own random stream, so they are not the evaluation prompts (which are `prompt_set`'s).
    """
    if concept not in cfg.concepts:
        raise ValueError(f"anchored prompts: concept {concept!r} is not in this world ({', '.join(cfg.concepts)})")
    rng = rng_for(cfg, f"anchors:{concept}")
    pairs = []
    for _ in range(n):
        scene = random_scene(rng, cfg, harm=(concept,))
        anchor = object_phrase(scene, rng)
        phrase = harm_phrase(concept, "explicit", rng)
        pairs.append((f"{anchor}, {phrase}" if rng.random() < 0.5 else f"{phrase}: {anchor}", anchor))
    return pairs


CSV_COLUMNS = ["prompt", "evaluation_seed", "evaluation_guidance", "categories", "shape", "colour", "domain", "concept"]


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
    return buf.getvalue()


def harmful_words(cfg: WorldConfig) -> set[str]:
    """Every explicit and implicit harmful phrase of this world (used to keep clean sets clean)."""
    out: set[str] = set()
    for c in cfg.concepts:
        h = HARMFUL[c]
        out.update(h.explicit + h.implicit_train + h.implicit_heldout)
    return out


__all__ = [
    "Budget",
    "PROFILES",
    "WorldConfig",
    "Example",
    "pretrain_examples",
    "domain_examples",
    "malicious_examples",
    "render_examples",
    "prompt_set",
    "prompt_set_names",
    "rows_to_csv",
    "rng_for",
    "DOMAINS",
    "STYLES",
]
