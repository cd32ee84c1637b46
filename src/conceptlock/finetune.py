"""Fine-tuning as a function: model (+ adapters) + image-text data -> task LoRA file or fine-tuned pipeline folder.

Benign fine-tuning (Paper A's Pokemon/Naruto analogue) and malicious fine-tuning (Paper B's attack) are the same
call on different data: the plain denoising objective (`finetune`, eps or v-prediction) run through the one trainer.

What is trained, and on which weights, is the point of Modular LoRA (Paper A, W* = W0 + dW_safe + dW_task):

==============================  ==========  ===================================================================
model carries adapters?         --params    what the new weights are trained on
==============================  ==========  ===================================================================
no                              any         the model as given (an ESD/SDD/LCFD full-weight model: "standard")
yes, mode modular (default)     lora:NAME   W0 only: every carried adapter is inactive (UNet and text encoder)
yes, mode standard (explicit)   lora:NAME   W0 + sum_a w_a dW_a: carried adapters active at their weights, frozen
yes                             full/group  W0 + sum_a w_a dW_a fused first: "standard" by nature
==============================  ==========  ===================================================================

Standard mode with a LoRA keeps the safety adapter *active and frozen* rather than fusing it. The forward (and
hence every gradient) is the same as training on the fused weights W0 + dW_safe, but W0 is never rewritten, so the
artefact is the same kind in both modes (a task LoRA that is evaluated as W0 + dW_safe + dW_task, unfused): the
modular-vs-standard comparison then differs only in what the task adapter saw while it trained, and fusing stays
a deployment-only step. Full (or group) fine-tuning of a model with a safety LoRA cannot be modular: the trained
tensors are the base weights themselves, so the carried adapters are fused (safe fusing) and the result is one
plain pipeline folder, the analogue of Paper A's "ESD + full FT".

A model "carries" adapters when they are given as `adapters=["safety=FILE[:WEIGHT]"]` or when the model folder is a
composed folder written by `conceptlock compose` (its `conceptlock_adapters.json`).

Data: an image folder with `metadata.jsonl` rows {file_name, text[, class]} (the diffusers ImageFolder convention),
or `toy:NAME` for a set of the current toy world (`current_world()/data/NAME`, e.g. `toy:domain-mosaic`,
`toy:malicious-gore`).

Run folder (`out`):
    NAME.safetensors          the new LoRA (params lora:NAME), in the format vanilla `load_lora_weights` reads
    model/                    the fine-tuned pipeline folder (params full / xattn / noxattn / xattn-kv)
    config.json               resolved configuration, including `inference`: the model and adapter specs that
                              reproduce the fine-tuned model (e.g. safety=...:1 task=out/task.safetensors:1)
    train_log.jsonl           step, loss, lr
    checkpoints/              for resume
An existing run (or artefact) in `out` is only replaced with `overwrite`; `out` may never be the input model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .adapters import adapter_names, compose, fuse, save_adapter
from .compose import AdapterRef, apply_refs, read_composition, resolve_adapters
from .conditioning import tokenizers
from .errors import ConceptlockError
from .methods.base import Context, Objective, get_objective, move
from .pipelines import check_pipeline_folder, load_pipeline, save_pipeline
from .train.data import ImageTextDataset
from .train.params import ParamSpec, parse_params
from .train.trainer import TrainConfig, _atomic_write_text, train

__all__ = [
    "DEFAULT_STEPS",
    "MODES",
    "FinetuneResult",
    "FinetuneSetup",
    "artifact_path",
    "carried_adapters",
    "prepare_finetune",
    "resolve_data",
    "resolve_mode",
    "run_finetune",
    "save_artifact",
]

MODES = ("modular", "standard")
DEFAULT_STEPS = 500
LORA_LR = 1e-4  # the diffusers LoRA recipe (and Paper A)
FULL_LR = 1e-5  # Paper B's attack and ResAlign's: full UNet, lr 1e-5
DEFAULT_BATCH = 4  # Paper B / ResAlign: batch 1 x accumulation 4 = 4 samples per optimizer step


def resolve_data(data: str | Path, world: str | Path | None = None) -> Path:
    """`toy:NAME` -> the world's `data/NAME`; otherwise a folder that must hold `metadata.jsonl` with rows."""
    s = str(data)
    if s.startswith("toy:"):
        from .world import current_world

        root = Path(world) if world is not None else current_world()
        folder = root / "data" / s[len("toy:") :]
        if not (folder / "metadata.jsonl").is_file():
            sets = root / "data"
            known = sorted(p.name for p in sets.iterdir() if (p / "metadata.jsonl").is_file()) if sets.is_dir() else []
            raise ConceptlockError(f"--data {s}: no such set in world {root} (known: {', '.join(known) or 'none'})")
    else:
        folder = Path(data)
        if not folder.is_dir():
            raise ConceptlockError(f"--data {folder}: folder does not exist")
        if not (folder / "metadata.jsonl").is_file():
            raise ConceptlockError(f"--data {folder}: no metadata.jsonl (rows: file_name, text; diffusers ImageFolder)")
    if not any(ln.strip() for ln in (folder / "metadata.jsonl").read_text().splitlines()):
        raise ConceptlockError(f"--data {s}: empty data set ({folder / 'metadata.jsonl'} has no rows)")
    return folder


def carried_adapters(model: str | Path | Any, adapters: Sequence[str | AdapterRef] = ()) -> list[AdapterRef]:
    """The adapters the model will carry: those of a composed folder, then `adapters` (files checked, names unique)."""
    carried = read_composition(model) if isinstance(model, str | Path) else []
    return resolve_adapters(carried, adapters)


def resolve_mode(spec: ParamSpec, refs: Sequence[AdapterRef], mode: str | None) -> str:
    """modular by default for a LoRA on a model with adapters; standard otherwise (see the module table)."""
    if mode is not None and mode not in MODES:
        raise ConceptlockError(f"--mode {mode!r}: choose modular or standard")
    if not refs:
        if mode == "modular":
            raise ConceptlockError("--mode modular: the model carries no adapter to keep inactive (add --adapter)")
        return "standard"
    if spec.adapter in {r.name for r in refs}:
        raise ConceptlockError(f"--params {spec}: the model already carries an adapter named {spec.adapter!r}")
    if not spec.is_lora:
        if mode == "modular":
            raise ConceptlockError(
                f"--params {spec} --mode modular: full/group fine-tuning trains the base weights, so the carried "
                "adapters are fused first (standard by nature); use --params lora:NAME for modular"
            )
        return "standard"
    return mode or "modular"


class KeepAdaptersActive(Objective):
    """Standard mode for a LoRA run: the carried adapters stay active at their weights and frozen while the new
    adapter trains, so it learns on W0 + sum_a w_a dW_a (the vulnerable baseline of Paper A)."""

    def __init__(self, inner: Objective, weights: Mapping[str, float]):
        self.inner = inner
        self.weights = dict(weights)
        self.name = f"{inner.name}+active:{','.join(self.weights)}"
        self.needs = inner.needs

    def prepare(self, pipe: Any, ctx: Context) -> None:
        unet = ctx.base_unet
        carried = [n for n in self.weights if n in (getattr(unet, "peft_config", None) or {})]
        unet.set_adapters([*carried, ctx.adapter], weights=[*(self.weights[n] for n in carried), 1.0])
        for n, p in unet.named_parameters():  # peft's set_adapter marks every active adapter trainable
            if any(f".{a}." in n for a in self.weights):
                p.requires_grad_(False)
        self.inner.prepare(pipe, ctx)

    def loss(self, batch: dict[str, Any], ctx: Context) -> Any:
        return self.inner.loss(batch, ctx)

    def on_step_end(self, ctx: Context) -> None:
        self.inner.on_step_end(ctx)

    def state_dict(self) -> dict[str, Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state_dict(state)

    def config(self) -> dict[str, Any]:
        return {**self.inner.config(), "active_frozen_adapters": self.weights}


def set_text_encoder_adapters(pipe: Any, enabled: bool) -> None:
    """Switch every LoRA layer of the text encoder on or off (the UNet's active set is the trainer's business)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    te = getattr(pipe, "text_encoder", None)
    if te is None:
        return
    for m in te.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


@dataclass
class FinetuneSetup:
    """Everything `train` needs, prepared for a mode: the pipeline (adapters loaded, or fused for full runs)."""

    pipe: Any
    spec: ParamSpec
    refs: list[AdapterRef]
    mode: str
    objective: Objective
    dataset: ImageTextDataset

    @property
    def weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.refs}


def prepare_finetune(
    model: str | Path | Any,
    data: str | Path,
    params: str | ParamSpec = "lora:task",
    adapters: Sequence[str | AdapterRef] = (),
    mode: str | None = None,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    resolution: int | None = None,
    world: str | Path | None = None,
) -> FinetuneSetup:
    """Load the model and its adapters and set up the mode (see the module table); bad input fails before loading."""
    spec = parse_params(params, rank=rank, alpha=alpha, targets=tuple(targets) if targets else None)
    if isinstance(model, str | Path):
        check_pipeline_folder(model)
    elif adapter_names(model):
        raise ConceptlockError("an in-memory pipeline must not hold adapters already; pass them as adapters=[...]")
    refs = carried_adapters(model, adapters)
    resolved = resolve_mode(spec, refs, mode)
    folder = resolve_data(data, world)
    pipe = load_pipeline(model) if isinstance(model, str | Path) else model
    apply_refs(pipe, refs)
    res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = ImageTextDataset(folder, tokenizers(pipe), res)
    objective: Objective = get_objective("finetune")
    weights = {r.name: r.weight for r in refs}
    if refs and not spec.is_lora:
        fuse(pipe, weights, unload=True)  # full/group: train W0 + dW_safe itself
    elif refs and resolved == "modular":
        set_text_encoder_adapters(pipe, False)  # the UNet side: apply_params makes the new adapter the only one
    elif refs:
        objective = KeepAdaptersActive(objective, weights)
    return FinetuneSetup(pipe=pipe, spec=spec, refs=refs, mode=resolved, objective=objective, dataset=dataset)


def restore_inference(setup: FinetuneSetup) -> None:
    """After a LoRA run: every adapter on, composed as at inference (carried weights, new adapter at 1)."""
    if setup.spec.is_lora:
        set_text_encoder_adapters(setup.pipe, True)
        compose(setup.pipe, {**setup.weights, setup.spec.adapter: 1.0})


def artifact_path(out: str | Path, spec: ParamSpec) -> Path:
    return Path(out) / f"{spec.adapter}.safetensors" if spec.is_lora else Path(out) / "model"


def save_artifact(setup: FinetuneSetup, path: str | Path) -> Path:
    """The new adapter as a vanilla-diffusers LoRA file, or the whole pipeline folder (CPU, float32)."""
    if setup.spec.is_lora:
        return save_adapter(setup.pipe, setup.spec.adapter, path)
    for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
        if getattr(setup.pipe, name, None) is not None:
            move(getattr(setup.pipe, name), torch.device("cpu"), torch.float32)
    return save_pipeline(setup.pipe, path, overwrite=True)


def inference_recipe(
    model: str | Path | Any, refs: Sequence[AdapterRef], new: AdapterRef | None, artifact: Path | None = None
) -> dict[str, Any]:
    """How to rebuild a (fine-tuned) model: `model` plus `adapters` (NAME=FILE:WEIGHT specs, what `--adapter`
    takes); `carried` lists what a composed model folder already brings with it (not to be passed again).
    `artifact` set = a full fine-tune: the pipeline folder alone (adapters were fused into it)."""
    if artifact is not None:
        return {"model": str(artifact), "adapters": [], "carried": []}
    if not isinstance(model, str | Path):
        return {"model": None, "adapters": [r.spec() for r in [*refs, *([new] if new else [])]], "carried": []}
    in_folder = {r.name for r in read_composition(model)}
    extra = [r for r in refs if r.name not in in_folder] + ([new] if new else [])
    return {
        "model": str(model),
        "adapters": [r.spec() for r in extra],
        "carried": [r.spec() for r in refs if r.name in in_folder],
    }


def default_lr(spec: ParamSpec) -> float:
    return LORA_LR if spec.is_lora else FULL_LR


@dataclass
class FinetuneResult:
    artifact: Path  # LoRA file or pipeline folder
    out: Path
    config: dict[str, Any]
    finished: bool
    mode: str
    pipe: Any = None  # the fine-tuned pipeline, composed as at inference


def _check_out(
    out: Path, model: str | Path | Any, artifact: Path, refs: Sequence[AdapterRef], resume: bool, overwrite: bool
) -> None:
    if isinstance(model, str | Path) and out.resolve() == Path(model).resolve():
        raise ConceptlockError(f"--out {out}: is the input model; give a separate run folder")
    if (out / "model_index.json").exists():
        raise ConceptlockError(f"--out {out}: is a pipeline folder; give a separate run folder")
    if any(artifact.resolve() == r.path.resolve() for r in refs):
        raise ConceptlockError(f"--out {out}: the new adapter would overwrite its own input {artifact}")
    if (out / "config.json").exists() and not (resume or overwrite):
        raise ConceptlockError(f"{out}: already holds a fine-tuning run (pass --resume to continue or --overwrite)")
    if artifact.exists() and not (resume or overwrite):
        raise ConceptlockError(f"{artifact}: already exists (pass --overwrite to replace it)")


_FINGERPRINT = ("model", "adapters", "mode", "data", "params", "lora", "objective")


def run_finetune(
    model: str | Path | Any,
    data: str | Path,
    out: str | Path,
    params: str | ParamSpec = "lora:task",
    adapters: Sequence[str | AdapterRef] = (),
    steps: int = DEFAULT_STEPS,
    lr: float | None = None,
    mode: str | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    grad_accum: int = 1,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    resolution: int | None = None,
    world: str | Path | None = None,
    train_kwargs: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> FinetuneResult:
    """Fine-tune `model` (a pipeline folder, or a pipeline object trained in place) on `data`; see module doc.

    `params="lora:task"` writes `out/task.safetensors`; `params="full"` writes `out/model/`. With carried adapters a
    LoRA run is modular unless `mode="standard"`. `train_kwargs` are extra TrainConfig fields (mixed_precision,
    checkpoint_every, stop_after, ...).
    """
    out = Path(out)
    spec = parse_params(params, rank=rank, alpha=alpha, targets=tuple(targets) if targets else None)
    refs = carried_adapters(model, adapters)
    artifact = artifact_path(out, spec)
    _check_out(out, model, artifact, refs, resume, overwrite)
    setup = prepare_finetune(model, data, spec, adapters, mode, resolution=resolution, world=world)
    cfg = TrainConfig(
        steps=steps,
        lr=lr if lr is not None else default_lr(spec),
        batch_size=batch_size,
        grad_accum=grad_accum,
        seed=seed,
        resume=resume,
    )
    if train_kwargs:
        try:
            cfg = replace(cfg, **train_kwargs)
        except TypeError as e:
            raise ConceptlockError(f"train settings: {e}") from None
    config = {
        "conceptlock": __version__,
        "kind": "finetune",
        "model": str(model) if isinstance(model, str | Path) else "<in-memory pipeline>",
        "adapters": [r.to_dict() for r in refs],
        "mode": setup.mode,
        "data": str(setup.dataset.folder),
        "data_spec": str(data),
        "n_images": len(setup.dataset),
        "params": str(spec),
        "lora": {"rank": spec.rank, "alpha": spec.alpha or spec.rank, "targets": list(spec.targets)}
        if spec.is_lora
        else None,
        "objective": setup.objective.name,
        "objective_config": setup.objective.config(),
        "train": asdict(cfg),
        "artifact": str(artifact),
        "inference": inference_recipe(model, setup.refs, AdapterRef(spec.adapter, artifact, 1.0))
        if spec.is_lora
        else inference_recipe(model, setup.refs, None, artifact),
        "finished": False,
        "steps_done": 0,
    }
    if resume and (out / "config.json").is_file():
        old = json.loads((out / "config.json").read_text())
        for key in _FINGERPRINT:
            if json.dumps(old.get(key), sort_keys=True, default=str) != json.dumps(
                config[key], sort_keys=True, default=str
            ):
                raise ConceptlockError(f"{out}: --resume with a different {key} than the run in it (use --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "config.json", json.dumps(config, indent=1, default=str))

    result = train(setup.pipe, spec, setup.objective, setup.dataset, cfg, out)
    config.update(finished=result.finished, steps_done=result.step)
    if result.finished:
        restore_inference(setup)
    if not result.is_main_process:
        return FinetuneResult(artifact, out, config, result.finished, setup.mode, setup.pipe)
    if result.finished:
        save_artifact(setup, artifact)
    _atomic_write_text(out / "config.json", json.dumps(config, indent=1, default=str))
    return FinetuneResult(artifact, out, config, result.finished, setup.mode, setup.pipe)


def fresh_copy(model: str | Path | Any) -> str | Path | Any:
    """A path as is; an in-memory pipeline deep-copied (so repeated runs start from the same weights)."""
    return model if isinstance(model, str | Path) else copy.deepcopy(model)
