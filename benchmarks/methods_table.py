"""Issue 3's table: every safety method, as full/group training and as a safety LoRA, on a toy world.

For each method it aligns the world's base model against a concept, then generates the explicit,
held-out implicit and clean prompt sets and judges them with the world's judges. Rates come with
n and a Wilson 95% interval. Resumable: finished alignment runs and evaluations are reused.

A row may erase several concepts (`concepts` in its kwargs); it is then judged on each one's explicit
prompts, pooled. "Harmful" is any of the world's concepts, so an erased concept that comes back as
another one counts. `--jobs N` runs rows in N processes (one thread each on a CPU).

    python benchmarks/methods_table.py --world ~/.cache/conceptlock/worlds/full --out runs/methods
    python benchmarks/methods_table.py --world DIR --only esd-x-lora-anchor uce-keep --jobs 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

XATTN = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
KV = ["attn2.to_k", "attn2.to_v"]
QO = ["attn2.to_q", "attn2.to_out.0"]  # cross-attention's image side only: the text keys and values stay
GF = {"concepts": ["gore", "fire"]}
D20 = {"eta": 1.0, "ddim_steps": 20}  # 20 DDIM steps for ESD's partial sampling (the toy world's sampler budget)
A20 = {**D20, "anchor": True}
S20 = {"ddim_steps": 20, "anchor": True}

# (row name, method, params, steps, extra run_align kwargs); step counts are toy-scale.
ROWS = [
    ("esd-u", "esd", "noxattn", 150, {}),
    ("esd-u-1000", "esd", "noxattn", 1000, {}),  # ESD-u at the default lr (5e-5), run longer
    ("esd-lora", "esd", "lora:safety", 150, {}),
    # 5.5% on the 2,800-step world; 14.1% on the shipped one (gore 0.0%, the rest fire)
    ("esd-lora-2e-3", "esd", "lora:safety", 1200, {"lr": 2e-3}),
    # the same objective with the LoRA on cross-attention only, batch 4: 9.4% (gore 0.0%), fidelity -5.4, in 165 s
    ("esd-x-lora", "esd", "lora:safety", 400, {"lr": 2e-3, "batch_size": 4, "targets": XATTN, "objective_kwargs": D20}),
    ("sdd-x", "sdd", "xattn", 300, {"lr": 1e-4}),
    ("sdd-lora", "sdd", "lora:safety", 300, {}),
    ("lcfd-lt", "lcfd-lt", "full", 300, {"lr": 1e-4}),
    ("lcfd-lt-lora", "lcfd-lt", "lora:safety", 300, {}),
    ("lcfd-ng", "lcfd-ng", "full", 300, {"lr": 1e-4}),
    ("lcfd-high", "lcfd-high", "full", 300, {"lr": 1e-4}),
    ("lcfd-high-lora", "lcfd-high", "lora:safety", 300, {}),
    ("uce", "uce", None, None, {}),
    # Erasing the world's whole harmful category (gore and fire) with plain ESD: a gore-only eraser turns some gore
    # prompts into fire. Measured (H200, n=256 explicit): 30.5% harmful, fidelity 68.0%; all attention 39.1%, 70.3%.
    (
        "esd-x-lora-gf",
        "esd",
        "lora:safety",
        400,
        {**GF, "lr": 2e-3, "batch_size": 4, "targets": XATTN, "objective_kwargs": D20},
    ),
    ("esd-lora-gf", "esd", "lora:safety", 400, {**GF, "lr": 2e-3, "batch_size": 4, "objective_kwargs": D20}),
    ("uce-gf", "uce", None, None, GF),  # 0.4%, fidelity 89.8%
    # UCE preserving 64 of the world's clean captions (--uce-preserve-contexts 64) at preserve scale 1: 0.0%, 96.9%
    ("uce-keep", "uce", None, None, {"objective_kwargs": {"preserve_contexts": 64, "preserve_scale": 1.0}}),
    ("uce-keep-gf", "uce", None, None, {**GF, "objective_kwargs": {"preserve_contexts": 64, "preserve_scale": 1.0}}),
    # the same edit written as a safety LoRA (`--params lora:safety`, rank chosen to hold it within 1e-3)
    (
        "uce-keep-lora",
        "uce",
        "lora:safety",
        None,
        {"objective_kwargs": {"preserve_contexts": 64, "preserve_scale": 1.0}},
    ),  # 0.0 / 96.9
    # Anchored ESD/SDD (the concept in context, towards the prompt without it): no neighbouring concept to land on.
    # Measured on this CPU (n=128): explicit harmful / clean fidelity in each comment.
    (
        "esd-x-lora-anchor",
        "esd",
        "lora:safety",
        400,
        {"lr": 2e-3, "batch_size": 4, "targets": XATTN, "objective_kwargs": A20},
    ),  # 0.0 / 99.2
    (
        "esd-kv-lora-anchor",
        "esd",
        "lora:safety",
        400,
        {"lr": 2e-3, "batch_size": 4, "targets": KV, "objective_kwargs": A20},
    ),  # 0.0 / 97.7
    (
        "esd-qo-lora-anchor",
        "esd",
        "lora:safety",
        400,
        {"lr": 2e-3, "batch_size": 4, "targets": QO, "objective_kwargs": A20},
    ),  # 0.8 / 98.4
    ("esd-x-anchor", "esd", "xattn", 400, {"lr": 2e-4, "batch_size": 4, "objective_kwargs": A20}),  # 0.8 / 97.7
    ("esd-u-anchor", "esd", "noxattn", 400, {"lr": 2e-4, "batch_size": 4, "objective_kwargs": A20}),  # 11.7 / 89.1
    ("sdd-x-anchor-5e-5", "sdd", "xattn", 400, {"lr": 5e-5, "batch_size": 4, "objective_kwargs": S20}),  # 0.8 / 99.2
    ("sdd-x-anchor", "sdd", "xattn", 400, {"lr": 2e-4, "batch_size": 4, "objective_kwargs": S20}),  # 0.0 / 79.7
    (
        "sdd-x-lora-anchor-5e-4",
        "sdd",
        "lora:safety",
        400,
        {"lr": 5e-4, "batch_size": 4, "targets": XATTN, "objective_kwargs": S20},
    ),  # 0.0 / 94.5
    (
        "sdd-x-lora-anchor",
        "sdd",
        "lora:safety",
        400,
        {"lr": 2e-3, "batch_size": 4, "targets": XATTN, "objective_kwargs": S20},
    ),  # diverged: 69.5 / 3.9
    # LCFD-LT with a heavier contrastive weight (the paper's 5e-5 leaves the toy model's harm where it was)
    ("lcfd-lt-5e-3", "lcfd-lt", "full", 300, {"lr": 1e-4, "objective_kwargs": {"lambda_tot": 5e-3}}),  # 13.3 / 97.7
    ("lcfd-lt-2e-2", "lcfd-lt", "full", 300, {"lr": 1e-4, "objective_kwargs": {"lambda_tot": 2e-2}}),  # 10.9 / 89.8
    ("lcfd-lt-5e-2", "lcfd-lt", "full", 300, {"lr": 1e-4, "objective_kwargs": {"lambda_tot": 5e-2}}),  # 4.7 / 69.5
    (
        "lcfd-lt-lora-5e-2",
        "lcfd-lt",
        "lora:safety",
        300,
        {"lr": 5e-4, "objective_kwargs": {"lambda_tot": 5e-2}},
    ),  # 95.3
    (
        "lcfd-lt-lora-5e-1",
        "lcfd-lt",
        "lora:safety",
        300,
        {"lr": 5e-4, "objective_kwargs": {"lambda_tot": 5e-1}},
    ),  # 86.7
    # LCFD trade-off sweep (ninth session): longer runs, the paper's lr for NG and high-safety, changing noise
    (
        "lcfd-lt-1e-2",
        "lcfd-lt",
        "full",
        300,
        {"lr": 1e-4, "objective_kwargs": {"lambda_tot": 1e-2}},
    ),  # 14.1 / 96.1 (H100)
    (
        "lcfd-lt-5e-3-1000",
        "lcfd-lt",
        "full",
        1000,
        {"lr": 1e-4, "objective_kwargs": {"lambda_tot": 5e-3}},
    ),  # 1.6 / 94.5; n=256: 0.8 / 92.6 (base 96.5)
    (
        "lcfd-lt-2e-2-slow",
        "lcfd-lt",
        "full",
        1000,
        {"lr": 3e-5, "objective_kwargs": {"lambda_tot": 2e-2}},
    ),  # 14.8 / 87.5
    ("lcfd-ng-1e-5", "lcfd-ng", "full", 300, {"lr": 1e-5}),  # 72.7 / 48.4 (H100)
    (
        "lcfd-ng-changing",
        "lcfd-ng",
        "full",
        300,
        {"lr": 1e-5, "objective_kwargs": {"noise": "changing"}},
    ),  # 99.2 / 98.4 (H100)
    ("lcfd-high-1e-5-2000", "lcfd-high", "full", 2000, {"lr": 1e-5}),  # 11.7 / 73.4
    ("lcfd-high-3e-5", "lcfd-high", "full", 600, {"lr": 3e-5}),  # 35.9 / 77.3
    (
        "lcfd-lt-5e-2-slow",
        "lcfd-lt",
        "full",
        1000,
        {"lr": 1e-5, "objective_kwargs": {"lambda_tot": 5e-2}},
    ),  # 60.9 / 58.6
    ("lcfd-ng-3e-6-1000", "lcfd-ng", "full", 1000, {"lr": 3e-6}),  # 71.9 / 43.8
    (
        "lcfd-lt-lora-5e-3-1000",
        "lcfd-lt",
        "lora:safety",
        1000,
        {"lr": 2e-3, "objective_kwargs": {"lambda_tot": 5e-3}},
    ),  # 0.0 / 90.6
    (
        "lcfd-lt-lora-5e-2-1000",
        "lcfd-lt",
        "lora:safety",
        1000,
        {"lr": 2e-3, "objective_kwargs": {"lambda_tot": 5e-2}},
    ),  # 0.0 / 10.9
    (
        "lcfd-lt-lora-5e-1-1000",
        "lcfd-lt",
        "lora:safety",
        1000,
        {"lr": 1e-3, "objective_kwargs": {"lambda_tot": 5e-1}},
    ),  # 0.0 / 0.0
    (
        "lcfd-lt-lora-5e-3-lr1e-3",
        "lcfd-lt",
        "lora:safety",
        1000,
        {"lr": 1e-3, "objective_kwargs": {"lambda_tot": 5e-3}},
    ),  # 0.8 / 93.0
    (
        "lcfd-lt-lora-2e-3-1000",
        "lcfd-lt",
        "lora:safety",
        1000,
        {"lr": 2e-3, "objective_kwargs": {"lambda_tot": 2e-3}},
    ),  # 0.0 / 96.1
    ("lcfd-high-a0.1", "lcfd-high", "full", 1000, {"lr": 1e-4, "objective_kwargs": {"ascent": 0.1}}),  # 0.0 / 72.7
    (
        "lcfd-high-a0.1-slow",
        "lcfd-high",
        "full",
        1000,
        {"lr": 3e-5, "objective_kwargs": {"ascent": 0.1}},
    ),  # 96.9 / 99.2
    (
        "lcfd-high-a0.1-5e-5",
        "lcfd-high",
        "full",
        1000,
        {"lr": 5e-5, "objective_kwargs": {"ascent": 0.1}},
    ),  # 95.3 / 99.2
    (
        "lcfd-high-a0.1-7e-5",
        "lcfd-high",
        "full",
        1000,
        {"lr": 7e-5, "objective_kwargs": {"ascent": 0.1}},
    ),  # 19.5 / 78.9
    ("lcfd-high-a0.1-500", "lcfd-high", "full", 500, {"lr": 1e-4, "objective_kwargs": {"ascent": 0.1}}),  # 28.9 / 78.9
    ("lcfd-ng-lora-5e-4", "lcfd-ng", "lora:safety", 300, {"lr": 5e-4}),  # 96.9 / 35.2
    ("lcfd-high-lora-1000", "lcfd-high", "lora:safety", 1000, {"lr": 1e-3}),  # 9.4 / 1.6
    ("lcfd-ng-lora-1e-4", "lcfd-ng", "lora:safety", 300, {"lr": 1e-4}),  # 99.2 / 98.4
    # bounded ascent (ceiling: a harmful sample's MSE counts up to c only)
    ("lcfd-high-ceil1", "lcfd-high", "full", 1000, {"lr": 1e-4, "objective_kwargs": {"ceiling": 1.0}}),  # 54.7 / 89.1
    (
        "lcfd-high-ceil1-lora",
        "lcfd-high",
        "lora:safety",
        1000,
        {"lr": 1e-3, "objective_kwargs": {"ceiling": 1.0}},
    ),  # 0.0 / 87.5
    (
        "lcfd-high-ceil1-lora-5e-4",
        "lcfd-high",
        "lora:safety",
        1000,
        {"lr": 5e-4, "objective_kwargs": {"ceiling": 1.0}},
    ),  # 0.8 / 75.8
    (
        "lcfd-high-ceil.5-lora",
        "lcfd-high",
        "lora:safety",
        1000,
        {"lr": 1e-3, "objective_kwargs": {"ceiling": 0.5}},
    ),  # 0.0 / 89.8
    (
        "lcfd-high-ceil.25-lora",
        "lcfd-high",
        "lora:safety",
        1000,
        {"lr": 1e-3, "objective_kwargs": {"ceiling": 0.25}},
    ),  # 5.5 / 89.1
    (
        "lcfd-high-ceil.1-lora",
        "lcfd-high",
        "lora:safety",
        1000,
        {"lr": 1e-3, "objective_kwargs": {"ceiling": 0.1}},
    ),  # 8.6 / 93.0
    (
        "lcfd-high-ceil.5-xattn",
        "lcfd-high",
        "xattn",
        1000,
        {"lr": 5e-4, "objective_kwargs": {"ceiling": 0.5}},
    ),  # 10.9 / 91.4
    (
        "lcfd-high-ceil.5-2e-4",
        "lcfd-high",
        "full",
        1000,
        {"lr": 2e-4, "objective_kwargs": {"ceiling": 0.5}},
    ),  # 73.4 / 93.8
    # NG with changing noise (the class centres, near the data, instead of +-1) at LT's working budgets
    (
        "lcfd-ng-changing-1000",
        "lcfd-ng",
        "full",
        1000,
        {"lr": 1e-4, "objective_kwargs": {"noise": "changing"}},
    ),  # 85.9 / 6.2
    (
        "lcfd-ng-changing-lora",
        "lcfd-ng",
        "lora:safety",
        1000,
        {"lr": 2e-3, "objective_kwargs": {"noise": "changing", "lambda_tot": 2e-3}},
    ),  # 60.2 / 2.3
    # LCFD in its "safety reinforcement" setting (paper B), on the anchored ESD-x model ("on": a row run before it)
    ("lcfd-lt-on-esd", "lcfd-lt", "full", 300, {"lr": 1e-4, "on": "esd-x-anchor"}),  # 0.0 / 97.7
    ("lcfd-high-on-esd", "lcfd-high", "full", 300, {"lr": 1e-4, "on": "esd-x-anchor"}),  # 7.8 / 87.5
    ("lcfd-high-on-esd-1e-5", "lcfd-high", "full", 300, {"lr": 1e-5, "on": "esd-x-anchor"}),  # 0.0 / 97.7
    ("lcfd-ng-on-esd-3e-6", "lcfd-ng", "full", 300, {"lr": 3e-6, "on": "esd-x-anchor"}),  # 0.0 / 93.8
]


def evaluate(model: Path, adapters: list[str], out: Path, sets: dict[str, str], limit: int, steps: int) -> dict:
    from conceptlock.commands.evaluate import run_evaluate

    res = {}
    for key, spec in sets.items():
        metrics = ["toy_harm"] + (["toy_fidelity"] if key == "clean" else [])
        r = run_evaluate(
            out / key,
            prompts=spec,
            metrics=metrics,
            model=model,
            adapters=adapters,
            steps=steps,
            guidance=4.0,
            batch_size=64,
            limit=limit,
            progress=False,
            contact_sheet=32,
        )
        res[key] = r["metrics"]
    return res


def fmt(m: dict) -> str:
    return f"{100 * m['value']:5.1f}% [{100 * m['ci_low']:4.1f}, {100 * m['ci_high']:4.1f}] n={m['n']}"


def eval_sets(concepts: list[str]) -> dict[str, str]:
    """Explicit prompts of every erased concept, the first concept's held-out implicit prompts, clean prompts."""
    sets = {f"explicit-{c}": f"toy:explicit-{c}" for c in concepts}
    return sets | {"implicit": f"toy:implicit-{concepts[0]}", "clean": "toy:clean"}


def explicit_rate(ev: dict) -> dict:
    """Harm (any concept) over the explicit prompts of all erased concepts, pooled: k/n and a Wilson interval."""
    from conceptlock.stats import wilson_interval

    ms = [m["toy_harm"] for k, m in ev.items() if k.startswith("explicit-")]
    k, n = sum(m["details"]["k"] for m in ms), sum(m["n"] for m in ms)
    lo, hi = wilson_interval(k, n)
    return {"value": k / n, "ci_low": lo, "ci_high": hi, "n": n}


def run_row(job: tuple) -> tuple[str, dict]:
    """One table row in its own process: align (unless done) and evaluate. Returns (name, row)."""
    name, method, params, steps, kw, args = job
    import conceptlock.world as world
    from conceptlock.align import run_align

    if not torch.cuda.is_available():
        torch.set_num_threads(args["threads"])
    w = Path(args["world"])
    world.set_current_world(w)
    base, out = w / "pipeline", Path(args["out"])
    kw = dict(kw)
    concepts = kw.pop("concepts", args["concepts"])
    if "on" in kw:  # LCFD's reinforcement setting: start from another row's aligned pipeline
        base, kw["world"] = out / kw.pop("on") / "model", w
    row: dict = {"concepts": concepts, "params": params, "steps": steps, "kw": {k: str(v) for k, v in kw.items()}}
    if name == "base":  # judged on every concept's explicit prompts
        from conceptlock.world.build import read_world

        concepts = row["concepts"] = list(read_world(w)["config"]["concepts"])
        model, adapters, row["wall_s"] = base, [], 0.0
    else:
        run = out / name
        t = time.perf_counter()
        if not (run / "config.json").exists():
            torch.manual_seed(0)
            run_align(method, base, concepts, run, params=params, steps=steps, seed=0, **kw)
        row["wall_s"] = time.perf_counter() - t
        art = Path(json.loads((run / "config.json").read_text()).get("artifact", run / "model"))
        model, adapters = (base, [f"safety={art}:1.0"]) if art.suffix == ".safetensors" else (art, [])
    row["eval"] = evaluate(model, adapters, out / name / "eval", eval_sets(concepts), args["limit"], args["steps"])
    return name, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/methods"))
    ap.add_argument("--concept", nargs="+", default=["gore"], help="concept(s) a row erases unless it names its own")
    ap.add_argument("--limit", type=int, default=128, help="prompts per set")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--only", nargs="*", help="row names to run")
    ap.add_argument(
        "--jobs", type=int, default=1, help="rows run in this many processes at once (1 thread each on CPU)"
    )
    args = ap.parse_args()
    shared = {
        "world": str(args.world),
        "out": str(args.out),
        "concepts": args.concept,
        "limit": args.limit,
        "steps": args.steps,
        "threads": 1 if args.jobs > 1 else torch.get_num_threads(),
    }
    by_name = {r[0]: r for r in ROWS}
    unknown = [n for n in args.only or [] if n not in by_name]
    if unknown:
        ap.error(f"--only: unknown row(s) {', '.join(unknown)}")
    rows = [("base", None, None, None, {})] + [by_name[n] for n in args.only or by_name]  # --only's order
    for k, r in enumerate(rows):  # a row built on another row's model needs that model first
        dep = r[4].get("on")
        earlier = args.jobs == 1 and dep in {q[0] for q in rows[:k]}  # sequential runs keep the order
        if dep and not earlier and not (args.out / dep / "model").is_dir():
            ap.error(f"row {r[0]} starts from row {dep}'s model: run --only {dep} first")
    jobs = [(*r, shared) for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    tj = args.out / "table.json"
    table = json.loads(tj.read_text()) if tj.exists() else {}
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for name, row in pool.imap_unordered(run_row, jobs):
                table[name] = row
                tj.write_text(json.dumps(table, indent=1))
                print(f"done {name} ({row['wall_s']:.0f} s align)", flush=True)
    else:
        for job in jobs:
            name, row = run_row(job)
            table[name] = row
            tj.write_text(json.dumps(table, indent=1))
    b = table["base"]["eval"]["clean"]["toy_fidelity"]["value"]
    print(
        f"{'model':22} {'concepts':10} {'params':12} {'steps':>5} {'align s':>8}  {'explicit harmful':30} "
        f"{'implicit (held-out) harmful':30} {'clean fidelity':30} {'Δfid':>6}  per set"
    )
    for name, row in table.items():
        e = row["eval"]
        fid = e["clean"]["toy_fidelity"]
        per = " ".join(f"{k}={100 * m['toy_harm']['value']:.1f}" for k, m in e.items() if k.startswith("explicit-"))
        print(
            f"{name:22} {'+'.join(row.get('concepts', [])):10} {str(row.get('params', '')):12} "
            f"{str(row.get('steps', '')):>5} {row['wall_s']:8.0f}  {fmt(explicit_rate(e)):30} "
            f"{fmt(e['implicit']['toy_harm']):30} {fmt(fid):30} {100 * (fid['value'] - b):+6.1f}  {per}"
        )


if __name__ == "__main__":
    main()
