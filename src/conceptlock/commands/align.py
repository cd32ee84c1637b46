"""`conceptlock align`: train a safety alignment (ESD, SDD, LCFD) into a pipeline or a safety LoRA.

The command only parses; `conceptlock.align.run_align` does the work (and is what other code calls).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..align import METHODS, TRAINING_FREE, run_align
from ..errors import ConceptlockError
from .finetune import trainer_flags

EXAMPLE = (
    "conceptlock align --method esd --model runs/base --concept nudity --concept 'naked person' "
    "--params lora:safety --steps 200 --out runs/esd-safety"
)


def register(app: typer.Typer) -> None:
    """Add the `align` command to the CLI."""

    @app.command(
        "align",
        help="Safety-align a model against a concept with ESD, SDD or LCFD; write an aligned pipeline folder "
        "(--params full|xattn|noxattn|xattn-kv) or a safety LoRA file (--params lora:NAME).\n\n"
        f"Example:\n\n  {EXAMPLE}\n\n"
        "LCFD reads labelled images:  conceptlock align --method lcfd-lt --model runs/base --concept nudity "
        "--data data/lcfd --out runs/lcfd  (metadata.jsonl rows: file_name, text, class 1 clean / 2 harmful).\n\n"
        "Anchored ESD (the concept erased in context, towards the prompt without it):  conceptlock align "
        "--method esd --anchor --model runs/base --concept nudity --data pairs.csv --params lora:safety "
        "--lora-targets attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0 --out runs/esd-anchor  "
        "(pairs.csv columns: prompt, anchor).\n\n"
        "UCE as a safety LoRA (closed form, no training; composes with task LoRAs):  conceptlock align --method uce "
        "--model runs/base --concept nudity --uce-preserve-contexts 64 --uce-preserve-scale 1 --params lora:safety "
        "--out runs/uce-safety\n\n"
        "Outputs in --out: model/ or NAME.safetensors, config.json, train_log.jsonl, checkpoints/. "
        "Multi-GPU: accelerate launch --num_processes N -m conceptlock.cli align ...",
        no_args_is_help=True,
    )
    def align_cmd(
        method: str = typer.Option(..., "--method", help=f"One of: {', '.join([*METHODS, *TRAINING_FREE])}."),
        model: Path = typer.Option(
            ..., "--model", help="Model to align: a diffusers folder, a hub id or a .safetensors single file."
        ),
        concept: list[str] = typer.Option(..., "--concept", help="Concept prompt text; repeat for several."),
        out: Path = typer.Option(..., "--out", help="Run folder for the artefact, logs and checkpoints."),
        params: str | None = typer.Option(
            None, "--params", help="full | xattn | noxattn | xattn-kv | lora:NAME (default: the method's)."
        ),
        steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (default: the method's)."),
        lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: the method's; 1e-4 for LoRA)."),
        released_code: bool = typer.Option(
            False, "--released-code", help="LCFD: reproduce the published scripts (contrastive term has no gradient)."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed for batches, noise and LoRA initialisation."),
        data: Path | None = typer.Option(
            None, "--data", help="LCFD: image folder with metadata.jsonl; anchored ESD: a CSV of prompt, anchor pairs."
        ),
        world: Path | None = typer.Option(None, "--world", help="Toy-world folder to resolve concept names."),
        batch_size: int | None = typer.Option(None, "--batch-size", help="Global samples per optimizer step."),
        grad_accum: int | None = typer.Option(None, "--grad-accum", help="Gradient accumulation micro-steps."),
        rank: int | None = typer.Option(
            None, "--rank", help="LoRA rank (default 4; UCE: the rank that holds the edit exactly)."
        ),
        alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default: the rank)."),
        lora_targets: str | None = typer.Option(
            None,
            "--lora-targets",
            help="Comma-separated module names the LoRA wraps (default to_q,to_k,to_v,to_out.0); "
            "attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0 keeps it to cross-attention.",
        ),
        eta: float | None = typer.Option(None, "--eta", help="ESD negative-guidance strength."),
        anchor: bool = typer.Option(
            False,
            "--anchor",
            help="ESD/SDD: erase the concept in context, towards the prompt without it (toy world: built in; "
            "else --data PAIRS.csv with columns prompt, anchor).",
        ),
        ddim_steps: int | None = typer.Option(None, "--ddim-steps", help="ESD/SDD: DDIM steps of the x_t sampler."),
        lambda_tot: float | None = typer.Option(None, "--lambda-tot", help="LCFD contrastive weight."),
        ng_noise: str | None = typer.Option(
            None, "--ng-noise", help="LCFD-NG: fixed (+-1 by class, the default) or changing (the class centres)."
        ),
        ascent: float | None = typer.Option(
            None, "--ascent", help="LCFD high-safety: weight of the gradient ascent on harmful data (default 0.5)."
        ),
        ascent_ceiling: float | None = typer.Option(
            None,
            "--ascent-ceiling",
            help="LCFD high-safety: bound the ascent; a harmful sample's MSE counts up to this value (default: "
            "unbounded, as in the paper).",
        ),
        guide: str | None = typer.Option(None, "--guide", help="UCE: text the concept is mapped to (default: '')."),
        preserve: list[str] = typer.Option([], "--preserve", help="UCE: text whose keys/values stay; repeatable."),
        uce_lambda: float | None = typer.Option(None, "--uce-lambda", help="UCE regulariser lambda (default 0.5)."),
        uce_contexts: int | None = typer.Option(
            None,
            "--uce-contexts",
            help="UCE: also erase the concept inside N neutral captions (default 40 in a toy world, else 0).",
        ),
        uce_preserve_contexts: int = typer.Option(
            0,
            "--uce-preserve-contexts",
            help="UCE: also preserve N neutral captions (a toy world's clean captions), keeping what they draw.",
        ),
        uce_preserve_scale: float | None = typer.Option(
            None, "--uce-preserve-scale", help="UCE: weight of the preserve set against the erased texts (default 0.1)."
        ),
        mixed_precision: str = typer.Option("no", "--mixed-precision", help="no | fp16 | bf16."),
        gradient_checkpointing: bool = typer.Option(
            False, "--gradient-checkpointing", help="Recompute UNet activations in backward (less memory)."
        ),
        cache_latents: bool = typer.Option(
            False, "--cache-latents", help="VAE-encode the training images once instead of every step."
        ),
        use_8bit_adam: bool = typer.Option(False, "--use-8bit-adam", help="bitsandbytes AdamW8bit (optional)."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Checkpoint every N steps (0: never)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    ) -> None:
        okw: dict = {}
        if eta is not None:
            okw["eta"] = eta
        if lambda_tot is not None:
            okw["lambda_tot"] = lambda_tot
        for flag, value, key, only in (
            ("--ng-noise", ng_noise, "noise", "lcfd-ng"),
            ("--ascent", ascent, "ascent", "lcfd-high"),
            ("--ascent-ceiling", ascent_ceiling, "ceiling", "lcfd-high"),
        ):
            if value is not None and method != only:
                raise ConceptlockError(f"{flag} only applies to --method {only}")
            if value is not None:
                okw[key] = value
        if anchor:
            okw["anchor"] = True
        if ddim_steps is not None:
            okw["ddim_steps"] = ddim_steps
        if method in TRAINING_FREE:  # uce: --guide/--preserve/--uce-lambda; example: --method uce --concept gore
            okw.update({"guide": guide, "preserve": preserve} | ({"lam": uce_lambda} if uce_lambda is not None else {}))
            if uce_contexts is not None:
                okw["contexts"] = uce_contexts
            if uce_preserve_contexts:
                okw["preserve_contexts"] = uce_preserve_contexts
            if uce_preserve_scale is not None:
                okw["preserve_scale"] = uce_preserve_scale
        res = run_align(
            method,
            model,
            concept,
            out,
            params=params,
            steps=steps,
            lr=lr,
            released_code=released_code,
            seed=seed,
            data=data,
            world=world,
            batch_size=batch_size,
            grad_accum=grad_accum,
            rank=rank,
            alpha=alpha,
            targets=[t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None,
            objective_kwargs=okw,
            train_kwargs=trainer_flags(
                mixed_precision, checkpoint_every, gradient_checkpointing, cache_latents, use_8bit_adam
            ),
            resume=resume,
            overwrite=overwrite,
        )
        state = "aligned" if res.finished else "stopped early"
        log = res.out / "train_log.jsonl"  # training-free methods (uce) have none
        typer.echo(f"{state}: {res.artifact}" + (f"  (log: {log})" if log.exists() else ""))
