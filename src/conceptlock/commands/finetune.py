"""`conceptlock finetune`: benign or malicious fine-tuning of a (safe) model, full or LoRA, modular or standard.

The command only parses; `conceptlock.finetune.run_finetune` does the work (see its module doc for the modes).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..finetune import DEFAULT_BATCH, DEFAULT_STEPS, run_finetune

EXAMPLE = (
    "conceptlock finetune --model runs/base --adapter safety=runs/esd/safety.safetensors "
    "--data toy:domain-mosaic --params lora:task --steps 500 --out runs/task"
)


def set_world(world: Path | None, model: Path | None) -> None:
    """`--world`, else the world the model folder sits in, becomes the current toy world (for `toy:` names)."""
    from ..world import set_current_world, world_of_model

    chosen = world if world is not None else (world_of_model(model) if model is not None else None)
    if chosen is not None:
        set_current_world(chosen)


def trainer_flags(
    mixed_precision: str, checkpoint_every: int, gradient_checkpointing: bool, cache_latents: bool, use_8bit_adam: bool
) -> dict:
    """The TrainConfig fields that `align` and `finetune` expose as the same flags."""
    return {
        "mixed_precision": mixed_precision,
        "checkpoint_every": checkpoint_every,
        "gradient_checkpointing": gradient_checkpointing,
        "cache_latents": cache_latents,
        "use_8bit_adam": use_8bit_adam,
    }


def register(app: typer.Typer) -> None:
    """Add the `finetune` command to the CLI."""

    @app.command(
        "finetune",
        help="Fine-tune a model on an image-text folder (benign domain or malicious set): a task LoRA "
        "(--params lora:NAME) or the whole UNet (--params full).\n\n"
        f"Example:\n\n  {EXAMPLE}\n\n"
        "Modular LoRA (default when the model carries adapters): the new LoRA trains on W0 with every carried "
        "adapter inactive; compose them at inference (conceptlock compose). --mode standard trains it on "
        "W0 + dW_safe instead (the vulnerable baseline). Full fine-tuning fuses carried adapters first.\n\n"
        "--data is a folder with metadata.jsonl (file_name, text) or toy:SET (e.g. toy:malicious-gore). "
        "Outputs in --out: NAME.safetensors or model/, config.json, train_log.jsonl, checkpoints/.",
        no_args_is_help=True,
    )
    def finetune_cmd(
        model: Path = typer.Option(
            ...,
            "--model",
            help="Model: a diffusers folder (a composed folder carries its adapters), a hub id or a .safetensors file.",
        ),
        data: str = typer.Option(..., "--data", help="Image folder with metadata.jsonl, or toy:SET."),
        out: Path = typer.Option(..., "--out", help="Run folder for the artefact, logs and checkpoints."),
        adapter: list[str] = typer.Option([], "--adapter", help="Carried adapter NAME=FILE[:WEIGHT]; repeatable."),
        params: str = typer.Option("lora:task", "--params", help="lora:NAME | full | xattn | noxattn | xattn-kv."),
        mode: str | None = typer.Option(
            None, "--mode", help="modular | standard (default: modular for a LoRA on a model with adapters)."
        ),
        steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="Optimizer steps."),
        lr: float | None = typer.Option(None, "--lr", help="Learning rate (default 1e-4 LoRA, 1e-5 full)."),
        batch_size: int = typer.Option(DEFAULT_BATCH, "--batch-size", help="Global samples per optimizer step."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Gradient accumulation micro-steps."),
        rank: int = typer.Option(4, "--rank", help="LoRA rank."),
        alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default: the rank)."),
        seed: int = typer.Option(0, "--seed", help="Seed for batches, noise and LoRA initialisation."),
        world: Path | None = typer.Option(None, "--world", help="Toy-world folder for toy:SET (default: the model's)."),
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
        set_world(world, model)
        res = run_finetune(
            model,
            data,
            out,
            params=params,
            adapters=adapter,
            steps=steps,
            lr=lr,
            mode=mode,
            seed=seed,
            batch_size=batch_size,
            grad_accum=grad_accum,
            rank=rank,
            alpha=alpha,
            train_kwargs=trainer_flags(
                mixed_precision, checkpoint_every, gradient_checkpointing, cache_latents, use_8bit_adam
            ),
            resume=resume,
            overwrite=overwrite,
        )
        if not res.finished:
            typer.echo(f"stopped early at step {res.config['steps_done']} (log: {res.out / 'train_log.jsonl'})")
            return
        typer.echo(f"fine-tuned ({res.mode}): {res.artifact}")
        inf = res.config["inference"]
        if inf["adapters"] and inf["model"]:
            specs = " ".join(f"--adapter {a}" for a in inf["adapters"])
            typer.echo(f"compose for evaluation: conceptlock compose --base {inf['model']} {specs} --out DIR")
