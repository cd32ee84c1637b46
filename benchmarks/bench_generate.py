"""Generation throughput: ``conceptlock.generate`` vs a bare ``pipe(prompts, ...)`` loop, same batches.

    python benchmarks/bench_generate.py [--model DIR] [--prompts 16] [--batch-size 4] [--steps 4]

Both sides make the same images: the same prompts in the same batches, one CPU generator per image
seeded the same way, the same steps and guidance. The bare loop keeps the PIL images in memory; ours
also writes each PNG atomically, appends the manifest, and checks resume state. Goal: ours >= 0.95x
the bare throughput. Without ``--model`` a random tiny pipeline is used (32 px; the worst case for
our overhead, since the pipeline call itself is cheapest there). Timings interleave the two methods
and report the best of ``--repeats`` (the machine may be shared).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="diffusers pipeline folder (default: tiny random pipeline)")
    ap.add_argument("--resolution", type=int, default=32, help="tiny pipeline resolution (no --model)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from conceptlock.generate import generate, image_seed
    from conceptlock.pipelines import load_pipeline, tiny_pipeline
    from conceptlock.prompts import PromptRow

    pipe = load_pipeline(args.model) if args.model else tiny_pipeline(0, resolution=args.resolution)
    pipe.set_progress_bar_config(disable=True)
    rows = [PromptRow(f"a photo of a red object number {i}", seed=1000 + i, index=i) for i in range(args.prompts)]
    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]

    def bare() -> None:
        for b in batches:
            gens = [torch.Generator(device="cpu").manual_seed(image_seed(r.seed, 0)) for r in b]
            pipe(prompt=[r.prompt for r in b], num_inference_steps=args.steps, guidance_scale=7.5, generator=gens)

    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))

    def ours() -> None:
        out = tmp / "run"
        shutil.rmtree(out, ignore_errors=True)
        generate(pipe, rows, out, steps=args.steps, guidance=7.5, batch_size=args.batch_size, progress=False)

    bare()  # warm-up
    best = {"bare pipe(prompts) loop": float("inf"), "conceptlock.generate": float("inf")}
    try:
        for _ in range(args.repeats):
            for k, fn in (("bare pipe(prompts) loop", bare), ("conceptlock.generate", ours)):
                t = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t)
        n_png = len(list((tmp / "run" / "images").glob("*.png")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(rows)
    h, w = pipe.unet.config.sample_size * pipe.vae_scale_factor, pipe.unet.config.sample_size * pipe.vae_scale_factor
    print(
        f"{args.model or 'tiny random pipeline'} at {h}x{w}, {n} prompts, batch {args.batch_size}, "
        f"{args.steps} steps, torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    print(f"| {'method':24s} | {'seconds':>8s} | {'img/s':>8s} | {'vs bare':>8s} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    base = n / best["bare pipe(prompts) loop"]
    for k, secs in best.items():
        print(f"| {k:24s} | {secs:8.3f} | {n / secs:8.2f} | {n / secs / base:7.3f}x |")
    ratio = (n / best["conceptlock.generate"]) / base
    print(f"\nconceptlock.generate / bare throughput: {ratio:.3f} (goal >= 0.95); PNGs written: {n_png}")


if __name__ == "__main__":
    main()
