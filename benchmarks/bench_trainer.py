"""Trainer overhead: conceptlock's `train` step vs a bare forward/backward/step loop on the same model and batch.

Both loops do the same work per step: encode the prompts with the frozen text encoder, draw noise and timesteps,
noise the latents, run the UNet, MSE against the target, backward, clip the gradient norm to 1, AdamW step. The
trainer adds what it owns (batch plan, per-sample random streams, the loss all-reduce/NaN check, the JSONL log).
Per-step times are medians of the intervals between consecutive steps after a warm-up, measured in alternating
rounds so that load from other processes hits both loops alike; `ratio(min)` compares the fastest steps, the
least disturbed estimate on a shared machine. Goal: trainer / bare <= 1.05.

    python benchmarks/bench_trainer.py [--steps 30] [--rounds 3] [--threads 1] [--batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from conceptlock.methods.base import Objective, get_objective, tokenize
from conceptlock.pipelines import tiny_pipeline, unet_config
from conceptlock.train.data import TensorDataset
from conceptlock.train.params import apply_params
from conceptlock.train.trainer import TrainConfig, train

PROMPTS = ["a red circle on grass", "a blue square", "a small green star at night", "a large yellow triangle"]


def make_pipe(size: str):
    pipe = tiny_pipeline(0)
    if size == "small":  # a wider UNet: more compute per step, so fixed overheads weigh less
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel(
            **unet_config(sample_size=16, channels=(32, 64), heads=4, cross_attention_dim=32)
        )
    return pipe


def batch_data(pipe, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        latents=torch.randn(n, 4, 16, 16, generator=g), input_ids=tokenize(pipe.tokenizer, (PROMPTS * n)[:n])
    )


def bare_loop(size: str, params: str, batch: int, steps: int) -> list[float]:
    pipe = make_pipe(size)
    unet, text = pipe.unet, pipe.text_encoder.requires_grad_(False)
    trainable = [p for _, p in apply_params(unet, params)]
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    data = batch_data(pipe, batch).tensors
    latents, ids = data["latents"], data["input_ids"]
    unet.train()
    stamps = []
    for _ in range(steps):
        stamps.append(time.perf_counter())
        with torch.no_grad():
            emb = text(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        out = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(out.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


class Stamped(Objective):
    """Finetune, recording when each step's loss starts (one micro-step per optimizer step here)."""

    name = "finetune"
    needs = ("input_ids", "latents|pixel_values")

    def __init__(self):
        self.inner, self.stamps = get_objective("finetune"), []

    def loss(self, batch, ctx):
        self.stamps.append(time.perf_counter())
        return self.inner.loss(batch, ctx)


def trainer_loop(size: str, params: str, batch: int, steps: int) -> list[float]:
    pipe = make_pipe(size)
    obj = Stamped()
    with tempfile.TemporaryDirectory() as out:
        train(
            pipe,
            params,
            obj,
            batch_data(pipe, batch),
            TrainConfig(steps=steps + 1, lr=1e-5, batch_size=batch),
            Path(out),
        )
    return [b - a for a, b in zip(obj.stamps, obj.stamps[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [("tiny", "full"), ("tiny", "lora:bench"), ("small", "full"), ("small", "xattn")]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.steps} steps x {args.rounds} rounds"
    )
    print(
        f"{'unet':6s} {'params':11s} {'bare ms/step':>13s} {'trainer ms/step':>16s} {'ratio':>7s} {'ratio(min)':>11s}"
    )
    for size, params in cases:
        bare, ours = [], []
        for _ in range(args.rounds):  # alternate, so background load hits both
            bare += bare_loop(size, params, args.batch, args.steps)[args.warmup :]
            ours += trainer_loop(size, params, args.batch, args.steps)[args.warmup :]
        b, o = statistics.median(bare) * 1e3, statistics.median(ours) * 1e3
        print(f"{size:6s} {params:11s} {b:13.2f} {o:16.2f} {o / b:7.3f} {min(ours) / min(bare):11.3f}")


if __name__ == "__main__":
    main()
