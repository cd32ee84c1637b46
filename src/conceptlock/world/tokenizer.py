"""The CLIP BPE tokenizer, built locally from OpenAI's vocabulary (no download).

`assets/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's BPE merge list (MIT licence), as shipped
inside the `open-clip-torch` wheel. From it we write the `vocab.json` + `merges.txt` pair that
`transformers.CLIPTokenizer` reads, exactly as `openai/clip-vit-large-patch14` has them, so toy-world
prompts and real prompt sets (I2P) get SD 1.x's token ids.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    raw = resources.files("conceptlock.world").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE
    return {t: i for i, t in enumerate(vocab)}, ["#version: 0.2"] + [" ".join(p) for p in pairs]


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json and merges.txt for a CLIPTokenizer into `folder`; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    return folder


@lru_cache(maxsize=1)
def _cached_dir() -> str:
    d = Path(tempfile.gettempdir()) / f"conceptlock-clip-bpe-{os.getuid() if hasattr(os, 'getuid') else 0}"
    if not (d / "merges.txt").exists():
        tmp = Path(tempfile.mkdtemp(prefix="clip-bpe-", dir=d.parent))
        write_tokenizer_files(tmp)
        try:
            os.replace(tmp, d)
        except OSError:  # another process won the race; use theirs
            pass
    return str(d)


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """SD 1.x's CLIPTokenizer (pad = eos, max length 77), built offline."""
    d = _cached_dir()
    # transformers 5 takes the files as `vocab`/`merges` (paths or objects); 4.x as `*_file`.
    vocab, merges = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
    try:
        tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    except TypeError:
        tok = CLIPTokenizer(vocab_file=vocab, merges_file=merges, model_max_length=model_max_length)
    if tok.bos_token_id != BOS_ID or tok.eos_token_id != EOS_ID:
        raise RuntimeError("conceptlock: the CLIP tokenizer was built with the wrong special ids")
    return tok
