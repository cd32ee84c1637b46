"""LAION aesthetic predictor (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE").

An MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts between the first four layers, no
activations, exactly as released) on the L2-normalised CLIP ViT-L/14 image embedding. Scores are
roughly 1-10; reported as the mean with a bootstrap 95% CI.

Weights: a safetensors file with the released state-dict keys (``layers.0``, ``layers.2``,
``layers.4``, ``layers.6``, ``layers.7``; ``.weight``/``.bias``). The release is a pickled ``.pth``;
convert it once on your machine (we never unpickle)::

    import torch; from safetensors.torch import save_file
    sd = torch.load("sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, "aesthetic-l14.safetensors")

Default location: ``$CONCEPTLOCK_WEIGHTS/aesthetic/sac+logos+ava1-l14-linearMSE.safetensors``.
The MLP's input width is read from the file, so it must match the CLIP model's projection width.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..pipelines import ConceptlockError
from .base import Metric, MetricResult, weights_dir, weights_missing
from .clip_score import DEFAULT_CLIP, load_clip

__all__ = ["AestheticMLP", "AestheticMetric", "default_aesthetic_weights", "load_aesthetic_mlp"]

_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


def default_aesthetic_weights() -> Path:
    return weights_dir() / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors"


class AestheticMLP(nn.Module):
    """The released head; module indices match its state dict."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_mlp(path: str | Path) -> AestheticMLP:
    """Load the head from safetensors; one-line errors for a missing file or foreign keys."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise weights_missing(
            "aesthetic", p, "the LAION aesthetic MLP as safetensors (see conceptlock.metrics.aesthetic)"
        )
    try:
        sd = load_file(str(p))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ConceptlockError(f"aesthetic: {p} is not a readable safetensors file ({e})") from None
    missing = [f"{k}.weight" for k in _KEYS if f"{k}.weight" not in sd]
    if missing:
        raise ConceptlockError(f"aesthetic: {p} lacks {', '.join(missing)} (not a LAION aesthetic MLP)")
    mlp = AestheticMLP(int(sd["layers.0.weight"].shape[1]))
    try:
        mlp.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ConceptlockError(f"aesthetic: {p} does not fit the 768-1024-128-64-16-1 MLP ({str(e)[:120]})") from None
    return mlp.eval()


class AestheticMetric(Metric):
    """Mean LAION aesthetic score (higher = prettier)."""

    name = "aesthetic"
    higher_is_better = True

    def __init__(self, weights: str | Path | None = None, model: str = DEFAULT_CLIP, device: str | None = None):
        super().__init__()
        self.weights = Path(weights) if weights else default_aesthetic_weights()
        self.mlp = load_aesthetic_mlp(self.weights)  # fail on missing weights before loading CLIP
        self.backend = load_clip(model, device)
        if self.mlp.input_size != self.backend.dim:
            raise ConceptlockError(
                f"aesthetic: {self.weights} expects {self.mlp.input_size}-d embeddings, "
                f"CLIP {self.backend.source} gives {self.backend.dim}-d"
            )
        self.mlp.to(self.backend.device)

    @torch.no_grad()
    def _update(self, images, prompts, rows) -> None:
        emb = self.backend.embed_images(images).to(self.backend.device)
        self._items.extend(self.mlp(emb).squeeze(-1).float().cpu().tolist())

    def compute(self) -> MetricResult:
        return self._mean_result({"weights": str(self.weights), "model": self.backend.source})
