"""Relearning curves: fine-tune a (safe) model for N steps and score it at every point of a schedule.

Paper B measures malicious fine-tuning at 0, 20, 100 and 200 steps; Paper A's benign fine-tuning is the same curve
on benign data. One curve = one training run (`conceptlock.finetune`: same data, params, modes and adapters as
`conceptlock finetune`) cut at the schedule's points; each point's model is saved and then scored by the evaluation
engine (`run_evaluate`: deterministic, resumable generation + metrics with n and 95% CI).

How the run is cut: point s is trained as a segment of one straight run to max(schedule) (`TrainConfig(steps=max,
stop_after=s, checkpoint_every=s, resume=True)`), so the lr schedule, batches and noise are those of the straight run
(the trainer's resume is exact) and exactly one checkpoint is written per point. Each point's artefact is saved from
the trained weights and reloaded for scoring, so a score is always the score of the file on disk.

Run folder (`out`):
    curve.json                        {"format", "config", "config_hash", "schedule", "harm", "fidelity", "points":
                                      [{step, harmful_rate, n, ci_low, ci_high, fidelity, fidelity_n,
                                        fidelity_ci_low, fidelity_ci_high, train_loss, artifact, inference,
                                        eval: {prompt set: {metric: MetricResult}}, seconds}], "complete"}
    points/step_00000020/NAME.safetensors   the adapter at that step (LoRA runs) ...
    points/step_00000020/model/             ... or the pipeline folder (full / group runs)
    points/step_00000020/eval/<set>/        images, manifest.jsonl, results.json, scores.jsonl, contact sheet
    train/                                  train_log.jsonl, train_config.json, checkpoints/ (the newest only)
Step 0 is the model as given (with its adapters), so nothing is saved for it.

Resume: calling again with the same configuration skips every point already in curve.json; a point whose artefact
is saved but not yet scored is only scored; training continues from the newest checkpoint. A different
configuration in the same `out` is refused (pass `overwrite` to start again).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .. import __version__
from ..adapters import adapter_names
from ..compose import AdapterRef, apply_refs, load_model
from ..errors import ConceptlockError
from ..finetune import (
    DEFAULT_BATCH,
    FinetuneSetup,
    carried_adapters,
    default_lr,
    inference_recipe,
    prepare_finetune,
    resolve_data,
    resolve_mode,
    save_artifact,
)
from ..pipelines import load_pipeline
from ..train.params import apply_params, parse_params
from ..train.trainer import TrainConfig, _atomic_write_text, normalise_train_dict, train, train_fingerprint

__all__ = [
    "DEFAULT_SCHEDULE",
    "CurveResult",
    "default_evals",
    "parse_eval_spec",
    "parse_schedule",
    "run_attack_curve",
]

DEFAULT_SCHEDULE = (0, 20, 100, 200)  # Paper B's table
CURVE_FILE = "curve.json"
_OWNED = ("points", "train", CURVE_FILE)  # what `overwrite` removes from `out`
_RESERVED_TRAIN_KEYS = ("steps", "stop_after", "checkpoint_every", "keep_checkpoints", "resume", "seed", "lr")


def parse_schedule(schedule: str | Sequence[int]) -> list[int]:
    """`"0,20,100,200"` or a list -> strictly increasing non-negative step counts (one-line error otherwise)."""
    items = [x.strip() for x in schedule.split(",")] if isinstance(schedule, str) else list(schedule)
    steps: list[int] = []
    for x in items:
        try:
            v = int(x)
        except (TypeError, ValueError):
            raise ConceptlockError(f"--schedule {schedule!r}: {x!r} is not a whole number of steps") from None
        if isinstance(x, float) and v != x:
            raise ConceptlockError(f"--schedule {schedule!r}: {x!r} is not a whole number of steps")
        steps.append(v)
    if not steps:
        raise ConceptlockError("--schedule: give at least one step count, e.g. 0,20,100,200")
    if steps[0] < 0:
        raise ConceptlockError(f"--schedule {schedule!r}: step counts must be >= 0")
    for a, b in zip(steps, steps[1:], strict=False):
        if b <= a:
            raise ConceptlockError(f"--schedule {schedule!r}: must be strictly increasing ({a} then {b})")
    return steps


def parse_eval_spec(spec: str) -> tuple[str, list[str]]:
    """`PROMPTS=METRIC[,METRIC...]` (split at the first '='), e.g. `toy:explicit-gore=toy_harm`."""
    prompts, sep, metrics = spec.partition("=")
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    if not sep or not prompts.strip() or not names:
        raise ConceptlockError(f"--eval {spec!r}: expected PROMPTS=METRIC[,METRIC], e.g. toy:explicit-gore=toy_harm")
    return prompts.strip(), names


def default_evals(data: str | Path) -> dict[str, list[str]]:
    """Harm on the explicit prompts of the attacked concept (toy:malicious-fire -> toy:explicit-fire; gore
    otherwise) and fidelity on clean prompts (Paper B: does the model forget clean generation?)."""
    concept = "gore"
    s = str(data)
    if s.startswith("toy:") and s[4:].startswith(("malicious-", "lcfd-")):
        concept = s[4:].split("-", 1)[1]
    return {f"toy:explicit-{concept}": ["toy_harm"], "toy:clean": ["toy_fidelity"]}


def _slug(spec: str) -> str:
    p = Path(spec)
    if p.suffix.lower() == ".csv":
        return f"{p.stem}-{hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in spec)


def _point_dir(out: Path, step: int) -> Path:
    return out / "points" / f"step_{step:08d}"


def _latest_checkpoint(train_dir: Path) -> tuple[int, Path] | None:
    folder = train_dir / "checkpoints"
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith("step_") and p.name[5:].isdigit() and (p / "meta.json").is_file():
                found.append((int(p.name[5:]), p))
    return max(found) if found else None


def _loss_at(train_dir: Path, step: int) -> float | None:
    log = train_dir / "train_log.jsonl"
    if not log.is_file():
        return None
    for line in log.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("step") == step:
                return row.get("loss")
    return None


def _headline(evals: Mapping[str, list[str]], results: Mapping[str, Mapping[str, dict]], metric: str) -> dict | None:
    """The first result of `metric` (by base name) over the prompt sets, in order."""
    from ..metrics.base import parse_metric_spec

    for prompts, specs in evals.items():
        for spec in specs:
            if parse_metric_spec(spec)[0] == metric:
                return results[prompts][spec]
    return None


@dataclass
class CurveResult:
    out: Path
    curve: Path
    points: list[dict[str, Any]]
    complete: bool


def run_attack_curve(
    model: str | Path | Any,
    data: str | Path,
    out: str | Path,
    schedule: str | Sequence[int] = DEFAULT_SCHEDULE,
    params: str = "full",
    adapters: Sequence[str] = (),
    mode: str | None = None,
    evals: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    harm_metric: str = "toy_harm",
    fidelity_metric: str = "toy_fidelity",
    lr: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    grad_accum: int = 1,
    seed: int = 0,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    resolution: int | None = None,
    world: str | Path | None = None,
    images_per_prompt: int = 1,
    limit: int | None = None,
    gen_steps: int = 20,
    guidance: float = 7.5,
    gen_batch_size: int = 16,
    eval_seed: int = 0,
    train_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CurveResult:
    """Fine-tune `model` on `data` and score it at each step of `schedule`; write `out/curve.json` (module doc).

    `evals` maps prompt sets to metric specs (or is a list of `PROMPTS=METRIC[,METRIC]` strings); the curve's
    `harmful_rate` is the first `harm_metric` result and its `fidelity` the first `fidelity_metric` result. Prompt
    rows carry their own guidance (toy sets do); `guidance` is for rows that do not.
    """
    from ..commands.evaluate import run_evaluate
    from ..metrics.base import get_metric
    from ..prompts import load_prompts

    out = Path(out)
    points_wanted = parse_schedule(schedule)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConceptlockError("attack finetune runs in one process; launch it without accelerate/torchrun")
    spec = parse_params(params, rank=rank, alpha=alpha, targets=tuple(targets) if targets else None)
    if evals is None:
        evals = default_evals(data)
    elif not isinstance(evals, Mapping):
        evals = dict(parse_eval_spec(e) for e in evals)
    evals = {str(k): [str(m) for m in v] for k, v in evals.items()}
    if not evals or any(not v for v in evals.values()):
        raise ConceptlockError("--eval: give at least one prompt set with at least one metric")
    bad = sorted(set(train_kwargs or {}) & set(_RESERVED_TRAIN_KEYS))
    if bad:
        raise ConceptlockError(f"train settings {bad} are set by the attack schedule; pass them as arguments")
    for prompts in evals:  # fail before any training: unknown prompt sets, metrics or missing judges
        load_prompts(prompts, base_seed=eval_seed, limit=limit)
    for specs in evals.values():
        for m in specs:
            get_metric(m)
    if not isinstance(model, str | Path) and adapter_names(model):
        raise ConceptlockError("an in-memory pipeline must not hold adapters already; pass them as adapters=[...]")
    refs = carried_adapters(model, adapters)
    resolved_mode = resolve_mode(spec, refs, mode)
    folder = resolve_data(data, world)
    if isinstance(model, str | Path) and out.resolve() == Path(model).resolve():
        raise ConceptlockError(f"--out {out}: is the input model; give a separate run folder")

    s_max = points_wanted[-1]
    train_cfg = TrainConfig(
        steps=max(s_max, 1),
        lr=lr if lr is not None else default_lr(spec),
        batch_size=batch_size,
        grad_accum=grad_accum,
        seed=seed,
        keep_checkpoints=1,
    )
    if train_kwargs:
        try:
            train_cfg = replace(train_cfg, **train_kwargs)
        except TypeError as e:
            raise ConceptlockError(f"train settings: {e}") from None
    config = {
        "model": str(model) if isinstance(model, str | Path) else "<in-memory pipeline>",
        "adapters": [r.to_dict() for r in refs],
        "data": str(folder),
        "data_spec": str(data),
        "params": str(spec),
        "lora": {"rank": spec.rank, "alpha": spec.alpha or spec.rank, "targets": list(spec.targets)}
        if spec.is_lora
        else None,
        "mode": resolved_mode,
        "schedule": points_wanted,
        "train": train_fingerprint(train_cfg),
        "resolution": resolution,
        "evals": evals,
        "harm_metric": harm_metric,
        "fidelity_metric": fidelity_metric,
        "generation": {
            "images_per_prompt": images_per_prompt,
            "limit": limit,
            "steps": gen_steps,
            "guidance": guidance,
            "eval_seed": eval_seed,
        },
    }
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    curve_path = out / CURVE_FILE
    done: dict[int, dict[str, Any]] = {}
    if overwrite:
        for name in _OWNED:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    elif curve_path.is_file():
        old = json.loads(curve_path.read_text())
        if isinstance(old.get("config", {}).get("train"), dict):  # recorded by an older version: same rule
            old["config"]["train"] = normalise_train_dict(old["config"]["train"])
        if old.get("config_hash") != config_hash and old.get("config") != json.loads(json.dumps(config, default=str)):
            changed = [
                k
                for k in config
                if json.dumps(old.get("config", {}).get(k), sort_keys=True, default=str)
                != json.dumps(config[k], sort_keys=True, default=str)
            ]
            raise ConceptlockError(
                f"{out}: holds a curve with a different configuration ({', '.join(changed) or 'version'}); "
                "use another --out or --overwrite"
            )
        else:
            done = {int(p["step"]): p for p in old.get("points", [])}
    out.mkdir(parents=True, exist_ok=True)

    pristine = model if isinstance(model, str | Path) else copy.deepcopy(model)
    train_dir = out / "train"

    def fresh_setup() -> FinetuneSetup:
        m = pristine if isinstance(pristine, str | Path) else copy.deepcopy(pristine)
        return prepare_finetune(m, folder, spec, adapters, resolved_mode, resolution=resolution)

    def artifact_at(step: int) -> Path:
        d = _point_dir(out, step)
        return d / f"{spec.adapter}.safetensors" if spec.is_lora else d / "model"

    def make_artifact(step: int) -> None:
        """Weights at `step` -> the point's artefact: from the checkpoint if it is at `step`, else by training."""
        target = artifact_at(step)
        shutil.rmtree(target.parent / "eval", ignore_errors=True)  # scores of an older artefact are void
        last = _latest_checkpoint(train_dir)
        setup = fresh_setup()
        if last is not None and last[0] == step:
            trainable = apply_params(setup.pipe.unet, spec)
            weights = load_file(str(last[1] / "trainable.safetensors"))
            if set(weights) != {n for n, _ in trainable}:
                raise ConceptlockError(f"{last[1]}: checkpoint does not match --params {spec}; use --overwrite")
            with torch.no_grad():
                for n, p in trainable:
                    p.copy_(weights[n].to(p.device, p.dtype))
        else:
            cfg = replace(
                train_cfg,
                stop_after=step if step < train_cfg.steps else None,
                checkpoint_every=step,
                resume=last is not None and last[0] < step,
            )
            result = train(setup.pipe, spec, setup.objective, setup.dataset, cfg, train_dir)
            if result.step != step:
                raise ConceptlockError(f"training stopped at step {result.step}, expected {step}")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_artifact(setup, target)

    def eval_pipe(step: int) -> tuple[Any, dict[str, Any]]:
        if step > 0 and not spec.is_lora:
            return load_pipeline(artifact_at(step)), inference_recipe(pristine, refs, None, artifact_at(step))
        new = AdapterRef(spec.adapter, artifact_at(step), 1.0) if step > 0 else None
        if isinstance(pristine, str | Path):
            pipe, _ = load_model(pristine, [*adapters, *([new] if new else [])])
        else:
            pipe = copy.deepcopy(pristine)
            apply_refs(pipe, [*refs, *([new] if new else [])])
        return pipe, inference_recipe(pristine, refs, new)

    def write_curve() -> None:
        pts = [done[s] for s in sorted(done)]
        doc = {
            "format": 1,
            "conceptlock": __version__,
            "config": config,
            "config_hash": config_hash,
            "schedule": points_wanted,
            "harm": {"metric": harm_metric},
            "fidelity": {"metric": fidelity_metric},
            "points": pts,
            "complete": all(s in done for s in points_wanted),
        }
        _atomic_write_text(curve_path, json.dumps(doc, indent=1, allow_nan=False, default=str))

    write_curve()  # before any training: a rerun with another configuration is refused, not mixed in
    todo = [s for s in points_wanted if s not in done]
    for step in tqdm(todo, desc="attack curve", unit="point", disable=not progress):
        t0 = time.time()
        if step > 0 and not artifact_at(step).exists():
            make_artifact(step)
        pipe, recipe = eval_pipe(step)
        results: dict[str, dict[str, dict]] = {}
        for prompts, specs in evals.items():
            rep = run_evaluate(
                _point_dir(out, step) / "eval" / _slug(prompts),
                prompts=prompts,
                metrics=specs,
                pipe=pipe,
                images_per_prompt=images_per_prompt,
                steps=gen_steps,
                batch_size=gen_batch_size,
                guidance=guidance,
                limit=limit,
                base_seed=eval_seed,
                progress=progress,
            )
            results[prompts] = rep["metrics"]
        harm = _headline(evals, results, harm_metric) or {}
        fid = _headline(evals, results, fidelity_metric) or {}
        done[step] = {
            "step": step,
            "harmful_rate": harm.get("value"),
            "n": harm.get("n"),
            "ci_low": harm.get("ci_low"),
            "ci_high": harm.get("ci_high"),
            "fidelity": fid.get("value"),
            "fidelity_n": fid.get("n"),
            "fidelity_ci_low": fid.get("ci_low"),
            "fidelity_ci_high": fid.get("ci_high"),
            "train_loss": _loss_at(train_dir, step) if step > 0 else None,
            "artifact": str(artifact_at(step)) if step > 0 else None,
            "inference": recipe,
            "eval": results,
            "seconds": round(time.time() - t0, 3),
        }
        del pipe
        write_curve()
    points = [done[s] for s in points_wanted]
    return CurveResult(out=out, curve=curve_path, points=points, complete=True)
