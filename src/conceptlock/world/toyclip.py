"""The toy CLIP: a real `transformers.CLIPModel` (tiny ViT + tiny text transformer), trained
contrastively on the world's images and captions.

Because it is a genuine CLIPModel saved in the standard folder layout, the CLIP-score and FID
code that serves real CLIP ViT-L/14 runs on it unchanged; and its text tower, frozen, is the
toy Stable Diffusion's text encoder, exactly as SD uses CLIP's.

Training adds NegCLIP-style hard negatives (Yuksekgonul et al. 2023): each caption again with its
object word swapped for another object's. Plain in-batch InfoNCE never needs the object's shape,
because random captions in a batch already differ in colour or background, so the text tower
learned to map circle, square and heart to nearly the same vectors (token cosine 0.97-0.99 at the
shape word), and the base model, conditioned on those vectors, could not draw the prompted shape.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig

from ..pipelines import text_config
from .concepts import GLYPH_WORDS, SHAPES

# object words, longest synonyms first so "love heart" wins over "heart"; each maps to (kind, key)
_OBJECT_WORDS = sorted(
    [(syn, ("shape", k)) for k, syns in SHAPES.items() for syn in syns]
    + [(syn, ("glyph", k)) for k, syns in GLYPH_WORDS.items() for syn in syns],
    key=lambda p: -len(p[0]),
)
_OBJECT_RE = re.compile(r"(?<![a-z])(" + "|".join(re.escape(w) for w, _ in _OBJECT_WORDS) + r")(?![a-z])")
_OBJECT_OF = dict(_OBJECT_WORDS)


def hard_negative(caption: str, rng: np.random.Generator) -> str | None:
    """`caption` with its object word replaced by a synonym of a different object of the same kind.

    None when the caption names no object."""
    m = _OBJECT_RE.search(caption)
    if m is None:
        return None
    kind, key = _OBJECT_OF[m.group(1)]
    table = SHAPES if kind == "shape" else GLYPH_WORDS
    others = [k for k in table if k != key]
    other = others[int(rng.integers(len(others)))]
    word = table[other][int(rng.integers(len(table[other])))]
    return caption[: m.start()] + word + caption[m.end() :]


CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def build_clip(resolution: int = 32, hidden: int = 64, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=resolution,
        patch_size=4,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=hidden,
    )
    text = text_config(hidden=hidden, layers=2, heads=4)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=hidden)
    return CLIPModel(cfg)


def pixel_values(images01: torch.Tensor) -> torch.Tensor:
    """Float NCHW in [0,1] -> CLIP-normalised pixel values."""
    return (images01 - CLIP_MEAN) / CLIP_STD


def train_clip(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    images01: torch.Tensor,
    captions: list[str],
    steps: int,
    seed: int,
    batch: int = 128,
    lr: float = 2e-3,
) -> CLIPModel:
    """Symmetric InfoNCE on (image, caption) pairs, plus object-swapped hard-negative captions on the
    image-to-text side; captions padded to the batch's longest."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n = images01.shape[0]
    for _ in tqdm(range(steps), desc="toy CLIP", leave=False):
        idx = torch.randint(0, n, (batch,), generator=g)
        x = images01[idx]
        x = x + torch.randn(x.shape, generator=g) * 0.02
        loss = contrastive_loss(model, tokenizer, x, [captions[i] for i in idx.tolist()], rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def contrastive_loss(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    images01: torch.Tensor,
    texts: list[str],
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE; with `rng`, each caption's object-swapped hard negative joins the image-to-text side.

    A text identical to an image's own caption counts as a positive wherever it sits, so duplicate captions
    in a batch (and a negative that happens to equal another image's caption) are never pushed away."""
    negatives = [] if rng is None else [n for t in texts if (n := hard_negative(t, rng)) is not None]
    tok = tokenizer(texts + negatives, padding="longest", truncation=True, return_tensors="pt")
    out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixel_values(images01))
    logits = out.logits_per_image  # (images, texts + negatives)
    same = torch.tensor([[a == b for b in texts + negatives] for a in texts]).float()
    pos = same[:, : len(texts)].t()
    return 0.5 * (
        F.cross_entropy(logits, same / same.sum(1, keepdim=True))
        + F.cross_entropy(logits[:, : len(texts)].t(), pos / pos.sum(1, keepdim=True))
    )


@torch.no_grad()
def image_features(model: CLIPModel, images01: torch.Tensor, batch: int = 256) -> np.ndarray:
    """L2-normalised projected image embeddings (the toy FID / CLIP-score feature space)."""
    feats = []
    for i in range(0, images01.shape[0], batch):
        f = model.get_image_features(pixel_values=pixel_values(images01[i : i + batch]))
        f = getattr(f, "pooler_output", f)
        feats.append(F.normalize(f, dim=-1))
    return torch.cat(feats).numpy()


@torch.no_grad()
def text_features(model: CLIPModel, tokenizer: CLIPTokenizer, texts: list[str], batch: int = 256) -> np.ndarray:
    feats = []
    for i in range(0, len(texts), batch):
        tok = tokenizer(texts[i : i + batch], padding="max_length", truncation=True, return_tensors="pt")
        f = model.get_text_features(input_ids=tok.input_ids)
        f = getattr(f, "pooler_output", f)
        feats.append(F.normalize(f, dim=-1))
    return torch.cat(feats).numpy()


@torch.no_grad()
def zero_shot_shape_accuracy(
    model: CLIPModel, tokenizer: CLIPTokenizer, images01: torch.Tensor, colours: list[str], shapes: list[str]
) -> float:
    """Share of images whose best-matching caption among "a <colour> <s>" (s over every shape, colour
    given) names the true shape: whether the toy CLIP, and so the base model's text encoder, tells shapes
    apart."""
    names = list(SHAPES)
    img = torch.from_numpy(image_features(model, images01))  # both feature sets are already unit length
    palette = sorted(set(colours))  # encode each distinct "a <colour> <shape>" once, not once per image
    prompts = [f"a {c} {s}" for c in palette for s in names]
    txt = torch.from_numpy(text_features(model, tokenizer, prompts)).view(len(palette), len(names), -1)
    per_image = txt[torch.tensor([palette.index(c) for c in colours])]
    pred = torch.einsum("nsd,nd->ns", per_image, img).argmax(-1)
    return float(np.mean([names[p] == s for p, s in zip(pred.tolist(), shapes, strict=True)]))
