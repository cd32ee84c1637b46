"""FID between generated images and a reference set, via torchmetrics' ``FrechetInceptionDistance``.

The feature extractor is injectable (``feature=`` any ``nn.Module`` mapping a uint8 BCHW batch to
(B, D) features): the toy world passes its toy-CLIP image tower, tests pass a tiny random net.
The standard path (Inception-v3 pool3, 2048-d, the TF-ported FID weights) needs torch-fidelity,
which needs torchvision; it is an optional extra (``pip install conceptlock[fid]``) imported
lazily only when ``feature`` is None or an int, never in tests. ``inception_weights=`` points it at
a local copy of ``pt_inception-2015-12-05-6726825d.pth`` instead of downloading.

COCO-30K protocol (as used for SD v1.4 / LCFDSD / ResAlign; papers are vague, so all of it is
configurable here and recorded in the result):

1. Prompts: 30,000 captions from MS-COCO 2014 *val*, one caption per distinct image, sampled with a
   fixed seed; the COCO-30K CSV (image_id, source, prompt, evaluation_seed) fixes both the captions
   and each generation seed (``conceptlock evaluate --prompts coco30k.csv``).
2. Generate one image per caption at the model's native size (512 px for SD 1.x), CFG 7.5, the run's
   scheduler and steps (ResAlign: 30 steps). Record them: FID moves with all of them.
3. Reference: the 30,000 (or all 40,504) val2014 real images, centre-cropped to square and resized
   to the generated size with bicubic resampling (``reference=FOLDER``; the same preprocessing is
   applied here to any reference image whose size differs from the generated size).
4. Features: Inception-v3 pool3 (2048-d) on both sets; FID = ||mu_r - mu_g||^2 +
   Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). clean-fid and torchmetrics (torch-fidelity weights) agree to
   ~0.1 for the same resize; pytorch-fid's bilinear resize differs more. Report which was used.

FID has no closed-form CI and is biased in n, so ``ci_low``/``ci_high`` are None; compare FIDs only
at equal n. Smaller sets (COCO-10K) give systematically larger values.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from tqdm.auto import tqdm

from ..pipelines import ConceptlockError
from .base import Metric, MetricResult, list_images, load_image, to_pil

__all__ = ["FIDMetric", "images_to_uint8"]


def images_to_uint8(images: Sequence[Image.Image], size: tuple[int, int] | None) -> torch.Tensor:
    """Stack RGB PIL images as a uint8 BCHW tensor, centre-cropping + resizing to ``size`` (W, H) when they differ."""
    arrs = []
    for im in images:
        if size is not None and im.size != size:
            im = ImageOps.fit(im, size, method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
        arrs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def _standard_inception(feature: int, weights: str | None) -> Any:
    try:
        import torch_fidelity  # noqa: F401  (pulls torchvision; only on users' machines)
    except ImportError:
        raise ConceptlockError(
            "fid: the standard Inception features need `pip install conceptlock[fid]` (torch-fidelity, "
            "torchvision); or pass feature=<nn.Module>"
        ) from None
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=weights)


class FIDMetric(Metric):
    """FID of the updated (generated) images against ``reference`` images (lower = closer)."""

    name = "fid"
    higher_is_better = False
    has_item_scores = False

    def __init__(
        self,
        feature: nn.Module | int | str | None = None,
        reference: str | Path | None = None,
        image_size: int | str | None = None,
        inception_weights: str | None = None,
        batch_size: int | str = 32,
        device: str | None = None,
    ):
        super().__init__()
        from torchmetrics.image.fid import FrechetInceptionDistance

        if isinstance(feature, nn.Module):
            self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False)
            self.feature_name = type(feature).__name__
        else:
            dim = int(feature) if feature not in (None, "", "inception") else 2048
            self.fid = _standard_inception(dim, inception_weights)
            self.feature_name = f"inception-v3-tf-pool{dim}"
        self.device = torch.device(device) if device else torch.device("cpu")
        self.fid.to(self.device)
        self.reference = Path(reference) if reference else None
        self.size = (int(image_size), int(image_size)) if image_size else None
        self.batch_size = int(batch_size)
        self.n_real = 0
        self._real_loaded = False

    def update_real(self, images: Any) -> None:
        """Add reference images (PIL, arrays or tensors); resized to the generated size."""
        pil = to_pil(images)
        if not pil:
            return
        if self.size is None:
            self.size = pil[0].size
        self.fid.update(images_to_uint8(pil, self.size).to(self.device), real=True)
        self.n_real += len(pil)

    def _load_reference(self) -> None:
        if self._real_loaded or self.reference is None:
            return
        files = list_images(self.reference)
        for i in tqdm(range(0, len(files), self.batch_size), desc="fid reference", unit="batch", leave=False):
            self.update_real([load_image(f) for f in files[i : i + self.batch_size]])
        self._real_loaded = True

    def _update(self, images, prompts, rows) -> None:
        if self.size is None:
            self.size = images[0].size
        self.fid.update(images_to_uint8(images, self.size).to(self.device), real=False)
        self._items.extend([float("nan")] * len(images))  # FID has no per-image score; counts n

    def item_scores(self) -> list[float]:
        return []  # FID is a set statistic: nothing to pair per image

    def reset(self) -> None:
        super().reset()
        self.fid.reset()  # keeps reference features (reset_real_features=False)

    def compute(self) -> MetricResult:
        self._check_nonempty()
        self._load_reference()
        n = len(self._items)
        if self.n_real < 2 or n < 2:
            where = f" ({self.reference})" if self.reference else " (pass reference=FOLDER or call update_real)"
            raise ConceptlockError(
                f"fid: needs >= 2 generated and >= 2 reference images, got {n} and {self.n_real}{where}"
            )
        value = float(self.fid.compute())
        return MetricResult(
            name=self.name,
            value=value,
            n=n,
            ci_low=None,
            ci_high=None,
            details={
                "n_real": self.n_real,
                "feature": self.feature_name,
                "size": list(self.size) if self.size else None,
                "reference": str(self.reference) if self.reference else None,
                "ci": "none (FID is a biased set statistic; compare at equal n)",
            },
        )
