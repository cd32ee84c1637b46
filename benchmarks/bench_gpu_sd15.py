"""SD 1.5-size LoRA training on a GPU: conceptlock's trainer vs diffusers' `train_text_to_image_lora.py` loop.

Both train a rank-4 LoRA on to_q/to_k/to_v/to_out.0 of a randomly initialised SD 1.5-shaped UNet (860 M
parameters, 64x64 latents = 512 px, batch 1) with the CLIP ViT-L-shaped text encoder frozen, the frozen weights
in fp16 or bf16 and the adapter weights in fp32, AdamW, gradient-norm clipping at 1. The "diffusers" loop is the
body of diffusers' example script (accelerate autocast, peft `add_adapter`, `cast_training_params`, the
per-step loss gather), minus its VAE encode: both loops are fed the same pre-encoded latents, so the comparison
is of the training step alone. Each case runs in its own process so peak memory is its own. Goal (issue #8):
trainer <= 1.0x the diffusers step time and memory.

    python benchmarks/bench_gpu_sd15.py [--steps 60] [--warmup 15] [--precision fp16] [--rounds 2]

Measured 2026-11-27 on one NVIDIA H200 (torch 2.11.0+cu130, diffusers 0.42.1, peft 0.21.0, accelerate 1.15.0),
`--steps 100 --warmup 20`, peak memory counted from the first timed step:

    precision  rounds  diffusers median / min ms  trainer median / min ms  time ratio (median)  peak GiB (both)
    fp16       3       162.0 / 114.9               130.7 / 110.5             0.81x                3.04
    bf16       1       142.9 / 111.9               116.1 / 107.6             0.81x                3.04

Batch 1 at 512 px is launch-bound on this card, so medians vary between runs: an earlier run (`--steps 60
--warmup 15`, fp16, 2 rounds) gave 164.6 vs 159.2 ms (1.03x) and bf16 165.9 vs 175.6 ms (0.94x). The minima,
less noisy, agree within 4% in every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
TINY_UNET = {
    **SD15_UNET,
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
DT = {"fp16": torch.float16, "bf16": torch.bfloat16}
CUDA = torch.cuda.is_available()  # without one, a tiny CPU smoke run of the same code
DEV = "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    """Peak memory is the training steps' own: building the model in fp32 before the cast is not counted."""
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def build(dtype_name: str):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device(DEV):
        unet = UNet2DConditionModel(**(SD15_UNET if CUDA else TINY_UNET))
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768 if CUDA else 32,
                intermediate_size=3072 if CUDA else 64,
                num_hidden_layers=12 if CUDA else 1,
                num_attention_heads=12 if CUDA else 4,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
            )
        )
        vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4)  # unused: latents given
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 64 if CUDA else 16, 64 if CUDA else 16, generator=g)
    ids = torch.randint(1, 49000, (1, 77), generator=g)
    return unet, text, vae, sched, latents, ids


def diffusers_loop(dtype_name: str, steps: int) -> list[float]:
    from accelerate import Accelerator
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    acc = Accelerator(mixed_precision=dtype_name, cpu=not CUDA)
    wd = DT[dtype_name]
    unet, text, _, sched, latents, ids = build(dtype_name)
    unet.requires_grad_(False)
    text.requires_grad_(False)
    unet.to(acc.device, dtype=wd)
    text.to(acc.device, dtype=wd)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet, opt = acc.prepare(unet, opt)
    latents, ids = latents.to(acc.device, wd), ids.to(acc.device)
    unet.train()
    stamps = []
    for _ in range(steps):
        sync()
        if not stamps:
            reset_peak()
        stamps.append(time.perf_counter())
        with acc.accumulate(unet):
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=latents.device).long()
            noisy = sched.add_noise(latents, noise, t)
            enc = text(ids, return_dict=False)[0]
            pred = unet(noisy, t, enc, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            _ = acc.gather(loss.repeat(1)).mean().item()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
    sync()
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def trainer_loop(dtype_name: str, steps: int) -> list[float]:
    from conceptlock.methods.base import Objective, get_objective
    from conceptlock.train.data import TensorDataset
    from conceptlock.train.trainer import TrainConfig, train

    unet, text, vae, sched, latents, ids = build(dtype_name)
    pipe = SimpleNamespace(unet=unet, text_encoder=text, vae=vae, scheduler=sched, tokenizer=None)

    class Stamped(Objective):
        name = "finetune"
        needs = ("input_ids", "latents|pixel_values")

        def __init__(self):
            self.inner, self.stamps = get_objective("finetune"), []

        def loss(self, batch, ctx):
            sync()
            if not self.stamps:
                reset_peak()
            self.stamps.append(time.perf_counter())
            return self.inner.loss(batch, ctx)

    obj = Stamped()
    with tempfile.TemporaryDirectory() as out:
        train(
            pipe,
            "lora:bench",
            obj,
            TensorDataset(latents=latents, input_ids=ids),
            TrainConfig(steps=steps + 1, lr=1e-4, batch_size=1, mixed_precision=dtype_name, cpu=not CUDA),
            Path(out),
        )
    return [b - a for a, b in zip(obj.stamps, obj.stamps[1:], strict=False)]


def run_case(case: str, dtype_name: str, steps: int, warmup: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = True
    times = (diffusers_loop if case == "diffusers" else trainer_loop)(dtype_name, steps)[warmup:]
    return {
        "case": case,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--precision", default="fp16", choices=sorted(DT))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.precision, args.steps, args.warmup)))
        return
    print(
        f"{torch.cuda.get_device_name() if CUDA else 'CPU (tiny smoke run)'}, torch {torch.__version__}, {args.precision}, batch 1, 512 px, LoRA r4"
    )
    res: dict[str, list[dict]] = {"diffusers": [], "trainer": []}
    for _ in range(args.rounds):
        for case in res:
            cmd = [sys.executable, __file__, "--case", case, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd + ["--precision", args.precision], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{case} failed:\n{out.stderr[-3000:]}")
            res[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'loop':10s} {'median ms/step':>15s} {'min ms/step':>12s} {'peak GiB':>9s}")
    for case, rows in res.items():
        med = statistics.median(r["median_ms"] for r in rows)
        print(f"{case:10s} {med:15.1f} {min(r['min_ms'] for r in rows):12.1f} {max(r['peak_gib'] for r in rows):9.2f}")
    d, t = res["diffusers"], res["trainer"]
    ratio_t = statistics.median(r["median_ms"] for r in t) / statistics.median(r["median_ms"] for r in d)
    ratio_m = max(r["peak_gib"] for r in t) / max(max(r["peak_gib"] for r in d), 1e-9)
    print(f"trainer / diffusers: step time {ratio_t:.3f}x, peak memory {ratio_m:.3f}x")


if __name__ == "__main__":
    main()
