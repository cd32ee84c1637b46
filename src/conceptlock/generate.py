"""Prompt rows in, PNG images + ``manifest.jsonl`` out: deterministic, batched, resumable, sharded.

Why each property:

- **Deterministic.** Image k of row r is drawn from its own CPU ``torch.Generator`` seeded with
  ``image_seed(r.seed, k)`` (k = 0 uses the row's seed itself, so I2P's published per-prompt seeds
  are honoured). Latents are drawn on the CPU and moved, so they do not depend on the device.
- **Batched.** Several prompts go into one pipeline call with a list of generators. The batch plan
  is a pure function of (rows, images per prompt, batch size, guidance): rows are grouped by
  guidance (a pipeline call takes one guidance scale; I2P rows each carry their own), then chunked.
  Every batch is computed identically whatever the process count or resume state, which is what
  makes sharded output bit-identical to a single process.
- **Resumable.** An image is skipped when its file exists *and* the manifest holds an entry for it
  with the same generation key (prompt, seed, guidance, steps, size, model, adapters, options).
  A batch with any missing image is regenerated whole (so its numerics are unchanged) and only the
  missing files are written. Images are written atomically (temp file + rename), and the manifest
  entry is written after the image, so a crash never leaves a half image marked done.
- **Sharded.** Under ``accelerate launch --num_processes N`` the batch list is split with
  ``PartialState.split_between_processes``; each process appends to its own
  ``manifest.part-*.jsonl`` and the main process merges them into ``manifest.jsonl`` at the end.
  ``shard=(i, n)`` runs shard i of n explicitly (e.g. on separate machines sharing a disk).

Manifest entry (one JSON object per line): image, index, k, prompt, seed, row_seed, guidance,
steps, height, width, model, adapters, options, row (the prompt row's extra columns), key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from .io import atomic_write_text as _atomic_write_text
from .pipelines import ConceptlockError
from .prompts import PromptRow

__all__ = [
    "GenerationResult",
    "WorkItem",
    "generate",
    "image_seed",
    "merge_manifests",
    "partial_state",
    "plan_batches",
    "read_manifest",
]

MANIFEST = "manifest.jsonl"
IMAGES_DIR = "images"
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def image_seed(row_seed: int, k: int) -> int:
    """Seed of image k of a row: the row seed for k = 0, a splitmix64 mix of (seed, k) otherwise.

    A hash (not ``seed + k``) so rows with consecutive seeds never share noise across images.
    """
    if k == 0:
        return int(row_seed)
    z = (int(row_seed) + k * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


@dataclass(frozen=True)
class WorkItem:
    """One image to make: which row, which of its K images, its seed, file and manifest entry."""

    row: PromptRow
    k: int
    seed: int
    guidance: float
    image: str  # relative to the output folder
    entry: dict[str, Any]


@dataclass
class GenerationResult:
    """What a `generate` call did. ``entries`` covers the whole plan (every shard) once complete."""

    out_dir: Path
    entries: list[dict[str, Any]]
    generated: int
    skipped: int
    pipe_calls: int
    seconds: float
    complete: bool
    shard: tuple[int, int] = (0, 1)
    images_per_second: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _entry_key(entry: dict[str, Any]) -> str:
    fields = ("prompt", "seed", "guidance", "steps", "height", "width", "model", "adapters", "options")
    blob = json.dumps({f: entry[f] for f in fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's native (height, width), as diffusers computes it when none is given."""
    sample = pipe.unet.config.sample_size
    scale = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, (list, tuple)):
        return int(sample[0]) * scale, int(sample[1]) * scale
    return int(sample) * scale, int(sample) * scale


def plan_batches(
    rows: Sequence[PromptRow],
    *,
    steps: int,
    guidance: float,
    images_per_prompt: int,
    batch_size: int,
    height: int,
    width: int,
    model: str = "",
    adapters: Sequence[str] = (),
    options: dict[str, Any] | None = None,
) -> list[list[WorkItem]]:
    """The fixed batch plan: items grouped by guidance (first-appearance order), then chunked."""
    if images_per_prompt < 1:
        raise ConceptlockError(f"--images-per-prompt must be >= 1, got {images_per_prompt}")
    if batch_size < 1:
        raise ConceptlockError(f"--batch-size must be >= 1, got {batch_size}")
    if steps < 1:
        raise ConceptlockError(f"--steps must be >= 1, got {steps}")
    opts = _jsonable(options or {})
    adapters = [str(a) for a in adapters]
    groups: dict[float, list[WorkItem]] = {}
    seen: set[int] = set()
    for row in rows:
        if row.index in seen:
            raise ConceptlockError(f"{row.source or 'prompt set'}: duplicate row index {row.index}")
        seen.add(row.index)
        g = float(row.guidance) if row.guidance is not None else float(guidance)
        for k in range(images_per_prompt):
            s = image_seed(row.seed, k)
            image = f"{IMAGES_DIR}/{row.index:05d}_{k:02d}.png"
            entry = {
                "image": image,
                "index": row.index,
                "k": k,
                "prompt": row.prompt,
                "seed": s,
                "row_seed": row.seed,
                "guidance": g,
                "steps": int(steps),
                "height": int(height),
                "width": int(width),
                "model": str(model),
                "adapters": adapters,
                "options": opts,
                "row": _jsonable(row.extra),
            }
            entry["key"] = _entry_key(entry)
            groups.setdefault(g, []).append(WorkItem(row, k, s, g, image, entry))
    batches: list[list[WorkItem]] = []
    for items in groups.values():
        batches.extend(items[i : i + batch_size] for i in range(0, len(items), batch_size))
    return batches


def read_manifest(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """All manifest entries by image path: ``manifest.jsonl`` then part files (newer wins)."""
    out = Path(out_dir)
    files = [out / MANIFEST] if (out / MANIFEST).is_file() else []
    files += sorted(out.glob("manifest.part-*.jsonl"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    entries: dict[str, dict[str, Any]] = {}
    for f in files:
        is_part = f.name != MANIFEST
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                if is_part:  # a line torn by a crash mid-append: that image is simply redone
                    continue
                raise ConceptlockError(f"{f}: line {n} is not valid JSON") from None
            if isinstance(e, dict) and "image" in e:
                entries[e["image"]] = e
    return entries


def merge_manifests(out_dir: str | Path, remove_parts: bool = True) -> Path:
    """Fold part files into ``manifest.jsonl`` (sorted by row index, then k), atomically."""
    out = Path(out_dir)
    entries = [e for e in read_manifest(out).values() if (out / e["image"]).is_file()]
    entries.sort(key=lambda e: (e.get("index", 0), e.get("k", 0), e["image"]))
    _atomic_write_text(out / MANIFEST, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    if remove_parts:
        for p in out.glob("manifest.part-*.jsonl"):
            p.unlink(missing_ok=True)
    return out / MANIFEST


def _save_png(img: Image.Image, path: Path, entry: dict[str, Any]) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("conceptlock", json.dumps({k: entry[k] for k in ("prompt", "seed", "guidance", "steps")}))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def partial_state() -> Any:
    """accelerate's PartialState; on a machine without CUDA it must be told so, or a CPU launch
    under ``accelerate launch``/``torchrun`` with several processes silently runs unsharded."""
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def _call_options(options: dict[str, Any] | None, n: int) -> dict[str, Any]:
    """Pipeline kwargs for a batch of n prompts: a string negative prompt is repeated per prompt."""
    opts = dict(options or {})
    if isinstance(opts.get("negative_prompt"), str):
        opts["negative_prompt"] = [opts["negative_prompt"]] * n
    return opts


class _Shards:
    """The process layout: accelerate's PartialState, or an explicit (index, count) shard."""

    def __init__(self, shard: tuple[int, int] | None, state: Any | None):
        if shard is not None:
            i, n = int(shard[0]), int(shard[1])
            if not (n >= 1 and 0 <= i < n):
                raise ConceptlockError(f"shard {i}/{n}: need 0 <= index < count")
            self.index, self.count, self.state = i, n, None
        else:
            if state is None:
                state = partial_state()
            self.index, self.count, self.state = state.process_index, state.num_processes, state

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def split(self, batches: list) -> list:
        if self.state is not None:
            with self.state.split_between_processes(batches) as mine:
                return list(mine)
        per, extra = divmod(len(batches), self.count)  # the same contiguous split accelerate makes
        start = self.index * per + min(self.index, extra)
        return batches[start : start + per + (1 if self.index < extra else 0)]

    def wait(self) -> None:
        if self.state is not None and self.count > 1:
            self.state.wait_for_everyone()


def generate(
    pipe: Any,
    rows: Sequence[PromptRow],
    out_dir: str | Path,
    *,
    steps: int = 30,
    guidance: float = 7.5,
    images_per_prompt: int = 1,
    batch_size: int = 4,
    height: int | None = None,
    width: int | None = None,
    model: str = "",
    adapters: Sequence[str] = (),
    options: dict[str, Any] | None = None,
    resume: bool = True,
    shard: tuple[int, int] | None = None,
    state: Any | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Generate every (row, k) image into ``out_dir/images`` and record it in ``manifest.jsonl``.

    ``options`` are extra keyword arguments for the pipeline call (e.g. SLD settings for a safe
    pipeline, ``negative_prompt``); they are recorded in the manifest and part of the resume key.
    ``model``/``adapters`` are recorded (and keyed) as given, so name them the way you loaded them.
    """
    t0 = time.perf_counter()
    if len(rows) == 0:
        raise ConceptlockError("empty prompt set: nothing to generate")
    out = Path(out_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    dh, dw = default_size(pipe)
    height, width = int(height or dh), int(width or dw)
    batches = plan_batches(
        rows,
        steps=steps,
        guidance=guidance,
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        height=height,
        width=width,
        model=model,
        adapters=adapters,
        options=options,
    )
    shards = _Shards(shard, state)
    mine = shards.split(batches)
    done = read_manifest(out) if resume else {}

    def is_done(it: WorkItem) -> bool:
        e = done.get(it.image)
        return e is not None and e.get("key") == it.entry["key"] and (out / it.image).is_file()

    call = pipe
    if options and options.get("sld") is not None:  # safe latent diffusion: our own loop, same pipeline parts
        from .sld import sld_pipeline_call

        call = sld_pipeline_call(pipe, options)
    part = out / f"manifest.part-{shards.index:03d}of{shards.count:03d}.jsonl"
    generated = skipped = calls = 0
    n_mine = sum(len(b) for b in mine)
    bar = tqdm(total=n_mine, desc="generate", unit="img", disable=not (progress and shards.is_main))
    with open(part, "a", encoding="utf-8") as mf:
        if part.stat().st_size and not part.read_bytes().endswith(b"\n"):
            mf.write("\n")  # isolate a line torn by an earlier crash
        for batch in mine:
            todo = {it.image for it in batch if not is_done(it)}
            if not todo:
                skipped += len(batch)
                bar.update(len(batch))
                continue
            gens = [torch.Generator(device="cpu").manual_seed(it.seed) for it in batch]
            result = call(
                prompt=[it.row.prompt for it in batch],
                num_inference_steps=steps,
                guidance_scale=batch[0].guidance,
                generator=gens,
                height=height,
                width=width,
                output_type="pil",
                **_call_options(options, len(batch)),
            )
            calls += 1
            images = result.images if hasattr(result, "images") else result[0]
            if len(images) != len(batch):
                raise RuntimeError(f"pipeline returned {len(images)} images for a batch of {len(batch)}")
            for it, img in zip(batch, images, strict=True):
                if it.image not in todo:
                    continue
                _save_png(img, out / it.image, it.entry)
                mf.write(json.dumps(it.entry, sort_keys=True) + "\n")
            mf.flush()
            generated += len(todo)
            skipped += len(batch) - len(todo)
            bar.update(len(batch))
    bar.close()

    shards.wait()
    if shards.state is not None and shards.is_main:
        merge_manifests(out, remove_parts=True)
    elif shards.state is None:
        merge_manifests(out, remove_parts=False)  # other explicit shards may still be writing
    shards.wait()

    final = read_manifest(out)
    entries: list[dict[str, Any]] = []
    complete = True
    for batch in batches:
        for it in batch:
            e = final.get(it.image)
            if e is not None and e.get("key") == it.entry["key"] and (out / it.image).is_file():
                entries.append(e)
            else:
                complete = False
    entries.sort(key=lambda e: (e["index"], e["k"]))  # row order, whatever the batch plan was
    secs = time.perf_counter() - t0
    return GenerationResult(
        out_dir=out,
        entries=entries,
        generated=generated,
        skipped=skipped,
        pipe_calls=calls,
        seconds=secs,
        complete=complete,
        shard=(shards.index, shards.count),
        images_per_second=generated / secs if secs > 0 else 0.0,
    )
