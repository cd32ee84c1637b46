"""Anchored ESD's cost: one ESD step (partial DDIM sampling by the frozen model, target, student pass, backward)
with the empty-prompt reference vs the anchor-prompt reference, on the same model, batch and seeds.

The anchored step puts the anchor's embedding where plain ESD puts the empty prompt's in the frozen model's
batched target pass, so it adds one text-encoder pass. Steps alternate between the two objectives round by round, so machine load hits both alike;
the table gives the median and the fastest step of each.

    python benchmarks/bench_anchor.py --world ~/.cache/conceptlock/worlds/full [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from conceptlock.methods.base import Context, get_objective, tokenize
from conceptlock.pipelines import load_pipeline
from conceptlock.train.params import apply_params

XATTN = "attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per objective per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ddim-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from conceptlock.align import anchor_pairs
    from conceptlock.train.params import parse_params

    pipe = load_pipeline(args.world / "pipeline")
    spec = parse_params("lora:safety", targets=tuple(XATTN.split(",")))
    ctx = Context(pipe=pipe, unet=pipe.unet, trainable=apply_params(pipe.unet, spec), adapter="safety")
    opt = torch.optim.AdamW([p for _, p in ctx.trainable], lr=1e-4)
    pairs = anchor_pairs(["gore"], args.world, None)[: args.batch]
    ids = tokenize(pipe.tokenizer, [p for p, _ in pairs])
    aids = tokenize(pipe.tokenizer, [a for _, a in pairs])
    objs = {
        "ESD (empty-prompt reference)": get_objective("esd", ddim_steps=args.ddim_steps),
        "anchored ESD": get_objective("esd", ddim_steps=args.ddim_steps, anchor=True),
    }
    for o in objs.values():
        o.prepare(pipe, ctx)
    times: dict[str, list[float]] = {k: [] for k in objs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, obj in objs.items():
            for s in range(args.steps):
                seed = torch.arange(args.batch) + 1000 * s  # the same partial-sampling depths for both
                t0 = time.perf_counter()
                loss, _ = obj.loss({"input_ids": ids, "anchor_ids": aids, "seed": seed}, ctx)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r:
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(objs))])
    print(
        f"batch {args.batch}, {args.ddim_steps} DDIM steps, {args.threads} thread(s), {args.steps * args.rounds} steps each"
    )
    print(f"{'objective':32} {'median s/step':>14} {'fastest':>9} {'ratio':>6}")
    for name, ts in times.items():
        print(f"{name:32} {statistics.median(ts):14.3f} {min(ts):9.3f} {statistics.median(ts) / base:6.2f}")


if __name__ == "__main__":
    main()
