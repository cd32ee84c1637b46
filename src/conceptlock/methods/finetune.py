"""Plain denoising fine-tuning (benign or malicious; also the Modular-LoRA task adapter).

    L = E_{z0, c, eps, t} || f_theta(x_t, t, c) - target(z0, eps, t) ||^2,   x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps

where target is eps for epsilon models and v = sqrt(a_t) eps - sqrt(1 - a_t) z0 for v-prediction models (Ho et al.
2020; Salimans & Ho 2022), exactly as diffusers' `train_text_to_image.py`. The batch gives `latents` or
`pixel_values`, and `input_ids`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import Context, Objective, SampleRNG, mse_per_sample, register, unet_out


@register("finetune")
class Finetune(Objective):
    name = "finetune"
    needs = ("input_ids", "latents|pixel_values|latent_mean")

    def loss(self, batch: dict[str, Any], ctx: Context) -> Tensor:
        rng = SampleRNG.for_batch(batch)
        z0 = ctx.latents(batch, rng)
        eps = rng.randn(tuple(z0.shape[1:]), ctx.device)
        t = ctx.timesteps(rng)
        pred = ctx.prediction
        x_t = pred.add_noise(z0, eps, t)
        out = unet_out(ctx.unet, x_t, t, ctx.encode_text(batch["input_ids"]))
        return mse_per_sample(out, pred.target(z0, eps, t)).mean()
