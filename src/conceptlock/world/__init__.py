"""The toy world: a miniature Stable Diffusion safety setting (see shared DESIGN.md).

Importing this package registers the `toy:NAME` prompt source: `load_prompts("toy:implicit-gore")`
reads that prompt set of the current world (`current_world()`).
"""

from __future__ import annotations

import os
from pathlib import Path

_CURRENT: Path | None = None


def set_current_world(folder: str | Path) -> None:
    """Make `folder` the world that `toy:` prompt sets and toy metrics use by default."""
    global _CURRENT
    _CURRENT = Path(folder)


def current_world() -> Path:
    """The world in use: set_current_world(), else $CONCEPTLOCK_WORLD, else the default full or quick world."""
    from ..pipelines import ConceptlockError
    from .build import default_world_dir

    if _CURRENT is not None:
        return _CURRENT
    env = os.environ.get("CONCEPTLOCK_WORLD")
    if env:
        return Path(env)
    for profile in ("full", "quick"):
        d = default_world_dir(profile)
        if (d / "world.json").is_file():
            return d
    from .shipped import materialise, shipped_meta

    if shipped_meta() is not None:  # first use: unpack the weights that ship with the package
        return materialise(default_world_dir("full"))
    raise ConceptlockError("no toy world found: run `conceptlock world build` or set CONCEPTLOCK_WORLD=DIR")


def world_of_model(model: str | Path) -> Path | None:
    """The world folder a model folder belongs to (its parent has world.json), if any."""
    p = Path(model).resolve()
    for cand in (p.parent, p.parent.parent):
        if (cand / "world.json").is_file():
            return cand
    return None


def world_for(model: str | Path | None, prompts: str | Path | None) -> Path | None:
    """The toy world in play: the model folder's, else the current one when the prompts are ``toy:``."""
    world = world_of_model(model) if model is not None else None
    if world is None and str(prompts or "").startswith("toy:"):
        world = current_world()
    return world


def safety_text(world: str | Path) -> str | None:
    """The SLD safety concept for a world: its harmful concepts' safety texts. SLD's default text (SD's list
    of I2P categories) names almost nothing the toy text encoder was trained on, so it guides nowhere."""
    from .build import read_world
    from .concepts import HARMFUL

    texts = [HARMFUL[c].safety_text for c in read_world(world)["config"]["concepts"] if c in HARMFUL]
    return ", ".join(t for t in texts if t) or None


def _toy_source(name: str):
    from ..prompts import load_prompts

    path = current_world() / "prompts" / f"{name}.csv"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.csv"))
        raise KeyError(f"toy:{name} (known: {', '.join('toy:' + k for k in known)})")
    ps = load_prompts(path)
    ps.name = f"toy:{name}"
    return ps


def _register() -> None:
    from ..prompts import register_prompt_source

    register_prompt_source("toy", _toy_source)


_register()
