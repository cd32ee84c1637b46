"""The toy CLIP: a real `transformers.CLIPModel` (tiny ViT + tiny text transformer), trained
contrastively on the world's images and captions.

Because it is a genuine CLIPModel saved in the standard folder layout, the CLIP-score and FID
code that serves real CLIP ViT-L/14 runs on it unchanged; and its text tower, frozen, is the
toy Stable Diffusion's text encoder, exactly as SD uses CLIP's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig

from ..pipelines import text_config

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
    """Symmetric InfoNCE on (image, caption) pairs; captions padded to the batch's longest."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n = images01.shape[0]
    for _ in tqdm(range(steps), desc="toy CLIP", leave=False):
        idx = torch.randint(0, n, (batch,), generator=g)
        texts = [captions[i] for i in idx.tolist()]
        tok = tokenizer(texts, padding="longest", truncation=True, return_tensors="pt")
        x = images01[idx]
        x = x + torch.randn(x.shape, generator=g) * 0.02
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixel_values(x))
        logits = out.logits_per_image
        # identical captions in a batch are not negatives of each other
        same = torch.tensor([[a == b for b in texts] for a in texts])
        target = same.float() / same.float().sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


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
