"""CLIP score, and the shared CLIP back-end that the aesthetic and Q16 metrics also use.

CLIP score as torchmetrics' ``CLIPScore`` states it: per image, ``max(100 * cos(E_img, E_text), 0)``;
reported as the mean over images with a bootstrap 95% CI (clustered by prompt when several images
share one). The field's default model is ``openai/clip-vit-large-patch14``.

The back-end is transformers' ``CLIPModel`` from a local folder or a hub id, loaded once per
process (``load_clip`` is cached), safetensors only, no remote code. Images are preprocessed with
``CLIPImageProcessorPil`` (resize shortest side, centre crop, normalise), which needs no
torchvision. A folder without a tokenizer gets SD 1.x's CLIP BPE tokenizer (the same vocabulary
as OpenAI CLIP); one without ``preprocessor_config.json`` gets OpenAI CLIP's preprocessing at the
model's image size. Prompts longer than the text tower's context are truncated keeping the
end-of-text token CLIP pools on, as OpenAI's ``clip.tokenize(truncate=True)`` does (torchmetrics
1.9 cuts the ids and drops it, so its scores differ for prompts over 77 tokens). Differences from
torchmetrics otherwise: we clamp each image's score at 0 (the CLIPScore paper's definition);
torchmetrics clamps the batch mean. They agree whenever every cosine is positive (real CLIP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..pipelines import ConceptlockError
from .base import Metric, MetricResult, weights_dir

__all__ = ["DEFAULT_CLIP", "CLIPBackend", "CLIPScoreMetric", "clip_score_values", "load_clip", "resolve_device"]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features (projection in pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class CLIPBackend:
    """A loaded CLIP model with its tokenizer and image processor; embeddings come out L2-normalised."""

    model: Any
    tokenizer: Any
    processor: Any
    device: torch.device
    source: str

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed_images(self, images: list, batch_size: int = 32) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), batch_size):
            px = self.processor(images=images[i : i + batch_size], return_tensors="pt")["pixel_values"]
            f = _features(self.model.get_image_features(pixel_values=px.to(self.device, self.model.dtype)))
            feats.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
        return torch.cat(feats)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        max_len = int(self.model.config.text_config.max_position_embeddings)
        feats = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            )
            f = _features(
                self.model.get_text_features(
                    input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
                )
            )
            feats.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
        return torch.cat(feats)


def _where(model: str) -> str:
    return (
        f"a transformers CLIP folder (config.json + model.safetensors; tokenizer and preprocessor_config.json "
        f"optional), e.g. under {weights_dir() / 'clip-vit-large-patch14'}, or pass a hub id"
    )


@lru_cache(maxsize=4)
def _load_clip_cached(model: str, device: str) -> CLIPBackend:
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    p = Path(model).expanduser()
    local = p.exists()
    if not local and not _HUB_ID.match(model):
        raise ConceptlockError(f"CLIP: weights not found at {p}; put {_where(model)}")
    if local and not (p / "config.json").is_file():
        raise ConceptlockError(f"CLIP: {p} has no config.json; put {_where(model)}")
    src = str(p) if local else model
    try:
        clip = CLIPModel.from_pretrained(src, use_safetensors=True)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConceptlockError(f"CLIP: cannot load {src} ({first[:160]}); put {_where(model)}") from None
    clip.eval().to(device)
    try:
        tok = CLIPTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        from ..world.tokenizer import clip_tokenizer

        tok = clip_tokenizer(model_max_length=int(clip.config.text_config.max_position_embeddings))
    try:
        proc = CLIPImageProcessorPil.from_pretrained(src)
    except (OSError, ValueError):
        s = int(clip.config.vision_config.image_size)
        proc = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return CLIPBackend(model=clip, tokenizer=tok, processor=proc, device=torch.device(device), source=src)


def load_clip(model: str | Path = DEFAULT_CLIP, device: str | None = None) -> CLIPBackend:
    """Load (once per process) a CLIP model from a folder or hub id; one-line error if absent."""
    return _load_clip_cached(str(model), str(resolve_device(device)))


def clip_score_values(backend: CLIPBackend, images: list, prompts: list[str]) -> torch.Tensor:
    """Per-image CLIP score, max(100 * cos, 0), as torchmetrics' CLIPScore computes it."""
    img = backend.embed_images(images)
    txt = backend.embed_texts(prompts)
    return (100.0 * (img * txt).sum(dim=-1)).clamp(min=0)


class CLIPScoreMetric(Metric):
    """Mean CLIP score of images against their prompts (higher = more faithful)."""

    name = "clip_score"
    higher_is_better = True
    requires_prompts = True

    def __init__(self, model: str = DEFAULT_CLIP, device: str | None = None):
        super().__init__()
        self.backend = load_clip(model, device)

    def _update(self, images, prompts, rows) -> None:
        self._items.extend(clip_score_values(self.backend, images, prompts).tolist())

    def compute(self) -> MetricResult:
        return self._mean_result({"model": self.backend.source})
