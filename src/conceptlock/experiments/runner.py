"""`conceptlock reproduce`: plan an experiment as a DAG of stages and run it, resumably.

Why stages: a protocol is tens of training runs and evaluations. Each stage writes into its own folder and ends by
writing `stage.json` (status, key, wall time, seeds, spec); a stage whose `stage.json` says done with the same key is
skipped, so a killed run restarts where it stopped, and, since every seed is fixed and recorded and every tool it
calls is deterministic (and exactly resumable where it trains), it finishes with the same numbers. The key hashes the
stage's resolved spec and its dependencies' keys: edit one entry of the TOML and only that entry and what depends
on it run again.

Stages (kind / folder under `OUT/<experiment>/`):

    world                 world/stage.json          the toy world (built or reused; cached by config hash)
    data/<slug>           data/<slug>/              a class-filtered copy of an image folder (clean half of LCFD's)
    align/<id>            align/<id>/               conceptlock.align.run_align: model/ or NAME.safetensors
    compose/<id>          compose/<id>/model/       conceptlock.compose.run_compose: the composed (unfused) folder
    eval/<model>          eval/<model>/<set>/       run_evaluate per prompt set: results.json, scores.jsonl, images
    attack/<id>           attack/<id>/              run_attack_curve: curve.json, points/step_N/, train/
    attack-eval/<id>      attack-eval/<id>/step_N/  the curve's points re-scored with the target's options (SLD)
    prompt-attack/<id>    prompt-attack/<id>/       run_prompt_attack: asr.json, prefixes, images
    report                report.html, report.md, summary.json, plots/

Step 0 of every curve is the attacked model itself, so it is not recomputed by the curve: its numbers are the
model row's (`eval/<model>`: the same prompts, seeds and generation settings, hence identical images). A curve whose
resolved configuration equals an earlier one (e.g. an SLD row attacked like its plain model) reuses that stage.

`OUT/<experiment>/experiment.json` records the resolved configuration, the profile, the plan, seeds, package
versions, the world and the inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import ConceptlockError
from ..io import atomic_write_text as _atomic_write
from .config import WORLD_PROFILE, Experiment, load_experiment

__all__ = [
    "Plan",
    "Recipe",
    "STAGE_RUNNERS",
    "Stage",
    "plan_experiment",
    "run_experiment",
    "run_plan",
    "run_plans",
    "versions",
]

STAGE_FILE = "stage.json"
_VERSION_PACKAGES = (
    "conceptlock",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "numpy",
    "safetensors",
    "pydantic",
    "matplotlib",
)


def versions() -> dict[str, str | None]:
    """Package versions recorded with every run (numbers move with them)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in _VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "x"


@dataclass
class Recipe:
    """How to build one model row: load `model` (a composed folder carries its adapters) plus `adapters`, and
    generate with `options`. `plain` + `all_adapters` is the same model for tools that load a plain folder."""

    model: str
    adapters: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    plain: str = ""
    all_adapters: list[str] = field(default_factory=list)
    stage: str | None = None  # the stage that produces it (None: nothing to build)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "adapters": self.adapters,
            "options": self.options,
            "plain": self.plain,
            "all_adapters": self.all_adapters,
        }


@dataclass
class Stage:
    id: str
    kind: str
    folder: Path
    deps: list[str]
    spec: dict[str, Any]
    label: str = ""
    key: str = ""

    def record(self) -> dict[str, Any] | None:
        p = self.folder / STAGE_FILE
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None

    def is_done(self) -> bool:
        """Finished with this very configuration, and its results are still on disk."""
        r = self.record()
        return bool(r and r.get("status") == "done" and r.get("key") == self.key) and self.outputs_exist()

    def outputs_exist(self) -> bool:
        f, sp = self.folder, self.spec
        if self.kind == "world":
            return (Path(sp["folder"]) / "world.json").is_file()
        if self.kind == "data":
            return (f / "metadata.jsonl").is_file()
        if self.kind == "align":
            params = sp.get("params") or ""
            art = f / f"{params[5:]}.safetensors" if params.startswith("lora:") else f / "model" / "model_index.json"
            return art.is_file()
        if self.kind == "compose":
            return (f / "model" / "model_index.json").is_file()
        if self.kind == "eval":
            return all((f / s["id"] / "results.json").is_file() for s in sp["sets"])
        if self.kind == "attack":
            c = f / "curve.json"
            return c.is_file() and bool(json.loads(c.read_text()).get("complete"))
        if self.kind == "attack-eval":
            return all(
                (f / f"step_{st:08d}" / s["id"] / "results.json").is_file() for st in sp["schedule"] for s in sp["sets"]
            )
        if self.kind == "prompt-attack":
            return (f / "asr.json").is_file()
        return True


@dataclass
class Plan:
    """An experiment resolved into stages (topologically ordered), model recipes and curve bookkeeping."""

    experiment: Experiment
    out: Path
    world: Path | None
    stages: list[Stage]
    recipes: dict[str, Recipe]
    curves: dict[str, dict[str, Any]]
    eval_sets: dict[str, list[dict[str, Any]]]  # model id -> the sets its eval stage scores
    warnings: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # model id -> label

    def stage(self, sid: str) -> Stage:
        for s in self.stages:
            if s.id == sid:
                return s
        raise KeyError(sid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [
                {
                    "id": s.id,
                    "kind": s.kind,
                    "deps": s.deps,
                    "key": s.key,
                    "folder": str(s.folder.relative_to(self.out)),
                }
                for s in self.stages
            ],
            "recipes": {k: v.to_dict() for k, v in self.recipes.items()},
            "curves": self.curves,
            "excluded": self.experiment.excluded,
            "warnings": self.warnings,
        }


# ------------------------------------------------------------------------------------------ planning


def _toy_names(world: Path | None, exp: Experiment) -> tuple[set[str], set[str], list[str]]:
    """Prompt-set names, data-set names and concepts of the toy world (from world.json, or the default config)."""
    from ..world.data import WorldConfig, prompt_set_names

    meta_cfg = None
    if world is not None and (world / "world.json").is_file():
        from ..world.build import read_world

        meta_cfg = read_world(world)["config"]
    cfg = WorldConfig(**meta_cfg) if meta_cfg else WorldConfig(profile="quick", seed=exp.model.world_seed)
    prompts = set(prompt_set_names(cfg))
    data = {f"domain-{d}" for d in cfg.domains}
    data |= {f"{k}-{c}" for c in cfg.concepts for k in ("malicious", "lcfd")}
    return prompts, data, list(cfg.concepts)


def plan_experiment(
    exp: Experiment,
    out: str | Path,
    world: str | Path | None = None,
    inputs: dict[str, str] | None = None,
    dry_run: bool = False,
) -> Plan:
    """Resolve `exp` into stages without loading any weights (what `--dry-run` prints).

    Checks what can be checked offline: model references, prompt sets and data sets of the toy world, metric
    names, inputs (missing input files are errors for a real run and warnings for a dry run).
    """
    import conceptlock.metrics.toy  # noqa: F401  (registers the toy_* metrics)

    from ..metrics.base import available_metrics, parse_metric_spec

    where = Path(exp.source).name if exp.source else exp.name
    root = Path(out) / exp.name
    warnings: list[str] = []
    ins = {**exp.inputs, **(inputs or {})}
    used_inputs: set[str] = set()
    stages: dict[str, Stage] = {}
    order: list[str] = []

    def fail(path: str, msg: str) -> None:
        raise ConceptlockError(f"{where}: {path}: {msg}")

    def subst(s: str, path: str) -> str:
        def rep(m: re.Match) -> str:
            name = m.group(1)
            if name not in ins:
                fail(path, f"unknown input {{{name}}} (known: {', '.join(sorted(ins)) or 'none'}; add it to [inputs])")
            used_inputs.add(name)
            return ins[name]

        return re.sub(r"\{([A-Za-z0-9_-]+)\}", rep, s)

    missing: dict[str, list[str]] = {}  # resolved path -> [where, input name or ""]

    def check_path(raw: str, path: str, what: str) -> str:
        names = re.findall(r"\{([A-Za-z0-9_-]+)\}", raw)
        s = subst(raw, path)
        if not Path(s).exists():
            if not dry_run:
                hint = f" (pass --input {names[0]}=PATH)" if names else ""
                raise ConceptlockError(f"{where}: {path}: {what} {s!r} not found{hint}")
            missing.setdefault(s, [path, names[0] if names else "", what])
            missing[s].append(path)
        return s

    def add(stage: Stage) -> Stage:
        stage.key = _hash({"kind": stage.kind, "spec": stage.spec, "deps": [stages[d].key for d in stage.deps]})
        stages[stage.id] = stage
        order.append(stage.id)
        return stage

    # ---- world and base model
    toy = exp.model.is_toy
    world_dir: Path | None = None
    if toy:
        from ..world.build import default_world_dir
        from ..world.data import WorldConfig

        wprofile = WORLD_PROFILE[exp.profile]
        world_dir = Path(world) if world is not None else default_world_dir(wprofile)
        explicit = world is not None
        cfg = WorldConfig(profile=wprofile, seed=exp.model.world_seed)  # type: ignore[arg-type]
        wkey = cfg.config_hash()
        if (world_dir / "world.json").is_file() and explicit:
            from ..world.build import read_world

            wkey = read_world(world_dir).get("config_hash", wkey)
        add(
            Stage(
                "world",
                "world",
                root / "world",
                [],
                {
                    "folder": str(world_dir),
                    "explicit": explicit,
                    "profile": wprofile,
                    "seed": exp.model.world_seed,
                    "config_hash": wkey,
                },
                "toy world",
            )
        )
        prompt_names, data_names, concepts = _toy_names(world_dir, exp)
        if exp.model.concept not in concepts:
            fail("model.concept", f"{exp.model.concept!r} is not a concept of the world ({', '.join(concepts)})")
        base_path = str(world_dir / (exp.model.base or "pipeline"))
        base = Recipe(base_path, plain=base_path, stage="world")
    else:
        prompt_names, data_names = set(), set()
        base_path = subst(exp.model.base or "", "model.base")
        base = Recipe(base_path, plain=base_path)
    known_metrics = set(available_metrics())

    def check_prompts(spec: str, path: str) -> str:
        if spec.startswith("toy:"):
            if not toy:
                fail(path, f'{spec!r}: toy: prompt sets need model.world = "toy"')
            if spec[4:] not in prompt_names:
                fail(
                    path,
                    f"unknown toy prompt set {spec!r} (known: {', '.join('toy:' + n for n in sorted(prompt_names))})",
                )
            return spec
        return check_path(spec, path, "prompt file")

    def check_metric(spec: str, path: str) -> str:
        spec = subst(spec, path)
        name = parse_metric_spec(spec)[0]
        if name not in known_metrics:
            fail(path, f"unknown metric {name!r} (available: {', '.join(sorted(known_metrics))})")
        if name.startswith("toy") and not toy:
            fail(path, f"{name!r} is a toy-world metric; this experiment has a real model")
        return spec

    def check_data(spec: str, path: str) -> str:
        """A toy:NAME set of the world (its folder) or a folder path (inputs substituted)."""
        if spec.startswith("toy:"):
            if not toy:
                fail(path, f'{spec!r}: toy: data sets need model.world = "toy"')
            if spec[4:] not in data_names:
                fail(
                    path, f"unknown toy data set {spec!r} (known: {', '.join('toy:' + n for n in sorted(data_names))})"
                )
            return str(world_dir / "data" / spec[4:])
        return check_path(spec, path, "data folder")

    ev = exp.eval
    sets = []
    for i, s in enumerate(ev.sets):
        sets.append(
            {
                "id": s.id,
                "label": s.label or s.id,
                "prompts": check_prompts(s.prompts, f"eval.sets[{i}].prompts"),
                "metrics": [check_metric(m, f"eval.sets[{i}].metrics") for m in s.metrics],
                "curves": s.curves,
            }
        )
    curve_sets = [s for s in sets if s["curves"]]
    harm_names = {parse_metric_spec(m)[0] for s in curve_sets for m in s["metrics"]}
    if ev.harm not in harm_names:
        fail("eval.harm", f"metric {ev.harm!r} is not scored on any set with curves = true")
    if ev.fidelity not in harm_names:
        warnings.append(f"eval.fidelity: {ev.fidelity!r} is not scored on any curve set; curves carry no fidelity")
    gen = {
        "limit": ev.limit,
        "images_per_prompt": ev.images_per_prompt,
        "gen_steps": ev.gen_steps,
        "guidance": ev.guidance,
        "batch_size": ev.batch_size,
        "seed": ev.seed,
        "dtype": exp.model.dtype,
    }

    # ---- models (align, baselines, compose) and attacks, resolved recursively in dependency order
    recipes: dict[str, Recipe] = {"base": base}
    labels: dict[str, str] = {"base": "base model"}
    curves: dict[str, dict[str, Any]] = {}
    idx = {
        sec: {e.id: i for i, e in enumerate(getattr(exp, sec))} for sec in ("align", "baselines", "compose", "attacks")
    }
    attack_stage_by_key: dict[str, str] = {}
    data_stages: dict[str, str] = {}
    sld_concept = None
    if toy:
        from ..world.concepts import HARMFUL

        sld_concept = HARMFUL[exp.model.concept].safety_text or None

    def model(ref: str) -> Recipe:
        if ref in recipes:
            return recipes[ref]
        hit = exp.entry(ref)
        assert hit is not None  # references were checked when the TOML was read
        section, e = hit
        if section == "align":
            plan_align(e, idx["align"][ref])
        elif section == "baselines":
            parent = model(e.model)
            opts = {
                "sld": e.sld,
                **({"sld_concept": e.sld_concept or sld_concept} if (e.sld_concept or sld_concept) else {}),
            }
            opts.update(e.options)
            recipes[ref] = Recipe(
                parent.model,
                list(parent.adapters),
                {**parent.options, **opts},
                parent.plain,
                list(parent.all_adapters),
                parent.stage,
            )
        elif section == "compose":
            plan_compose(e, idx["compose"][ref])
        labels[ref] = e.label or ref
        return recipes[ref]

    def plan_align(a: Any, i: int) -> None:
        parent = model(a.on)
        p = f"align[{i}]"
        data = check_data(a.data, f"{p}.data") if a.data else None
        if a.method.startswith("lcfd") and data is None and not toy:
            fail(f"{p}.data", f"method {a.method} needs data = an image folder with class 1 (clean) / 2 (harmful) rows")
        folder = root / "align" / a.id
        spec = {
            "method": a.method,
            "model": parent.to_dict(),
            "concept": a.concept or exp.model.concept,
            "params": a.params,
            "steps": a.steps,
            "lr": a.lr,
            "released_code": a.released_code,
            "batch_size": a.batch_size,
            "grad_accum": a.grad_accum,
            "rank": a.rank,
            "seed": exp.seed if a.seed is None else a.seed,
            "data": data,
            "objective": a.objective,
            "train": a.train,
            "resolution": exp.model.resolution,
        }
        deps = [d for d in [parent.stage, "world" if toy else None] if d]
        add(Stage(f"align/{a.id}", "align", folder, sorted(set(deps)), spec, a.label or a.id))
        if a.is_lora:
            adapter = f"{a.adapter}={folder / f'{a.adapter}.safetensors'}:1"
            recipes[a.id] = Recipe(
                parent.model,
                [*parent.adapters, adapter],
                {},
                parent.plain,
                [*parent.all_adapters, adapter],
                f"align/{a.id}",
            )
        else:
            m = str(folder / "model")
            recipes[a.id] = Recipe(m, [], {}, m, [], f"align/{a.id}")

    def adapter_file(source: str, step: int | None) -> tuple[str, Path, str]:
        """(adapter name, file, producing stage) of a compose source."""
        hit = exp.entry(source)
        assert hit is not None
        section, e = hit
        if section == "align":
            model(source)
            return str(e.adapter), root / "align" / source / f"{e.adapter}.safetensors", f"align/{source}"
        plan_attack(e, idx["attacks"][source])
        st = step if step is not None else e.schedule[-1]
        c = curves[source]
        name = e.params[5:]
        return name, stages[c["stage"]].folder / "points" / f"step_{st:08d}" / f"{name}.safetensors", c["stage"]

    def plan_compose(c: Any, i: int) -> None:
        parent = model(c.model)
        specs, deps = [], [parent.stage] if parent.stage else []
        names = [a.split("=", 1)[0] for a in parent.all_adapters]
        for j, ad in enumerate(c.adapters):
            name, path, st = adapter_file(ad.source, ad.step)
            name = ad.name or name
            if name in names:
                fail(f"compose[{i}].adapters[{j}].name", f'adapter name {name!r} is already used; set name = "..."')
            names.append(name)
            specs.append(f"{name}={path}:{ad.weight:g}")
            deps.append(st)
        folder = root / "compose" / c.id
        spec = {"model": parent.to_dict(), "adapters": specs}
        add(Stage(f"compose/{c.id}", "compose", folder, sorted(set(deps)), spec, c.label or c.id))
        m = str(folder / "model")
        recipes[c.id] = Recipe(
            m, [], dict(parent.options), parent.plain, [*parent.all_adapters, *specs], f"compose/{c.id}"
        )

    def plan_attack(a: Any, i: int) -> None:
        if a.id in curves:
            return
        target = model(a.model)
        p = f"attacks[{i}]"
        data = check_data(a.data, f"{p}.data")
        deps = [d for d in [target.stage] if d]
        if a.data_class is not None:
            slug = _slug(f"{Path(data).name}-class{a.data_class}")
            sid = f"data/{slug}"
            if sid not in stages:
                add(
                    Stage(
                        sid,
                        "data",
                        root / "data" / slug,
                        ["world"] if toy else [],
                        {"source": data, "class": a.data_class},
                    )
                )
            data_stages[a.id] = sid
            deps.append(sid)
            data = str(root / "data" / slug)
        task = None
        if a.task:
            task = {
                "id": f"task-{_slug(a.task.replace('toy:', ''))}",
                "label": f"task: {a.task}",
                "prompts": check_prompts(a.task, f"{p}.task"),
                "metrics": [check_metric(m, f"{p}.task_metrics") for m in a.task_metrics],
                "curves": True,
            }
        evals = [*curve_sets, *([task] if task else [])]
        positive = [s for s in a.schedule if s > 0]
        underlying = Recipe(target.model, target.adapters, {}, target.plain, target.all_adapters)
        what = "LoRA" if a.is_lora else a.params
        mode = a.mode or ("modular" if a.is_lora and target.adapters else "standard")
        label = a.label or f"{labels.get(a.model, a.model)}: {a.kind} FT ({what}{', ' + mode if a.is_lora else ''})"
        entry: dict[str, Any] = {
            "label": label,
            "target": a.model,
            "kind": a.kind,
            "params": a.params,
            "mode": mode,
            "data": a.data,
            "schedule": list(a.schedule),
            "sets": [s["id"] for s in evals],
            "task": task["id"] if task else None,
            "task_set": task,
            "stage": None,
            "sld_stage": None,
            "step0": a.model,
        }
        if positive:
            spec = {
                "model": underlying.to_dict(),
                "data": data,
                "params": a.params,
                "mode": a.mode,
                "schedule": positive,
                "lr": a.lr,
                "batch_size": a.batch_size,
                "grad_accum": a.grad_accum,
                "rank": a.rank,
                "seed": exp.seed if a.seed is None else a.seed,
                "train": a.train,
                "resolution": exp.model.resolution,
                "evals": {s["prompts"]: s["metrics"] for s in evals},
                "harm": ev.harm,
                "fidelity": ev.fidelity,
                "gen": gen,
            }
            key = _hash(spec)
            if key in attack_stage_by_key:  # the same curve (e.g. an SLD row attacked like its plain model)
                entry["stage"] = attack_stage_by_key[key]
                entry["shared_with"] = attack_stage_by_key[key]
            else:
                st = add(
                    Stage(f"attack/{a.id}", "attack", root / "attack" / a.id, sorted(set(deps)), spec, a.label or a.id)
                )
                attack_stage_by_key[key] = st.id
                entry["stage"] = st.id
            if target.options:
                spec2 = {"options": target.options, "sets": evals, "gen": gen, "schedule": positive}
                st2 = add(
                    Stage(
                        f"attack-eval/{a.id}",
                        "attack-eval",
                        root / "attack-eval" / a.id,
                        [entry["stage"]],
                        spec2,
                        a.label or a.id,
                    )
                )
                entry["sld_stage"] = st2.id
        curves[a.id] = entry

    for a in exp.align:
        model(a.id)
    for b in exp.baselines:
        model(b.id)
    for c in exp.compose:
        model(c.id)
    for i, a in enumerate(exp.attacks):
        plan_attack(a, i)

    # ---- evaluations of every model row: the experiment's sets + the task sets of the attacks on it
    eval_sets: dict[str, list[dict[str, Any]]] = {}
    model_ids = ["base", *(e.id for sec in ("align", "baselines", "compose") for e in getattr(exp, sec))]
    for mid in model_ids:
        r = model(mid)
        extra: list[dict[str, Any]] = []
        for c in curves.values():
            t = c["task_set"]
            if c["target"] == mid and t and t["prompts"] not in {s["prompts"] for s in [*sets, *extra]}:
                extra.append(t)
        eval_sets[mid] = [*sets, *extra]
        add(
            Stage(
                f"eval/{mid}",
                "eval",
                root / "eval" / mid,
                [r.stage] if r.stage else [],
                {"model": r.to_dict(), "sets": eval_sets[mid], "gen": gen},
                labels.get(mid, mid),
            )
        )

    # ---- adversarial prompts
    for i, pa in enumerate(exp.prompt_attacks):
        r = model(pa.model)
        p = f"prompt_attacks[{i}]"
        spec = {
            "model": r.to_dict(),
            "prompts": check_prompts(pa.prompts, f"{p}.prompts"),
            "limit": pa.limit,
            "k": pa.k,
            "iterations": pa.iterations,
            "lr": pa.lr,
            "weight_decay": pa.weight_decay,
            "gen_steps": pa.gen_steps or ev.gen_steps,
            "guidance": ev.guidance,
            "batch_size": pa.batch_size,
            "discrete": pa.discrete,
            "metric": check_metric(pa.metric, f"{p}.metric") if pa.metric else None,
            "seed": exp.seed if pa.seed is None else pa.seed,
            "eval_seed": ev.seed,
            "base_model": base_path,
        }
        add(
            Stage(
                f"prompt-attack/{pa.id}",
                "prompt-attack",
                root / "prompt-attack" / pa.id,
                [r.stage] if r.stage else [],
                spec,
                pa.label or pa.id,
            )
        )

    for s_path, (first, name, what, *more) in missing.items():
        uses = f"{first}" + (f" and {len(more) - 1} more" if len(more) > 1 else "")
        hint = f"; pass --input {name}=PATH" if name else ""
        label = f"input {name} = {s_path!r}" if name else f"{what} {s_path!r}"
        warnings.append(f"{label}: not found (needed at run time by {uses}{hint})")
    unused = sorted(set(exp.inputs) - used_inputs - set(inputs or {}))
    for name in unused:
        warnings.append(f"inputs.{name}: declared but not used")
    add(Stage("report", "report", root, [s for s in order], {"profile": exp.profile}, "report"))
    plan = Plan(
        experiment=exp,
        out=root,
        world=world_dir,
        stages=[stages[s] for s in order],
        recipes=recipes,
        curves=curves,
        eval_sets=eval_sets,
        warnings=warnings,
        inputs=dict(ins),
        labels=labels,
    )
    return plan


# ------------------------------------------------------------------------------------------ stage runners


@dataclass
class Context:
    """What every stage runner gets: the plan, logging and progress switches."""

    plan: Plan
    log: Callable[[str], None]
    progress: bool

    @property
    def exp(self) -> Experiment:
        return self.plan.experiment


def _dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _load(recipe: dict[str, Any], dtype: str) -> Any:
    from ..compose import load_model

    pipe, _ = load_model(recipe["model"], recipe["adapters"], dtype=_dtype(dtype))
    return pipe


def _evaluate_sets(ctx: Context, pipe: Any, folder: Path, sets: list[dict[str, Any]], options: dict[str, Any]) -> dict:
    """run_evaluate per set into folder/<set id>; a set whose results.json exists is not redone."""
    from ..commands.evaluate import run_evaluate

    gen = ctx.exp.eval
    out = {}
    for s in sets:
        res = folder / s["id"] / "results.json"
        if res.is_file():
            out[s["id"]] = json.loads(res.read_text())["metrics"]
            continue
        rep = run_evaluate(
            folder / s["id"],
            prompts=s["prompts"],
            metrics=s["metrics"],
            pipe=pipe,
            images_per_prompt=gen.images_per_prompt,
            steps=gen.gen_steps,
            batch_size=gen.batch_size,
            guidance=gen.guidance,
            limit=gen.limit,
            base_seed=gen.seed,
            dtype=ctx.exp.model.dtype,
            options=options or None,
            progress=ctx.progress,
        )
        out[s["id"]] = rep["metrics"] if rep else {}
    return out


def run_world(ctx: Context, stage: Stage) -> dict[str, Any]:
    from ..world import set_current_world
    from ..world.build import build_world, read_world
    from ..world.data import WorldConfig

    folder = Path(stage.spec["folder"])
    if not (stage.spec["explicit"] and (folder / "world.json").is_file()):
        cfg = WorldConfig(profile=stage.spec["profile"], seed=stage.spec["seed"])
        if not _unpack_shipped(cfg, folder, ctx.log):
            build_world(cfg, folder, log=ctx.log)
    meta = read_world(folder)
    set_current_world(folder)
    return {"world": str(folder), "config_hash": meta.get("config_hash"), "profile": meta["config"]["profile"]}


def _unpack_shipped(cfg: Any, folder: Path, log: Callable[[str], None]) -> bool:
    """Use the world shipped inside the package (same config hash) instead of building it: seconds, not minutes."""
    try:
        from ..world.build import world_is_valid
        from ..world.shipped import materialise, shipped_meta
    except ImportError:
        return False
    meta = shipped_meta()
    if meta is None or meta.get("config_hash") != cfg.config_hash() or world_is_valid(folder, cfg):
        return False
    if folder.exists() and any(folder.iterdir()):
        return False  # a stale or partial world: build_world replaces it
    materialise(folder, log=log)
    return True


def run_data(ctx: Context, stage: Stage) -> dict[str, Any]:
    """A copy of an ImageFolder keeping only the rows of one class (e.g. the clean half of LCFD's set)."""
    src, cls = Path(stage.spec["source"]), int(stage.spec["class"])
    meta = src / "metadata.jsonl"
    if not meta.is_file():
        raise ConceptlockError(f"{src}: no metadata.jsonl to filter by class")
    rows = [json.loads(ln) for ln in meta.read_text().splitlines() if ln.strip()]
    keep = [r for r in rows if int(r.get("class", 0)) == cls]
    if not keep:
        raise ConceptlockError(f"{meta}: no rows with class {cls}")
    tmp = stage.folder.with_name(f".{stage.folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for r in keep:
        shutil.copy2(src / r["file_name"], tmp / r["file_name"])
    (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    if stage.folder.exists():
        shutil.rmtree(stage.folder)
    os.replace(tmp, stage.folder)
    return {"rows": len(keep), "of": len(rows)}


def run_align_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    from ..align import run_align

    sp = stage.spec
    model = sp["model"]
    if model["adapters"]:
        raise ConceptlockError(f"{stage.id}: cannot align on a model that carries adapters ({model['adapters']})")
    training_free = sp["method"] == "uce"
    kw: dict[str, Any] = {"params": sp["params"]} if training_free and sp["params"] else {}
    if not training_free:
        kw = dict(
            params=sp["params"],
            steps=sp["steps"],
            lr=sp["lr"],
            released_code=sp["released_code"],
            seed=sp["seed"],
            data=sp["data"],
            batch_size=sp["batch_size"],
            grad_accum=sp["grad_accum"],
            rank=sp["rank"],
            resolution=sp["resolution"],
            train_kwargs=sp["train"] or None,
        )
    res = run_align(
        sp["method"],
        model["model"],
        [sp["concept"]],
        stage.folder,
        world=ctx.plan.world,
        objective_kwargs=sp["objective"] or None,
        overwrite=True,
        **kw,
    )
    if not res.finished:
        raise ConceptlockError(f"{stage.id}: alignment did not finish")
    return {"artifact": str(res.artifact), "seed": sp["seed"]}


def run_compose_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    from ..compose import run_compose

    sp = stage.spec
    res = run_compose(
        sp["model"]["model"], [*sp["model"]["adapters"], *sp["adapters"]], stage.folder / "model", overwrite=True
    )
    return {"model": str(res.out), "adapters": [r.spec() for r in res.adapters]}


def run_eval_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    sp = stage.spec
    pipe = _load(sp["model"], sp["gen"]["dtype"])
    res = _evaluate_sets(ctx, pipe, stage.folder, sp["sets"], sp["model"]["options"])
    return {"sets": sorted(res), "eval_seed": sp["gen"]["seed"]}


def run_attack_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    from ..attacks.finetune import run_attack_curve

    sp, gen = stage.spec, stage.spec["gen"]
    res = run_attack_curve(
        sp["model"]["model"],
        sp["data"],
        stage.folder,
        schedule=sp["schedule"],
        params=sp["params"],
        adapters=sp["model"]["adapters"],
        mode=sp["mode"],
        evals=sp["evals"],
        harm_metric=sp["harm"],
        fidelity_metric=sp["fidelity"],
        lr=sp["lr"],
        batch_size=sp["batch_size"],
        grad_accum=sp["grad_accum"],
        seed=sp["seed"],
        rank=sp["rank"],
        resolution=sp["resolution"],
        world=ctx.plan.world,
        images_per_prompt=gen["images_per_prompt"],
        limit=gen["limit"],
        gen_steps=gen["gen_steps"],
        guidance=gen["guidance"],
        gen_batch_size=gen["batch_size"],
        eval_seed=gen["seed"],
        train_kwargs=sp["train"] or None,
        progress=ctx.progress,
    )
    if not res.complete:
        raise ConceptlockError(f"{stage.id}: curve incomplete")
    # every point is saved and scored: the resume checkpoint (optimizer state: GBs on SD) is no longer needed
    shutil.rmtree(stage.folder / "train" / "checkpoints", ignore_errors=True)
    return {"points": [p["step"] for p in res.points], "seed": sp["seed"]}


def run_attack_eval_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    """Score each trained point of a curve with the target's generation options (an SLD row under attack)."""
    sp = stage.spec
    curve = json.loads((ctx.plan.stage(stage.deps[0]).folder / "curve.json").read_text())
    done = []
    for pt in curve["points"]:
        step = int(pt["step"])
        if step not in sp["schedule"]:
            continue
        inf = pt["inference"]
        pipe = _load({"model": inf["model"], "adapters": inf["adapters"]}, sp["gen"]["dtype"])
        _evaluate_sets(ctx, pipe, stage.folder / f"step_{step:08d}", sp["sets"], sp["options"])
        done.append(step)
        del pipe
    return {"points": done}


def run_prompt_attack_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    from ..attacks.prompt import AttackConfig, run_prompt_attack

    sp = stage.spec
    opts = sp["model"]["options"]
    cfg = AttackConfig(
        k=sp["k"],
        iterations=sp["iterations"],
        lr=sp["lr"],
        weight_decay=sp["weight_decay"],
        steps=sp["gen_steps"],
        guidance=sp["guidance"],
        batch_size=sp["batch_size"],
        seed=sp["seed"],
        discrete=sp["discrete"],
        sld=opts.get("sld"),
        sld_concept=opts.get("sld_concept"),
    )
    rep = run_prompt_attack(
        sp["model"]["plain"],
        sp["prompts"],
        stage.folder,
        adapters=sp["model"]["all_adapters"],
        config=cfg,
        base_model=sp["base_model"],
        metric=sp["metric"],
        limit=sp["limit"],
        base_seed=sp["eval_seed"],
        progress=ctx.progress,
    )
    return {"pre_asr": rep["pre_asr"]["value"], "asr": rep["asr"]["value"], "seed": sp["seed"]}


def run_report_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    from .report import collect, write_report

    summary = collect(ctx.plan)
    paths = write_report(ctx.plan, summary)
    return {k: str(v) for k, v in paths.items()}


STAGE_RUNNERS: dict[str, Callable[[Context, Stage], dict[str, Any]]] = {
    "world": run_world,
    "data": run_data,
    "align": run_align_stage,
    "compose": run_compose_stage,
    "eval": run_eval_stage,
    "attack": run_attack_stage,
    "attack-eval": run_attack_eval_stage,
    "prompt-attack": run_prompt_attack_stage,
    "report": run_report_stage,
}


# ------------------------------------------------------------------------------------------ running


def _write_record(stage: Stage, status: str, **extra: Any) -> None:
    rec = {
        "id": stage.id,
        "kind": stage.kind,
        "label": stage.label,
        "key": stage.key,
        "status": status,
        "deps": stage.deps,
        "spec": stage.spec,
        **extra,
    }
    _atomic_write(stage.folder / STAGE_FILE, json.dumps(rec, indent=1, sort_keys=True, default=str))


def _experiment_record(plan: Plan, status: str, started: float) -> None:
    exp = plan.experiment
    src = Path(exp.source) if exp.source else None
    rec = {
        "conceptlock_experiment": 1,
        "name": exp.name,
        "title": exp.title,
        "paper": exp.paper,
        "profile": exp.profile,
        "source": str(src) if src else None,
        "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest() if src and src.is_file() else None,
        "config": exp.model_dump(mode="json", exclude={"profiles"}),
        "seeds": {
            "experiment": exp.seed,
            "eval": exp.eval.seed,
            "world": exp.model.world_seed,
            "stages": {s.id: s.spec["seed"] for s in plan.stages if isinstance(s.spec.get("seed"), int)},
        },
        "world": str(plan.world) if plan.world else None,
        "inputs": plan.inputs,
        "versions": versions(),
        "plan": plan.to_dict(),
        "status": status,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": round(time.time() - started, 2),
    }
    _atomic_write(plan.out / "experiment.json", json.dumps(rec, indent=1, default=str))


def _run_stage(ctx: Context, stage: Stage) -> float:
    """Run one stage (clearing a stale folder first) and record it done; returns its wall seconds."""
    rec = stage.record()
    if rec is not None and rec.get("key") != stage.key and stage.kind != "report":
        ctx.log(f"{stage.id}: its configuration changed; running it again")
        shutil.rmtree(stage.folder, ignore_errors=True)
    t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_record(stage, "running", started=started)
    outputs = STAGE_RUNNERS[stage.kind](ctx, stage)
    wall = round(time.time() - t0, 2)
    _write_record(
        stage,
        "done",
        wall_s=wall,
        started=started,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        outputs=outputs,
        versions={k: v for k, v in versions().items() if k in ("conceptlock", "torch", "diffusers")},
    )
    return wall


def _say(log: Callable[[str], None] | None, progress: bool) -> Callable[[str], None]:
    from tqdm.auto import tqdm

    return log or (tqdm.write if progress else (lambda m: print(m, file=sys.stderr, flush=True)))


def run_plan(plan: Plan, log: Callable[[str], None] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every stage not yet done (in plan order); returns {stage id: "ran" | "skipped"}."""
    from tqdm.auto import tqdm

    import conceptlock.world as W

    previous_world = W._CURRENT  # restored below: the toy world is process-global state
    plan.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    _experiment_record(plan, "running", started)
    bar = tqdm(total=len(plan.stages), desc=plan.experiment.name, unit="stage", disable=not progress)
    say = _say(log, progress)
    ctx = Context(plan, say, progress)
    status: dict[str, str] = {}
    try:
        for stage in plan.stages:
            bar.set_postfix_str(stage.id)
            if stage.kind != "report" and stage.is_done():
                status[stage.id] = "skipped"
                if stage.kind == "world":  # later stages need the current world set
                    W.set_current_world(Path(stage.spec["folder"]))
                bar.update(1)
                continue
            wall = _run_stage(ctx, stage)
            status[stage.id] = "ran"
            say(f"{stage.id}: done in {wall:.1f} s")
            bar.update(1)
    except BaseException:
        _experiment_record(plan, "interrupted", started)
        raise
    finally:
        bar.close()
        W._CURRENT = previous_world
    _experiment_record(plan, "done", started)
    return status


# ------------------------------------------------------------------------------------------ parallel stages
#
# Why processes, and one thread each: on a small CPU the toy world's training stages barely use a second thread
# (an ESD step: 0.40 s on two threads, 0.46 s on one), so two one-thread workers do about twice the work of one
# two-thread process. Stages of every experiment share one queue; a stage starts once the stages it needs are done,
# those that head the costliest chain of dependent stages first. Each stage still writes its own folder and
# stage.json, so resuming, skipping and the report work exactly as in `run_plan`. A stage's numbers depend on its
# thread count (float summation order), so a stage run with --jobs 2 can differ in the last digits from the same stage
# run with --jobs 1; within one setting a run is reproducible, killed or not.


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _enter_world(plan: Plan) -> None:
    """Make the plan's toy world the process's current one (stage runners resolve toy: names through it)."""
    import conceptlock.world as W

    for s in plan.stages:
        if s.kind == "world":
            W.set_current_world(Path(s.spec["folder"]))


def _worker_run(plan: Plan, stage_id: str) -> float:
    """Run one stage of `plan` in a worker process (the toy world set as the parent's)."""
    _enter_world(plan)
    say = _say(None, False)
    return _run_stage(Context(plan, say, False), plan.stage(stage_id))


# Rough relative cost of a stage by kind (toy world, full profile: an alignment or a curve ~20-250 s, an evaluation
# ~10 s): only the order of the queue depends on it, never a result.
_KIND_COST = {"align": 6.0, "attack": 6.0, "prompt-attack": 3.0, "attack-eval": 2.0, "eval": 1.0, "compose": 0.1}


def _critical_path(plans: Sequence[Plan]) -> dict[tuple[int, str], float]:
    """Each stage's priority: its cost plus the costliest chain of stages waiting on it (critical path first)."""
    out: dict[tuple[int, str], float] = {}
    for i, plan in enumerate(plans):
        children: dict[str, list[str]] = {s.id: [] for s in plan.stages}
        for s in plan.stages:
            for d in s.deps:
                children.setdefault(d, []).append(s.id)
        for s in reversed(plan.stages):  # topological order reversed: a stage's dependents are scored already
            below = [out[(i, c)] for c in children[s.id] if c != "report"]
            out[(i, s.id)] = _KIND_COST.get(s.kind, 0.0) + max(below, default=0.0)
    return out


def run_plans(
    plans: Sequence[Plan],
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    threads_per_job: int = 1,
) -> list[dict[str, str]]:
    """Run several plans; with jobs > 1 their stages run in `jobs` worker processes, as dependencies allow.

    The world stages and the reports run in this process (the world first, the reports once their plan is done).
    Returns one {stage id: "ran" | "skipped"} per plan.
    """
    if jobs < 1:
        raise ConceptlockError(f"--jobs {jobs}: must be at least 1")
    if jobs == 1:
        return [run_plan(p, log=log, progress=progress) for p in plans]
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    import conceptlock.world as W

    previous_world = W._CURRENT
    say = _say(log, progress)
    started = time.time()
    status: list[dict[str, str]] = [{} for _ in plans]
    done: set[tuple[int, str]] = set()
    pending: list[tuple[int, Stage]] = []
    prio = _critical_path(plans)
    bar = tqdm(total=sum(len(p.stages) for p in plans), desc="reproduce", unit="stage", disable=not progress)
    try:
        for i, plan in enumerate(plans):
            plan.out.mkdir(parents=True, exist_ok=True)
            _experiment_record(plan, "running", started)
            ctx = Context(plan, say, progress)
            for stage in plan.stages:
                if stage.kind == "report":
                    continue
                if stage.is_done():
                    status[i][stage.id] = "skipped"
                    if stage.kind == "world":
                        W.set_current_world(Path(stage.spec["folder"]))
                    done.add((i, stage.id))
                    bar.update(1)
                elif stage.kind == "world":  # cheap (cached or unpacked) and needed by everything: run it here
                    wall = _run_stage(ctx, stage)
                    status[i][stage.id] = "ran"
                    done.add((i, stage.id))
                    say(f"{plan.experiment.name}/{stage.id}: done in {wall:.1f} s")
                    bar.update(1)
                else:
                    pending.append((i, stage))
        pending.sort(key=lambda t: -prio[(t[0], t[1].id)])  # stable: plan order among equals
        ctxt = mp.get_context("spawn")  # no fork: the parent holds torch's thread pools
        with ProcessPoolExecutor(jobs, mp_context=ctxt, initializer=_worker_init, initargs=(threads_per_job,)) as ex:
            running: dict[Any, tuple[int, Stage]] = {}
            try:
                while pending or running:
                    for item in list(pending):
                        if len(running) >= jobs:
                            break
                        i, stage = item
                        if all((i, d) in done for d in stage.deps):
                            pending.remove(item)
                            running[ex.submit(_worker_run, plans[i], stage.id)] = item
                    if not running:
                        left = ", ".join(s.id for _, s in pending)
                        raise ConceptlockError(f"stages wait on stages that never ran: {left}")
                    bar.set_postfix_str(", ".join(s.id for _, s in running.values()))
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        i, stage = running.pop(fut)
                        wall = fut.result()
                        status[i][stage.id] = "ran"
                        done.add((i, stage.id))
                        say(f"{plans[i].experiment.name}/{stage.id}: done in {wall:.1f} s")
                        bar.update(1)
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)  # stages already running finish and are kept
                raise
        for i, plan in enumerate(plans):
            for stage in plan.stages:
                if stage.kind == "report":
                    _enter_world(plan)
                    _run_stage(Context(plan, say, progress), stage)
                    status[i][stage.id] = "ran"
                    bar.update(1)
            _experiment_record(plan, "done", started)
    except BaseException:
        for plan in plans:
            rec = plan.out / "experiment.json"
            if rec.is_file() and json.loads(rec.read_text()).get("status") == "running":
                _experiment_record(plan, "interrupted", started)
        raise
    finally:
        bar.close()
        W._CURRENT = previous_world
    return status


def run_experiment(
    experiments: Sequence[str | Path] = ("paper-a", "paper-b"),
    profile: str = "quick",
    out: str | Path = "runs/reproduce",
    world: str | Path | None = None,
    inputs: dict[str, str] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> list[Plan]:
    """Plan (and unless `dry_run`, run) each experiment into OUT/<name>/, then write OUT/report.html|md over all.

    Every experiment is validated and planned before the first one runs, so a typo in the second file fails in a
    second rather than after the first file's hours.
    """
    plans = []
    for name in experiments:
        exp = load_experiment(name, profile, inputs=inputs)
        plans.append(plan_experiment(exp, out, world=world, inputs=inputs, dry_run=dry_run))
    names = [p.experiment.name for p in plans]
    if len(set(names)) != len(names):
        raise ConceptlockError(f"experiments: two have the same name ({', '.join(names)}); they would share a folder")
    if dry_run:
        return plans
    run_plans(plans, jobs=jobs, log=log, progress=progress)
    from .report import write_index

    write_index(Path(out), plans)
    return plans
