"""Training data as map-style datasets, and the deterministic batch plan the trainer draws from them.

The trainer does not iterate a DataLoader: the samples of optimizer step s are positions (s-1)*B .. s*B-1 of an
endless stream of seeded per-epoch permutations, and each process takes its share of those positions. A batch is
then a pure function of (seed, step, micro-step, rank), which is what makes resume exact and multi-process runs
equal to single-process runs with the same global batch (each sample also carries a per-position seed, see
`conceptlock.methods.base.SampleRNG`).

Datasets return dicts of tensors (and strings, kept as lists):
    PromptDataset       {"input_ids", "text"}                      ESD / SDD (concept prompts)
    ImageTextDataset    {"pixel_values", "input_ids", "text", "label"}   finetune / LCFD (metadata.jsonl folder)
    TensorDataset       any dict of equal-length tensors            tests, precomputed latents
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..methods.base import sample_seed, tokenize
from ..pipelines import ConceptlockError


class PromptDataset(Dataset):
    """Concept prompts (ESD, SDD): one sample per prompt, cycled by the batch plan.

    `anchors` (optional, one per prompt) adds `anchor_ids`: the same prompt without the concept, which anchored
    ESD regresses towards instead of the empty prompt.
    """

    def __init__(self, prompts: list[str], tokenizer: Any, anchors: list[str] | None = None):
        if not prompts:
            raise ConceptlockError("no concept prompt given")
        if anchors is not None and len(anchors) != len(prompts):
            raise ConceptlockError(f"anchors: {len(anchors)} anchor prompts for {len(prompts)} concept prompts")
        self.prompts = list(prompts)
        self.ids = tokenize(tokenizer, self.prompts)
        self.anchors = list(anchors) if anchors is not None else None
        self.anchor_ids = tokenize(tokenizer, self.anchors) if anchors is not None else None

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.ids[i], "text": self.prompts[i]}
        if self.anchor_ids is not None:
            item |= {"anchor_ids": self.anchor_ids[i], "anchor_text": self.anchors[i]}
        return item


class TensorDataset(Dataset):
    """A dict of tensors sharing their first dimension."""

    def __init__(self, **tensors: Tensor):
        sizes = {len(v) for v in tensors.values()}
        if len(sizes) != 1:
            raise ConceptlockError(f"TensorDataset: tensors have different lengths {sorted(sizes)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def _load_image(path: Path, resolution: int) -> Tensor:
    """Resize the short side to `resolution` (bicubic), centre-crop, scale to [-1, 1]; CHW float32."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageTextDataset(Dataset):
    """An image folder with `metadata.jsonl` rows {file_name, text[, class]} (the LCFD release's format).

    `class` 1 = clean, 2 = harmful (as the released scripts); it becomes `label` 0 / 1. Rows without `class`
    are clean.
    """

    def __init__(self, folder: str | Path, tokenizer: Any, resolution: int):
        self.folder = Path(folder)
        meta = self.folder / "metadata.jsonl"
        if not meta.is_file():
            raise ConceptlockError(
                f"{self.folder}: no metadata.jsonl (rows: file_name, text, class 1 clean / 2 harmful)"
            )
        rows = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConceptlockError(f"{meta}:{n}: not JSON ({e.msg})") from None
            if "file_name" not in row or "text" not in row:
                raise ConceptlockError(f"{meta}:{n}: needs 'file_name' and 'text'")
            cls = int(row.get("class", 1))
            if cls not in (1, 2):
                raise ConceptlockError(f"{meta}:{n}: class must be 1 (clean) or 2 (harmful), got {cls}")
            if not (self.folder / row["file_name"]).is_file():
                raise ConceptlockError(f"{meta}:{n}: image {row['file_name']!r} not found")
            rows.append((row["file_name"], str(row["text"]), cls - 1))
        if not rows:
            raise ConceptlockError(f"{meta}: no rows")
        self.rows = rows
        self.resolution = int(resolution)
        self.ids = tokenize(tokenizer, [r[1] for r in rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, text, label = self.rows[i]
        return {
            "pixel_values": _load_image(self.folder / name, self.resolution),
            "input_ids": self.ids[i],
            "text": text,
            "label": torch.tensor(label, dtype=torch.long),
        }


class CachedLatents(Dataset):
    """A view of an image dataset whose images were VAE-encoded once (mean and std of each posterior).

    Fine-tuning re-reads the same few hundred images for thousands of steps; encoding each once instead
    of every step removes the VAE encoder from the step (diffusers' training scripts offer the same).
    The posterior *sample* is still drawn per step from the sample's own RNG stream, so a cached run
    is numerically the run without the cache (`Context.latents` draws the same noise either way).
    Items keep every field but `pixel_values`, which becomes `latent_mean` and `latent_std`.
    """

    def __init__(self, data: Dataset, vae: Any, device: Any = "cpu", dtype: Any = None, batch: int = 32):
        self.data = data
        self.folder = getattr(data, "folder", None)
        dtype = dtype or next(vae.parameters()).dtype
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(data), batch):
                px = torch.stack([data[j]["pixel_values"] for j in range(i, min(i + batch, len(data)))])
                dist = vae.encode(px.to(device, dtype)).latent_dist
                means.append(dist.mean.cpu())
                stds.append(dist.std.cpu())
        self.mean, self.std = torch.cat(means), torch.cat(stds)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v for k, v in self.data[i].items() if k != "pixel_values"}
        item["latent_mean"], item["latent_std"] = self.mean[i], self.std[i]
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], Tensor) else vals
    return out


class BatchPlan:
    """Which samples (and which per-sample seeds) a process uses at (step, micro-step).

    `batch_size` is the GLOBAL number of samples per optimizer step; it must split evenly over
    `num_processes * grad_accum` micro-batches.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        grad_accum: int = 1,
        num_processes: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        if len(dataset) == 0:
            raise ConceptlockError("training data is empty")
        parts = num_processes * grad_accum
        if batch_size < 1 or batch_size % parts:
            raise ConceptlockError(
                f"batch size {batch_size} must be a positive multiple of processes x accumulation ({num_processes} x {grad_accum})"
            )
        self.dataset, self.B, self.accum, self.world, self.rank, self.seed = (
            dataset,
            batch_size,
            grad_accum,
            num_processes,
            rank,
            seed,
        )
        self.micro = batch_size // parts
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, stream=1))
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=g)
        return self._perms[epoch]

    def positions(self, step: int, micro_step: int) -> list[int]:
        """Global stream positions for this process; step counts from 1."""
        start = (step - 1) * self.B + (micro_step * self.world + self.rank) * self.micro
        return list(range(start, start + self.micro))

    def batch(self, step: int, micro_step: int) -> dict[str, Any]:
        n = len(self.dataset)
        pos = self.positions(step, micro_step)
        items = [self.dataset[int(self._perm(p // n)[p % n])] for p in pos]
        b = collate(items)
        b["seed"] = torch.tensor([sample_seed(self.seed, p) for p in pos], dtype=torch.long)
        return b
