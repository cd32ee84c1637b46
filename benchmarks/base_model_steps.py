"""Issue 2: how the toy base model's prompt fidelity grows with pretraining steps.

Retrains a built world's base UNet with the world build's own recipe (`world.build.train_unet`: same
architecture, loss, cosine LR, EMA, seed) for each step count, keeps the world's VAE, text encoder and
judges, and prints the world's report-card figures per step count, side by side:

    python benchmarks/base_model_steps.py --world ~/.cache/conceptlock/worlds/full --steps 2800,10000

Measured on the full world (seed 0, 2 cores, n=256 per figure):
- text encoder from the plain toy CLIP: 2800 steps (the full profile's budget) 18.0% [13.8, 23.1] clean
  fidelity, 10,000 steps 45.3% [39.3, 51.4];
- text encoder from the hard-negative toy CLIP (config 4052d7943739ba75): 2800 steps 39.8% [34.0, 45.9],
  10,000 steps 95.3% [92.0, 97.3] with clean prompts judged harmful 3.9% [2.1, 7.0] and explicit gore
  prompts 99.2% [97.2, 99.8]; about 0.21-0.28 s per step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from conceptlock.world.build import encode_latents, read_world, report_card, train_unet
from conceptlock.world.data import WorldConfig, pretrain_examples, render_examples
from conceptlock.world.judges import to_tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True, help="a built world folder")
    ap.add_argument("--steps", default="2800,10000", help="comma-separated pretraining step counts")
    ap.add_argument("--save", type=Path, default=None, help="also save each trained UNet as SAVE/unet-<steps>")
    args = ap.parse_args()
    meta = read_world(args.world)
    cfg = WorldConfig(**meta["config"])
    budget = cfg.resolved_budget()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(args.world / "pipeline"), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    te: CLIPTextModel = pipe.text_encoder.float().eval()
    tok: CLIPTokenizer = pipe.tokenizer
    pre = pretrain_examples(cfg)
    latents = torch.cat(
        [
            encode_latents(pipe.vae, to_tensor(render_examples(pre[i : i + 2000], cfg.resolution)))
            for i in range(0, len(pre), 2000)
        ]
    )
    latents = latents * pipe.vae.config.scaling_factor
    captions = [e.caption for e in pre]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        card_dir = Path(tmp)
        for sub in ("judges", "clip"):
            shutil.copytree(args.world / sub, card_dir / sub)
        for steps in [int(s) for s in args.steps.split(",")]:
            t0 = time.perf_counter()
            pipe.unet = train_unet(cfg, latents, captions, te, tok, steps, budget.unet_batch, budget.unet_lr)
            train_s = time.perf_counter() - t0
            if args.save is not None:
                pipe.unet.save_pretrained(str(args.save / f"unet-{steps}"), safe_serialization=True)
            bm = report_card(card_dir, cfg, pipe)["base_model"]
            target = cfg.concepts[0]
            clean, explicit = bm["clean"], bm[f"explicit-{target}"]
            rows.append(
                {
                    "steps": steps,
                    "train_s": round(train_s, 1),
                    "clean_fidelity": clean["fidelity"],
                    "clean_harmful": clean["harmful"],
                    "explicit_harmful": explicit["harmful"],
                    "toy_fid": clean["toy_fid"],
                }
            )

    def r(x: dict) -> str:
        return f"{100 * x['rate']:.1f}% [{100 * x['ci95'][0]:.1f}, {100 * x['ci95'][1]:.1f}] n={x['n']}"

    print(f"world {args.world} (config {meta['config_hash']}), batch {budget.unet_batch}, lr {budget.unet_lr}")
    print("| steps | train s | clean fidelity | clean judged harmful | explicit harmful | toy FID |")
    print("|---|---|---|---|---|---|")
    for x in rows:
        print(
            f"| {x['steps']} | {x['train_s']} | {r(x['clean_fidelity'])} | {r(x['clean_harmful'])} | "
            f"{r(x['explicit_harmful'])} | {x['toy_fid']:.3f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
