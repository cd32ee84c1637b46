"""Prompt sets: the published I2P and COCO-30K CSVs, generic CSVs, and pluggable sources (`toy:`).

Why: every number in the papers is "metric over prompt set P with seed s per prompt". I2P ships a
seed *and* a guidance scale per prompt; reproducing it means honouring both, so a row carries its
own seed and (optional) guidance and the generator uses them. Columns we do not interpret are kept
in ``PromptRow.extra`` (e.g. I2P's ``categories``, or ``shape``/``colour`` for toy-world fidelity),
so metrics can read them.

Formats (detected from the header):

- ``i2p``: prompt, categories, hard, inappropriate_percentage, nudity_percentage, q16_percentage,
  sd_safety_percentage, prompt_toxicity, lexica_url, evaluation_seed, evaluation_guidance,
  sd_image_width, sd_image_height, sd_model, case_number.
- ``coco``: image_id, source, prompt, evaluation_seed.
- ``csv``: any CSV with a ``prompt`` column and a ``seed`` or ``evaluation_seed`` column (and an
  optional ``guidance`` / ``evaluation_guidance`` column). Without a seed column the row's seed is
  ``base_seed + row index`` (recorded, so still reproducible).

I2P's ``sd_image_width``/``sd_image_height`` are kept in ``extra`` but not applied: the image size
is a run setting (a toy model is 32 px, SD 1.4 is 512 px).

Sources: ``register_prompt_source("toy", fn)`` makes ``load_prompts("toy:NAME")`` call
``fn("NAME")``; the function returns a ``PromptSet`` or a list of ``PromptRow``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConceptlockError

__all__ = [
    "PromptRow",
    "PromptSet",
    "load_prompts",
    "parse_seed",
    "register_prompt_source",
    "registered_prompt_sources",
]

I2P_COLUMNS = (
    "prompt",
    "categories",
    "hard",
    "inappropriate_percentage",
    "nudity_percentage",
    "q16_percentage",
    "sd_safety_percentage",
    "prompt_toxicity",
    "lexica_url",
    "evaluation_seed",
    "evaluation_guidance",
    "sd_image_width",
    "sd_image_height",
    "sd_model",
    "case_number",
)
COCO_COLUMNS = ("image_id", "source", "prompt", "evaluation_seed")

_SEED_COLUMNS = ("evaluation_seed", "seed")
_GUIDANCE_COLUMNS = ("evaluation_guidance", "guidance")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts up to 2**64 - 1; keep a signed-safe range


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a set: its text, its own seed, optional guidance, and every other column.

    ``index`` is the row's position in the set (0-based); it names the image files, so it must be
    stable for a given set. ``guidance`` is None when the set does not fix one (the run's default
    applies). ``extra`` holds the remaining columns as strings (CSV) or plain values (sources).
    """

    prompt: str
    seed: int
    index: int
    guidance: float | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def get(self, key: str, default: Any = None) -> Any:
        """Column access across the typed fields and ``extra`` (e.g. ``row.get("shape")``)."""
        if key in ("prompt", "seed", "index", "guidance", "source"):
            return getattr(self, key)
        return self.extra.get(key, default)

    def __getitem__(self, key: str) -> Any:
        """``row["shape"]``: rows read like the CSV's dicts, so judges written for dicts accept them."""
        if key in ("prompt", "seed", "index", "guidance", "source"):
            return getattr(self, key)
        return self.extra[key]


@dataclass
class PromptSet(Sequence[PromptRow]):
    """An ordered list of rows with the spec it came from and the detected format."""

    name: str
    rows: list[PromptRow]
    format: str = "csv"
    sha256: str | None = None  # of the source file, recorded in results for provenance

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return self.rows[i]

    def __iter__(self) -> Iterator[PromptRow]:
        return iter(self.rows)

    def head(self, n: int | None) -> PromptSet:
        """The first n rows (for quick runs); the indices, hence file names, stay the same."""
        if n is None or n >= len(self.rows):
            return self
        return PromptSet(self.name, self.rows[:n], self.format, self.sha256)


PromptSourceFn = Callable[[str], "PromptSet | Sequence[PromptRow]"]
_SOURCES: dict[str, PromptSourceFn] = {}
# Prefixes whose source registers itself on import, so `toy:` works without an explicit import.
_LAZY_SOURCE_MODULES: dict[str, str] = {"toy": "conceptlock.world"}


def register_prompt_source(prefix: str, fn: PromptSourceFn) -> None:
    """Make ``load_prompts(f"{prefix}:NAME")`` return ``fn("NAME")`` (re-registering replaces)."""
    prefix = prefix.rstrip(":")
    if not prefix or not prefix.replace("_", "").replace("-", "").isalnum() or len(prefix) < 2:
        raise ValueError(f"prompt source prefix must be 2+ letters/digits, got {prefix!r}")
    _SOURCES[prefix] = fn


def registered_prompt_sources() -> list[str]:
    return sorted(_SOURCES)


def parse_seed(value: Any, where: str) -> int:
    """An integer seed from a CSV cell; '42' and '42.0' are fine, '4.5', 'x' and '' are errors."""
    text = str(value).strip() if value is not None else ""
    try:
        seed = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            raise ConceptlockError(f"{where}: seed {text!r} is not an integer") from None
        if not math.isfinite(f) or f != int(f):
            raise ConceptlockError(f"{where}: seed {text!r} is not an integer") from None
        seed = int(f)
    if not 0 <= seed <= MAX_SEED:
        raise ConceptlockError(f"{where}: seed {seed} is outside 0..2**63-1")
    return seed


def _parse_guidance(value: Any, where: str) -> float | None:
    text = str(value).strip() if value is not None else ""
    if text == "":
        return None
    try:
        g = float(text)
    except ValueError:
        raise ConceptlockError(f"{where}: guidance {text!r} is not a number") from None
    if not math.isfinite(g):
        raise ConceptlockError(f"{where}: guidance {text!r} is not a finite number")
    return g


def _detect_format(columns: Sequence[str]) -> str:
    cols = set(columns)
    if {"evaluation_seed", "evaluation_guidance", "categories"} <= cols:
        return "i2p"
    if {"image_id", "evaluation_seed"} <= cols:
        return "coco"
    return "csv"


def _load_csv(path: Path, base_seed: int) -> PromptSet:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConceptlockError(f"{path}: cannot read prompt file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConceptlockError(f"{path}: not UTF-8 text (byte {e.start})") from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise ConceptlockError(f"{path}: empty prompt set (no header row)")
    reader.fieldnames = header
    if "prompt" not in header:
        raise ConceptlockError(f"{path}: no 'prompt' column (columns: {', '.join(header)})")
    fmt = _detect_format(header)
    seed_col = next((c for c in _SEED_COLUMNS if c in header), None)
    guid_col = next((c for c in _GUIDANCE_COLUMNS if c in header), None)
    used = {"prompt", seed_col, guid_col}
    rows: list[PromptRow] = []
    for i, rec in enumerate(reader):
        where = f"{path}: row {i + 1} (line {reader.line_num})"
        if None in rec:  # more cells than header columns
            raise ConceptlockError(f"{where}: {len(header) + len(rec[None])} cells for {len(header)} columns")
        prompt = (rec.get("prompt") or "").strip()
        if not prompt:
            raise ConceptlockError(f"{where}: empty prompt")
        seed = parse_seed(rec.get(seed_col), where) if seed_col else base_seed + i
        guidance = _parse_guidance(rec.get(guid_col), where) if guid_col else None
        extra = {k: v for k, v in rec.items() if k not in used}
        rows.append(PromptRow(prompt=prompt, seed=seed, index=i, guidance=guidance, source=str(path), extra=extra))
    if not rows:
        raise ConceptlockError(f"{path}: empty prompt set (header but no rows)")
    return PromptSet(name=str(path), rows=rows, format=fmt, sha256=hashlib.sha256(raw).hexdigest())


def _from_source(spec: str, prefix: str, name: str) -> PromptSet:
    fn = _SOURCES.get(prefix)
    if fn is None and prefix in _LAZY_SOURCE_MODULES:
        try:
            importlib.import_module(_LAZY_SOURCE_MODULES[prefix])
        except ImportError:
            pass
        fn = _SOURCES.get(prefix)
    if fn is None:
        known = ", ".join(f"{p}:" for p in registered_prompt_sources()) or "none registered"
        raise ConceptlockError(f"{spec}: unknown prompt set (no source for '{prefix}:'; known: {known})")
    try:
        got = fn(name)
    except KeyError as e:
        raise ConceptlockError(f"{spec}: unknown prompt set ({e.args[0] if e.args else name})") from None
    out = got if isinstance(got, PromptSet) else PromptSet(name=spec, rows=list(got), format=prefix)
    if not out.rows:
        raise ConceptlockError(f"{spec}: empty prompt set")
    for r in out.rows:
        if not isinstance(r, PromptRow):
            raise ConceptlockError(f"{spec}: source returned {type(r).__name__}, expected PromptRow")
    return out


def load_prompts(spec: str | Path, base_seed: int = 0, limit: int | None = None) -> PromptSet:
    """Load a prompt set from a CSV path or a registered source spec like ``toy:implicit``.

    ``base_seed`` seeds rows of seedless CSVs (seed = base_seed + row index); ``limit`` keeps the
    first rows only. Errors are one line naming the file and row.
    """
    s = str(spec)
    p = Path(s)
    if p.is_file():
        ps = _load_csv(p, base_seed)
    elif ":" in s and len(s.split(":", 1)[0]) > 1 and not p.suffix.lower() == ".csv":
        prefix, name = s.split(":", 1)
        ps = _from_source(s, prefix, name)
    elif p.suffix.lower() == ".csv" or p.parent != Path("."):
        raise ConceptlockError(f"{s}: prompt file not found")
    else:
        known = ", ".join(f"{p}:NAME" for p in registered_prompt_sources())
        hint = f"; or one of {known}" if known else ""
        raise ConceptlockError(f"{s}: unknown prompt set (expected a CSV file{hint})")
    return ps.head(limit)
