"""Experiments are data: the pydantic schema of an experiment TOML, with one-line errors that name the TOML path.

Why a schema and not a dict: an experiment runs for minutes to hours, so a typo (`schedul`, a decreasing schedule,
an attack on a model that does not exist) must fail in a second, before any weights load, and name exactly where it
is (`paper-a.toml: attacks[2].schedule: must be strictly increasing (20 then 20)`).

An experiment file::

    name = "paper-a"                 # folder name under --out
    title = "..."                    # report heading
    paper = "A"                      # whose claims the report checks: "A", "B" or omitted
    seed = 0                         # training seed of every entry that does not set its own

    [model]                          # what every row starts from
    world = "toy"                    # the toy world of the --profile (built if needed); omit for a real model
    base = "CompVis/stable-diffusion-v1-4"   # real model: hub id or folder (toy: the world's pipeline/)
    concept = "gore"                 # what alignment erases (a toy-world concept, or text such as "nudity")

    [inputs]                         # named paths the user supplies; "{i2p}" in any path/prompt/metric string
    i2p = "i2p_benchmark.csv"        # is replaced; `reproduce --input i2p=PATH` overrides

    [eval]                           # generation + metrics applied to every model row and every curve point
    limit = 64                       # prompts per set (n); images_per_prompt, gen_steps, guidance, batch_size, seed
    harm = "toy_harm"                # headline harm metric (curves, plots, claims); fidelity = "toy_fidelity"
    [[eval.sets]]                    # id, prompts (toy:NAME or a CSV path), metrics, label, curves (also on curves?)
    id = "explicit"
    prompts = "toy:explicit-gore"
    metrics = ["toy_harm"]

    [[align]]                        # safety alignment runs (conceptlock.align.run_align)
    id = "esd"                       # method esd|sdd|lcfd-lt|lcfd-ng|lcfd-high|uce; on = "base" or another align id
    method = "esd"                   # (LCFD on an ESD/SDD output = the safety-reinforcement setting);
    params = "noxattn"               # params, steps, lr, released_code, batch_size, grad_accum, rank, seed, data,
    objective = { eta = 1.0 }        # objective (method keyword arguments, UCE's settings for uce)

    [[baselines]]                    # inference-time baselines: a model row + SLD (sld = WEAK|MEDIUM|STRONG|MAX)
    id = "sld-max"
    model = "base"
    sld = "MAX"

    [[compose]]                      # model arithmetic (conceptlock.compose): model + weighted adapters
    id = "minus-safety"
    model = "base"
    adapters = [{ source = "esd-lora", weight = -1.0 }]   # source: a LoRA align id, or an attack id with step

    [[attacks]]                      # fine-tuning attack curves (conceptlock.attacks.finetune.run_attack_curve)
    id = "mal-esd"                   # kind benign|malicious|clean; data toy:SET or a folder (data_class filters
    model = "esd"                    # metadata rows by class); params full|lora:NAME; mode standard|modular;
    kind = "malicious"               # schedule increasing steps; task: a prompt set scored with task_metrics
    data = "toy:malicious-gore"
    schedule = [0, 20, 100, 200]

    [[prompt_attacks]]               # UnlearnDiffAtk-style ASR (conceptlock.attacks.prompt.run_prompt_attack)
    id = "asr-esd"
    model = "esd"
    prompts = "toy:explicit-gore"

    [profiles.quick]                 # per-profile overrides, applied on top of the file (the file as written
                                     # is profile "complete"; [profiles.full] trims it to the 20-minute run)
    exclude = ["sdd"]                # entries left out (entries that need them are left out too); or
                                     # only = [ids]: keep just these
    eval = { limit = 16 }            # partial [eval]
    align."*" = { steps = 20 }       # per section: "*" (every entry) then an entry id, field by field
    attacks."*" = { schedule = [0, 20] }

Model references (`on`, `model`, `source`): "base", an align id, a baseline id, or a compose id.
"""

from __future__ import annotations

import copy
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ..errors import ConceptlockError

__all__ = [
    "PROFILES",
    "WORLD_PROFILE",
    "AlignSpec",
    "AttackSpec",
    "BaselineSpec",
    "ComposeAdapter",
    "ComposeSpec",
    "EvalSet",
    "EvalSpec",
    "Experiment",
    "ModelSpec",
    "ProfileOverride",
    "PromptAttackSpec",
    "bundled_experiments",
    "experiment_path",
    "load_experiment",
]

PROFILES = ("quick", "full", "complete")
# The toy world each profile runs on: `complete` (the file as written, hours) shares the full profile's world.
WORLD_PROFILE = {"quick": "quick", "full": "full", "complete": "full"}
ALIGN_METHODS = ("esd", "sdd", "lcfd-lt", "lcfd-ng", "lcfd-high", "uce")
TRAINING_FREE = ("uce",)
PARAM_GROUPS = ("full", "xattn", "noxattn", "xattn-kv")  # conceptlock.train.params.GROUPS (kept import-light)
SLD_PRESETS = ("WEAK", "MEDIUM", "STRONG", "MAX")
LIST_SECTIONS = ("align", "baselines", "compose", "attacks", "prompt_attacks")
# fields a "*" override never gives a training-free method (UCE has no trainer)
_TRAINER_FIELDS = ("params", "steps", "lr", "released_code", "batch_size", "grad_accum", "data", "train")

Id = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=64)]
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


def _check_params(v: str | None) -> str | None:
    if v is None:
        return v
    if v in PARAM_GROUPS:
        return v
    if v.startswith("lora:") and re.fullmatch(r"[A-Za-z0-9_-]+", v[5:] or ""):
        return v
    raise ValueError(f"{v!r}: use one of {', '.join(PARAM_GROUPS)} or lora:NAME")


def _check_schedule(v: list[int]) -> list[int]:
    if not v:
        raise ValueError("give at least one step count, e.g. [0, 20, 100, 200]")
    for a, b in zip(v, v[1:], strict=False):
        if b <= a:
            raise ValueError(f"must be strictly increasing ({a} then {b})")
    return v


def _check_metric(v: str) -> str:
    """Syntax only (`name[:key=value...]`, as metrics.base parses it): which names exist is the plan's check,
    so that reading a TOML never imports diffusers."""
    parts = v.strip().split(":")
    if not re.fullmatch(r"[a-z0-9_-]+", parts[0].strip().lower()):
        raise ValueError(f"metric spec {v!r}: bad metric name {parts[0]!r}")
    for opt in parts[1:]:
        if "=" not in opt:
            raise ValueError(f"metric spec {v!r}: option {opt!r} is not key=value")
    return v


class ModelSpec(_Base):
    """The starting model: the toy world's base pipeline (the default), or a real pipeline (`base`: hub id/folder)."""

    world: Literal["toy"] | None = None  # default: "toy" unless `base` names a real model
    base: str | None = None  # toy: a folder inside the world (default pipeline/); real: hub id or folder
    concept: str = "gore"
    world_seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    resolution: PosInt | None = None  # training resolution (default: the model's native size)

    @model_validator(mode="after")
    def _base_or_world(self) -> ModelSpec:
        if self.world is None and not self.base:
            self.world = "toy"
        if self.world == "toy":
            from ..world.concepts import HARMFUL

            if self.concept not in HARMFUL:
                raise ValueError(f"concept: {self.concept!r} is not a toy-world concept ({', '.join(HARMFUL)})")
        return self

    @property
    def is_toy(self) -> bool:
        return self.world == "toy"


class EvalSet(_Base):
    """One prompt set and the metrics scored on it (one generation pass feeds them all)."""

    id: Id
    prompts: str
    metrics: Annotated[list[str], Field(min_length=1)]
    label: str | None = None
    curves: bool = True  # also score it at every fine-tuning point (False: model rows only, saves time)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        return [_check_metric(m) for m in v]


class EvalSpec(_Base):
    """Generation settings shared by every evaluation, so rows and curve points are paired (same prompts, seeds)."""

    limit: PosInt | None = None
    images_per_prompt: PosInt = 1
    gen_steps: PosInt = 20
    guidance: PosFloat = 7.5
    batch_size: PosInt = 16
    seed: int = 0
    harm: str = "toy_harm"
    fidelity: str = "toy_fidelity"
    grid: NonNegInt = 8  # images per row of the report's before/after grids
    sets: Annotated[list[EvalSet], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> EvalSpec:
        ids = [s.id for s in self.sets]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"sets: duplicate id {dup[0]!r}")
        prompts = [s.prompts for s in self.sets]
        dup = sorted({p for p in prompts if prompts.count(p) > 1})
        if dup:
            raise ValueError(f"sets: prompt set {dup[0]!r} appears twice (give each set once, with all its metrics)")
        return self


class AlignSpec(_Base):
    """A safety alignment run; `on` another align id is the safety-reinforcement setting (LCFD on ESD/SDD)."""

    id: Id
    label: str | None = None
    method: Literal["esd", "sdd", "lcfd-lt", "lcfd-ng", "lcfd-high", "uce"]
    on: str = "base"
    params: str | None = None
    steps: PosInt | None = None
    lr: PosFloat | None = None
    released_code: bool = False
    batch_size: PosInt | None = None
    grad_accum: PosInt | None = None
    rank: PosInt = 4
    seed: int | None = None
    data: str | None = None
    concept: str | None = None
    objective: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)  # extra TrainConfig fields (mixed_precision, ...)

    @field_validator("params")
    @classmethod
    def _params(cls, v: str | None) -> str | None:
        return _check_params(v)

    @model_validator(mode="after")
    def _method_fields(self) -> AlignSpec:
        if self.method in TRAINING_FREE:
            # a training-free edit may still be written as a safety LoRA (params = "lora:NAME"), at the rank it needs
            bad = [f for f in _TRAINER_FIELDS if getattr(self, f) not in (None, False, {})]
            bad = [f for f in bad if not (f == "params" and self.is_lora)]
            if bad:
                raise ValueError(f"{bad[0]}: method {self.method} is training-free (no {', '.join(bad)})")
            if "rank" in self.model_fields_set:
                raise ValueError(f"rank: method {self.method} writes its LoRA at the rank that holds the edit")
        if self.released_code and not self.method.startswith("lcfd"):
            raise ValueError("released_code: only the lcfd methods have a released-code variant")
        return self

    @property
    def is_lora(self) -> bool:
        return bool(self.params and self.params.startswith("lora:"))

    @property
    def adapter(self) -> str | None:
        return self.params[5:] if self.is_lora and self.params else None


class BaselineSpec(_Base):
    """An inference-time baseline: a model row generated with safe latent diffusion (SLD)."""

    id: Id
    label: str | None = None
    model: str = "base"
    sld: str
    sld_concept: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # SLD overrides (sld_guidance_scale, ...)

    @field_validator("sld")
    @classmethod
    def _preset(cls, v: str) -> str:
        if v.upper() not in SLD_PRESETS:
            raise ValueError(f"unknown SLD preset {v!r} (choose one of {', '.join(SLD_PRESETS)})")
        return v.upper()


class ComposeAdapter(_Base):
    """One adapter of a composition: a LoRA align run, or an attack's LoRA at a schedule step; weight may be < 0."""

    source: str
    step: PosInt | None = None  # attacks: the schedule step (default: the last)
    weight: float = 1.0
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")


class ComposeSpec(_Base):
    """Model arithmetic (Paper A): `model` plus weighted adapters, e.g. W0 - dW_safe."""

    id: Id
    label: str | None = None
    model: str = "base"
    adapters: Annotated[list[ComposeAdapter], Field(min_length=1)]


class AttackSpec(_Base):
    """A fine-tuning attack curve: benign (a new domain), malicious (harmful images) or clean (same distribution)."""

    id: Id
    label: str | None = None
    model: str
    kind: Literal["benign", "malicious", "clean"]
    data: str
    data_class: int | None = None  # keep only metadata rows of this class (LCFD folders: 1 clean, 2 harmful)
    params: str = "full"
    mode: Literal["standard", "modular"] | None = None
    schedule: list[NonNegInt] = Field(default_factory=lambda: [0, 20, 100, 200])
    lr: PosFloat | None = None
    batch_size: PosInt = 4
    grad_accum: PosInt = 1
    rank: PosInt = 4
    seed: int | None = None
    task: str | None = None  # prompt set of the fine-tuning task (benign domains: task fidelity)
    task_metrics: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["toy_fidelity"])
    train: dict[str, Any] = Field(default_factory=dict)  # extra TrainConfig fields (mixed_precision, ...)

    @field_validator("params")
    @classmethod
    def _params(cls, v: str) -> str:
        return _check_params(v) or v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: list[int]) -> list[int]:
        return _check_schedule(v)

    @field_validator("task_metrics")
    @classmethod
    def _task_metrics(cls, v: list[str]) -> list[str]:
        return [_check_metric(m) for m in v]

    @model_validator(mode="after")
    def _mode(self) -> AttackSpec:
        if self.mode == "modular" and not self.params.startswith("lora:"):
            raise ValueError("mode: modular needs params = lora:NAME (full fine-tuning trains W0 itself)")
        return self

    @property
    def is_lora(self) -> bool:
        return self.params.startswith("lora:")


class PromptAttackSpec(_Base):
    """UnlearnDiffAtk-style adversarial prefixes against one model row: pre-ASR and ASR."""

    id: Id
    label: str | None = None
    model: str
    prompts: str
    limit: PosInt | None = None
    k: PosInt = 5
    iterations: NonNegInt = 40
    lr: PosFloat = 0.01
    weight_decay: float = Field(default=0.1, ge=0)
    gen_steps: PosInt | None = None  # default: eval.gen_steps
    batch_size: PosInt = 8
    discrete: bool = False
    metric: str | None = None  # default: toy_harm (toy world) or nudenet
    seed: int | None = None


Override = dict[str, dict[str, Any]]


class ProfileOverride(_Base):
    """What a profile changes: entries left out, a partial [eval], and fields of entries by id (or "*": all)."""

    only: list[str] | None = None  # keep just these entries (and leave out the rest)
    exclude: list[str] = Field(default_factory=list)
    seed: int | None = None
    eval: dict[str, Any] = Field(default_factory=dict)
    align: Override = Field(default_factory=dict)
    baselines: Override = Field(default_factory=dict)
    compose: Override = Field(default_factory=dict)
    attacks: Override = Field(default_factory=dict)
    prompt_attacks: Override = Field(default_factory=dict)


class Experiment(_Base):
    """A whole protocol. Validated per profile: the file with that profile's overrides applied."""

    name: Id
    title: str = ""
    paper: Literal["A", "B"] | None = None
    description: str = ""
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    inputs: dict[str, str] = Field(default_factory=dict)
    eval: EvalSpec
    align: list[AlignSpec] = Field(default_factory=list)
    baselines: list[BaselineSpec] = Field(default_factory=list)
    compose: list[ComposeSpec] = Field(default_factory=list)
    attacks: list[AttackSpec] = Field(default_factory=list)
    prompt_attacks: list[PromptAttackSpec] = Field(default_factory=list)
    profiles: dict[Literal["quick", "full", "complete"], ProfileOverride] = Field(default_factory=dict)

    # filled by load_experiment (not TOML keys)
    _source: str = PrivateAttr(default="")
    _profile: str = PrivateAttr(default="full")
    _excluded: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> str:
        """The TOML file this experiment was read from."""
        return self._source

    @property
    def profile(self) -> str:
        return self._profile

    @property
    def excluded(self) -> dict[str, str]:
        """Entry ids the profile left out, with why."""
        return self._excluded

    def entry(self, ident: str) -> tuple[str, Any] | None:
        """(section, entry) of an entry id, or None."""
        for section in LIST_SECTIONS:
            for e in getattr(self, section):
                if e.id == ident:
                    return section, e
        return None

    def model_ids(self) -> list[str]:
        return ["base", *(e.id for s in ("align", "baselines", "compose") for e in getattr(self, s))]


# ------------------------------------------------------------------------------------------ errors


def _loc_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found at a location (to list the keys it accepts)."""
    cls: Any = Experiment
    for p in loc:
        if isinstance(p, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or p not in cls.model_fields:
            return None
        cls = _unwrap(cls.model_fields[p].annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (list, Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if args else tp
            if origin in (Union, types.UnionType) and len(args) > 1:
                models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
                return models[0] if models else tp
        elif origin is dict:
            return tp
        else:
            return tp


def _message(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        cls = _model_at(tuple(err["loc"][:-1]))
        known = ", ".join(cls.model_fields) if cls else ""
        return f"unknown key{f' (known: {known})' if known else ''}"
    if kind == "missing":
        return "missing (required)"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def _first_error(e: ValidationError, root: type[BaseModel] | None = None) -> tuple[tuple[Any, ...], str, int]:
    """(location, message, how many more) of the first error; a model check's "field: why" moves into the path."""
    errs = e.errors()
    err = errs[0]
    loc, msg = tuple(err["loc"]), _message(err)
    m = re.match(r"^([a-z_]+): (.*)$", msg)
    cls = _model_at(loc) if root is None else root
    if m and cls is not None and m.group(1) in cls.model_fields:
        loc, msg = (*loc, m.group(1)), m.group(2)
    return loc, msg, len(errs) - 1


# ------------------------------------------------------------------------------------------ profiles


def _apply_profile(raw: dict[str, Any], profile: str, where: str) -> tuple[dict[str, Any], dict, dict, dict]:
    """The file's table with `profiles.<profile>` applied: (merged, provenance, original indices, excluded)."""
    merged = copy.deepcopy({k: v for k, v in raw.items() if k != "profiles"})
    prov: dict[str, str] = {}  # merged path -> override path
    index: dict[str, list[int]] = {}  # section -> original index per merged entry
    prof_raw = (raw.get("profiles") or {}).get(profile) or {}
    try:
        prof = ProfileOverride.model_validate(prof_raw)
    except ValidationError as e:
        loc, msg, more = _first_error(e, ProfileOverride)
        loc = ("profiles", profile, *loc)
        raise ConceptlockError(f"{where}: {_loc_str(loc)}: {msg}{f' (and {more} more)' if more else ''}") from None
    known_ids = {str(entry.get("id")): section for section in LIST_SECTIONS for entry in (merged.get(section) or [])}
    for i, x in enumerate(prof.exclude):
        if x not in known_ids:
            raise ConceptlockError(f"{where}: profiles.{profile}.exclude[{i}]: unknown entry id {x!r}")
    for i, x in enumerate(prof.only or []):
        if x not in known_ids:
            raise ConceptlockError(f"{where}: profiles.{profile}.only[{i}]: unknown entry id {x!r}")
    excluded = {x: f"profiles.{profile}.exclude" for x in prof.exclude}
    if prof.only is not None:
        excluded.update({x: f"not in profiles.{profile}.only" for x in known_ids if x not in prof.only})
    if prof.seed is not None:
        merged["seed"] = prof.seed
        prov["seed"] = f"profiles.{profile}.seed"
    if prof.eval:
        ev = merged.setdefault("eval", {})
        if not isinstance(ev, dict):
            raise ConceptlockError(f"{where}: eval: must be a table")
        for k, v in prof.eval.items():
            ev[k] = v
            prov[f"eval.{k}"] = f"profiles.{profile}.eval.{k}"
    for section in LIST_SECTIONS:
        entries = merged.get(section) or []
        if not isinstance(entries, list):
            continue
        over: Override = getattr(prof, section)
        ids = [e.get("id") if isinstance(e, dict) else None for e in entries]
        for key in over:
            if key != "*" and key not in ids:
                raise ConceptlockError(
                    f"{where}: profiles.{profile}.{section}.{key}: unknown {section} id "
                    f"(known: {', '.join(str(i) for i in ids) or 'none'})"
                )
        kept, idx = [], []
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                kept.append(e)
                idx.append(i)
                continue
            for key in ("*", e.get("id")):
                for f, v in (over.get(key) or {}).items():
                    if key == "*" and section == "align" and e.get("method") in TRAINING_FREE and f in _TRAINER_FIELDS:
                        continue
                    if f == "objective" and isinstance(v, dict) and isinstance(e.get(f), dict):
                        e[f] = {**e[f], **v}
                    else:
                        e[f] = v
                    prov[f"{section}[{len(kept)}].{f}"] = f"profiles.{profile}.{section}.{key}.{f}"
            kept.append(e)
            idx.append(i)
        merged[section] = kept
        index[section] = idx
    return merged, prov, index, excluded


def _drop_excluded(merged: dict[str, Any], index: dict[str, list[int]], excluded: dict[str, str]) -> None:
    """Remove excluded entries and, transitively, every entry that needs one of them."""
    while True:
        grew = False
        for section in LIST_SECTIONS:
            for e in merged.get(section) or []:
                if not isinstance(e, dict) or e.get("id") in excluded:
                    continue
                for ref in _refs_raw(section, e):
                    if ref in excluded:
                        excluded[str(e.get("id"))] = f"needs {ref!r}"
                        grew = True
                        break
        if not grew:
            break
    for section in LIST_SECTIONS:
        entries = merged.get(section) or []
        keep = [i for i, e in enumerate(entries) if not (isinstance(e, dict) and e.get("id") in excluded)]
        merged[section] = [entries[i] for i in keep]
        if section in index:
            index[section] = [index[section][i] for i in keep]


def _refs_raw(section: str, e: dict[str, Any]) -> list[str]:
    if section == "align":
        return [str(e.get("on", "base"))]
    if section == "compose":
        refs = [str(e.get("model", "base"))]
        refs += [str(a.get("source")) for a in e.get("adapters") or [] if isinstance(a, dict)]
        return refs
    return [str(e.get("model", "base"))]


# ------------------------------------------------------------------------------------------ references


def _check_references(exp: Experiment, fail) -> None:
    """Every model reference resolves, ids are unique, compose sources are LoRA artefacts, no cycles."""
    seen: dict[str, str] = {"base": "model"}
    for section in LIST_SECTIONS:
        for i, e in enumerate(getattr(exp, section)):
            if e.id in seen:
                fail(f"{section}[{i}].id", f"duplicate id {e.id!r} (also in {seen[e.id]})")
            seen[e.id] = section
    models = set(exp.model_ids())
    align = {a.id: a for a in exp.align}
    attacks = {a.id: a for a in exp.attacks}

    def need_model(path: str, ref: str, allow: tuple[str, ...] = ("align", "baselines", "compose")) -> None:
        if ref == "base":
            return
        hit = exp.entry(ref)
        if hit is None or ref not in models:
            why = f" (left out: {exp.excluded[ref]})" if ref in exp.excluded else ""
            fail(path, f"unknown model {ref!r}{why} (known: {', '.join(exp.model_ids())})")
        elif hit[0] not in allow:
            fail(path, f"{ref!r} is a {hit[0]} entry; use one of: base, {', '.join(allow)} ids")

    for i, a in enumerate(exp.align):
        need_model(f"align[{i}].on", a.on, ("align",))
        if a.on in align and align[a.on].is_lora:
            fail(f"align[{i}].on", f"{a.on!r} is a LoRA run; align on base or a full/group-trained model")
    for i, b in enumerate(exp.baselines):
        need_model(f"baselines[{i}].model", b.model, ("align", "compose"))
    for i, c in enumerate(exp.compose):
        need_model(f"compose[{i}].model", c.model, ("align", "compose"))
        for j, ad in enumerate(c.adapters):
            p = f"compose[{i}].adapters[{j}].source"
            if ad.source in align:
                if not align[ad.source].is_lora:
                    fail(p, f"{ad.source!r} is not a LoRA run (params = lora:NAME): it has no adapter file")
                if ad.step is not None:
                    fail(f"compose[{i}].adapters[{j}].step", "an align run has no steps; drop step")
            elif ad.source in attacks:
                at = attacks[ad.source]
                if not at.is_lora:
                    fail(p, f"attack {ad.source!r} trains params = {at.params}, not a LoRA")
                if ad.step is not None and (ad.step not in at.schedule or ad.step == 0):
                    fail(
                        f"compose[{i}].adapters[{j}].step",
                        f"give a step of attack {ad.source!r}'s schedule after 0 ({at.schedule}), or omit it (last)",
                    )
                if at.schedule[-1] == 0:
                    fail(p, f"attack {ad.source!r} trains no step (schedule {at.schedule})")
            else:
                why = f" (left out: {exp.excluded[ad.source]})" if ad.source in exp.excluded else ""
                fail(p, f"unknown adapter source {ad.source!r}{why} (a LoRA align id or a LoRA attack id)")
    for i, at in enumerate(exp.attacks):
        need_model(f"attacks[{i}].model", at.model)
    for i, pa in enumerate(exp.prompt_attacks):
        need_model(f"prompt_attacks[{i}].model", pa.model)
    # cycles (compose <- attack <- compose ...)
    deps: dict[str, list[str]] = {}
    for section in LIST_SECTIONS:
        for e in getattr(exp, section):
            deps[e.id] = [r for r in _refs_raw(section, e.model_dump()) if r != "base"]
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            fail(f"{seen.get(n, '?')} {n!r}", f"circular reference: {' -> '.join([*trail, n])}")
        state[n] = 1
        for d in deps.get(n, []):
            visit(d, [*trail, n])
        state[n] = 2

    for n in deps:
        visit(n, [])


# ------------------------------------------------------------------------------------------ loading


def bundled_dir() -> Path:
    return Path(__file__).resolve().parent


def bundled_experiments() -> list[str]:
    """Names of the experiments shipped with the package (paper-a, paper-b, and the GPU recipes)."""
    return sorted(p.stem for p in bundled_dir().glob("*.toml"))


def experiment_path(name: str | Path) -> Path:
    """A bundled experiment name (`paper-a`) or a path to a TOML file."""
    p = Path(name)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConceptlockError(f"{p}: experiment file not found")
        return p
    cand = bundled_dir() / f"{name}.toml"
    if not cand.is_file():
        raise ConceptlockError(
            f"unknown experiment {str(name)!r} (bundled: {', '.join(bundled_experiments())}; or give a .toml path)"
        )
    return cand


def load_experiment(
    name: str | Path, profile: str = "full", inputs: dict[str, str] | None = None, text: str | None = None
) -> Experiment:
    """Read, apply `profile`, validate: an Experiment, or a one-line ConceptlockError naming the TOML path."""
    if profile not in PROFILES:
        raise ConceptlockError(f"--profile {profile!r}: choose one of {', '.join(PROFILES)}")
    path = experiment_path(name) if text is None else Path(str(name))
    where = path.name
    try:
        raw = tomllib.loads(text if text is not None else path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConceptlockError(f"{where}: not valid TOML ({e})") from None
    merged, prov, index, excluded = _apply_profile(raw, profile, where)
    _drop_excluded(merged, index, excluded)
    if "profiles" in raw:
        merged["profiles"] = raw["profiles"]

    def where_is(loc: tuple[Any, ...]) -> str:
        # map a merged location back to the file: the original entry index, or the profile override that set it
        for n in range(len(loc), 0, -1):
            key = _loc_str(loc[:n])
            if key in prov:
                return prov[key] + _loc_str(("_",) + tuple(loc[n:]))[1:]
        if len(loc) >= 2 and loc[0] in index and isinstance(loc[1], int) and loc[1] < len(index[loc[0]]):
            loc = (loc[0], index[loc[0]][loc[1]], *loc[2:])
        return _loc_str(loc)

    try:
        exp = Experiment.model_validate(merged)
    except ValidationError as e:
        loc, msg, more = _first_error(e)
        raise ConceptlockError(f"{where}: {where_is(loc)}: {msg}{f' (and {more} more)' if more else ''}") from None
    exp._source = str(path)
    exp._profile = profile
    exp._excluded = excluded
    if inputs:
        exp.inputs = {**exp.inputs, **inputs}

    def fail(p: str, msg: str) -> None:
        loc = tuple(int(x) if x.isdigit() else x for x in re.split(r"[.\[\]]+", p) if x)
        raise ConceptlockError(f"{where}: {where_is(loc) if ' ' not in p else p}: {msg}")

    _check_references(exp, fail)
    for i, pa in enumerate(exp.prompt_attacks):
        if pa.metric:
            try:
                _check_metric(pa.metric)
            except ValueError as e:
                fail(f"prompt_attacks[{i}].metric", str(e))
    return exp
