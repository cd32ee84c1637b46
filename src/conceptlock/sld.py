"""Safe Latent Diffusion (SLD, Schramowski et al. 2023) as an inference mode for any SD pipeline.

Why a separate denoising loop and not ``StableDiffusionPipelineSafe``: that pipeline is a fork of
SD's (deprecated in diffusers), so it cannot run a pipeline someone else built, with LoRA
adapters loaded, a v-prediction scheduler or adversarial ``prompt_embeds``. `sld_generate` reuses
the pipeline's own parts (``encode_prompt``, ``prepare_latents``, its scheduler, VAE and image
processor) and only replaces the guidance step, so it works on every ``StableDiffusionPipeline``,
toy included, without patching ``Pipeline.__call__``.

The guidance is diffusers' (equations 3-8 of the paper), in noise (epsilon) space::

    g      = eps_text - eps_uncond                                         (CFG direction)
    scale  = clamp(|eps_text - eps_safety| * s_S, max=1)                   (eq. 6)
    mu     = where(eps_text - eps_safety >= threshold, 0, scale)           (eq. 6)
    gamma  = mu * (eps_safety - eps_uncond) + s_m * nu                      (eq. 4, 7)
    nu     = beta_m * nu + (1 - beta_m) * gamma                             (eq. 8)
    eps    = eps_uncond + s_g * (g - gamma)   if step >= warm-up, else eps_uncond + s_g * g (eq. 3)

The momentum ``nu`` builds up during the warm-up too, as in diffusers. For a model whose scheduler
predicts v or x0, the three outputs are converted to epsilon with `methods.base.Prediction`, the
guidance is applied there (the threshold and scale are defined on noise estimates) and the result
is converted back; for epsilon models this is the identity, so the output equals
``StableDiffusionPipelineSafe`` (tested on a tiny model).

Use from the generation engine: ``generate(..., options={"sld": "MAX", "sld_concept": "..."})`` (and
``run_evaluate(options=...)``) dispatch here; the per-preset values can be overridden with the
diffusers keyword names (``sld_guidance_scale``, ``sld_warmup_steps``, ``sld_threshold``,
``sld_momentum_scale``, ``sld_mom_beta``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .errors import ConceptlockError

__all__ = [
    "DEFAULT_SAFETY_TEXT",
    "SLD_PRESETS",
    "SLDConfig",
    "SLDOutput",
    "get_sld_preset",
    "resolve_sld",
    "sld_guidance",
    "sld_pipeline_call",
    "sld_generate",
]

#: The safety concept SLD ships with (the I2P categories), as in diffusers' safe pipeline.
DEFAULT_SAFETY_TEXT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
    "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, "
    "brutality, cruelty"
)


@dataclass(frozen=True)
class SLDConfig:
    """One SLD setting: warm-up steps, safety guidance scale s_S, threshold, momentum s_m and beta_m."""

    warmup_steps: int
    guidance_scale: float
    threshold: float
    momentum_scale: float
    mom_beta: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


#: The published presets (paper table 1; diffusers' ``SafetyConfig``).
SLD_PRESETS: dict[str, SLDConfig] = {
    "WEAK": SLDConfig(warmup_steps=15, guidance_scale=20, threshold=0.0, momentum_scale=0.0, mom_beta=0.0),
    "MEDIUM": SLDConfig(warmup_steps=10, guidance_scale=1000, threshold=0.01, momentum_scale=0.3, mom_beta=0.4),
    "STRONG": SLDConfig(warmup_steps=7, guidance_scale=2000, threshold=0.025, momentum_scale=0.5, mom_beta=0.7),
    "MAX": SLDConfig(warmup_steps=0, guidance_scale=5000, threshold=1.0, momentum_scale=0.5, mom_beta=0.7),
}

# diffusers keyword -> SLDConfig field: the override names accepted in generation options.
_OVERRIDES = {
    "sld_warmup_steps": "warmup_steps",
    "sld_guidance_scale": "guidance_scale",
    "sld_threshold": "threshold",
    "sld_momentum_scale": "momentum_scale",
    "sld_mom_beta": "mom_beta",
}
SLD_OPTION_KEYS = ("sld", "sld_concept", *_OVERRIDES)


def get_sld_preset(name: str | SLDConfig) -> SLDConfig:
    """A preset by (case-insensitive) name; an unknown name is a one-line error."""
    if isinstance(name, SLDConfig):
        return name
    key = str(name).strip().upper()
    if key not in SLD_PRESETS:
        raise ConceptlockError(f"unknown SLD preset {name!r} (choose one of {', '.join(SLD_PRESETS)})")
    return SLD_PRESETS[key]


def resolve_sld(options: dict[str, Any]) -> tuple[SLDConfig, str]:
    """(config, safety text) from generation options ``{"sld": PRESET, "sld_concept": TEXT, overrides}``."""
    cfg = get_sld_preset(options["sld"])
    over = {}
    for key, fld in _OVERRIDES.items():
        if options.get(key) is not None:
            try:
                over[fld] = type(getattr(cfg, fld))(options[key])
            except (TypeError, ValueError):
                raise ConceptlockError(f"SLD option {key}={options[key]!r} is not a number") from None
    cfg = replace(cfg, **over) if over else cfg
    if not 0.0 <= cfg.mom_beta <= 1.0:
        raise ConceptlockError(f"SLD mom_beta must be in [0, 1], got {cfg.mom_beta}")
    text = options.get("sld_concept")
    text = DEFAULT_SAFETY_TEXT if text is None else str(text)
    if not text.strip():
        raise ConceptlockError("--sld-concept: the safety concept text is empty")
    return cfg, text


def sld_guidance(
    eps_uncond: Tensor,
    eps_text: Tensor,
    eps_safety: Tensor,
    guidance_scale: float,
    cfg: SLDConfig,
    step: int,
    momentum: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One SLD guidance step (noise space): returns (guided eps, new momentum). Pure, so testable alone."""
    if momentum is None:
        momentum = torch.zeros_like(eps_text)
    guide = eps_text - eps_uncond
    diff = eps_text - eps_safety
    scale = torch.clamp(diff.abs() * cfg.guidance_scale, max=1.0)
    mu = torch.where(diff >= cfg.threshold, torch.zeros_like(scale), scale)
    gamma = (eps_safety - eps_uncond) * mu + cfg.momentum_scale * momentum
    momentum = cfg.mom_beta * momentum + (1 - cfg.mom_beta) * gamma
    if step >= cfg.warmup_steps:
        guide = guide - gamma
    return eps_uncond + guidance_scale * guide, momentum


@dataclass
class SLDOutput:
    """What `sld_generate` returns: ``images`` like a pipeline output, plus the settings applied."""

    images: Any
    config: SLDConfig
    safety_text: str
    applied: bool


def _repeat(emb: Tensor, n: int) -> Tensor:
    return emb if emb.shape[0] == n else emb.expand(n, *emb.shape[1:])


@torch.no_grad()
def sld_generate(
    pipe: Any,
    prompt: str | Sequence[str] | None = None,
    *,
    sld: str | SLDConfig = "MEDIUM",
    sld_concept: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | Sequence[str] | None = None,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    output_type: str = "pil",
    **overrides: Any,
) -> SLDOutput:
    """Sample from ``pipe`` with SLD safety guidance away from ``sld_concept`` (keywords as the pipeline's).

    ``sld`` is a preset name or an `SLDConfig`; ``overrides`` are diffusers' ``sld_*`` keywords.
    Needs classifier-free guidance (``guidance_scale > 1``): SLD is a third branch of it.
    """
    unknown = set(overrides) - set(_OVERRIDES)
    if unknown:
        raise ConceptlockError(f"sld_generate: unknown option(s) {', '.join(sorted(unknown))}")
    cfg, text = resolve_sld({"sld": sld, "sld_concept": sld_concept, **overrides})
    if guidance_scale <= 1.0:
        raise ConceptlockError(f"SLD needs classifier-free guidance (guidance > 1), got {guidance_scale}")
    from .conditioning import encode_texts, is_sdxl, unet_forward
    from .methods.base import Prediction

    sdxl = is_sdxl(pipe)
    for what, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if sdxl and emb is not None and emb.shape[1] != pipe.tokenizer.model_max_length + 1:
            raise ConceptlockError(
                "SLD on SDXL takes prompts or packed conditioning (conceptlock.conditioning.encode), "
                f"got {what} of shape {tuple(emb.shape)}"
            )
    device = pipe._execution_device
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if prompt_embeds is not None:
        batch = prompt_embeds.shape[0]
    elif prompt is not None:
        batch = 1 if isinstance(prompt, str) else len(prompt)
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
    else:
        raise ConceptlockError("sld_generate: give a prompt or prompt_embeds")
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * batch
    dtype = pipe.unet.dtype
    if sdxl:  # packed conditioning (conceptlock.conditioning): SDXL's two encoders, pooled text, time ids
        cond = (
            prompt_embeds.to(device, dtype) if prompt_embeds is not None else encode_texts(pipe, prompt, device, dtype)
        )
        if negative_prompt_embeds is not None:
            uncond = negative_prompt_embeds.to(device, dtype)
        else:
            uncond = encode_texts(pipe, negative_prompt or [""] * batch, device, dtype)
    else:
        cond, uncond = pipe.encode_prompt(
            prompt,
            device,
            1,
            True,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
    apply = cfg.guidance_scale > 1.0  # diffusers: a safety scale <= 1 switches SLD off
    embeds = [_repeat(uncond, batch), _repeat(cond, batch)]
    if apply:
        safety = encode_texts(pipe, [text], device, dtype) if sdxl else pipe.encode_prompt(text, device, 1, False)[0]
        embeds.append(_repeat(safety.to(cond.dtype), batch))
    embeds = torch.cat(embeds)
    branches = len(embeds) // batch

    sched = pipe.scheduler
    sched.set_timesteps(num_inference_steps, device=device)
    x = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, cond.dtype, device, generator, latents)
    step_kwargs: dict[str, Any] = {}
    params = set(inspect.signature(sched.step).parameters)
    if "eta" in params:
        step_kwargs["eta"] = eta
    if "generator" in params:
        step_kwargs["generator"] = generator
    pred = Prediction.from_scheduler_config(sched.config)
    momentum: Tensor | None = None
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(torch.cat([x] * branches), t)
        out = unet_forward(pipe.unet, inp, t, embeds)
        tt = torch.full((batch,), int(t), device=device)
        x_in = inp[:batch]
        if pred.kind != "epsilon":
            out = torch.cat([pred.to_eps(o, x_in, tt) for o in out.chunk(branches)])
        parts = out.chunk(branches)
        if apply:
            eps, momentum = sld_guidance(parts[0], parts[1], parts[2], guidance_scale, cfg, i, momentum)
        else:
            eps = parts[0] + guidance_scale * (parts[1] - parts[0])
        if pred.kind != "epsilon":
            eps = pred.from_eps(eps, x_in, tt)
        x = sched.step(eps, t, x, **step_kwargs, return_dict=False)[0]

    if output_type == "latent":
        images: Any = x
    else:
        img = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        images = pipe.image_processor.postprocess(img, output_type=output_type, do_denormalize=[True] * batch)
    return SLDOutput(images=images, config=cfg, safety_text=text, applied=apply)


def sld_pipeline_call(pipe: Any, options: dict[str, Any]) -> Callable[..., SLDOutput]:
    """A pipeline-shaped callable running SLD, for `generate`: validates the options now (fail fast)."""
    resolve_sld(options)
    return partial(sld_generate, pipe)
