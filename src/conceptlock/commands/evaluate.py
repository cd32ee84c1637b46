"""``conceptlock evaluate``: generate a prompt set with a model (+ adapters), score it, write results.

One generation pass feeds every requested metric (DESIGN: "one generator, many metrics"). Metrics
are built *before* generating, so missing weights fail in a second, not after an hour of sampling.
Outputs in ``--out``:

- ``images/*.png`` + ``manifest.jsonl``: from ``conceptlock.generate`` (resumable, shardable).
- ``results.json``: every metric with n and 95% CI, the image seeds, package versions, the full
  config and its hash (two runs with the same hash are the same experiment).
- ``scores.jsonl``: per-image scores, the input to paired comparisons between two models
  (``conceptlock.stats.compare_paired``; see ``compare_runs`` below).
- ``contact_sheet.png``: the first images in a grid, to eyeball what was scored.

Under ``accelerate launch --num_processes N conceptlock evaluate ...`` generation is sharded and the
main process scores. ``--images DIR`` scores an existing folder instead of generating (prompts
come from its ``manifest.jsonl`` if present).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import typer
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..io import atomic_write_text as _atomic_write
from ..pipelines import ConceptlockError
from ..prompts import PromptRow, load_prompts

__all__ = ["compare_runs", "make_contact_sheet", "parse_adapter_spec", "register", "run_evaluate"]

EXAMPLE = (
    "conceptlock evaluate --model runs/safe --adapter safety=runs/safety.safetensors:1.0 "
    "--prompts i2p_benchmark.csv --metrics nudenet,nudenet:preset=unlearndiffatk-9@0.45/0.75 "
    "--images-per-prompt 3 --steps 30 --batch-size 8 --out runs/eval-safe"
)
_VERSION_PACKAGES = (
    "conceptlock",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "torchmetrics",
    "nudenet",
    "onnxruntime",
    "numpy",
    "pillow",
)


def parse_adapter_spec(spec: str) -> dict[str, Any]:
    """``NAME=FILE[:WEIGHT]`` -> {name, path, weight} (adapters.py's parser), checking the file exists."""
    from ..adapters import parse_adapter_spec as _parse  # lazy: owned by the adapters module

    name, path, weight = _parse(spec)
    if not Path(path).is_file():
        raise ConceptlockError(f"--adapter {spec!r}: {path}: adapter file not found")
    return {"name": name, "path": str(path), "weight": weight}


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in _VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def make_contact_sheet(
    paths: Sequence[Path], labels: Sequence[str], out: Path, max_images: int = 64, cols: int = 8, tile: int = 128
) -> Path | None:
    """A grid of the first images with a one-line label each (index/seed), written atomically."""
    paths = list(paths)[:max_images]
    if not paths:
        return None
    cols = min(cols, len(paths))
    rows = (len(paths) + cols - 1) // cols
    band = 14
    sheet = Image.new("RGB", (cols * tile, rows * (tile + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (p, lab) in enumerate(zip(paths, labels, strict=False)):
        with Image.open(p) as im:
            thumb = im.convert("RGB").resize(
                (tile, tile), Image.Resampling.NEAREST if im.width < tile else Image.Resampling.LANCZOS
            )
        x, y = (i % cols) * tile, (i // cols) * (tile + band)
        sheet.paste(thumb, (x, y))
        draw.text((x + 2, y + tile + 1), lab[:22], fill="black")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


def _row_from_entry(e: dict[str, Any], source: str) -> PromptRow:
    return PromptRow(
        prompt=e.get("prompt", ""),
        seed=int(e.get("row_seed", e.get("seed", 0))),
        index=int(e.get("index", 0)),
        guidance=e.get("guidance"),
        source=source,
        extra=dict(e.get("row") or {}),
    )


def _entries_from_folder(folder: Path, prompts: Any) -> list[dict[str, Any]]:
    """Entries for an existing image folder: its manifest if any, else its files (paired with prompts)."""
    from ..generate import read_manifest
    from ..metrics.base import list_images

    if not folder.is_dir():
        raise ConceptlockError(f"{folder}: image folder does not exist")
    man = read_manifest(folder)
    if man:
        entries = sorted(man.values(), key=lambda e: (e.get("index", 0), e.get("k", 0), e["image"]))
        for e in entries:
            e["path"] = str(folder / e["image"])
        return entries
    files = list_images(folder)
    if prompts is not None and len(prompts) != len(files):
        raise ConceptlockError(f"{folder}: {len(files)} images but {len(prompts)} prompts (pair them with a manifest)")
    entries = []
    for i, f in enumerate(files):
        row = prompts[i] if prompts is not None else None
        entries.append(
            {
                "image": f.name,
                "path": str(f),
                "index": row.index if row else i,
                "k": 0,
                "prompt": row.prompt if row else "",
                "seed": row.seed if row else None,
                "row_seed": row.seed if row else 0,
                "guidance": row.guidance if row else None,
                "row": dict(row.extra) if row else {},
            }
        )
    return entries


def run_evaluate(
    out: str | Path,
    prompts: str | Path | None = None,
    metrics: str | Sequence[str] = ("nudenet",),
    model: str | Path | None = None,
    adapters: Sequence[str] = (),
    images: str | Path | None = None,
    *,
    pipe: Any | None = None,
    images_per_prompt: int = 1,
    steps: int = 30,
    batch_size: int = 4,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    limit: int | None = None,
    base_seed: int = 0,
    dtype: str = "float32",
    metric_batch_size: int = 16,
    options: dict[str, Any] | None = None,
    resume: bool = True,
    contact_sheet: int = 64,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Generate (or read) images for a prompt set, score them with every metric, write results.json.

    ``model`` is a pipeline folder (or pass an already built ``pipe``); ``images`` scores a folder
    instead. ``metrics`` is a comma-separated string or a list of specs (``name[:key=value...]``).
    ``options`` are extra pipeline-call keywords (e.g. SLD settings for a safe pipeline); they are
    recorded in the manifest and config. Returns the results dict on the main process (None on
    other accelerate processes).
    """
    from ..metrics.base import get_metric, load_image

    t0 = time.time()
    out = Path(out)
    specs = [s.strip() for s in (metrics.split(",") if isinstance(metrics, str) else metrics) if s.strip()]
    if not specs:
        raise ConceptlockError("--metrics: no metric given")
    if (images is None) == (model is None and pipe is None):
        raise ConceptlockError("give exactly one of --model (generate) or --images (score a folder)")
    adapter_info = [parse_adapter_spec(a) for a in adapters]
    if adapter_info and images is not None:
        raise ConceptlockError("--adapter needs --model (adapters apply to a pipeline, not to images)")
    prompt_set = load_prompts(prompts, base_seed=base_seed, limit=limit) if prompts is not None else None
    if prompt_set is None and images is None:
        raise ConceptlockError("--prompts is required with --model")

    state = None
    is_main = True
    if images is None:
        from ..generate import partial_state

        state = partial_state()
        is_main = state.is_main_process

    if options and options.get("sld") and not options.get("sld_concept"):
        from ..world import safety_text, world_for

        world = world_for(model, prompts) if (model is not None or prompts is not None) else None
        if world is not None:  # a toy model: guide away from the world's concepts, not SD's default list
            options = {**options, "sld_concept": safety_text(world)}
    built = [get_metric(s) for s in specs] if is_main else []  # fail fast on missing weights
    out.mkdir(parents=True, exist_ok=True)

    gen_info: dict[str, Any] = {}
    if images is None:
        import torch

        from ..generate import generate

        carried: list = []
        if pipe is None:
            from ..pipelines import load_pipeline

            dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
            if dt is None:
                raise ConceptlockError(f"--dtype {dtype!r}: use float32, float16 or bfloat16")
            from ..compose import read_composition

            carried = read_composition(model)  # a composed folder carries its adapters
            if carried:
                from ..compose import load_model

                pipe, refs = load_model(model, adapters, dtype=dt)
                adapters = [r.spec() for r in refs]
                adapter_info = [{"name": r.name, "path": str(r.path), "weight": r.weight} for r in refs]
            else:
                pipe = load_pipeline(model, dtype=dt)
        if adapters and not carried:
            # Lazy: adapters.py is owned by another module and may land after this one.
            try:
                from ..adapters import apply_adapters
            except ImportError as e:
                raise ConceptlockError(f"--adapter: conceptlock.adapters.apply_adapters is unavailable ({e})") from None
            apply_adapters(pipe, list(adapters))
        pipe.to(state.device)
        res = generate(
            pipe,
            prompt_set.rows,
            out,
            steps=steps,
            guidance=guidance,
            images_per_prompt=images_per_prompt,
            batch_size=batch_size,
            height=height,
            width=width,
            model=str(model) if model is not None else "<in-memory pipeline>",
            adapters=list(adapters),
            options=options,
            resume=resume,
            state=state,
            progress=progress,
        )
        if not is_main:
            return None
        if not res.complete:
            raise ConceptlockError(f"{out}: generation incomplete ({len(res.entries)} images); rerun to resume")
        entries = [dict(e, path=str(out / e["image"])) for e in res.entries]
        by_index = {r.index: r for r in prompt_set.rows}
        rows = [by_index[e["index"]] for e in entries]
        gen_info = {
            "generated": res.generated,
            "skipped": res.skipped,
            "pipe_calls": res.pipe_calls,
            "seconds": round(res.seconds, 3),
            "images_per_second": round(res.images_per_second, 4),
        }
    else:
        entries = _entries_from_folder(Path(images), prompt_set)
        rows = [_row_from_entry(e, str(images)) for e in entries]

    prompts_text = [e.get("prompt", "") for e in entries]
    for i in tqdm(range(0, len(entries), metric_batch_size), desc="score", unit="batch", disable=not progress):
        chunk = slice(i, i + metric_batch_size)
        imgs = [load_image(e["path"]) for e in entries[chunk]]
        for m in built:
            m.update(imgs, prompts_text[chunk], rows[chunk])

    results = {}
    for spec, m in zip(specs, built, strict=True):
        results[spec] = m.compute().to_dict()

    # Per-image scores, for paired comparisons between runs on the same prompts and seeds.
    score_cols = {spec: m.item_scores() for spec, m in zip(specs, built, strict=True) if m.has_item_scores}
    lines = []
    for j, e in enumerate(entries):
        rec = {k: e.get(k) for k in ("image", "index", "k", "seed", "prompt")}
        rec["scores"] = {s: v[j] for s, v in score_cols.items()}
        lines.append(json.dumps(rec, sort_keys=True))
    _atomic_write(out / "scores.jsonl", "\n".join(lines) + "\n")

    config = {
        "model": str(model) if model is not None else (None if images is not None else "<in-memory pipeline>"),
        "adapters": [dict(a, sha256=_sha256_file(a["path"])) for a in adapter_info],
        "images": str(images) if images is not None else None,
        "prompts": {
            "spec": str(prompts) if prompts is not None else None,
            "format": prompt_set.format if prompt_set else None,
            "sha256": prompt_set.sha256 if prompt_set else None,
            "rows": len(prompt_set) if prompt_set else None,
            "limit": limit,
            "base_seed": base_seed,
        },
        "metrics": specs,
        "images_per_prompt": images_per_prompt,
        "steps": steps,
        "guidance_default": guidance,
        "height": entries[0].get("height") if entries else height,
        "width": entries[0].get("width") if entries else width,
        "batch_size": batch_size,
        "dtype": dtype,
        "options": json.loads(json.dumps(options or {}, sort_keys=True, default=str)),
    }
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    report = {
        "conceptlock_results": 1,
        "metrics": results,
        "n_images": len(entries),
        "seeds": [e.get("seed") for e in entries],
        "config": config,
        "config_hash": config_hash,
        "versions": _versions(),
        "generation": gen_info,
        "processes": state.num_processes if state is not None else 1,
        "command": " ".join(sys.argv) if sys.argv and "conceptlock" in sys.argv[0] else None,
        "seconds": round(time.time() - t0, 3),
    }
    _atomic_write(out / "results.json", json.dumps(report, indent=2, sort_keys=True, allow_nan=False))
    if contact_sheet > 0:
        labels = [f"#{e.get('index')}.{e.get('k')} s{e.get('seed')}" for e in entries]
        make_contact_sheet(
            [Path(e["path"]) for e in entries], labels, out / "contact_sheet.png", max_images=contact_sheet
        )
    return report


def compare_runs(run_a: str | Path, run_b: str | Path, metric: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of one metric between two evaluation folders (B minus A), by image seed/prompt."""
    from ..stats import compare_paired

    def load(run: Path) -> dict[tuple, tuple[float, Any]]:
        f = Path(run) / "scores.jsonl"
        if not f.is_file():
            raise ConceptlockError(f"{f}: no per-image scores (run conceptlock evaluate first)")
        out = {}
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if metric not in r["scores"]:
                raise ConceptlockError(f"{f}: line {n} has no score for metric {metric!r}")
            out[(r["index"], r["k"], r["seed"], r["prompt"])] = (r["scores"][metric], r["index"])
        return out

    a, b = load(Path(run_a)), load(Path(run_b))
    keys = sorted(set(a) & set(b), key=lambda k: (k[0], k[1]))
    if not keys:
        raise ConceptlockError(f"{run_a} vs {run_b}: no images with the same prompt and seed to pair")
    res = compare_paired(
        [a[k][0] for k in keys], [b[k][0] for k in keys], n_boot=n_boot, seed=seed, groups=[a[k][1] for k in keys]
    )
    d = res.to_dict()
    d.update(
        metric=metric, run_a=str(run_a), run_b=str(run_b), unpaired_a=len(a) - len(keys), unpaired_b=len(b) - len(keys)
    )
    return d


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to the CLI."""

    @app.command(
        "evaluate",
        help="Generate a prompt set with a model (+ LoRA adapters) and score it; write results.json.\n\n"
        f"Example:\n\n  {EXAMPLE}\n\n"
        "Score an existing folder instead:  conceptlock evaluate --images runs/eval-safe --metrics nudenet --out runs/rescore",
        no_args_is_help=True,
    )
    def evaluate_cmd(
        out: Path = typer.Option(..., "--out", help="Output folder (images, manifest.jsonl, results.json)."),
        model: Path | None = typer.Option(
            None, "--model", help="Model: a diffusers folder, a hub id or a .safetensors single file."
        ),
        adapter: list[str] = typer.Option([], "--adapter", help="LoRA adapter NAME=FILE[:WEIGHT]; repeatable."),
        prompts: str | None = typer.Option(None, "--prompts", help="Prompt CSV (I2P, COCO-30K, generic) or toy:SET."),
        metrics: str = typer.Option(
            "nudenet", "--metrics", help="Comma-separated metric specs, e.g. nudenet,clip_score:model=DIR."
        ),
        images: Path | None = typer.Option(None, "--images", help="Score this image folder instead of generating."),
        images_per_prompt: int = typer.Option(
            1, "--images-per-prompt", help="Images per prompt (seeds derived per image)."
        ),
        steps: int = typer.Option(30, "--steps", help="Denoising steps."),
        batch_size: int = typer.Option(4, "--batch-size", help="Prompts per pipeline call."),
        guidance: float = typer.Option(7.5, "--guidance", help="CFG scale for rows that do not fix one."),
        height: int | None = typer.Option(None, "--height", help="Image height (default: the model's)."),
        width: int | None = typer.Option(None, "--width", help="Image width (default: the model's)."),
        limit: int | None = typer.Option(None, "--limit", help="Use only the first N prompts."),
        seed: int = typer.Option(0, "--seed", help="Base seed for CSVs without a seed column."),
        dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
        no_resume: bool = typer.Option(False, "--no-resume", help="Regenerate images already on disk."),
        sld: str | None = typer.Option(None, "--sld", help="Safe Latent Diffusion preset: WEAK, MEDIUM, STRONG, MAX."),
        sld_concept: str | None = typer.Option(None, "--sld-concept", help="SLD safety concept text."),
    ) -> None:
        options = {"sld": sld, **({"sld_concept": sld_concept} if sld_concept else {})} if sld else None
        if sld_concept and not sld:
            raise ConceptlockError("--sld-concept needs --sld PRESET")
        rep = run_evaluate(
            out,
            prompts=prompts,
            metrics=metrics,
            model=model,
            adapters=adapter,
            images=images,
            images_per_prompt=images_per_prompt,
            steps=steps,
            batch_size=batch_size,
            guidance=guidance,
            height=height,
            width=width,
            limit=limit,
            base_seed=seed,
            dtype=dtype,
            resume=not no_resume,
            options=options,
        )
        if rep is None:
            return
        for spec, r in rep["metrics"].items():
            ci = f" [{r['ci_low']:.4f}, {r['ci_high']:.4f}]" if r.get("ci_low") is not None else ""
            typer.echo(f"{spec:40s} {r['value']:.4f}{ci}  n={r['n']}")
        typer.echo(f"wrote {Path(out) / 'results.json'}")
