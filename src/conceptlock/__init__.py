"""conceptlock: keep the safety alignment of text-to-image diffusion models through fine-tuning."""

__version__ = "0.1.0"
