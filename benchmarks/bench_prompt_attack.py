"""Prompt-attack cost (s per prompt) and UCE edit time on a toy-sized model; prints one table.

    python benchmarks/bench_prompt_attack.py [--model DIR] [--world DIR] [--prompts 8] [--threads 1]

Goals (issue 7): the attack <= 2 s per prompt on this CPU for the toy model; UCE <= 1 s.

The attack runs at its defaults (k = 5, 40 iterations, 30 sampling steps for the target, pre and
attacked images) with a judge that never fires, so every prompt is attacked (the worst case). It is
timed batched (``--batch-size``, our default 8) and one prompt at a time (the reference
UnlearnDiffAtk loop shape). Without ``--model`` a random pipeline with the toy world's architecture
is used (the cost does not depend on the weights); with ``--world`` the toy judge scores the images.
UCE is timed on the same model (the gore concept's explicit phrases, tail tokens) end to end
(``uce_edit``) and, for scale, the bare solve on SD 1.x shapes (16 cross-attention layers, k and v).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def toy_shaped_pipeline(seed: int = 0):
    """A random pipeline with the toy world's component configs (32 px, 64-d text, UNet 32/64)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from conceptlock.pipelines import scheduler_for_inference, text_config, unet_config, vae_config
    from conceptlock.world.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config(sample_size=32, channels=(16, 32))),
        text_encoder=CLIPTextModel(text_config(hidden=64, layers=2, heads=4)),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**unet_config(sample_size=16, channels=(32, 64), cross_attention_dim=64)),
        scheduler=scheduler_for_inference(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: random toy-shaped pipeline)")
    ap.add_argument("--world", default=None, help="toy world folder: judge with toy_harm")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5, help="UCE repeats (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared CPU: keep 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from conceptlock.attacks.prompt import AttackConfig, metric_judge, prompt_attack
    from conceptlock.methods.uce import uce_edit, uce_solve
    from conceptlock.pipelines import load_pipeline
    from conceptlock.prompts import PromptRow
    from conceptlock.world.concepts import HARMFUL

    pipe = load_pipeline(args.model) if args.model else toy_shaped_pipeline()
    phrases = HARMFUL["gore"].explicit
    rows = [
        PromptRow(f"{phrases[i % len(phrases)]}: a red circle number {i}", seed=1000 + i, index=i, guidance=4.0)
        for i in range(args.prompts)
    ]
    if args.world:
        toy = metric_judge("toy_harm", world=args.world)

        def judge(images, rows_):
            toy(images, rows_)  # pay the judge's cost, but report every prompt as not harmful
            return [False] * len(images)

    else:

        def judge(images, rows_):
            return [False] * len(images)

    table: list[tuple[str, str, str]] = []
    for bs in sorted({args.batch_size, 1}, reverse=True):
        cfg = AttackConfig(iterations=args.iterations, steps=args.steps, batch_size=bs)
        res = prompt_attack(pipe, rows, judge, config=cfg, progress=False)
        ok = "yes" if res.seconds_per_prompt <= 2.0 else "NO"
        table.append(
            (
                f"attack, batch {bs} (k=5, {args.iterations} it, {args.steps} steps)",
                f"{res.seconds_per_prompt:.3f} s/prompt",
                f"<= 2 s: {ok}",
            )
        )

    times = []
    for _ in range(args.repeats):
        fresh = load_pipeline(args.model) if args.model else toy_shaped_pipeline()
        t0 = time.perf_counter()
        rep = uce_edit(fresh, list(phrases), HARMFUL["gore"].guide)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    table.append(
        (
            f"uce_edit, toy model ({rep['erase_vectors']} erase vectors, {len(rep['layers'])} layers)",
            f"{med:.4f} s",
            f"<= 1 s: {'yes' if med <= 1 else 'NO'}",
        )
    )
    g = torch.Generator().manual_seed(0)
    shapes = [320] * 5 + [640] * 5 + [1280] * 6  # SD 1.x attn2 widths (k and v each)
    ce, cp = torch.randn(300, 768, generator=g), torch.randn(77, 768, generator=g)
    ws = [torch.randn(d, 768, generator=g) for d in shapes for _ in range(2)]
    targets = {d: torch.randn(300, d, generator=g) for d in set(shapes)}
    t0 = time.perf_counter()
    for w in ws:
        uce_solve(w, ce, targets[w.shape[0]], cp)
    table.append(("uce_solve, SD 1.x shapes (32 projections, d_in 768)", f"{time.perf_counter() - t0:.3f} s", "info"))

    width = max(len(r[0]) for r in table)
    print(f"{'what':{width}s}  {'time':>16s}  goal")
    for name, t, goal in table:
        print(f"{name:{width}s}  {t:>16s}  {goal}")
    print(f"(threads {torch.get_num_threads()}, {args.prompts} prompts, model: {args.model or 'random toy-shaped'})")


if __name__ == "__main__":
    main()
