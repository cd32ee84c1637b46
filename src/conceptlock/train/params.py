"""Which parameters train: a declarative choice, separate from the objective.

    full        every UNet parameter
    xattn       cross-attention (`attn2.*`): ESD-x
    noxattn     everything but cross-attention, the time embedding and the output conv: ESD-u, as in ESD's code
    xattn-kv    `attn2.to_k` / `attn2.to_v` only: ESD-x-strict
    lora:NAME   a new LoRA adapter NAME (rank, alpha, target modules) added through the diffusers UNet's
                `add_adapter`; the base weights stay frozen and only NAME is active while it trains, so an adapter
                trained on a pipeline that already holds e.g. `safety` is trained on W0, with `safety` inactive.

`noxattn` follows ESD's released code (it also leaves `time_embed` and the final `out` conv frozen) rather than
the literal "all but attn2", so that ESD-u numbers are comparable with the paper.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from ..pipelines import ConceptlockError

GROUPS = ("full", "xattn", "noxattn", "xattn-kv")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class ParamSpec:
    kind: str  # one of GROUPS or "lora"
    adapter: str | None = None
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __str__(self) -> str:
        return f"lora:{self.adapter}" if self.kind == "lora" else self.kind

    @property
    def is_lora(self) -> bool:
        return self.kind == "lora"


def parse_params(
    spec: str | ParamSpec, rank: int = 4, alpha: float | None = None, targets: tuple[str, ...] | list[str] | None = None
) -> ParamSpec:
    """Parse `full|xattn|noxattn|xattn-kv|lora:NAME` into a ParamSpec (one-line error on anything else)."""
    if isinstance(spec, ParamSpec):
        return spec
    s = spec.strip()
    if s in GROUPS:
        return ParamSpec(kind=s)
    if s.startswith("lora:"):
        name = s[len("lora:") :]
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConceptlockError(f"--params {spec!r}: adapter name must be letters, digits, '-' or '_'")
        if rank < 1:
            raise ConceptlockError(f"--params {spec!r}: LoRA rank must be >= 1, got {rank}")
        tg = tuple(targets) if targets else DEFAULT_TARGETS
        return ParamSpec(kind="lora", adapter=name, rank=int(rank), alpha=alpha, targets=tg)
    raise ConceptlockError(f"--params {spec!r}: choose one of {', '.join(GROUPS)} or lora:NAME")


def _in_group(name: str, kind: str) -> bool:
    if kind == "full":
        return True
    if kind == "xattn":
        return "attn2." in name
    if kind == "xattn-kv":
        return "attn2.to_k." in name or "attn2.to_v." in name
    if kind == "noxattn":
        return not ("attn2." in name or name.startswith(("time_embedding.", "conv_out.", "conv_norm_out.")))
    raise ConceptlockError(f"unknown parameter group {kind!r}")


def matching_modules(unet: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Module names peft would wrap: the name equals a target or ends with '.' + target."""
    return [n for n, _ in unet.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]


def add_lora(unet: nn.Module, spec: ParamSpec) -> None:
    """Add the (zero-initialised B) LoRA adapter `spec.adapter` to `unet` and make it the only active one."""
    from peft import LoraConfig

    if not matching_modules(unet, spec.targets):
        raise ConceptlockError(f"LoRA target modules {list(spec.targets)} match no module of the UNet")
    if spec.adapter in (getattr(unet, "peft_config", None) or {}):
        raise ConceptlockError(f"adapter {spec.adapter!r} already exists in this pipeline; pick another name")
    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
        target_modules=list(spec.targets),
        init_lora_weights=True,
    )
    with warnings.catch_warnings():  # several named adapters on one base is the point (Modular LoRA)
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(cfg, adapter_name=spec.adapter)
    unet.set_adapter(spec.adapter)


def apply_params(unet: nn.Module, spec: str | ParamSpec) -> list[tuple[str, nn.Parameter]]:
    """Freeze the UNet, unfreeze (or add, for LoRA) what `spec` names; return the trainable (name, param) list."""
    spec = parse_params(spec)
    if spec.is_lora:
        add_lora(unet, spec)
    unet.requires_grad_(False)  # after add_lora: peft marks adapter weights trainable on its own
    if spec.is_lora:
        tag = f".{spec.adapter}."
        chosen = [(n, p) for n, p in unet.named_parameters() if tag in n and ".lora_" in n]
    else:
        chosen = [(n, p) for n, p in unet.named_parameters() if _in_group(n, spec.kind)]
    if not chosen:
        raise ConceptlockError(f"--params {spec}: selects no parameter of this UNet")
    for _, p in chosen:
        p.requires_grad_(True)
    return chosen
