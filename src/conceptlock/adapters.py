"""Named LoRA adapters: add, save, load (diffusers and kohya files), compose with weights, fuse for deployment.

Modular LoRA (W* = W0 + dW_safe + dW_ft) is nothing more than named adapters on one base. Files are written in the
format vanilla diffusers reads (`pipe.load_lora_weights(file, adapter_name=...)`), with the adapter's LoraConfig
in the safetensors metadata so that a rank-4/alpha-8 adapter reloads with the same scale. kohya `lora_unet_*`
files load through diffusers' own converter. Loading is strict: a file whose tensors do not all land on a module
of the pipeline, or whose shapes do not match, is a one-line ConceptlockError and leaves the pipeline unchanged,
because a half-loaded safety adapter would silently report a safer model than the user has.

Evaluate safety with adapters unfused (`compose`); `fuse` (with `safe_fusing=True`) is for deployment only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .pipelines import ConceptlockError
from .train.params import DEFAULT_TARGETS, ParamSpec, add_lora

__all__ = [
    "DEFAULT_TARGETS",
    "add_adapter",
    "adapter_names",
    "adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "compose",
    "fuse",
    "delete_adapter",
    "parse_adapter_spec",
    "apply_adapters",
]

_COMPONENTS = ("unet", "text_encoder")


def _unet(obj: Any) -> nn.Module:
    return obj.unet if hasattr(obj, "unet") else obj


def _components(obj: Any) -> dict[str, nn.Module]:
    if hasattr(obj, "unet"):
        return {c: getattr(obj, c) for c in _COMPONENTS if getattr(obj, c, None) is not None}
    return {"unet": obj}


def adapter_names(obj: Any) -> list[str]:
    """Names of the adapters held by a pipeline (any component) or a bare UNet."""
    names: list[str] = []
    for mod in _components(obj).values():
        for n in getattr(mod, "peft_config", None) or {}:
            if n not in names:
                names.append(n)
    return names


def add_adapter(
    obj: Any, name: str, rank: int = 4, alpha: float | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> None:
    """Add a fresh LoRA adapter to the UNet (B = 0, so the model is unchanged) and make it the active one."""
    add_lora(_unet(obj), ParamSpec(kind="lora", adapter=name, rank=rank, alpha=alpha, targets=tuple(targets)))


def _check_name(obj: Any, name: str) -> None:
    if name not in adapter_names(obj):
        have = ", ".join(adapter_names(obj)) or "none"
        raise ConceptlockError(f"adapter {name!r} is not loaded (loaded: {have})")


def adapter_state_dict(obj: Any, name: str, component: str = "unet") -> dict[str, Tensor]:
    """The adapter's weights in diffusers LoRA format (`...to_q.lora.down.weight`), without component prefix."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    _check_name(obj, name)
    mod = _components(obj)[component]
    if name not in (getattr(mod, "peft_config", None) or {}):
        return {}
    sd = get_peft_model_state_dict(mod, adapter_name=name)
    return {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(sd).items()}


def _metadata(mod: nn.Module, name: str) -> dict | None:
    cfg = (getattr(mod, "peft_config", None) or {}).get(name)
    return cfg.to_dict() if cfg is not None else None


def save_adapter(obj: Any, name: str, path: str | Path) -> Path:
    """Write adapter `name` to a .safetensors file (a folder gets `<name>.safetensors`), atomically."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .conditioning import is_sdxl

    _check_name(obj, name)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / f"{name}.safetensors"
    comps = _components(obj)
    unet_sd = adapter_state_dict(obj, name, "unet")
    te_sd = adapter_state_dict(obj, name, "text_encoder") if "text_encoder" in comps else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        writer = StableDiffusionXLPipeline if is_sdxl(obj) else StableDiffusionPipeline  # same unet.* keys
        writer.save_lora_weights(
            str(tmp),
            unet_lora_layers=unet_sd or None,
            text_encoder_lora_layers=te_sd or None,
            weight_name=path.name,
            safe_serialization=True,
            unet_lora_adapter_metadata=_metadata(comps["unet"], name) if unet_sd else None,
            text_encoder_lora_adapter_metadata=_metadata(comps["text_encoder"], name) if te_sd else None,
        )
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers logs a warning per component without LoRA keys; the strict count below replaces those."""
    logs = [logging.getLogger(n) for n in ("diffusers", "peft")]
    levels = [lg.level for lg in logs]
    for lg in logs:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        for lg, lv in zip(logs, levels, strict=True):
            lg.setLevel(lv)


def _loaded_count(obj: Any, name: str) -> int:
    pat = re.compile(rf"\.lora_(A|B|magnitude_vector)\.{re.escape(name)}(\.|$)")
    return sum(1 for mod in _components(obj).values() for n, _ in mod.named_parameters() if pat.search(n))


def _summarise(err: BaseException) -> str:
    msg = str(err)
    m = re.search(
        r"size mismatch for (\S+): copying a param with shape (\S+(?: \S+)?) from checkpoint, "
        r"the shape in current model is (\S+(?: \S+)?)\.",
        msg,
    )
    if m:
        return f"rank/shape mismatch, e.g. {m.group(1)}: file {m.group(2)} vs model {m.group(3)}"
    m = re.search(r"Target modules (.*) not found in the base model", msg)
    if m:
        return f"fits no module of this pipeline (e.g. {m.group(1)[:120]})"
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), type(err).__name__)
    return first[:300]


def delete_adapter(obj: Any, name: str) -> None:
    for mod in _components(obj).values():
        if name in (getattr(mod, "peft_config", None) or {}):
            mod.delete_adapters(name)


_KNOWN_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_XATTN_K_DOWN = re.compile(r"attn2[._]to_k[._](lora_A|lora\.down|lora_down)(\.[^.]+)?\.weight$")


def _xattn_width(f: Any, keys: list[str]) -> int | None:
    """The text width a LoRA file's UNet cross-attention key projection reads, from an open safetensors handle."""
    k = next((k for k in keys if _XATTN_K_DOWN.search(k) and "text_encoder" not in k and "lora_te" not in k), None)
    return int(f.get_slice(k).get_shape()[-1]) if k is not None else None


def _check_architecture(pipe: Any, path: Path, keys: list[str], file_width: int | None) -> None:
    """Refuse, in one line naming both, a LoRA made for another architecture (an SDXL LoRA on SD 1.x, the reverse).

    The file's cross-attention key projections read the text width it was trained for (SD 1.x 768, SD 2.x 1024,
    SDXL 2048); a second text encoder's keys mark SDXL. Checked before diffusers loads anything, so the error
    names the architectures instead of a tensor shape deep in the UNet.
    """
    from .conditioning import is_sdxl

    unet = getattr(pipe, "unet", None)
    if unet is None:
        return
    model_width = int(unet.config.cross_attention_dim)
    model_xl = is_sdxl(pipe)
    file_xl = any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys)
    if file_width is None and not file_xl:
        return

    def name(width: int | None, xl: bool) -> str:
        base = "SDXL" if xl else _KNOWN_WIDTHS.get(width or -1, "SD 1.x/2.x")
        return f"{base} (cross-attention width {width})" if width else base

    if (file_width is not None and file_width != model_width) or (file_xl and not model_xl):
        file_is_xl = file_xl or file_width == 2048
        raise ConceptlockError(
            f"{path}: architecture mismatch: a LoRA for {name(file_width, file_is_xl)}, but the model is "
            f"{name(model_width, model_xl)}; "
            "train or pick a LoRA for this model's architecture"
        )


def load_adapter(pipe: Any, path: str | Path, name: str, strict: bool = True) -> str:
    """Load a LoRA file (diffusers or kohya format) into `pipe` as adapter `name`. Strict: every LoRA tensor of
    the file must land on a module; otherwise nothing is kept and a one-line error says why."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ConceptlockError(f"{p}: LoRA file does not exist")
    if p.suffix != ".safetensors":
        raise ConceptlockError(f"{p}: only .safetensors LoRA files are accepted")
    if name in adapter_names(pipe):
        raise ConceptlockError(f"adapter {name!r} is already loaded; pick another name")
    try:
        with safe_open(str(p), "pt") as f:
            keys = list(f.keys())
            file_width = _xattn_width(f, keys)
    except Exception as e:  # any unreadable file is the same user error
        raise ConceptlockError(f"{p}: not a readable safetensors file ({_summarise(e)})") from None
    expected = sum(1 for k in keys if "lora" in k and k.endswith(".weight"))
    if expected == 0:
        raise ConceptlockError(f"{p}: holds no LoRA weights (no '*lora*.weight' keys)")
    _check_architecture(pipe, p, keys, file_width)
    try:
        with _quiet_diffusers():
            pipe.load_lora_weights(str(p), adapter_name=name)
    except Exception as e:  # diffusers/peft raise ValueError, RuntimeError, KeyError, ...
        delete_adapter(pipe, name)
        raise ConceptlockError(f"{p}: {_summarise(e)}") from None
    loaded = _loaded_count(pipe, name)
    if loaded == 0 or (strict and loaded < expected):
        delete_adapter(pipe, name)
        what = "fits no module of this pipeline" if loaded == 0 else f"only {loaded} of {expected} LoRA tensors fit"
        raise ConceptlockError(f"{p}: {what}")
    return name


def compose(obj: Any, weights: Mapping[str, float]) -> None:
    """Activate exactly the adapters in `weights`, each scaled by its weight (negative weights subtract).

    PEFT computes base(x) + sum_a weight_a * (alpha_a / r_a) * B_a A_a x, so weights 1, 1 give W0 + dW_a + dW_b.
    """
    if not weights:
        raise ConceptlockError("compose: give at least one adapter and weight")
    for n in weights:
        _check_name(obj, n)
    names, ws = list(weights), [float(w) for w in weights.values()]
    if hasattr(obj, "unet"):
        obj.set_adapters(names, adapter_weights=ws)
    else:
        obj.set_adapters(names, weights=ws)


def fuse(pipe: Any, weights: Mapping[str, float], unload: bool = True) -> None:
    """Merge the composed adapters into the base weights (deployment only). `safe_fusing=True` refuses NaNs.
    With `unload`, the LoRA layers are removed afterwards so the pipeline saves as a plain diffusers folder."""
    compose(pipe, weights)
    comps = [
        c for c, m in _components(pipe).items() if any(n in (getattr(m, "peft_config", None) or {}) for n in weights)
    ]
    try:
        pipe.fuse_lora(components=comps, lora_scale=1.0, safe_fusing=True, adapter_names=list(weights))
    except ValueError as e:
        raise ConceptlockError(f"fuse: {_summarise(e)}") from None
    if unload:
        pipe.unload_lora_weights()


def parse_adapter_spec(spec: str | Mapping[str, Any]) -> tuple[str, Path, float]:
    """`NAME=FILE[:WEIGHT]` (or {name, path[, weight]}) -> (name, path, weight); weight defaults to 1."""
    if isinstance(spec, Mapping):
        try:
            return str(spec["name"]), Path(spec["path"]), float(spec.get("weight", 1.0))
        except KeyError as e:
            raise ConceptlockError(f"adapter {dict(spec)!r}: missing {e}") from None
    if "=" not in spec:
        raise ConceptlockError(f"adapter {spec!r}: expected NAME=FILE[:WEIGHT]")
    name, rest = (x.strip() for x in spec.split("=", 1))
    path, weight = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass  # a ':' inside the path, no weight
    if not name or not path:
        raise ConceptlockError(f"adapter {spec!r}: expected NAME=FILE[:WEIGHT]")
    return name, Path(path), weight


def apply_adapters(pipe: Any, specs: list[str] | list[Mapping[str, Any]]) -> dict[str, float]:
    """Load each `NAME=FILE[:WEIGHT]` adapter and activate exactly those, composed with their weights."""
    parsed = [parse_adapter_spec(s) for s in specs]
    names = [n for n, _, _ in parsed]
    if len(set(names)) != len(names):
        raise ConceptlockError(f"adapter names must be unique, got {names}")
    for name, path, _ in parsed:
        load_adapter(pipe, path, name)
    weights = {n: w for n, _, w in parsed}
    compose(pipe, weights)
    return weights
