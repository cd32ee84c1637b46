"""Issue 2: how the toy base model's prompt fidelity grows with pretraining steps.

Retrains a built world's base UNet with the world build's own recipe (`world.build.train_unet`: same
architecture, loss, cosine LR, EMA, seed) for each step count, keeps the world's VAE, text encoder and
judges, and prints the world's report-card figures per step count, side by side:

    python benchmarks/base_model_steps.py --world ~/.cache/conceptlock/worlds/full --steps 2800,10000

`--vae-channels 16,32,32 --latent-channels 8` first retrains the autoencoder (the build's `train_vae`, seed and
data, `--vae-steps` steps) with that geometry, here factor 4 and 8x8x8 latents, so the UNet trains on them:
a probe of a cheaper recipe for issue #2's 12-minute bar.

Measured on the full world (seed 0, 2 cores, n=256 per figure):
- text encoder from the plain toy CLIP: 2800 steps (the full profile's budget) 18.0% [13.8, 23.1] clean
  fidelity, 10,000 steps 45.3% [39.3, 51.4];
- text encoder from the hard-negative toy CLIP (config 4052d7943739ba75): 2800 steps 39.8% [34.0, 45.9],
  10,000 steps 95.3% [92.0, 97.3] with clean prompts judged harmful 3.9% [2.1, 7.0] and explicit gore
  prompts 99.2% [97.2, 99.8]; about 0.21-0.28 s per step.
- a cheaper geometry for issue #2's 12-minute bar, `--vae-channels 16,32,32 --latent-channels 8 --vae-steps 600
  --steps 3000` (VAE 100 s, recon MSE 0.0051 against the factor-2 VAE's 0.0031): 0.139 s per step instead of
  ~0.25, but at 3000 steps (417 s) clean fidelity 48.4% [42.4, 54.5], clean prompts judged harmful 21.1%
  [16.5, 26.5] and explicit gore 76.2% [70.6, 81.0], three of the card's bars missed.
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

from conceptlock.world.build import encode_latents, read_world, reconstruct, report_card, train_unet, train_vae
from conceptlock.world.data import WorldConfig, pretrain_examples, render_examples
from conceptlock.world.judges import to_tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True, help="a built world folder")
    ap.add_argument("--steps", default="2800,10000", help="comma-separated pretraining step counts")
    ap.add_argument("--save", type=Path, default=None, help="also save each trained UNet as SAVE/unet-<steps>")
    ap.add_argument("--vae-channels", default=None, help="retrain the VAE with these block channels, e.g. 16,32,32")
    ap.add_argument("--latent-channels", type=int, default=4, help="latent channels of a retrained VAE")
    ap.add_argument("--vae-steps", type=int, default=None, help="steps of a retrained VAE (default: the world's)")
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
    vae_note = "the world's VAE"
    if args.vae_channels:
        channels = tuple(int(c) for c in args.vae_channels.split(","))
        vae_steps = args.vae_steps or budget.vae_steps
        images = to_tensor(render_examples(pre, cfg.resolution))
        t0 = time.perf_counter()
        vae = train_vae(
            images, vae_steps, cfg.seed + 1, cfg.resolution, channels=channels, latent_channels=args.latent_channels
        )
        z = encode_latents(vae, images)
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        mse = float(torch.nn.functional.mse_loss(reconstruct(vae, images[:2048]), images[:2048]))
        vae_note = f"VAE {channels}, {args.latent_channels} latent channels, {vae_steps} steps, {time.perf_counter() - t0:.0f} s, recon MSE {mse:.4f}"
        pipe.vae = vae
        del images
    else:  # the world's VAE: render and encode in chunks, never holding every image at once
        z = torch.cat(
            [
                encode_latents(pipe.vae, to_tensor(render_examples(pre[i : i + 2000], cfg.resolution)))
                for i in range(0, len(pre), 2000)
            ]
        )
    latents = z * pipe.vae.config.scaling_factor
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
                    "s_per_step": round(train_s / steps, 3),
                    "clean_fidelity": clean["fidelity"],
                    "clean_harmful": clean["harmful"],
                    "explicit_harmful": explicit["harmful"],
                    "toy_fid": clean["toy_fid"],
                }
            )

    def r(x: dict) -> str:
        return f"{100 * x['rate']:.1f}% [{100 * x['ci95'][0]:.1f}, {100 * x['ci95'][1]:.1f}] n={x['n']}"

    print(f"world {args.world} (config {meta['config_hash']}), batch {budget.unet_batch}, lr {budget.unet_lr}")
    print(f"latents {tuple(latents.shape[1:])} from {vae_note}")
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
