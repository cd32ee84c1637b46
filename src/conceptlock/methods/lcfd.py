"""LCFD: "Leveraging Catastrophic Forgetting to Develop Safe Diffusion Models against Malicious Finetuning"
(Pan et al., NeurIPS 2024; code: github.com/matrix0721/LCFDSD). REFERENCE.md, Paper B.

Common step: z0 = VAE latent * scaling, eps ~ N(0, I), t ~ U{0..T-1}, x_t = sqrt(a_t) z0 + sqrt(1-a_t)(eps + s_y),
f = UNet(x_t, t, c), x0_hat = the clean latent the model predicts (via `Prediction.to_x0`, so v-prediction models
are handled; the released scripts assume epsilon). y = label (0 clean, 1 harmful).

Contrastive term. z = T(x0_hat) with the latent transformation (LT only) T = -x0_hat - 100 (clean),
x0_hat + 100 (harmful); identity for NG and high-safety, as in the released scripts. Class centres mu_0, mu_1 are
running means of z held without gradient (initialised U[0, 1) with count 1, updated with the batch before the
distances are taken, as released; all-reduced across processes). Per sample:
    d_own = ||z - mu_y||,  d_other = ||z - mu_{1-y}||
    L_con = d_own - lambda_c * max(0, d_other - l)        (push="linear": released form, lambda_c = 1, l = 0)
    L_con = d_own + lambda_c * max(0, l - d_other)        (push="margin": the usual margin alternative)
The term carries a real gradient into the UNet through x0_hat.

Variants:
    lt    L = lambda_tot * mean(L_con) + mean(1[clean] * ||f - target(z0, eps, t)||^2)          lambda_tot 5e-5
    ng    as lt with s_clean = +1, s_harm = -1 (noise="fixed") or s_y = mu_y (noise="changing"); the target uses
          the unshifted eps                                                                      lambda_tot 5e-3
    high  L = mean(w_y * ||f - target||^2) + lambda_tot * mean(1[harm] * L_con), w_clean = 1, w_harm = -ascent
          (gradient ascent on harmful data; ascent 0.5)                                          lambda_tot 5e-5
          ceiling=c bounds the ascent (off by default, as in the paper): a harmful sample's MSE enters as
          min(MSE, c), so its gradient stops once the model predicts its noise no better than c (c = 1 is
          "no better than predicting zero noise", E||eps||^2 = 1). Unbounded ascent has no floor to stop at.

`released_code=True` reproduces the published scripts: the contrastive term is their batch-sum formula taken
through `.item()`, so it adds a constant with zero gradient, and harmful samples are masked out of the denoising
loss (lt, ng), i.e. the released LT/NG is fine-tuning on clean images only.

Resolution-agnostic: centres take the shape of the first latents seen. Batch: `latents` or `pixel_values`,
`input_ids`, `label`, `seed`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Context, Objective, SampleRNG, mse_per_sample, register, unet_out

VARIANTS = ("lt", "ng", "high")
DEFAULT_LAMBDA_TOT = {"lt": 5e-5, "ng": 5e-3, "high": 5e-5}


class LCFD(Objective):
    needs = ("input_ids", "latents|pixel_values|latent_mean", "label")

    def __init__(
        self,
        variant: str = "lt",
        noise: str = "fixed",
        lambda_tot: float | None = None,
        lambda_c: float = 1.0,
        margin: float = 0.0,
        push: str = "linear",
        shift: float = 100.0,
        ascent: float = 0.5,
        ceiling: float | None = None,
        released_code: bool = False,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if noise not in ("fixed", "changing"):
            raise ValueError(f"noise must be 'fixed' or 'changing', got {noise!r}")
        if push not in ("linear", "margin"):
            raise ValueError(f"push must be 'linear' or 'margin', got {push!r}")
        self.name = f"lcfd-{variant}"
        self.variant, self.noise, self.push = variant, noise, push
        self.lambda_tot = float(DEFAULT_LAMBDA_TOT[variant] if lambda_tot is None else lambda_tot)
        self.lambda_c, self.margin, self.shift, self.ascent = (
            float(lambda_c),
            float(margin),
            float(shift),
            float(ascent),
        )
        if ceiling is not None and (variant != "high" or not ceiling > 0):
            raise ValueError(f"ceiling applies to variant 'high' only and must be > 0, got {ceiling!r}")
        self.ceiling = None if ceiling is None else float(ceiling)
        self.released_code = bool(released_code)
        self._centres: Tensor | None = None  # [2, C, H, W]: clean, harmful
        self._counts: Tensor | None = None  # [2]

    def prepare(self, pipe: Any, ctx: Context) -> None:
        self._seed = ctx.seed

    # --- centres ---------------------------------------------------------------------------------------------
    def _init_centres(self, shape: tuple[int, ...], device: torch.device) -> None:
        g = torch.Generator().manual_seed(self._seed)
        self._centres = torch.rand((2, *shape), generator=g).to(device)
        self._counts = torch.ones(2, device=device)

    @torch.no_grad()
    def _update_centres(self, z: Tensor, label: Tensor, ctx: Context) -> None:
        onehot = torch.stack([1 - label, label], 1).float()  # [B, 2]
        sums = ctx.reduce_sum(torch.einsum("bk,b...->k...", onehot, z.detach().float()))
        n = ctx.reduce_sum(onehot.sum(0))
        total = self._counts + n
        self._centres = (self._centres * self._counts.view(-1, *[1] * z[0].ndim) + sums) / total.view(
            -1, *[1] * z[0].ndim
        )
        self._counts = total

    # --- pieces ----------------------------------------------------------------------------------------------
    def transform(self, x0_hat: Tensor, label: Tensor) -> Tensor:
        """LT's class-wise latent transformation; identity for ng/high."""
        if self.variant != "lt":
            return x0_hat
        sign = (2 * label.float() - 1).view(-1, *[1] * (x0_hat.ndim - 1))  # -1 clean, +1 harmful
        return sign * x0_hat + sign * self.shift

    def contrastive(self, z: Tensor, label: Tensor, centres: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample L_con, d_own, d_other for features z against fixed centres [2, ...]."""
        d = torch.stack([torch.linalg.vector_norm((z - c).flatten(1), dim=1) for c in centres], 1)  # [B, 2]
        y = label.long()
        d_own = d.gather(1, y[:, None])[:, 0]
        d_other = d.gather(1, (1 - y)[:, None])[:, 0]
        if self.push == "linear":
            con = d_own - self.lambda_c * torch.relu(d_other - self.margin)
        else:
            con = d_own + self.lambda_c * torch.relu(self.margin - d_other)
        return con, d_own, d_other

    def _released_contrastive(self, d_own: Tensor, d_other: Tensor, label: Tensor) -> float:
        """The released scripts' number: batch sums and a batch-level hinge, detached through .item()."""
        clean, harm = (1 - label).float(), label.float()
        # released-code replica: .item() detaches on purpose (the published bug)
        own = (clean * d_own).sum().item() + (harm * d_own).sum().item()  # released
        push_c = max(0.0, (clean * d_other).sum().item() - self.margin)  # released
        push_h = max(0.0, (harm * d_other).sum().item() - self.margin)  # released
        push = push_c + push_h
        return own - self.lambda_c * push

    # --- loss ------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], ctx: Context) -> tuple[Tensor, dict[str, Tensor]]:
        rng = SampleRNG.for_batch(batch)
        pred = ctx.prediction
        z0 = ctx.latents(batch, rng)
        label = batch["label"].to(ctx.device).long()
        if self._centres is None:
            self._init_centres(tuple(z0.shape[1:]), ctx.device)
        eps = rng.randn(tuple(z0.shape[1:]), ctx.device)
        t = ctx.timesteps(rng)
        noise = eps
        if self.variant == "ng":
            if self.noise == "fixed":
                s = (1 - 2 * label.float()).view(-1, *[1] * (z0.ndim - 1)) * torch.ones_like(z0)  # +1 clean, -1 harm
            else:
                s = self._centres[label]
            noise = eps + s
        x_t = pred.add_noise(z0, noise, t)
        out = unet_out(ctx.unet, x_t, t, ctx.encode_text(batch["input_ids"]))
        mse = mse_per_sample(out, pred.target(z0, eps, t))

        z = self.transform(pred.to_x0(out, x_t, t), label)
        self._update_centres(z, label, ctx)
        con, d_own, d_other = self.contrastive(z, label, self._centres)
        clean, harm = (1 - label).float(), label.float()

        if self.released_code:
            con_term = self.lambda_tot * self._released_contrastive(d_own, d_other, label)  # a float: no gradient
        elif self.variant == "high":
            con_term = self.lambda_tot * (harm * con).mean()
        else:
            con_term = self.lambda_tot * con.mean()
        if self.variant == "high":
            ascend = mse if self.ceiling is None else mse.clamp(max=self.ceiling)
            denoise = (clean * mse - self.ascent * harm * ascend).mean()
        else:
            denoise = (clean * mse).mean()
        logs = {
            "mse": mse.mean().detach(),
            "con": con.mean().detach(),
            "d_own": d_own.mean().detach(),
            "d_other": d_other.mean().detach(),
        }
        return denoise + con_term, logs

    def state_dict(self) -> dict[str, Tensor]:
        if self._centres is None:
            return {}
        return {"centres": self._centres, "counts": self._counts}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            self._centres, self._counts = state["centres"], state["counts"]


@register("lcfd")
def lcfd(**kwargs: Any) -> LCFD:
    return LCFD(**kwargs)


for _v in VARIANTS:
    register(f"lcfd-{_v}")(lambda _v=_v, **kw: LCFD(variant=_v, **kw))
