"""Objectives: prediction-type conversions, ESD's target, LCFD's contrastive gradient (and the released-code
zero gradient), SDD's EMA teacher, and the registry's errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conceptlock.methods.base import (
    Context,
    Prediction,
    SampleRNG,
    ddim_sample_until,
    ddim_timesteps,
    get_objective,
    objective_names,
    tokenize,
)
from conceptlock.methods.esd import esd_target, esd_target_eps
from conceptlock.pipelines import ConceptlockError, tiny_pipeline
from conceptlock.train.params import apply_params


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPUs are shared: one intra-op thread is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


G = torch.Generator().manual_seed(0)
X0 = torch.randn(3, 4, 8, 8, generator=G)
EPS = torch.randn(3, 4, 8, 8, generator=G)
T = torch.tensor([0, 400, 999])


def _tiny(kind: str = "epsilon", **kw):
    """tiny_pipeline with the scheduler's prediction type forced (pipelines.tiny_pipeline currently drops it:
    `DDIMScheduler.from_config` resets values registered after init that were listed as defaults)."""
    pipe = tiny_pipeline(0, prediction_type=kind, **kw)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=kind)
    assert pipe.scheduler.config.prediction_type == kind
    return pipe


def _pred(kind: str) -> Prediction:
    return Prediction.from_scheduler_config(_tiny(kind).scheduler.config)


# ----------------------------------------------------------------------------------------------- prediction types
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_round_trip(kind):
    pred = _pred(kind)
    ddpm = DDPMScheduler.from_config(tiny_pipeline(0).scheduler.config)
    x_t = pred.add_noise(X0, EPS, T)
    assert torch.allclose(x_t, ddpm.add_noise(X0, EPS, T), atol=1e-5)
    out = pred.target(X0, EPS, T)
    expected = {"epsilon": EPS, "v_prediction": ddpm.get_velocity(X0, EPS, T), "sample": X0}[kind]
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(pred.to_eps(out, x_t, T), EPS, atol=1e-3)
    assert torch.allclose(pred.to_x0(out, x_t, T), X0, atol=1e-3)
    assert torch.allclose(pred.from_eps(EPS, x_t, T), out, atol=1e-3)


def test_v_prediction_formulas_by_hand():
    pred = _pred("v_prediction")
    a = pred.alphas_cumprod[T].view(-1, 1, 1, 1)
    x_t = a.sqrt() * X0 + (1 - a).sqrt() * EPS
    v = a.sqrt() * EPS - (1 - a).sqrt() * X0
    assert torch.allclose(pred.to_x0(v, x_t, T), a.sqrt() * x_t - (1 - a).sqrt() * v, atol=1e-6)
    assert torch.allclose(pred.to_x0(v, x_t, T), X0, atol=1e-5)
    assert torch.allclose(pred.to_eps(v, x_t, T), EPS, atol=1e-5)


def test_unknown_prediction_type_is_an_error():
    with pytest.raises(ConceptlockError, match="prediction_type"):
        Prediction(torch.ones(10), "flow")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_helper_matches_diffusers_scheduler(kind):
    """Our partial DDIM run (used by ESD and SDD) equals diffusers' DDIMScheduler, for both prediction types."""
    pipe = _tiny(kind)
    pred = Prediction.from_scheduler_config(pipe.scheduler.config)
    assert pred.kind == kind
    ts = ddim_timesteps(pipe.scheduler.config, 5)
    ids = tokenize(pipe.tokenizer, ["a red circle"])
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours, t = ddim_sample_until(pipe.unet, x, torch.tensor([3]), cond, cond, 1.0, ts, pred)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(5)
    ref = x
    with torch.no_grad():
        for step_t in sched.timesteps[:3]:
            ref = sched.step(pipe.unet(ref, step_t, cond).sample, step_t, ref).prev_sample
    assert int(t) == int(sched.timesteps[3])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_ddim_helper_stops_each_sample_at_its_own_step():
    pipe = tiny_pipeline(0)
    pred = Prediction.from_scheduler_config(pipe.scheduler.config)
    ts = ddim_timesteps(pipe.scheduler.config, 4)
    cond = torch.zeros(2, 77, 32)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    both, t = ddim_sample_until(pipe.unet, x, torch.tensor([0, 2]), cond, cond, 2.0, ts, pred)
    alone, _ = ddim_sample_until(pipe.unet, x[1:], torch.tensor([2]), cond[1:], cond[1:], 2.0, ts, pred)
    assert torch.equal(both[0], x[0]) and torch.equal(t, ts[torch.tensor([0, 2])])
    assert torch.allclose(both[1], alone[0], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------- ESD
def test_esd_target_matches_equation_on_hand_made_tensors():
    e0 = torch.tensor([1.0, -2.0, 0.5])
    ec = torch.tensor([3.0, 0.0, 0.5])
    # eps0 - eta (eps_c - eps0) with eta = 2
    assert torch.equal(esd_target_eps(e0, ec, 2.0), torch.tensor([1.0 - 4.0, -2.0 - 4.0, 0.5]))
    assert torch.equal(esd_target_eps(e0, ec, 0.0), e0)


def test_esd_target_in_v_space_is_the_eps_equation():
    pred = _pred("v_prediction")
    x_t = pred.add_noise(X0, EPS, T)
    eps_u, eps_c = EPS, torch.randn(EPS.shape, generator=G)
    v_u, v_c = pred.from_eps(eps_u, x_t, T), pred.from_eps(eps_c, x_t, T)
    target_v = esd_target(pred, v_u, v_c, x_t, T, eta=1.5)
    assert torch.allclose(pred.to_eps(target_v, x_t, T), eps_u - 1.5 * (eps_c - eps_u), atol=1e-4)
    assert torch.allclose(target_v, v_u - 1.5 * (v_c - v_u), atol=1e-4)  # linear in the output space too


def _ctx(pipe, spec: str) -> Context:
    trainable = apply_params(pipe.unet, spec)
    return Context(
        pipe=pipe, unet=pipe.unet, trainable=trainable, adapter=spec[5:] if spec.startswith("lora:") else None
    )


@pytest.mark.parametrize("spec,kind", [("xattn", "epsilon"), ("lora:safety", "epsilon"), ("xattn", "v_prediction")])
def test_esd_loss_equals_manual_computation_and_teacher_is_frozen(spec, kind):
    """For v models the target is v_0 - eta (v_c - v_0): the eps equation mapped through the (affine) conversion."""
    pipe = _tiny(kind)
    original = _tiny(kind).unet
    ctx = _ctx(pipe, spec)
    obj = get_objective("esd", eta=2.0, ddim_steps=4)
    obj.prepare(pipe, ctx)
    with torch.no_grad():  # make the student differ from the teacher
        for _, p in ctx.trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=G))
    ids = tokenize(pipe.tokenizer, ["fire"])
    batch = {"input_ids": ids, "seed": torch.tensor([1234])}
    loss, _ = obj.loss(batch, ctx)
    # by hand, with the ORIGINAL model as eps_0
    rng = SampleRNG([1234])
    stop = rng.randint(0, 4)
    x = rng.randn((4, 16, 16))
    with torch.no_grad():
        c, u = pipe.text_encoder(ids)[0], pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0]
        pred = Prediction.from_scheduler_config(pipe.scheduler.config)
        x_t, t = ddim_sample_until(original, x, stop, c, u, 3.0, ddim_timesteps(pipe.scheduler.config, 4), pred)
        e0, ep = original(x_t, t, u).sample, original(x_t, t, c).sample
        en = pipe.unet(x_t, t, c).sample
    assert torch.allclose(loss, ((en - (e0 - 2.0 * (ep - e0))) ** 2).mean(), rtol=1e-4)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in ctx.trainable[:4])


def test_anchored_esd_regresses_towards_the_anchor_prompt_not_the_empty_one():
    """target = eps_0(x_t, a) - eta (eps_0(x_t, c) - eps_0(x_t, a)); x_t still sampled with CFG against ''."""
    pipe = _tiny()
    original = _tiny().unet
    ctx = _ctx(pipe, "lora:safety")
    obj = get_objective("esd", eta=1.5, ddim_steps=4, anchor=True)
    assert "anchor_ids" in obj.needs
    obj.prepare(pipe, ctx)
    with torch.no_grad():
        for _, p in ctx.trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=G))
    ids, aids = tokenize(pipe.tokenizer, ["a red circle, on fire"]), tokenize(pipe.tokenizer, ["a red circle"])
    loss, _ = obj.loss({"input_ids": ids, "anchor_ids": aids, "seed": torch.tensor([77])}, ctx)
    rng = SampleRNG([77])
    stop = rng.randint(0, 4)
    x = rng.randn((4, 16, 16))
    with torch.no_grad():
        enc = lambda i: pipe.text_encoder(i)[0]  # noqa: E731
        c, u, a = enc(ids), enc(tokenize(pipe.tokenizer, [""])), enc(aids)
        pred = Prediction.from_scheduler_config(pipe.scheduler.config)
        x_t, t = ddim_sample_until(original, x, stop, c, u, 3.0, ddim_timesteps(pipe.scheduler.config, 4), pred)
        ea, ep, e0 = original(x_t, t, a).sample, original(x_t, t, c).sample, original(x_t, t, u).sample
        en = pipe.unet(x_t, t, c).sample
    assert torch.allclose(loss, ((en - (ea - 1.5 * (ep - ea))) ** 2).mean(), rtol=1e-4)
    assert not torch.allclose(loss, ((en - (e0 - 1.5 * (ep - e0))) ** 2).mean(), rtol=1e-3)  # not plain ESD
    with pytest.raises(ConceptlockError, match="anchor_ids"):  # a batch without anchors is refused by the trainer
        from conceptlock.train.trainer import _check_batch

        _check_batch({"input_ids": ids, "seed": torch.tensor([77])}, obj)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_finetune_regresses_the_prediction_type_target(kind):
    pipe = _tiny(kind)
    ctx = _ctx(pipe, "xattn")
    obj = get_objective("finetune")
    z0 = torch.randn(2, 4, 16, 16, generator=G)
    ids = tokenize(pipe.tokenizer, ["a", "b"])
    loss = obj.loss({"latents": z0, "input_ids": ids, "seed": torch.tensor([3, 4])}, ctx)
    rng = SampleRNG([3, 4])  # same draw order as the objective: noise, then timesteps
    eps, t = rng.randn((4, 16, 16)), rng.randint(0, 1000)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    target = ddpm.get_velocity(z0, eps, t) if kind == "v_prediction" else eps
    with torch.no_grad():
        out = pipe.unet(ddpm.add_noise(z0, eps, t), t, pipe.text_encoder(ids)[0]).sample
    assert torch.allclose(loss, ((out - target) ** 2).mean(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------- LCFD
def _lcfd_grads(pipe_seed: int, labels: list[int], **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pipe = tiny_pipeline(pipe_seed, resolution=24)  # 12x12 latents: nothing assumes a resolution
    ctx = _ctx(pipe, "full")
    obj = get_objective("lcfd", **kw)
    obj.prepare(pipe, ctx)
    n = len(labels)
    batch = {
        "latents": torch.randn(n, 4, 12, 12, generator=torch.Generator().manual_seed(5)),
        "input_ids": tokenize(pipe.tokenizer, ["a red circle"] * n),
        "label": torch.tensor(labels),
        "seed": torch.arange(n) + 100,
    }
    loss, _ = obj.loss(batch, ctx)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in ctx.trainable if p.grad is not None}


def _diff(a: dict, b: dict) -> float:
    return sum((a[k] - b[k]).abs().sum().item() for k in a)


@pytest.mark.parametrize("variant", ["lt", "ng", "high"])
def test_lcfd_contrastive_term_has_real_gradient(variant):
    _, g0 = _lcfd_grads(0, [0, 1], variant=variant, lambda_tot=0.0)
    _, g1 = _lcfd_grads(0, [0, 1], variant=variant, lambda_tot=1e-2)
    assert _diff(g0, g1) > 0
    assert (g0["conv_out.weight"] - g1["conv_out.weight"]).abs().sum() > 0  # reaches UNet weights


@pytest.mark.parametrize("variant", ["lt", "ng", "high"])
def test_lcfd_released_code_contrastive_contributes_exactly_zero_gradient(variant):
    l0, g0 = _lcfd_grads(0, [0, 1], variant=variant, lambda_tot=0.0, released_code=True)
    l1, g1 = _lcfd_grads(0, [0, 1], variant=variant, lambda_tot=1e-2, released_code=True)
    assert _diff(g0, g1) == 0.0
    assert not torch.equal(l0, l1)  # the term is there, as a constant


@pytest.mark.parametrize("released", [False, True])
def test_lcfd_lt_masks_harmful_samples_out_of_denoising(released):
    _, g = _lcfd_grads(0, [1, 1], variant="lt", lambda_tot=0.0, released_code=released)
    assert _diff(g, {k: torch.zeros_like(v) for k, v in g.items()}) == 0.0


def test_lcfd_high_ascends_on_harmful_samples():
    _, g_clean = _lcfd_grads(0, [0], variant="high", lambda_tot=0.0)
    _, g_harm = _lcfd_grads(0, [1], variant="high", lambda_tot=0.0, ascent=0.5)
    for k in g_clean:
        assert torch.allclose(g_harm[k], -0.5 * g_clean[k], atol=1e-7)


def test_lcfd_high_ceiling_stops_the_ascent_once_a_sample_is_forgotten():
    _, g_free = _lcfd_grads(0, [0, 1], variant="high", lambda_tot=0.0)
    _, g_loose = _lcfd_grads(0, [0, 1], variant="high", lambda_tot=0.0, ceiling=1e6)  # never reached
    assert _diff(g_free, g_loose) == 0.0
    _, g_clean = _lcfd_grads(0, [0, 1], variant="high", lambda_tot=0.0, ascent=0.0)
    _, g_done = _lcfd_grads(0, [0, 1], variant="high", lambda_tot=0.0, ceiling=1e-6)  # already past it
    assert _diff(g_clean, g_done) < 1e-6 * sum(v.abs().sum().item() for v in g_clean.values())
    assert _diff(g_free, g_done) > 0
    with pytest.raises(ValueError, match="ceiling"):
        get_objective("lcfd-lt", ceiling=1.0)


def test_lcfd_pieces_on_hand_made_tensors():
    obj = get_objective("lcfd-lt", lambda_c=2.0, margin=1.0)
    x = torch.full((2, 1, 2, 2), 3.0)
    label = torch.tensor([0, 1])
    z = obj.transform(x, label)
    assert torch.equal(z[0], torch.full((1, 2, 2), -103.0)) and torch.equal(z[1], torch.full((1, 2, 2), 103.0))
    centres = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    feats = torch.stack([torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)])
    con, d_own, d_other = obj.contrastive(feats, label, centres)
    # sample 0 (clean): own 0, other ||0 - 1|| = 2; sample 1 (harm): own 2, other 0
    assert torch.allclose(d_own, torch.tensor([0.0, 2.0])) and torch.allclose(d_other, torch.tensor([2.0, 0.0]))
    assert torch.allclose(con, torch.tensor([0.0 - 2.0 * (2.0 - 1.0), 2.0 - 0.0]))
    margin = get_objective("lcfd-lt", lambda_c=2.0, margin=3.0, push="margin")
    con_m, _, _ = margin.contrastive(feats, label, centres)
    assert torch.allclose(con_m, torch.tensor([0.0 + 2.0 * 1.0, 2.0 + 2.0 * 3.0]))


def test_lcfd_centres_are_running_means_without_gradient():
    pipe = tiny_pipeline(0)
    ctx = _ctx(pipe, "xattn")
    obj = get_objective("lcfd-ng", noise="changing")
    obj.prepare(pipe, ctx)
    batch = {
        "latents": torch.randn(2, 4, 16, 16, generator=G),
        "input_ids": tokenize(pipe.tokenizer, ["a", "b"]),
        "label": torch.tensor([0, 0]),
        "seed": torch.tensor([1, 2]),
    }
    obj.loss(batch, ctx)
    state = obj.state_dict()
    assert torch.equal(state["counts"], torch.tensor([3.0, 1.0]))  # 1 (init) + 2 clean, harmful untouched
    assert not state["centres"].requires_grad


# ------------------------------------------------------------------------------------------------------------ SDD
def test_sdd_teacher_is_an_ema_of_the_student():
    pipe = tiny_pipeline(0)
    ctx = _ctx(pipe, "xattn-kv")
    obj = get_objective("sdd", ema_decay=0.9, ddim_steps=3)
    obj.prepare(pipe, ctx)
    name, p = ctx.trainable[0]
    before = obj.state_dict()[f"teacher.{name}"].clone()
    with torch.no_grad():
        p.add_(1.0)
    obj.on_step_end(ctx)
    assert torch.allclose(obj.state_dict()[f"teacher.{name}"], 0.9 * before + 0.1 * p.detach(), atol=1e-6)
    loss = obj.loss({"input_ids": tokenize(pipe.tokenizer, ["fire"]), "seed": torch.tensor([7])}, ctx)
    loss.backward()
    assert p.grad is not None and torch.isfinite(loss)


def test_anchored_sdd_pulls_the_concept_prompt_to_the_students_anchor_prediction():
    pipe = tiny_pipeline(0)
    ctx = _ctx(pipe, "xattn")
    obj = get_objective("sdd", ddim_steps=3, anchor=True)
    obj.prepare(pipe, ctx)
    ids, aids = tokenize(pipe.tokenizer, ["a dog, on fire"]), tokenize(pipe.tokenizer, ["a dog"])
    loss = obj.loss({"input_ids": ids, "anchor_ids": aids, "seed": torch.tensor([9])}, ctx)
    rng = SampleRNG([9])
    stop = rng.randint(0, 3)
    x = rng.randn((4, 16, 16))
    with torch.no_grad():
        c, u, a = (pipe.text_encoder(i)[0] for i in (ids, tokenize(pipe.tokenizer, [""]), aids))
        pred = Prediction.from_scheduler_config(pipe.scheduler.config)
        z_t, t = ddim_sample_until(obj._teacher, x, stop, c, u, 3.0, ddim_timesteps(pipe.scheduler.config, 3), pred)
        target = pipe.unet(z_t, t, a).sample
    out = pipe.unet(z_t, t, c).sample
    assert torch.allclose(loss, ((out - target) ** 2).mean(), rtol=1e-4)
    loss.backward()  # the gradient flows through the concept branch only (the anchor target is detached)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in ctx.trainable)


# ------------------------------------------------------------------------------------------------------- registry
def test_registry_names_and_errors():
    assert {"finetune", "esd", "sdd", "lcfd", "lcfd-lt", "lcfd-ng", "lcfd-high"} <= set(objective_names())
    with pytest.raises(ConceptlockError, match="unknown objective") as e:
        get_objective("esdd")
    assert "\n" not in str(e.value)
    with pytest.raises(ConceptlockError, match="esd"):
        get_objective("esd", etaa=1.0)
    with pytest.raises(ConceptlockError):
        get_objective("lcfd", variant="xx")
