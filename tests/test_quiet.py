"""The CLI starts without transformers' torchvision-fallback notice (torchvision is absent by design), while other
transformers warnings still get through."""

from __future__ import annotations

import logging

import conceptlock  # noqa: F401  (installs the filter)


def test_only_the_torchvision_fallback_notice_is_dropped():
    logger = logging.getLogger("transformers.utils.import_utils")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    logger.addHandler(h)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`")
        logger.warning("something else")
    finally:
        logger.removeHandler(h)
    assert seen == ["something else"]
