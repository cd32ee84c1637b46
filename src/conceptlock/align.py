"""Safety alignment as a function: method + model + concept -> aligned pipeline folder or safety LoRA file.

`run_align` is what `conceptlock align` calls; experiments and tests call it directly. It only chooses the
objective, the data and the defaults of each method's paper/code, then hands everything to the one trainer.

Run folder (`out`):
    model/                    aligned pipeline (full / group training)          \
    <adapter>.safetensors     safety LoRA (params lora:NAME), vanilla-diffusers  } the artefact
    config.json               resolved configuration (method, objective settings, trainer settings, artefact)
    train_log.jsonl           step, loss, lr and the objective's scalars
    checkpoints/              for --resume

Defaults per method (from the papers' released code; every one is overridable):
    esd        noxattn (ESD-u, the nudity setting), 200 steps, lr 5e-5, eta 1, 50 DDIM steps, start guidance 3
    sdd        xattn, 1500 steps, lr 1e-5, EMA teacher 0.999, CFG 3, weight decay 1e-4
    lcfd-lt    full UNet, 2000 steps, lr 1e-5, batch 1 x accumulation 4, cosine schedule, lambda_tot 5e-5
    lcfd-ng    as lcfd-lt with lambda_tot 5e-3, fixed noise
    lcfd-high  as lcfd-lt with 10000 steps (gradient ascent on harmful data)
    uce        training-free closed-form edit of attn2 to_k/to_v (methods/uce.py): model/ + config.json
A LoRA run (`--params lora:NAME`) defaults to lr 1e-4 (the diffusers LoRA recipe).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapters import save_adapter
from .conditioning import tokenizers
from .methods.base import get_objective, move
from .pipelines import ConceptlockError, load_pipeline, save_pipeline
from .train.data import ImageTextDataset, PromptDataset
from .train.params import parse_params
from .train.trainer import TrainConfig, _atomic_write_text, train


@dataclass(frozen=True)
class MethodDefaults:
    objective: str
    params: str
    steps: int
    lr: float
    batch_size: int = 1
    grad_accum: int = 1
    lr_scheduler: str = "constant"
    weight_decay: float = 1e-2
    objective_kwargs: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, MethodDefaults] = {
    "esd": MethodDefaults("esd", "noxattn", 200, 5e-5, objective_kwargs={"eta": 1.0}),
    "sdd": MethodDefaults("sdd", "xattn", 1500, 1e-5, weight_decay=1e-4),
    "lcfd-lt": MethodDefaults("lcfd-lt", "full", 2000, 1e-5, 4, 4, "cosine"),
    "lcfd-ng": MethodDefaults("lcfd-ng", "full", 2000, 1e-5, 4, 4, "cosine"),
    "lcfd-high": MethodDefaults("lcfd-high", "full", 10000, 1e-5, 4, 4, "cosine"),
}
LORA_LR = 1e-4
TRAINING_FREE = ("uce",)  # closed-form edits: conceptlock.methods.uce.run_uce, no trainer


@dataclass
class ResolvedConcept:
    """What a concept name means for training: prompts (ESD, SDD) and, optionally, a labelled image folder (LCFD)."""

    prompts: list[str]
    data: Path | None = None


def resolve_concept(name: str, world_dir: str | Path | None = None) -> ResolvedConcept:
    """Map a concept to training prompts (ESD, SDD) and a labelled image folder (LCFD).

    Outside a toy world a concept is its own prompt text ("nudity"). Inside one (`world_dir`, or the
    world the model folder belongs to) it must be one of the world's harmful concepts: its prompts are
    the explicit phrases that name it, and its LCFD data is the world's `data/lcfd-NAME` folder.
    """
    if world_dir is None:
        return ResolvedConcept(prompts=[name])
    from .world.build import read_world
    from .world.concepts import HARMFUL

    world_dir = Path(world_dir)
    concepts = read_world(world_dir)["config"]["concepts"]
    if name not in concepts:
        raise ConceptlockError(
            f"--concept {name!r}: not a harmful concept of world {world_dir} ({', '.join(concepts)})"
        )
    data = world_dir / "data" / f"lcfd-{name}"
    return ResolvedConcept(prompts=list(HARMFUL[name].explicit), data=data if data.is_dir() else None)


def anchor_pairs(
    concepts: Sequence[str], world_dir: str | Path | None, data: str | Path | None
) -> list[tuple[str, str]]:
    """(concept prompt, anchor) pairs for anchored ESD/SDD: from `data` (a CSV) if given, else the toy world's."""
    if data is not None:
        return read_anchor_csv(data)
    if world_dir is None:
        raise ConceptlockError(
            "--anchor: give --data PAIRS.csv (columns prompt, anchor); only a toy world's concepts bring their own"
        )
    from .world.build import read_world
    from .world.data import WorldConfig, anchored_prompts

    cfg = WorldConfig(**read_world(world_dir)["config"])
    return [pair for c in concepts for pair in anchored_prompts(cfg, c)]


def read_anchor_csv(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, anchor) pairs from a CSV with `prompt` and `anchor` columns (anchored ESD outside a toy world)."""
    import csv

    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".csv":
        raise ConceptlockError(f"--data {path}: anchored ESD needs a CSV file with 'prompt' and 'anchor' columns")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"prompt", "anchor"} - set(reader.fieldnames or [])
        if missing:
            raise ConceptlockError(
                f"{path}: missing column(s) {', '.join(sorted(missing))} (need 'prompt' and 'anchor')"
            )
        pairs = [(r["prompt"], r["anchor"]) for r in reader]
    if not pairs:
        raise ConceptlockError(f"{path}: no rows")
    return pairs


@dataclass
class AlignResult:
    artifact: Path  # pipeline folder or LoRA file
    out: Path
    config: dict[str, Any]
    finished: bool


def run_align(
    method: str,
    model: str | Path | Any,
    concepts: list[str],
    out: str | Path,
    params: str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    released_code: bool = False,
    seed: int = 0,
    data: str | Path | None = None,
    world: str | Path | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    resolution: int | None = None,
    objective_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> AlignResult:
    """Align `model` (a pipeline folder, or a pipeline object, which is trained in place) against `concepts`."""
    if method in TRAINING_FREE:
        opts = {"--steps": steps, "--lr": lr, "--data": data, "--released-code": released_code, "--alpha": alpha}
        opts |= {"--lora-targets": targets, "--batch-size": batch_size, "--grad-accum": grad_accum}
        bad = [k for k, v in opts.items() if v is not None and v is not False]
        if bad:
            raise ConceptlockError(f"--method {method} is training-free: {', '.join(bad)} cannot apply")
        from .methods.uce import run_uce

        kw = objective_kwargs or {}
        return run_uce(model, concepts, out, world=world, overwrite=overwrite, params=params, rank=rank, **kw)
    if method not in METHODS:
        raise ConceptlockError(f"--method {method!r}: choose one of {', '.join([*METHODS, *TRAINING_FREE])}")
    if not concepts:
        raise ConceptlockError("--concept: give at least one concept")
    d = METHODS[method]
    out = Path(out)
    if (out / "config.json").exists() and not (resume or overwrite):
        raise ConceptlockError(f"{out}: already holds an alignment run (pass --resume to continue or --overwrite)")
    spec = parse_params(
        params or d.params, rank=4 if rank is None else rank, alpha=alpha, targets=tuple(targets) if targets else None
    )
    pipe = load_pipeline(model) if isinstance(model, str | Path) else model

    if world is None and isinstance(model, str | Path):
        from .world import world_of_model

        world = world_of_model(model)
    resolved = [resolve_concept(c, world) for c in concepts]
    prompts = [p for r in resolved for p in r.prompts]
    kwargs = {**d.objective_kwargs, **(objective_kwargs or {})}
    if method.startswith("lcfd"):
        kwargs["released_code"] = released_code
        if data is not None:
            from .finetune import resolve_data  # toy:NAME or a folder, one rule for every command

            folder = resolve_data(data, world)
        else:
            folder = next((r.data for r in resolved if r.data is not None), None)
        if folder is None:
            raise ConceptlockError(
                f"--method {method} needs --data: an image folder with metadata.jsonl (class 1 clean / 2 harmful)"
            )
        res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        dataset = ImageTextDataset(folder, tokenizers(pipe), res)
    else:
        if released_code:
            raise ConceptlockError("--released-code only applies to the lcfd methods")
        if kwargs.get("anchor"):
            pairs = anchor_pairs(concepts, world, data)
            prompts = [p for p, _ in pairs]
            dataset = PromptDataset(prompts, tokenizers(pipe), anchors=[a for _, a in pairs])
        else:
            dataset = PromptDataset(prompts, tokenizers(pipe))
    objective = get_objective(d.objective, **kwargs)

    cfg = TrainConfig(
        steps=steps if steps is not None else d.steps,
        lr=lr if lr is not None else (LORA_LR if spec.is_lora else d.lr),
        batch_size=batch_size or d.batch_size,
        grad_accum=grad_accum or d.grad_accum,
        lr_scheduler=d.lr_scheduler,
        weight_decay=d.weight_decay,
        seed=seed,
        resume=resume,
    )
    if train_kwargs:
        try:
            cfg = replace(cfg, **train_kwargs)
        except TypeError as e:
            raise ConceptlockError(f"train settings: {e}") from None
    result = train(pipe, spec, objective, dataset, cfg, out)

    artifact = out / f"{spec.adapter}.safetensors" if spec.is_lora else out / "model"
    config = {
        "conceptlock": __version__,
        "method": method,
        "model": str(model) if isinstance(model, str | Path) else type(model).__name__,
        "concepts": list(concepts),
        "prompts": prompts,
        "data": str(dataset.folder) if isinstance(dataset, ImageTextDataset) else None,
        "params": str(spec),
        "lora": {"rank": spec.rank, "alpha": spec.alpha or spec.rank, "targets": list(spec.targets)}
        if spec.is_lora
        else None,
        "objective": objective.name,
        "objective_config": objective.config(),
        "train": asdict(cfg),
        "artifact": str(artifact),
        "finished": result.finished,
        "steps_done": result.step,
    }
    if not result.is_main_process:
        return AlignResult(artifact=artifact, out=out, config=config, finished=result.finished)
    if result.finished:
        if spec.is_lora:
            save_adapter(pipe, spec.adapter, artifact)
        else:
            for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
                if getattr(pipe, name, None) is not None:
                    move(getattr(pipe, name), torch.device("cpu"), torch.float32)
            save_pipeline(pipe, artifact, overwrite=True)
    _atomic_write_text(out / "config.json", json.dumps(config, indent=1, default=str))
    return AlignResult(artifact=artifact, out=out, config=config, finished=result.finished)
