"""Text conditioning for SD 1.x/2.x and SDXL, carried as one tensor.

SD 1.x/2.x condition the UNet on the text encoder's last hidden state, (B, 77, D). SDXL conditions it on three
things (Podell et al. 2023; diffusers' `StableDiffusionXLPipeline.encode_prompt`): the penultimate hidden states
of its two text encoders concatenated, (B, 77, 768 + 1280); the second encoder's pooled projection, (B, 1280);
and six micro-conditioning numbers (original size, crop corner, target size) as `time_ids`.

Objectives, samplers and UCE move conditioning around as a tensor: concatenated for classifier-free guidance,
expanded, indexed. Rather than thread a dict through every one of them, SDXL conditioning is *packed*: rows
0..76 are the hidden states and one extra row holds ``[pooled, time_ids, 0, ...]``; `unet_forward` unpacks it
right before the UNet call, the only place that needs the parts. SD 1.x/2.x conditioning is the plain hidden
state, unchanged, so nothing about those models moves. (diffusers' own training scripts pass
`added_cond_kwargs` alongside; that is the right shape for one script, the packed row for many objectives.)

Token ids follow the same rule: (B, 77) for one tokenizer, (B, 2, 77) for SDXL's two (their padding differs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConceptlockError

N_TIME_IDS = 6


def _unet_config(obj: Any) -> Any:
    unet = getattr(obj, "unet", obj)
    unet = getattr(unet, "module", unet)  # DDP
    return unet.config


def is_sdxl(obj: Any) -> bool:
    """True for an SDXL pipeline or UNet (pooled text + time-id micro-conditioning)."""
    return getattr(_unet_config(obj), "addition_embed_type", None) == "text_time"


def tokenizers(pipe: Any) -> tuple[Any, ...]:
    """The tokenizers whose ids a batch's `input_ids` hold, in order."""
    toks = tuple(t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None)
    if not toks:
        raise ConceptlockError("the pipeline has no tokenizer")
    return toks if is_sdxl(pipe) else toks[:1]


def tokenize(tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """Token ids padded to max length, as SD's pipelines do: (B, 77) for one tokenizer, (B, K, 77) for a tuple."""
    if isinstance(tokenizer, (tuple, list)):
        ids = [tokenize(t, texts) for t in tokenizer]
        return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)
    return tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _pooled_dim(config: Any) -> int:
    return int(config.projection_class_embeddings_input_dim) - N_TIME_IDS * int(config.addition_time_embed_dim)


def time_ids(pipe: Any, height: int | None = None, width: int | None = None) -> Tensor:
    """SDXL's micro-conditioning for an uncropped image at the target size: (h, w, 0, 0, h, w)."""
    cfg = _unet_config(pipe)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    scale = getattr(pipe, "vae_scale_factor", 8)
    h, w = height or size * scale, width or size * scale
    return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)


@torch.no_grad()
def encode(pipe: Any, input_ids: Tensor, device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    """Frozen text conditioning for token ids from `tokenize(tokenizers(pipe), ...)`; packed for SDXL."""
    if not is_sdxl(pipe):
        te = pipe.text_encoder
        device = device or next(te.parameters()).device
        out = te(input_ids.to(device), return_dict=False)[0]
        return out.to(dtype or out.dtype)
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    if input_ids.dim() != 3 or input_ids.shape[1] != len(encoders):
        raise ConceptlockError(
            f"SDXL needs token ids of shape (B, {len(encoders)}, L) from both tokenizers, got {tuple(input_ids.shape)}"
        )
    device = device or next(encoders[-1].parameters()).device
    hidden, pooled = [], None
    for k, te in enumerate(encoders):
        out = te(input_ids[:, k].to(device), output_hidden_states=True, return_dict=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out[0]
    h = torch.cat(hidden, dim=-1)
    return pack(h, pooled, time_ids(pipe).to(device).expand(h.shape[0], -1)).to(dtype or h.dtype)


def pack(hidden: Tensor, pooled: Tensor, tids: Tensor) -> Tensor:
    """(B, L, D) hidden + (B, P) pooled + (B, 6) time ids -> (B, L + 1, D)."""
    b, _, d = hidden.shape
    p = pooled.shape[-1]
    if p + N_TIME_IDS > d:
        raise ConceptlockError(f"cannot pack SDXL conditioning: pooled {p} + {N_TIME_IDS} time ids > width {d}")
    row = torch.zeros(b, 1, d, dtype=hidden.dtype, device=hidden.device)
    row[:, 0, :p] = pooled.to(hidden.dtype)
    row[:, 0, p : p + N_TIME_IDS] = tids.to(hidden.dtype)
    return torch.cat([hidden, row], dim=1)


def unpack(unet: Any, emb: Tensor) -> tuple[Tensor, dict[str, Tensor] | None]:
    """(encoder_hidden_states, added_cond_kwargs) for the UNet; the identity for SD 1.x/2.x."""
    if not is_sdxl(unet):
        return emb, None
    p = _pooled_dim(_unet_config(unet))
    row = emb[:, -1]
    return emb[:, :-1], {"text_embeds": row[:, :p], "time_ids": row[:, p : p + N_TIME_IDS]}


def hidden_states(unet: Any, emb: Tensor) -> Tensor:
    """The per-token part of (packed) conditioning: what cross-attention keys and values read."""
    return unpack(unet, emb)[0]


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a UNet's frozen base weights (its first non-adapter parameter; adapters may stay fp32)."""
    for name, p in model.named_parameters():
        if "lora_" not in name:
            return p.dtype
    return torch.float32


def unet_forward(model: nn.Module, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
    """Call a (possibly DDP-wrapped) UNet on packed or plain conditioning; the raw prediction.

    Inputs are cast to the frozen base weights' dtype, as diffusers' training scripts cast latents to
    `weight_dtype`: autocast does it on a GPU, but accelerate gives no fp16 autocast on a CPU. The cast is
    differentiable, so a loss that back-propagates into `x` (LCFD) keeps its gradient."""
    wdt = base_dtype(model)
    x, emb = x.to(wdt), emb.to(wdt)
    ehs, added = unpack(model, emb)
    if added is None:
        return model(x, t, encoder_hidden_states=ehs, return_dict=False)[0]
    added = {k: v.to(ehs.dtype) for k, v in added.items()}
    return model(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)[0]


def encode_texts(pipe: Any, texts: Sequence[str], device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    """Encode prompts. For an SDXL pipeline with `force_zeros_for_empty_prompt` (SDXL base), the empty prompt is
    all zeros (hidden and pooled; time ids kept), which is what its pipeline uses as the unconditional input."""
    emb = encode(pipe, tokenize(tokenizers(pipe), texts), device, dtype)
    if is_sdxl(pipe) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        p = _pooled_dim(_unet_config(pipe))
        for i, text in enumerate(texts):
            if text == "":
                emb[i, :-1] = 0
                emb[i, -1, :p] = 0
    return emb
