"""Export a diffusers SD 1.x/2.x pipeline as one original-layout (LDM) `.safetensors` checkpoint.

Why: A1111, ComfyUI and `from_single_file` users exchange models as one file in the original
Stable Diffusion key layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`). A hardened model is only useful if it can be handed over in the
format its users load, and a round trip through this writer is also how conceptlock tests its own
single-file loading path on tiny models (no real checkpoint can be downloaded here).

The mapping is the inverse of diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`
(the same block arithmetic as diffusers' `convert_diffusers_to_original_stable_diffusion.py`, written
for any number of levels and layers per block): LDM numbers the UNet's input blocks
``1 + level * (layers + 1) + j``, puts each downsampler at ``(level + 1) * (layers + 1)``, numbers the
output blocks ``level * (layers + 1) + j`` and appends the upsampler to the last of a level. The text
encoder is written in the Hugging Face CLIP layout under `cond_stage_model.transformer.`, which
diffusers reads for SD 1.x and 2.x alike. SDXL (OpenCLIP-layout second encoder) is not written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import ConceptlockError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model.transformer."

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_tail(tail: str) -> str:
    for new, old in _RESNET:
        if tail.startswith(new + "."):
            return old + tail[len(new) :]
    raise ConceptlockError(f"single-file export: unexpected UNet resnet parameter {tail!r}")


def _unet_key(key: str, config: Any) -> str:
    """The LDM name of one diffusers UNet parameter."""
    lpb = int(config.layers_per_block)
    parts = key.split(".")
    for new, old in _UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    if parts[0] == "down_blocks":
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "downsamplers":  # down_blocks.L.downsamplers.0.conv.* -> input_blocks.N.0.op.*
            return f"input_blocks.{(level + 1) * (lpb + 1)}.0.op.{'.'.join(parts[5:])}"
        idx = 1 + level * (lpb + 1) + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_resnet_tail(rest)}"
        if kind == "attentions":
            return f"input_blocks.{idx}.1.{rest}"
    if parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        rest = ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_resnet_tail(rest)}"
        if kind == "attentions":
            return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "upsamplers":  # after the level's last resnet (and its attention, if any)
            idx = level * (lpb + 1) + lpb
            has_attn = "Attn" in config.up_block_types[level]
            return f"output_blocks.{idx}.{2 if has_attn else 1}.{'.'.join(parts[4:])}"
        idx = level * (lpb + 1) + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_resnet_tail(rest)}"
        if kind == "attentions":
            return f"output_blocks.{idx}.1.{rest}"
    raise ConceptlockError(f"single-file export: no LDM name for UNet parameter {key!r}")


def _vae_key(key: str, n_up: int) -> tuple[str, bool]:
    """The LDM name of one VAE parameter, and whether it is a mid-block attention projection (stored as 1x1 conv)."""
    fixed = {"conv_norm_out": "norm_out"}
    parts = key.split(".")
    side = parts[0]
    if side in ("quant_conv", "post_quant_conv"):
        return key, False
    if parts[1] in ("conv_in", "conv_out"):
        return key, False
    if parts[1] in fixed:
        return f"{side}.{fixed[parts[1]]}.{'.'.join(parts[2:])}", False
    if parts[1] == "mid_block":
        kind, j = parts[2], int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}", False
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for new, old in names.items():
            if rest.startswith(new + "."):
                return f"{side}.mid.attn_1.{old}{rest[len(new) :]}", new != "group_norm"
    if parts[1] in ("down_blocks", "up_blocks"):
        i, kind = int(parts[2]), parts[3]
        ldm_i = i if parts[1] == "down_blocks" else n_up - 1 - i
        name = "down" if parts[1] == "down_blocks" else "up"
        if kind == "resnets":
            j, rest = parts[4], ".".join(parts[5:])
            return f"{side}.{name}.{ldm_i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}", False
        if kind in ("downsamplers", "upsamplers"):
            what = "downsample" if kind == "downsamplers" else "upsample"
            return f"{side}.{name}.{ldm_i}.{what}.{'.'.join(parts[5:])}", False
    raise ConceptlockError(f"single-file export: no LDM name for VAE parameter {key!r}")


def ldm_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder in the original Stable Diffusion checkpoint layout."""
    from .conditioning import is_sdxl

    if is_sdxl(pipe):
        raise ConceptlockError("single-file export writes SD 1.x/2.x checkpoints; SDXL is not supported")
    if type(pipe.text_encoder).__name__ != "CLIPTextModel":
        raise ConceptlockError("single-file export needs a CLIPTextModel text encoder")
    out: dict[str, torch.Tensor] = {}
    ucfg = pipe.unet.config
    for k, v in pipe.unet.state_dict().items():
        out[UNET + _unet_key(k, ucfg)] = v
    n_up = len(pipe.vae.config.up_block_types)
    for k, v in pipe.vae.state_dict().items():
        name, attn = _vae_key(k, n_up)
        out[VAE + name] = v[:, :, None, None] if attn and v.dim() == 2 else v
    for k, v in pipe.text_encoder.state_dict().items():
        # the original layout nests CLIP under `text_model.` (transformers 5 flattens it)
        out[TEXT + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return {k: v.detach().contiguous() for k, v in out.items()}


def export_single_file(pipe: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Write `ldm_state_dict(pipe)` to `path` (.safetensors) atomically; never replaces a file unless asked."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConceptlockError(f"--out {path}: a single-file checkpoint must end in .safetensors")
    if path.exists() and not overwrite:
        raise ConceptlockError(f"--out {path}: already exists (pass --overwrite to replace it)")
    sd = ldm_state_dict(pipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(sd, str(tmp), metadata={"format": "pt", "written_by": "conceptlock"})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
