"""The metric interface, its result type, the registry, and image input helpers.

Why torchmetrics-shaped: a metric accumulates over batches (``update(images, prompts, rows)``) and
reports once (``compute()``), so one generation pass feeds many metrics and a metric never needs
all images in memory. Every result carries ``n`` and a 95% interval, because a rate over 142
prompts without one is not a finding.

Real back-ends never download in tests: they take a local path or a hub id (on a user's machine).
A missing local weight file is a one-line error saying where to put it (``weights_dir()``, set
by ``$CONCEPTLOCK_WEIGHTS``, default ``~/.cache/conceptlock/weights``).

Metric specs (CLI ``--metrics``): ``name`` or ``name:key=value:key=value``, e.g.
``nudenet:preset=unlearndiffatk-9@0.45/0.75`` or ``clip_score:model=/models/clip-l14``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..pipelines import ConceptlockError

__all__ = [
    "IMAGE_SUFFIXES",
    "Metric",
    "MetricResult",
    "available_metrics",
    "get_metric",
    "list_images",
    "load_image",
    "parse_metric_spec",
    "register_metric",
    "rows_index",
    "to_pil",
    "weights_dir",
    "weights_missing",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _clean(x: Any) -> Any:
    """Plain JSON types: numpy/torch scalars to Python, NaN/inf to None (strict JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass
class MetricResult:
    """One metric's value over ``n`` items with its 95% interval (None where none is defined)."""

    name: str
    value: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetricResult:
        return cls(**{k: d.get(k) for k in ("name", "value", "n", "ci_low", "ci_high")}, details=d.get("details") or {})


class Metric:
    """Base class: subclasses implement `_update` and `compute`; `item_scores` feeds paired tests.

    ``requires_prompts`` says whether the metric reads the prompt text (CLIP score) or the rows'
    extra columns; ``higher_is_better`` orients comparisons in reports.
    """

    name: str = "metric"
    higher_is_better: bool = False
    requires_prompts: bool = False
    has_item_scores: bool = True

    def __init__(self) -> None:
        self._items: list[float] = []
        self._groups: list[Any] = []

    def update(self, images: Any, prompts: Sequence[str] | None = None, rows: Sequence[Any] | None = None) -> None:
        """Score a batch. ``images``: PIL images, HWC uint8 arrays, or a BCHW uint8/[0,1] tensor."""
        pil = to_pil(images)
        prompts = list(prompts) if prompts is not None else [""] * len(pil)
        if len(prompts) != len(pil):
            raise ValueError(f"{self.name}: {len(pil)} images but {len(prompts)} prompts")
        if rows is not None and len(rows) != len(pil):
            raise ValueError(f"{self.name}: {len(pil)} images but {len(rows)} rows")
        if self.requires_prompts and any(not p for p in prompts):
            raise ConceptlockError(f"{self.name}: needs the prompt of every image (got an empty prompt)")
        if not pil:
            return
        self._groups.extend(rows_index(rows) if rows is not None else [None] * len(pil))
        self._update(pil, prompts, rows)

    def _update(self, images: list[Image.Image], prompts: list[str], rows: Sequence[Any] | None) -> None:
        raise NotImplementedError

    def compute(self) -> MetricResult:
        raise NotImplementedError

    def reset(self) -> None:
        self._items.clear()
        self._groups.clear()

    def item_scores(self) -> list[float]:
        """Per-image scores in update order (flags as 0/1): the input to `stats.compare_paired`."""
        return list(self._items)

    def _cluster_groups(self) -> list[Any] | None:
        """Prompt indices for a cluster bootstrap when rows were given (K images share a prompt)."""
        if not self._groups or any(g is None for g in self._groups):
            return None
        return self._groups if len(set(self._groups)) < len(self._groups) else None

    def _mean_result(self, details: dict[str, Any]) -> MetricResult:
        """Mean of the per-image scores with a bootstrap 95% CI (clustered by prompt when rows repeat)."""
        from ..stats import bootstrap_ci

        self._check_nonempty()
        groups = self._cluster_groups()
        low, high = bootstrap_ci(self._items, groups=groups)
        n = len(self._items)
        ci = "bootstrap95" + (", clustered by prompt" if groups else "")
        return MetricResult(self.name, sum(self._items) / n, n, low, high, {**details, "ci": ci})

    def _check_nonempty(self) -> None:
        if not self._items:
            raise ConceptlockError(f"{self.name}: no images were scored (call update() first)")


def rows_index(rows: Sequence[Any]) -> list[Any]:
    """The prompt index of each row (PromptRow, manifest dict, or None)."""
    out = []
    for r in rows:
        if r is None:
            out.append(None)
        elif isinstance(r, dict):
            out.append(r.get("index"))
        else:
            out.append(getattr(r, "index", None))
    return out


def to_pil(images: Any) -> list[Image.Image]:
    """Normalise metric input to a list of RGB PIL images."""
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[1] not in (1, 3, 4):
            raise ValueError(f"expected a BCHW image tensor, got shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        arr = t.permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).convert("RGB") for a in arr]
    if isinstance(images, np.ndarray) and images.ndim == 4:  # a NHWC batch
        images = list(images)
    elif isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im if im.mode == "RGB" else im.convert("RGB"))
        elif isinstance(im, np.ndarray):
            a = im if im.dtype == np.uint8 else (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
            out.append(Image.fromarray(a).convert("RGB"))
        elif isinstance(im, (str, Path)):
            out.append(load_image(im))
        else:
            raise TypeError(f"unsupported image type {type(im).__name__}")
    return out


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully (so a truncated file fails here, naming the file, not mid-metric)."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ConceptlockError(f"{p}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConceptlockError(f"{p}: unreadable or truncated image ({msg})") from None


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder, sorted by name (the order metrics see them)."""
    f = Path(folder)
    if not f.is_dir():
        raise ConceptlockError(f"{f}: image folder does not exist")
    files = sorted(p for p in f.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ConceptlockError(f"{f}: no images ({', '.join(IMAGE_SUFFIXES)}) in folder")
    return files


def weights_dir() -> Path:
    """Where local metric weights live: ``$CONCEPTLOCK_WEIGHTS`` or ``~/.cache/conceptlock/weights``."""
    env = os.environ.get("CONCEPTLOCK_WEIGHTS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "conceptlock" / "weights"


def weights_missing(metric: str, path: str | Path, what: str) -> ConceptlockError:
    """The one-line error for absent weights: what is needed and where to put it."""
    return ConceptlockError(f"{metric}: weights not found at {path}; put {what} there (or pass its path)")


# ----------------------------------------------------------------------------------------- registry

MetricFactory = Callable[..., Metric]
_REGISTRY: dict[str, MetricFactory | str] = {
    "nudenet": "conceptlock.metrics.nudenet:NudeNetMetric",
    "clip_score": "conceptlock.metrics.clip_score:CLIPScoreMetric",
    "aesthetic": "conceptlock.metrics.aesthetic:AestheticMetric",
    "q16": "conceptlock.metrics.q16:Q16Metric",
    "ip": "conceptlock.metrics.q16:IPMetric",
    "fid": "conceptlock.metrics.fid:FIDMetric",
}
# Name prefixes whose metrics register themselves when this module is imported.
_LAZY_PREFIX_MODULES: dict[str, tuple[str, ...]] = {"toy": ("conceptlock.metrics.toy", "conceptlock.world")}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_metric(name: str, factory: MetricFactory) -> None:
    """Register a metric factory (a Metric subclass or a function returning one) under `name`."""
    _REGISTRY[_norm(name)] = factory


def available_metrics() -> list[str]:
    return sorted(_REGISTRY)


def parse_metric_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"nudenet:preset=i2p-6@0.5"`` -> ``("nudenet", {"preset": "i2p-6@0.5"})``."""
    parts = spec.strip().split(":")
    name, kw = _norm(parts[0]), {}
    for p in parts[1:]:
        if "=" not in p:
            raise ConceptlockError(f"metric spec {spec!r}: option {p!r} is not key=value")
        k, v = p.split("=", 1)
        kw[k.strip().replace("-", "_")] = v.strip()
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ConceptlockError(f"metric spec {spec!r}: bad metric name {parts[0]!r}")
    return name, kw


def _resolve(name: str) -> MetricFactory | None:
    f = _REGISTRY.get(name)
    if f is None:
        for prefix, modules in _LAZY_PREFIX_MODULES.items():
            if name.startswith(prefix):
                for m in modules:
                    try:
                        importlib.import_module(m)
                    except ImportError:
                        continue
                f = _REGISTRY.get(name)
    if isinstance(f, str):
        mod, attr = f.split(":")
        f = getattr(importlib.import_module(mod), attr)
        _REGISTRY[name] = f
    return f


def get_metric(name: str, **kw: Any) -> Metric:
    """Build a metric by name or spec (``"nudenet:preset=i2p-6@0.5"``); keywords override the spec."""
    base, opts = parse_metric_spec(name)
    opts.update(kw)
    factory = _resolve(base)
    if factory is None:
        raise ConceptlockError(f"unknown metric {base!r} (available: {', '.join(available_metrics())})")
    try:
        return factory(**opts)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ConceptlockError(f"metric {base!r}: {str(e).split(')', 1)[-1].strip() or e}") from None
        raise


def iter_batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
