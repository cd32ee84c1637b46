"""Metrics with one interface: ``update(images, prompts, rows)`` then ``compute() -> MetricResult``.

Back-ends are imported lazily by name (``get_metric("nudenet")``), so importing this package does
not load CLIP, ONNX or Inception.
"""

from .base import Metric, MetricResult, available_metrics, get_metric, register_metric

__all__ = ["Metric", "MetricResult", "available_metrics", "get_metric", "register_metric"]
