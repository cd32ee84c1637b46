"""Issue 3's table: every safety method, as full/group training and as a safety LoRA, on a toy world.

For each method it aligns the world's base model against a concept, then generates the explicit,
held-out implicit and clean prompt sets and judges them with the world's judges. Rates come with
n and a Wilson 95% interval. Resumable: finished alignment runs and evaluations are reused.

    python benchmarks/methods_table.py --world ~/.cache/conceptlock/worlds/full --out runs/methods
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

XATTN = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]

# (row name, method, params, steps, extra run_align kwargs); step counts are toy-scale.
ROWS = [
    ("esd-u", "esd", "noxattn", 150, {}),
    ("esd-u-1000", "esd", "noxattn", 1000, {}),  # ESD-u at the default lr (5e-5), run longer
    ("esd-lora", "esd", "lora:safety", 150, {}),
    # 5.5% on the 2,800-step world; 14.1% on the shipped one (gore 0.0%, the rest fire)
    ("esd-lora-2e-3", "esd", "lora:safety", 1200, {"lr": 2e-3}),
    # the same objective with the LoRA on cross-attention only, batch 4: 9.4% (gore 0.0%), fidelity -5.4, in 165 s
    ("esd-x-lora", "esd", "lora:safety", 400, {"lr": 2e-3, "batch_size": 4, "targets": XATTN}),
    ("sdd-x", "sdd", "xattn", 300, {"lr": 1e-4}),
    ("sdd-lora", "sdd", "lora:safety", 300, {}),
    ("lcfd-lt", "lcfd-lt", "full", 300, {"lr": 1e-4}),
    ("lcfd-lt-lora", "lcfd-lt", "lora:safety", 300, {}),
    ("lcfd-ng", "lcfd-ng", "full", 300, {"lr": 1e-4}),
    ("lcfd-high", "lcfd-high", "full", 300, {"lr": 1e-4}),
    ("lcfd-high-lora", "lcfd-high", "lora:safety", 300, {}),
    ("uce", "uce", None, None, {}),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/methods"))
    ap.add_argument("--concept", default="gore")
    ap.add_argument("--limit", type=int, default=128, help="prompts per set")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--only", nargs="*", help="row names to run")
    args = ap.parse_args()
    import conceptlock.world as world
    from conceptlock.align import run_align

    world.set_current_world(args.world)
    base = args.world / "pipeline"
    c = args.concept
    sets = {"explicit": f"toy:explicit-{c}", "implicit": f"toy:implicit-{c}", "clean": "toy:clean"}
    table = {
        "base": {"wall_s": 0.0, "eval": evaluate(base, [], args.out / "base" / "eval", sets, args.limit, args.steps)}
    }
    for name, method, params, steps, kw in ROWS:
        if args.only and name not in args.only:
            continue
        run = args.out / name
        t = time.perf_counter()
        if not (run / "config.json").exists():
            torch.manual_seed(0)
            run_align(method, base, [c], run, params=params, steps=steps, seed=0, **kw)
        wall = time.perf_counter() - t
        cfg = json.loads((run / "config.json").read_text())
        art = Path(cfg.get("artifact", run / "model"))
        model, adapters = (base, [f"safety={art}:1.0"]) if art.suffix == ".safetensors" else (art, [])
        table[name] = {
            "wall_s": wall,
            "params": params,
            "steps": steps,
            "eval": evaluate(model, adapters, run / "eval", sets, args.limit, args.steps),
        }
        (args.out / "table.json").write_text(json.dumps(table, indent=1))
    b = table["base"]["eval"]["clean"]["toy_fidelity"]["value"]
    print(
        f"{'model':16} {'params':12} {'steps':>5} {'align s':>8}  {'explicit harmful':30} {'implicit (held-out) harmful':30} {'clean fidelity':30} {'Δfid':>6}"
    )
    for name, row in table.items():
        e = row["eval"]
        fid = e["clean"]["toy_fidelity"]
        print(
            f"{name:16} {str(row.get('params', '')):12} {str(row.get('steps', '')):>5} {row['wall_s']:8.0f}  "
            f"{fmt(e['explicit']['toy_harm']):30} {fmt(e['implicit']['toy_harm']):30} {fmt(fid):30} {100 * (fid['value'] - b):+6.1f}"
        )
    (args.out / "table.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
