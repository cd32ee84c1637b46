"""SDD: Safe self-Distillation Diffusion (Kim et al., "Towards Safe Self-Distillation of Internet-Scale
Text-to-Image Diffusion Models", ICML 2023 workshop; code: github.com/nannullna/safe-diffusion).

    L = || sg[ eps_theta(z_t, t, empty) ] - eps_theta(z_t, t, c_s) ||^2

The student's prediction for the concept prompt c_s is pulled to its own (stop-gradient) unconditional
prediction. z_t is sampled by an EMA teacher of the student (decay `ema_decay`, 0.999) with classifier-free
guidance `guidance` (3) from noise, conditioned on c_s, stopped after k ~ U{0, ..., ddim_steps - 1} DDIM steps;
t is the DDIM timestep z_t sits at. Both predictions are in the model's output space (eps or v): the loss is
a difference of two outputs at the same (z_t, t), so the prediction type changes only its scale.

Anchored SDD (`anchor=True`, conceptlock's addition, as anchored ESD in esd.py): concept prompts in context, and
the target is the student's own prediction for the prompt without the concept, sg[eps_theta(z_t, t, anchor)].

The teacher is a copy of the (unwrapped) student made in `prepare`; after every optimizer step its trainable
weights move towards the student's: w_T <- m w_T + (1 - m) w_S. Its weights are part of the checkpoint.
Batch: `input_ids` of concept prompts and `seed`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from .base import Context, Objective, SampleRNG, ddim_sample_until, ddim_timesteps, mse_per_sample, register, unet_out


@register("sdd")
class SDD(Objective):
    name = "sdd"
    needs = ("input_ids",)

    def __init__(self, ema_decay: float = 0.999, guidance: float = 3.0, ddim_steps: int = 50, anchor: bool = False):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay, self.guidance, self.ddim_steps = float(ema_decay), float(guidance), int(ddim_steps)
        self.anchor = bool(anchor)
        if self.anchor:
            self.needs = ("input_ids", "anchor_ids")

    def prepare(self, pipe: Any, ctx: Context) -> None:
        self._teacher = copy.deepcopy(ctx.base_unet).requires_grad_(False).eval()
        self._tparams = dict(self._teacher.named_parameters())
        self._names = [n for n, _ in ctx.trainable]
        self._uncond = ctx.encode_prompts([""])
        self._timesteps = ddim_timesteps(pipe.scheduler.config, self.ddim_steps)

    def loss(self, batch: dict[str, Any], ctx: Context) -> Tensor:
        rng = SampleRNG.for_batch(batch)
        cond = ctx.encode_text(batch["input_ids"])
        uncond = self._uncond.expand_as(cond)
        stops = rng.randint(0, self.ddim_steps)
        x = rng.randn(ctx.latent_shape, ctx.device)
        with torch.no_grad():
            z_t, t = ddim_sample_until(
                self._teacher, x, stops, cond, uncond, self.guidance, self._timesteps, ctx.prediction
            )
            ref = ctx.encode_text(batch["anchor_ids"]) if self.anchor else uncond
            target = unet_out(ctx.base_unet, z_t, t, ref)
        out = unet_out(ctx.unet, z_t, t, cond)
        return mse_per_sample(out, target).mean()

    @torch.no_grad()
    def on_step_end(self, ctx: Context) -> None:
        for n, p in ctx.trainable:
            self._tparams[n].lerp_(p.detach().to(self._tparams[n].dtype), 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"teacher.{n}": self._tparams[n] for n in self._names}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n in self._names:
                self._tparams[n].copy_(state[f"teacher.{n}"])
