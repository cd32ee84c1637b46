"""The one training loop. A run = (pipeline, trainable-parameter spec, objective, dataset) + a TrainConfig.

Every method in conceptlock (ESD, SDD, LCFD, plain fine-tuning, attacks) is an objective run through `train`.
The loop owns what objectives should never think about: device and mixed precision (accelerate), gradient
accumulation, multi-process (`accelerate launch`), lr schedule, optional EMA, the JSONL loss log, atomic
checkpoints and resume, and stopping on a non-finite loss.

Determinism: the batches come from `BatchPlan` (a pure function of seed and step) and every random draw of a
sample from `SampleRNG` (seeded by the sample's stream position), so a run is reproducible from its seed, a resumed
run equals a straight one, and N processes equal one process with the same global `batch_size`.

Checkpoint folder `out/checkpoints/step_NNNNNNNN/`:
    trainable.safetensors   the trainable parameters (by UNet parameter name)
    ema.safetensors         EMA shadow weights (if EMA is on)
    objective.safetensors   the objective's state (teacher EMA, class centres, ...) if any
    meta.json               step, params spec, objective, seed
    optimizer.bin, scheduler.bin, random_states_*.pkl   accelerate `save_state` (loaded with weights_only=True)
A checkpoint is written into a temporary folder and renamed into place, so an interrupted save never leaves a
half checkpoint behind; `resume` picks the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..io import atomic_write_text as _atomic_write_text
from ..methods.base import Context, Objective, move
from ..pipelines import ConceptlockError
from .data import BatchPlan
from .params import ParamSpec, apply_params, parse_params

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(ConceptlockError):
    """Training stopped (e.g. a non-finite loss); the message names the step and the last good checkpoint."""


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-5
    batch_size: int = 1  # GLOBAL samples per optimizer step (over processes and accumulation)
    grad_accum: int = 1
    lr_scheduler: str = "constant"  # any name diffusers.optimization.get_scheduler knows
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    cache_latents: bool = False  # VAE-encode an image dataset once (train.data.CachedLatents)
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit (optional; GPU)
    ema_decay: float | None = None  # EMA of the trainable weights; applied to the model when training ends
    seed: int = 0
    checkpoint_every: int = 0  # 0: never
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest checkpoint in out/checkpoints (fresh start if none)
    stop_after: int | None = None  # stop after this step as if interrupted (time slicing, tests)
    cpu: bool = False


# Fields that change how a run executes but not what it computes (cache_latents is bit-identical by test).
_EXECUTION_ONLY = ("stop_after", "checkpoint_every", "keep_checkpoints", "resume", "cache_latents", "cpu")


def train_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of `cfg` that decide a run's result, defaults left out.

    Leaving defaults out means a field added to TrainConfig later (with a default that keeps the old
    behaviour) does not invalidate finished runs that resume logic compares against.
    """
    return normalise_train_dict(asdict(cfg))


def normalise_train_dict(d: dict[str, Any]) -> dict[str, Any]:
    """`train_fingerprint` of a stored (JSON) train config, so runs recorded by older versions compare equal."""
    default = asdict(TrainConfig(steps=1))

    def same(a: Any, b: Any) -> bool:
        return json.dumps(a, default=str) == json.dumps(b, default=str)

    return {k: v for k, v in d.items() if k not in _EXECUTION_ONLY and (k == "steps" or not same(v, default.get(k)))}


@dataclass
class TrainResult:
    step: int  # last completed optimizer step
    loss: float | None
    log: Path
    checkpoint: Path | None
    finished: bool
    trainable: list[str] = field(default_factory=list)
    is_main_process: bool = True  # write final artefacts only when True


def _atomic_save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class EMA:
    """Exponential moving average of the trainable weights (fp32 shadow copies)."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ConceptlockError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params}

    @torch.no_grad()
    def update(self, params: list[tuple[str, nn.Parameter]]) -> None:
        for n, p in params:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: list[tuple[str, nn.Parameter]]) -> None:
        for n, p in params:
            p.copy_(self.shadow[n].to(p.dtype))


class LossLog:
    """JSONL rows {step, loss, lr, ...objective scalars}. On resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_until: int, enabled: bool):
        self.path, self.f = path, None
        if not enabled:
            return
        rows = []
        if keep_until > 0 and path.is_file():
            rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_until]
        _atomic_write_text(path, "".join(r + "\n" for r in rows))
        self.f = path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class Checkpointer:
    """Atomic save / load of everything a resume needs (see module docstring)."""

    PATTERN = re.compile(r"^step_(\d{8})$")

    def __init__(self, acc: Any, folder: Path, keep: int):
        self.acc, self.folder, self.keep = acc, folder, max(1, keep)
        # accelerate would save the whole UNet (GBs for SD, even for a LoRA run): skip it, we save trainables.
        acc.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        acc.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    def all(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if self.PATTERN.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(
        self, step: int, trainable: list[tuple[str, nn.Parameter]], ema: EMA | None, objective: Objective, meta: dict
    ) -> Path:
        acc = self.acc
        final = self.folder / f"step_{step:08d}"
        tmp = self.folder / f".tmp_step_{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        obj_state = objective.state_dict()
        if acc.is_main_process:
            save_file({n: p.detach().cpu().contiguous() for n, p in trainable}, str(tmp / "trainable.safetensors"))
            if ema is not None:
                save_file({n: t.cpu().contiguous() for n, t in ema.shadow.items()}, str(tmp / "ema.safetensors"))
            if obj_state:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in obj_state.items()}, str(tmp / "objective.safetensors")
                )
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(
        self, path: Path, trainable: list[tuple[str, nn.Parameter]], ema: EMA | None, objective: Objective, meta: dict
    ) -> int:
        saved = json.loads((path / "meta.json").read_text())
        for key in ("params", "objective"):
            if saved.get(key) != meta.get(key):
                raise ConceptlockError(
                    f"{path}: checkpoint was made with {key}={saved.get(key)!r}, this run has {meta.get(key)!r}"
                )
        self.acc.load_state(str(path))
        weights = load_file(str(path / "trainable.safetensors"))
        names = {n for n, _ in trainable}
        if set(weights) != names:
            raise ConceptlockError(f"{path}: trainable parameters in the checkpoint do not match this run's --params")
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(weights[n].to(p.device, p.dtype))
        if ema is not None:
            ema_file = path / "ema.safetensors"
            if not ema_file.is_file():
                raise ConceptlockError(f"{path}: no EMA weights in the checkpoint but this run uses EMA")
            shadow = load_file(str(ema_file))
            if set(shadow) != names:
                raise ConceptlockError(f"{path}: EMA weights in the checkpoint do not match this run's --params")
            ema.shadow = {n: shadow[n].to(self.acc.device) for n in names}
        obj_file = path / "objective.safetensors"
        state = load_file(str(obj_file)) if obj_file.is_file() else {}
        objective.load_state_dict({k: v.to(self.acc.device) for k, v in state.items()})
        return int(saved["step"])


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _check_batch(batch: dict[str, Any], objective: Objective) -> None:
    for need in objective.needs:
        if not any(k in batch for k in need.split("|")):
            raise ConceptlockError(
                f"objective {objective.name!r} needs batch key {need!r}; the data gives {sorted(batch)}"
            )


def train(
    pipe: Any,
    params: str | ParamSpec,
    objective: Objective,
    data: Dataset,
    config: TrainConfig,
    out_dir: str | Path,
) -> TrainResult:
    """Train `pipe.unet` in place. Writes `out_dir/train_log.jsonl`, `out_dir/train_config.json` and
    `out_dir/checkpoints/`; the caller saves the result (pipeline folder or adapter file)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg = config
    if cfg.steps <= 0:
        raise ConceptlockError(f"steps must be > 0, got {cfg.steps}")
    if cfg.mixed_precision not in DTYPES:
        raise ConceptlockError(f"mixed_precision must be one of {sorted(DTYPES)}, got {cfg.mixed_precision!r}")
    if cfg.grad_accum < 1:
        raise ConceptlockError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
    spec = parse_params(params)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu or (distributed and not torch.cuda.is_available()),
        step_scheduler_with_optimizer=False,
    )
    try:
        return _train(acc, pipe, spec, objective, data, cfg, Path(out_dir))
    finally:
        if acc.num_processes == 1:  # let the next run in this process pick its own mixed precision
            AcceleratorState._reset_state()


def _has_images(data: Dataset) -> bool:
    return len(data) > 0 and "pixel_values" in data[0]


def _optimizer(cfg: TrainConfig) -> Any:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked (an optional dependency, for GPU memory)."""
    if not cfg.use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConceptlockError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit


def _train(
    acc: Any, pipe: Any, spec: ParamSpec, objective: Objective, data: Dataset, cfg: TrainConfig, out: Path
) -> TrainResult:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    plan = BatchPlan(data, cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, cfg.seed)
    set_seed(cfg.seed)  # only LoRA initialisation draws from the global RNG; batches use SampleRNG
    dtype, device = DTYPES[cfg.mixed_precision], acc.device

    unet = pipe.unet
    trainable = apply_params(unet, spec)
    for name in ("vae", "text_encoder", "text_encoder_2"):  # text_encoder_2: SDXL
        if getattr(pipe, name, None) is not None:
            move(getattr(pipe, name).requires_grad_(False).eval(), device, dtype)
    if spec.is_lora and dtype != torch.float32:  # frozen base in low precision, adapter weights stay fp32
        move(unet, device, dtype)
        for _, p in trainable:
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device).train()

    ctx = Context(
        pipe=pipe,
        unet=unet,
        device=device,
        dtype=dtype,
        adapter=spec.adapter,
        trainable=trainable,
        seed=cfg.seed,
        reduce_sum=(lambda x: acc.reduce(x, reduction="sum")) if acc.num_processes > 1 else (lambda x: x),
    )
    objective.prepare(pipe, ctx)
    if cfg.cache_latents and _has_images(data):
        from .data import CachedLatents

        data = CachedLatents(data, pipe.vae, device, dtype)
        plan.dataset = data

    opt = _optimizer(cfg)(
        [p for _, p in trainable], lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    model, opt, sched = acc.prepare(unet, opt, sched)
    ctx.unet = model
    ema = EMA(trainable, cfg.ema_decay) if cfg.ema_decay else None

    meta = {"params": str(spec), "objective": objective.name, "seed": cfg.seed, "steps": cfg.steps}
    ckpt = Checkpointer(acc, out / "checkpoints", cfg.keep_checkpoints)
    start, last_ckpt = 0, None
    if cfg.resume and (last_ckpt := ckpt.latest()) is not None:
        start = ckpt.load(last_ckpt, trainable, ema, objective, meta)
    elif not cfg.resume and acc.is_main_process and ckpt.folder.is_dir():
        shutil.rmtree(ckpt.folder)  # a fresh run: an earlier run's checkpoints must not be resumed into it
    acc.wait_for_everyone()
    if acc.is_main_process:
        run = {
            "train": asdict(cfg),
            "params": str(spec),
            "objective": objective.name,
            "objective_config": objective.config(),
            "num_processes": acc.num_processes,
        }
        _atomic_write_text(out / "train_config.json", json.dumps(run, indent=1, default=str))
    log = LossLog(out / "train_log.jsonl", start, acc.is_main_process)

    step, loss_value, finished = start, None, True
    try:
        for step in range(start + 1, cfg.steps + 1):
            ctx.step = step
            totals: dict[str, Tensor] = {}
            for micro in range(cfg.grad_accum):
                batch = _to_device(plan.batch(step, micro), device)
                if step == start + 1 and micro == 0:
                    _check_batch(batch, objective)
                last = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if last else acc.no_sync(model):  # DDP syncs once per step
                    with acc.autocast():
                        res = objective.loss(batch, ctx)
                    loss, extras = res if isinstance(res, tuple) else (res, {})
                    acc.backward(loss / cfg.grad_accum)
                for k, v in {"loss": loss, **extras}.items():
                    totals[k] = totals.get(k, 0) + v.detach().float() / cfg.grad_accum
            keys = list(totals)
            values = acc.reduce(torch.stack([totals[k] for k in keys]), reduction="mean").tolist()
            if not math.isfinite(values[0]):  # before the optimizer step: the weights stay finite
                where = f"last good checkpoint kept: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise TrainingError(f"loss is {values[0]} at step {step}; stopped ({where})")
            if cfg.max_grad_norm:
                acc.clip_grad_norm_([p for _, p in trainable], cfg.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            objective.on_step_end(ctx)
            if ema is not None:
                ema.update(trainable)
            loss_value = values[0]
            log.write({"step": step, **dict(zip(keys, values, strict=True)), "lr": lr})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                last_ckpt = ckpt.save(step, trainable, ema, objective, meta)
            if cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.steps:
                finished = False
                break
        if finished and ema is not None:
            ema.copy_to(trainable)
        acc.wait_for_everyone()
    finally:
        log.close()
        if cfg.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()
    return TrainResult(
        step=step,
        loss=loss_value,
        log=out / "train_log.jsonl",
        checkpoint=last_ckpt,
        finished=finished,
        trainable=[n for n, _ in trainable],
        is_main_process=acc.is_main_process,
    )
