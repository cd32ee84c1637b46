"""conceptlock: keep the safety alignment of text-to-image diffusion models through fine-tuning."""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchvisionFallbackNotice(_logging.Filter):
    """conceptlock runs without torchvision on purpose (it has no CPU build for the pinned torch), so transformers'
    notice that CLIP's image processor falls back to its PIL version is expected, not news: drop just that line."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
