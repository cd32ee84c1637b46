"""Toy-world metrics: same interface as the real ones, judged by the world's judges and toy CLIP."""

from __future__ import annotations

import numpy as np
import pytest

from conceptlock.errors import ConceptlockError
from conceptlock.metrics import get_metric
from conceptlock.world.data import WorldConfig, malicious_examples, prompt_set, render_examples
from conceptlock.world.render import Scene, render


def _clean_rows_and_renders(n: int = 16):
    from conceptlock.world.data import random_scene, rng_for

    cfg = WorldConfig(profile="quick")
    rows = prompt_set(cfg, "clean", n)
    rng = rng_for(cfg, "test-metrics")
    imgs = np.stack([render(random_scene(rng, cfg, shape=r["shape"], colour=r["colour"])) for r in rows])
    return rows, imgs


def test_toy_metrics_share_the_metric_interface(micro_world):
    rows, imgs = _clean_rows_and_renders()
    prompts = [r["prompt"] for r in rows]
    for name in ("toy_harm", "toy_fidelity", "toy_clip_score", "toy_fid"):
        m = get_metric(name, world=str(micro_world))
        m.update(imgs[:8], prompts[:8], rows[:8])
        m.update(imgs[8:], prompts[8:], rows[8:])
        r = m.compute()
        assert r.name == name and r.n == 16 and np.isfinite(r.value)
        if r.ci_low is not None:
            assert r.ci_low <= r.value <= r.ci_high
        assert r.to_dict()["n"] == 16


def test_toy_fidelity_needs_rows_and_harm_knows_its_concepts(micro_world):
    _, imgs = _clean_rows_and_renders(4)
    with pytest.raises(ConceptlockError, match="rows"):
        get_metric("toy_fidelity", world=str(micro_world)).update(imgs)
    with pytest.raises(ConceptlockError, match="not in world"):
        get_metric("toy_harm", world=str(micro_world), concept="nudity")


def test_toy_prompt_source_reads_the_current_world(micro_world):
    import conceptlock.world as world
    from conceptlock.prompts import load_prompts

    world.set_current_world(micro_world)
    ps = load_prompts("toy:implicit-gore")
    assert len(ps) == 8 and ps[0].extra["concept"] == "gore" and ps[0].guidance == 4.0
    with pytest.raises(ConceptlockError, match="toy:clean"):
        load_prompts("toy:no-such-set")


@pytest.mark.slow
def test_quick_world_judges_separate_harmful_from_clean_renders(quick_world):
    cfg = WorldConfig(profile="quick")
    harmful = render_examples(malicious_examples(cfg, "gore", 64, purpose="metric-test"), 32)
    rows, clean = _clean_rows_and_renders(64)
    m = get_metric("toy_harm", world=str(quick_world), concept="gore")
    m.update(harmful)
    assert m.compute().value > 0.8
    m = get_metric("toy_harm", world=str(quick_world))
    m.update(clean)
    assert m.compute().value < 0.1
    fid = get_metric("toy_fidelity", world=str(quick_world))
    fid.update(clean, [r["prompt"] for r in rows], rows)
    assert fid.compute().value > 0.5
    # fire is a different concept: the gore-only metric does not count it
    fire = np.stack([render(Scene(shape="circle", colour="blue", harm=("fire",), seed=i)) for i in range(32)])
    m = get_metric("toy_harm", world=str(quick_world), concept="gore")
    m.update(fire)
    assert m.compute().value < 0.2
