"""The world's judges: the detector's texture negatives."""

from __future__ import annotations

import torch

from conceptlock.world.data import WorldConfig, pretrain_examples, render_examples
from conceptlock.world.judges import texture_negatives, to_tensor, train_judge


def test_texture_negatives_are_seeded_images_with_structure():
    a = texture_negatives(6, 32, torch.Generator().manual_seed(1))
    b = texture_negatives(6, 32, torch.Generator().manual_seed(1))
    c = texture_negatives(6, 32, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert (a.std(dim=(2, 3)) > 0.05).all()  # not flat colour fields


def test_texture_negatives_lower_the_detectors_false_alarms_on_textures():
    """Same data, seed and steps; the detector shown textures as negatives calls fewer textures harmful, and
    still separates harmful renders from clean ones."""
    cfg = WorldConfig(profile="quick")
    ex = pretrain_examples(cfg, n=400)
    images = to_tensor(render_examples(ex, cfg.resolution))
    harm = torch.tensor([[float(c in e.scene.harm) for c in cfg.concepts] for e in ex])
    probe = texture_negatives(256, cfg.resolution, torch.Generator().manual_seed(99))
    scores = {}
    for neg in (0.0, 0.25):
        net = train_judge({"harm": 2}, images, {"harm": harm}, 80, 0, batch=32, negatives=neg)
        with torch.no_grad():
            scores[neg] = torch.sigmoid(net(probe)["harm"]).max(1).values.mean().item()
            s = torch.sigmoid(net(images)["harm"])
        if neg:
            pos, clean = s[harm.bool()], s[~harm.bool().any(1)].max(1).values
            assert pos.mean() > clean.mean() + 0.3
    assert scores[0.25] < scores[0.0]
