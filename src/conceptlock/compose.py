"""Modular LoRA at inference: compose named adapters on one base, W* = W0 + sum_a weight_a * dW_a.

`run_compose` (what `conceptlock compose` calls) writes one of two artefacts:

* **Composed folder (default, for evaluation).** A copy of the base pipeline folder plus the adapter files, unfused:

      out/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   the base, byte for byte
      out/adapters/<name>.safetensors                                           each adapter, byte for byte
      out/conceptlock_adapters.json                                             {"format": 1, "adapters": [
                                                                                  {"name", "file", "weight",
                                                                                   "sha256"}, ...]}

  `load_model(out)` (used by `finetune`, `attack finetune`, and meant for `evaluate --model`) loads the base and
  composes the listed adapters with `set_adapters`; plain diffusers does the same by hand:
  `pipe = StableDiffusionPipeline.from_pretrained(out)`, then for each entry
  `pipe.load_lora_weights(out / file, adapter_name=name)`, then `pipe.set_adapters(names, adapter_weights=weights)`.
  diffusers ignores the extra files. The base is copied, not hard-linked: a later in-place save over the base
  folder must not silently change a model that was evaluated as safe. Safety is evaluated on this unfused form.

* **Fused folder (`fuse=True`, for deployment only).** A plain diffusers pipeline folder whose UNet (and text
  encoder, if an adapter touches it) weights are W0 + sum_a weight_a * dW_a. Fusing uses diffusers' safe fusing,
  so an adapter that would put NaN into the weights is refused with a one-line error.

Weights may be negative (Paper A's model arithmetic): `safety=FILE:-1` gives W0 - dW_safe, and
`safety=FILE:1 task=FILE:-1` gives W0 + dW_safe - dW_task.

Threat model (Paper A): composition protects a *service* that controls inference and always adds dW_safe. It does
not protect released weights: whoever holds W0 can drop the safety adapter, and a fused folder is an ordinary
model that can be fine-tuned like any other.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import compose, load_adapter, parse_adapter_spec
from .adapters import fuse as fuse_adapters
from .errors import ConceptlockError
from .io import replace_dir
from .pipelines import check_pipeline_folder, load_pipeline, save_pipeline

__all__ = ["ADAPTERS_FILE", "AdapterRef", "ComposeResult", "load_model", "read_composition", "run_compose"]

ADAPTERS_FILE = "conceptlock_adapters.json"
ADAPTERS_DIR = "adapters"


@dataclass(frozen=True)
class AdapterRef:
    """One named adapter of a composition: its file and its inference weight."""

    name: str
    path: Path
    weight: float = 1.0

    def spec(self) -> str:
        """`NAME=FILE:WEIGHT`, the form every `--adapter` option reads."""
        return f"{self.name}={self.path}:{self.weight:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "weight": self.weight, "sha256": sha256_file(self.path)}


@dataclass
class ComposeResult:
    out: Path
    adapters: list[AdapterRef]
    fused: bool


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_composition(model_dir: str | Path) -> list[AdapterRef]:
    """The adapters a composed folder carries (empty for a plain pipeline folder), files checked against sha256."""
    folder = Path(model_dir)
    index = folder / ADAPTERS_FILE
    if not index.is_file():
        return []
    try:
        meta = json.loads(index.read_text())
        entries = meta["adapters"]
        refs = [AdapterRef(str(e["name"]), folder / e["file"], float(e.get("weight", 1.0))) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConceptlockError(f"{index}: unreadable adapter list ({type(e).__name__}: {e})") from None
    for ref, e in zip(refs, entries, strict=True):
        if not ref.path.is_file():
            raise ConceptlockError(f"{index}: adapter {ref.name!r} file {ref.path} is missing")
        if e.get("sha256") and sha256_file(ref.path) != e["sha256"]:
            raise ConceptlockError(f"{index}: adapter {ref.name!r} file {ref.path} changed since it was composed")
    return refs


def resolve_adapters(carried: Sequence[AdapterRef], specs: Sequence[str | AdapterRef]) -> list[AdapterRef]:
    """Carried adapters followed by `NAME=FILE[:WEIGHT]` specs; names must be unique and files must exist."""
    refs = list(carried)
    for s in specs:
        ref = s if isinstance(s, AdapterRef) else AdapterRef(*parse_adapter_spec(s))
        if not ref.path.is_file():
            raise ConceptlockError(f"--adapter {ref.name}: {ref.path}: adapter file not found")
        if ref.name in {r.name for r in refs}:
            raise ConceptlockError(f"--adapter {ref.name}: an adapter of that name is already part of the model")
        refs.append(ref)
    return refs


def apply_refs(pipe: Any, refs: Sequence[AdapterRef]) -> None:
    """Load each adapter (strict: a misfit file is a one-line error) and compose them with their weights."""
    for r in refs:
        load_adapter(pipe, r.path, r.name)
    if refs:
        compose(pipe, {r.name: r.weight for r in refs})


def load_model(
    model: str | Path, adapters: Sequence[str | AdapterRef] = (), dtype: torch.dtype = torch.float32
) -> tuple[Any, list[AdapterRef]]:
    """Load a pipeline folder with the adapters it carries (a composed folder) plus `adapters`, all composed.

    Returns the pipeline and the full adapter list (carried first), so callers can record or re-compose it.
    """
    check_pipeline_folder(model)
    refs = resolve_adapters(read_composition(model), adapters)
    pipe = load_pipeline(model, dtype=dtype)
    apply_refs(pipe, refs)
    return pipe, refs


def _copy_base(base: Path, dest: Path) -> None:
    """Copy the pipeline folder without an earlier composition's adapter list and files (rewritten by the caller)."""
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns(ADAPTERS_FILE, ADAPTERS_DIR, ".*"))


def run_compose(
    base: str | Path,
    adapters: Sequence[str | AdapterRef],
    out: str | Path,
    fuse: bool = False,
    overwrite: bool = False,
) -> ComposeResult:
    """Compose `adapters` (`NAME=FILE[:WEIGHT]`) on `base` and write a composed folder, or a fused one.

    Every adapter is loaded into the base first (strict), so a file that fits no module or has the wrong rank is a
    one-line error before anything is written. `out` is replaced only with `overwrite`, and never when it is the
    base itself or inside it.
    """
    base, out = Path(base), Path(out)
    check_pipeline_folder(base)
    if not adapters:
        raise ConceptlockError("compose: give at least one --adapter NAME=FILE[:WEIGHT]")
    b, o = base.resolve(), out.resolve()
    if o == b or b in o.parents:
        raise ConceptlockError(f"--out {out}: must not be the base folder or inside it")
    if out.exists() and not overwrite:
        raise ConceptlockError(f"{out}: already exists (pass --overwrite to replace it)")
    pipe, refs = load_model(base, adapters)
    weights = {r.name: r.weight for r in refs}
    if fuse:
        fuse_adapters(pipe, weights, unload=True)
        save_pipeline(pipe, out, overwrite=overwrite)
        return ComposeResult(out=out, adapters=refs, fused=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        staged = tmp / "model"
        _copy_base(base, staged)
        (staged / ADAPTERS_DIR).mkdir()
        entries = []
        for r in refs:
            rel = f"{ADAPTERS_DIR}/{r.name}.safetensors"
            shutil.copy2(r.path, staged / rel)
            entries.append({"name": r.name, "file": rel, "weight": r.weight, "sha256": sha256_file(staged / rel)})
        meta = {
            "format": 1,
            "base": str(base),
            "adapters": entries,
            "how": "diffusers: from_pretrained(this folder); load_lora_weights(folder/file, adapter_name=name) for "
            "each entry; set_adapters(names, adapter_weights=weights). Evaluate unfused; fuse only to deploy.",
        }
        (staged / ADAPTERS_FILE).write_text(json.dumps(meta, indent=1))
        replace_dir(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ComposeResult(
        out=out,
        adapters=[AdapterRef(r.name, out / e["file"], r.weight) for r, e in zip(refs, entries, strict=True)],
        fused=False,
    )
