"""Issue 7's tables on a toy world: UnlearnDiffAtk pre-ASR/ASR per model, and the inference-time
baselines (UCE, SLD presets), each rate with n and a Wilson 95% interval. Prints two tables.

    python benchmarks/asr_table.py --world ~/.cache/conceptlock/worlds/full --methods runs/methods --out runs/asr

`--methods` is the output folder of benchmarks/methods_table.py (its aligned models and LoRAs are
attacked as they are); the base model is always included. Finished attacks are reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def fmt(m: dict) -> str:
    """A rate dict ({value, n, ci_low, ci_high}) as 'rate [lo, hi] n=N'."""
    return f"{100 * m['value']:5.1f}% [{100 * m['ci_low']:4.1f}, {100 * m['ci_high']:4.1f}] n={m['n']}"


def models(world: Path, methods: Path | None) -> list[tuple[str, Path, list[str]]]:
    out = [("base", world / "pipeline", [])]
    if methods is None:
        return out
    for run in sorted(p for p in methods.iterdir() if (p / "config.json").is_file()):
        cfg = json.loads((run / "config.json").read_text())
        art = Path(cfg.get("artifact", run / "model"))
        if art.suffix == ".safetensors":
            out.append((run.name, world / "pipeline", [f"safety={art}:1.0"]))
        elif art.is_dir():
            out.append((run.name, art, []))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--methods", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/asr"))
    ap.add_argument("--concept", default="gore")
    ap.add_argument("--limit", type=int, default=64, help="prompts attacked per model")
    ap.add_argument("--eval-limit", type=int, default=128, help="prompts per SLD evaluation")
    args = ap.parse_args()
    import conceptlock.world as world
    from conceptlock.attacks.prompt import run_prompt_attack
    from conceptlock.commands.evaluate import run_evaluate

    world.set_current_world(args.world)
    prompts = f"toy:explicit-{args.concept}"
    rows = []
    for name, model, adapters in models(args.world, args.methods):
        out = args.out / "attack" / name
        res = json.loads((out / "asr.json").read_text()) if (out / "asr.json").is_file() else None
        if res is None:
            res = run_prompt_attack(model, prompts, out, adapters=adapters, limit=args.limit, progress=False)
        rows.append((name, res))
    print(f"UnlearnDiffAtk on {prompts} (k=5, 40 iterations, targets: the base model's images)")
    print(f"{'model':16} {'pre-ASR':28} {'ASR':28} {'s/prompt':>8}")
    for name, res in rows:
        print(f"{name:16} {fmt(res['pre_asr']):28} {fmt(res['asr']):28} {res['seconds_per_prompt']:8.2f}")
    print()
    print(f"Inference-time baseline: SLD on {prompts} (toy_harm), base model")
    print(f"{'preset':10} {'explicit harmful':30} {'clean fidelity':30}")
    for preset in [None, "WEAK", "MEDIUM", "STRONG", "MAX"]:
        line = []
        for key, metric in ((prompts, "toy_harm"), ("toy:clean", "toy_fidelity")):
            r = run_evaluate(
                args.out / "sld" / (preset or "none") / key.split(":")[1],
                prompts=key,
                metrics=[metric],
                model=args.world / "pipeline",
                steps=20,
                guidance=4.0,
                batch_size=64,
                limit=args.eval_limit,
                progress=False,
                contact_sheet=0,
                options={"sld": preset} if preset else None,
            )
            line.append(fmt(r["metrics"][metric]))
        print(f"{preset or 'off':10} {line[0]:30} {line[1]:30}")


if __name__ == "__main__":
    main()
