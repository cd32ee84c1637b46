"""What every training objective shares: the Objective class, its registry, and the few helpers that make
prediction-type and randomness mistakes impossible by construction.

* `Prediction` is the ONLY place that knows how a UNet output relates to eps and x0. Objectives never write
  `(x_t - sqrt(1-a) * out) / sqrt(a)` themselves, so an epsilon-only assumption (the bug in the LCFD scripts,
  which compute x0 that way for v-prediction models too) cannot creep in.
* `SampleRNG` draws every random number of a sample from a stream seeded by (run seed, position of the sample in
  the data stream). The draws therefore do not depend on how a global batch is split over processes or
  accumulation steps, which is what makes 1 process == N processes and stop + resume == straight run.
* `Context` is what the trainer hands an objective: the pipeline's frozen parts, the model being trained (as the
  trainer wraps it), the device and dtype.

An objective is a small class: `prepare(pipe, ctx)` once, then `loss(batch, ctx)` per micro-batch, returning a
scalar tensor or `(tensor, {name: scalar tensor})` for extra log columns.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import encode, encode_texts, tokenizers, unet_forward
from ..conditioning import tokenize as tokenize  # re-exported: data sets and callers tokenize through here
from ..pipelines import ConceptlockError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------------------------
# Prediction types
# --------------------------------------------------------------------------------------------------------------
class Prediction:
    """Forward process and model-output conversions for one noise schedule and prediction type.

    With a_t = alphas_cumprod[t]:  x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps,  v = sqrt(a_t) eps - sqrt(1-a_t) x0.
    """

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise ConceptlockError(f"scheduler prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.kind = prediction_type
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32)
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def from_scheduler_config(cls, config: Any) -> Prediction:
        """Build from any diffusers scheduler config (betas are recomputed the DDPM way)."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(config)
        return cls(sched.alphas_cumprod, config.get("prediction_type", "epsilon"))

    def _coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        a = self.alphas_cumprod.to(like.device)[t.to(like.device).long()].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().reshape(shape), (1 - a).sqrt().reshape(shape)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        sa, s1 = self._coeffs(t, x0)
        return sa * x0 + s1 * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the model should output for clean latent x0 and noise eps at step t."""
        if self.kind == "epsilon":
            return eps
        if self.kind == "sample":
            return x0
        sa, s1 = self._coeffs(t, x0)
        return sa * eps - s1 * x0

    def to_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.kind == "epsilon":
            return out
        sa, s1 = self._coeffs(t, x_t)
        if self.kind == "sample":
            return (x_t - sa * out) / s1
        return sa * out + s1 * x_t

    def to_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.kind == "sample":
            return out
        sa, s1 = self._coeffs(t, x_t)
        if self.kind == "epsilon":
            return (x_t - s1 * out) / sa
        return sa * x_t - s1 * out

    def from_eps(self, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output that corresponds to a given eps at (x_t, t): the inverse of `to_eps`."""
        if self.kind == "epsilon":
            return eps
        sa, s1 = self._coeffs(t, x_t)
        x0 = (x_t - s1 * eps) / sa
        if self.kind == "sample":
            return x0
        return sa * eps - s1 * x0


# --------------------------------------------------------------------------------------------------------------
# Randomness that does not depend on how the batch is split
# --------------------------------------------------------------------------------------------------------------
def sample_seed(run_seed: int, position: int, stream: int = 0) -> int:
    """A 63-bit seed for the sample at `position` of the data stream of a run seeded with `run_seed`
    (`stream` separates independent uses, e.g. 1 = epoch permutations)."""
    seq = np.random.SeedSequence([run_seed & 0xFFFFFFFF, stream, position])
    return int(seq.generate_state(2, np.uint32).view(np.uint64)[0]) >> 1


class SampleRNG:
    """One torch.Generator per sample; draws are stacked into a batch. Call order defines the streams."""

    def __init__(self, seeds: Tensor | list[int]):
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    @classmethod
    def for_batch(cls, batch: dict[str, Any]) -> SampleRNG:
        """Streams from `batch['seed']` (the trainer always sets it); a batch built by hand without seeds
        draws them from torch's global RNG, so direct callers still get a valid (non-reproducible) batch."""
        if "seed" in batch:
            return cls(batch["seed"])
        n = len(batch["input_ids"])
        return cls(torch.randint(0, 2**62, (n,)))

    def __len__(self) -> int:
        return len(self.gens)

    def randn(
        self, shape: tuple[int, ...], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(device=device, dtype=dtype)

    def rand(
        self, shape: tuple[int, ...], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self.gens]).to(device=device, dtype=dtype)

    def randint(self, low: int, high: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in self.gens]).to(device)


# --------------------------------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What the trainer gives an objective. `unet` is the trained model exactly as the trainer calls it (DDP-
    wrapped under multi-process): use it for passes that need gradients. `base_unet` is the same module
    unwrapped: use it for no-grad passes (teacher targets, sampling)."""

    pipe: Any
    unet: nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    adapter: str | None = None
    trainable: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    seed: int = 0
    step: int = 0
    reduce_sum: Callable[[Tensor], Tensor] = lambda x: x  # all-reduce for state shared across processes
    _prediction: Prediction | None = None

    @property
    def base_unet(self) -> nn.Module:
        return getattr(self.unet, "module", self.unet)

    @property
    def prediction(self) -> Prediction:
        if self._prediction is None:
            self._prediction = Prediction.from_scheduler_config(self.pipe.scheduler.config)
        return self._prediction

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Latent (C, H, W) at the UNet's native sample size; used when an objective samples from noise."""
        cfg = self.base_unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor) -> Tensor:
        """Frozen text conditioning: last_hidden_state for SD 1.x/2.x, packed for SDXL (see `conditioning`)."""
        return encode(self.pipe, input_ids, self.device, self.dtype)

    def text_ids(self, texts: list[str]) -> Tensor:
        return tokenize(tokenizers(self.pipe), texts)

    def encode_prompts(self, texts: list[str]) -> Tensor:
        """Encode prompts the way the model's pipeline does (SDXL base: the empty prompt is zeros)."""
        return encode_texts(self.pipe, texts, self.device, self.dtype)

    @torch.no_grad()
    def latents(self, batch: dict[str, Any], rng: SampleRNG) -> Tensor:
        """`batch['latents']` as given, or VAE-encode `batch['pixel_values']` (in [-1, 1]) with per-sample noise."""
        if "latents" in batch:
            return batch["latents"].to(self.device, torch.float32)
        vae = self.pipe.vae
        if "latent_mean" in batch:  # train.data.CachedLatents: the posterior was computed once
            mean = batch["latent_mean"].to(self.device, self.dtype)
            std = batch["latent_std"].to(self.device, self.dtype)
        elif "pixel_values" in batch:
            dist = vae.encode(batch["pixel_values"].to(self.device, self.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        else:
            raise ConceptlockError("batch has neither 'latents' nor 'pixel_values'")
        z = mean + std * rng.randn(tuple(mean.shape[1:]), self.device, mean.dtype)
        return z.float() * vae.config.scaling_factor

    def timesteps(self, rng: SampleRNG) -> Tensor:
        return rng.randint(0, self.prediction.num_train_timesteps, self.device)


def move(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Move a module; cast only when the dtype really changes (diffusers warns on every `.to(dtype)`)."""
    module.to(device)
    if dtype is not None and next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


def unet_out(model: nn.Module, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
    """Call a (possibly wrapped) UNet on plain or packed SDXL conditioning; the raw prediction in float32."""
    return unet_forward(model, x, t, emb).float()


def mse_per_sample(a: Tensor, b: Tensor) -> Tensor:
    return F.mse_loss(a.float(), b.float(), reduction="none").flatten(1).mean(1)


# --------------------------------------------------------------------------------------------------------------
# Frozen teachers and sampling
# --------------------------------------------------------------------------------------------------------------
class FrozenTeacher:
    """The model as it was before training. A LoRA run disables the adapter for the teacher pass (no copy of
    the UNet); a full or group run keeps a frozen deep copy taken in `prepare`."""

    def __init__(self, ctx: Context):
        self.copy: nn.Module | None = None
        if ctx.adapter is None:
            self.copy = move(copy.deepcopy(ctx.base_unet).requires_grad_(False).eval(), ctx.device, ctx.dtype)

    @contextlib.contextmanager
    def __call__(self, ctx: Context) -> Iterator[nn.Module]:
        with torch.no_grad():
            if self.copy is not None:
                yield self.copy
                return
            unet = ctx.base_unet
            unet.disable_adapters()
            try:
                yield unet
            finally:
                unet.enable_adapters()


def ddim_timesteps(scheduler_config: Any, num_steps: int) -> Tensor:
    """The timesteps an SD pipeline visits with `num_steps` DDIM steps (spacing and offset from the config)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_steps)
    return sched.timesteps.clone().long()


@torch.no_grad()
def ddim_sample_until(
    model: nn.Module,
    x: Tensor,
    stops: Tensor,
    cond: Tensor,
    uncond: Tensor,
    guidance: float,
    timesteps: Tensor,
    pred: Prediction,
) -> tuple[Tensor, Tensor]:
    """Run deterministic DDIM (eta=0) with classifier-free guidance from noise `x`; sample b stops after
    `stops[b]` steps. Returns (x_t, t) with t = timesteps[stops], the noise level x_t is at."""
    stops = stops.to(x.device)
    ts = timesteps.to(x.device)
    steps = int(stops.max()) if len(stops) else 0
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        if guidance == 1.0:
            out = unet_out(model, x, t, cond)
        else:
            out_u, out_c = unet_out(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
            out = out_u + guidance * (out_c - out_u)
        x0, eps = pred.to_x0(out, x, t), pred.to_eps(out, x, t)
        t_prev = ts[i + 1].expand(x.shape[0])
        sa, s1 = pred._coeffs(t_prev, x)
        x_new = sa * x0 + s1 * eps
        active = (i < stops).reshape(-1, *([1] * (x.ndim - 1)))
        x = torch.where(active, x_new, x)
    return x, ts[stops]


# --------------------------------------------------------------------------------------------------------------
# Objective base and registry
# --------------------------------------------------------------------------------------------------------------
LossOutput = Tensor | tuple[Tensor, dict[str, Tensor]]


class Objective:
    """Base class. Subclasses set `name`, accept their settings as keyword arguments, and implement `loss`."""

    name: ClassVar[str] = ""
    #: batch keys the objective reads (the trainer checks the first batch against this)
    needs: ClassVar[tuple[str, ...]] = ("input_ids",)

    def prepare(self, pipe: Any, ctx: Context) -> None:
        """Build what the loss needs once (frozen teacher, unconditional embedding, ...)."""

    def loss(self, batch: dict[str, Any], ctx: Context) -> LossOutput:
        raise NotImplementedError

    def on_step_end(self, ctx: Context) -> None:
        """Called after every optimizer step on every process (e.g. EMA teacher updates)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that must survive a checkpoint/resume (saved as safetensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ConceptlockError(f"objective {self.name!r} has no state but the checkpoint holds some")

    def config(self) -> dict[str, Any]:
        """The resolved settings, for the run's config JSON."""
        return {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and isinstance(v, int | float | str | bool | type(None) | list | tuple)
        }


_REGISTRY: dict[str, Callable[..., Objective]] = {}
_METHOD_MODULES = ("finetune", "esd", "sdd", "lcfd")


def register(name: str) -> Callable:
    """Class decorator (or factory registration) adding an objective under `name`."""

    def deco(obj: Callable[..., Objective]) -> Callable[..., Objective]:
        _REGISTRY[name] = obj
        return obj

    return deco


def objective_names() -> list[str]:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"conceptlock.methods.{mod}")
    return sorted(_REGISTRY)


def get_objective(name: str, **kwargs: Any) -> Objective:
    """Build a registered objective; unknown names or settings are one-line errors."""
    names = objective_names()
    if name not in _REGISTRY:
        raise ConceptlockError(f"unknown objective {name!r}; choose one of {', '.join(names)}")
    try:
        return _REGISTRY[name](**kwargs)
    except (TypeError, ValueError) as e:  # unknown keyword or a bad value: one line naming the objective
        raise ConceptlockError(f"objective {name!r}: {e}") from None
