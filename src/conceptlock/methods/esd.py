"""ESD: Erased Stable Diffusion (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023).

    L = || eps_theta(x_t, c, t) - [ eps_0(x_t, t) - eta (eps_0(x_t, c, t) - eps_0(x_t, t)) ] ||^2

eps_0 is the frozen original model, c the concept prompt, eta the negative-guidance strength. x_t comes from a
partial DDIM run of the frozen model conditioned on c (with classifier-free guidance `start_guidance`, 3 in ESD's
code) from pure noise, stopped after k ~ U{0, ..., ddim_steps - 1} steps; t is the DDIM timestep x_t sits at
(the consistent choice of ESD's diffusers rewrite; the original CompVis script drew a DDPM t from a mismatched
interval).

Prediction types: the target is built in eps space through `Prediction` and converted back to the model's own
output space, so for v-prediction models the loss is || v_theta - v(target) ||^2. Because eps is affine in the
model output with the same x_t term, the target in v space is v_0 - eta (v_0c - v_0): the equation holds in both.

Anchored ESD (`anchor=True`, an addition of conceptlock's): the concept is trained in context, on prompts that
name it beside other content ("a blue pyramid, covered in blood"), and the reference is the frozen model on the
same prompt without the concept (the anchor, "a blue pyramid") instead of the empty prompt:
    target = eps_0(x_t, a, t) - eta (eps_0(x_t, c, t) - eps_0(x_t, a, t))
Why: plain ESD's reference, the empty prompt, carries no content, so negative guidance away from the concept can
land on a neighbouring concept (on the toy world a gore-erased LoRA drew fire on 9% of gore prompts); the anchor
keeps the rest of the prompt and pushes only the concept away, as Concept Ablation's anchor prompts (Kumari et
al., ICCV 2023) and UCE's guide concepts do. x_t is still sampled from the concept prompt with CFG against the
empty prompt. Needs `anchor_ids` in the batch (`PromptDataset(..., anchors=)`).

Teacher: a LoRA run disables the adapter for the teacher passes (no UNet copy); full/group runs keep a frozen copy.
Batch: `input_ids` of concept prompts (see `conceptlock.train.data.PromptDataset`) and `seed`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import (
    Context,
    FrozenTeacher,
    Objective,
    Prediction,
    SampleRNG,
    ddim_sample_until,
    ddim_timesteps,
    mse_per_sample,
    register,
    unet_out,
)


def esd_target_eps(eps_uncond: Tensor, eps_cond: Tensor, eta: float) -> Tensor:
    """ESD's regression target in eps space: eps_0(x_t, t) - eta * (eps_0(x_t, c, t) - eps_0(x_t, t))."""
    return eps_uncond - eta * (eps_cond - eps_uncond)


def esd_target(pred: Prediction, out_uncond: Tensor, out_cond: Tensor, x_t: Tensor, t: Tensor, eta: float) -> Tensor:
    """ESD target in the model's output space, from the frozen model's raw outputs."""
    eps = esd_target_eps(pred.to_eps(out_uncond, x_t, t), pred.to_eps(out_cond, x_t, t), eta)
    return pred.from_eps(eps, x_t, t)


@register("esd")
class ESD(Objective):
    name = "esd"
    needs = ("input_ids",)

    def __init__(self, eta: float = 1.0, ddim_steps: int = 50, start_guidance: float = 3.0, anchor: bool = False):
        self.eta, self.ddim_steps, self.start_guidance = float(eta), int(ddim_steps), float(start_guidance)
        if self.ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {ddim_steps}")
        self.anchor = bool(anchor)
        if self.anchor:
            self.needs = ("input_ids", "anchor_ids")

    def prepare(self, pipe: Any, ctx: Context) -> None:
        self._teacher = FrozenTeacher(ctx)
        self._uncond = ctx.encode_prompts([""])
        self._timesteps = ddim_timesteps(pipe.scheduler.config, self.ddim_steps)

    def loss(self, batch: dict[str, Any], ctx: Context) -> tuple[Tensor, dict[str, Tensor]]:
        rng = SampleRNG.for_batch(batch)
        cond = ctx.encode_text(batch["input_ids"])
        uncond = self._uncond.expand_as(cond)
        stops = rng.randint(0, self.ddim_steps)
        x = rng.randn(ctx.latent_shape, ctx.device)
        with self._teacher(ctx) as frozen:
            x_t, t = ddim_sample_until(
                frozen, x, stops, cond, uncond, self.start_guidance, self._timesteps, ctx.prediction
            )
            # the reference: the empty prompt, or (anchored) the prompt without the concept
            ref = ctx.encode_text(batch["anchor_ids"]) if self.anchor else uncond
            out_r, out_c = unet_out(frozen, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([ref, cond])).chunk(2)
            target = esd_target(ctx.prediction, out_r, out_c, x_t, t, self.eta)
        out = unet_out(ctx.unet, x_t, t, cond)
        return mse_per_sample(out, target).mean(), {"t": t.float().mean()}
