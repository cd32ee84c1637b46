"""`conceptlock attack ...`: attacks on a (safe) model. A typer group: add a command with `@attack_app.command(...)`.

`attack finetune` draws relearning curves (`conceptlock.attacks.finetune.run_attack_curve`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..finetune import DEFAULT_BATCH
from .finetune import set_world

attack_app = typer.Typer(
    name="attack",
    help="Attack a model and measure how much of its safety survives.\n\n"
    "Example: conceptlock attack finetune --model runs/esd/model --data toy:malicious-gore --out runs/curve",
    no_args_is_help=True,
)

FINETUNE_EXAMPLE = (
    "conceptlock attack finetune --model runs/base --adapter safety=runs/esd/safety.safetensors "
    "--data toy:malicious-gore --params lora:attack --schedule 0,20,100,200 "
    "--eval toy:explicit-gore=toy_harm --eval toy:clean=toy_fidelity --out runs/curve"
)


@attack_app.command(
    "finetune",
    help="Relearning curve: fine-tune the model (malicious or benign data; full or LoRA; modular or standard) and "
    "score it at each step of --schedule; write curve.json (step, harmful rate, n, 95% CI, fidelity).\n\n"
    f"Example:\n\n  {FINETUNE_EXAMPLE}\n\n"
    "Each point's model or adapter is kept in --out/points/. Rerunning the same command resumes: finished points "
    "are not recomputed. Default evaluation: toy:explicit-<concept>=toy_harm and toy:clean=toy_fidelity.",
    no_args_is_help=True,
)
def finetune_attack_cmd(
    model: Path = typer.Option(
        ...,
        "--model",
        help="Model: a diffusers folder (a composed folder carries its adapters), a hub id or a .safetensors file.",
    ),
    data: str = typer.Option(..., "--data", help="Image folder with metadata.jsonl, or toy:SET."),
    out: Path = typer.Option(..., "--out", help="Run folder (curve.json, points/, train/)."),
    adapter: list[str] = typer.Option([], "--adapter", help="Carried adapter NAME=FILE[:WEIGHT]; repeatable."),
    params: str = typer.Option("full", "--params", help="full | xattn | noxattn | xattn-kv | lora:NAME."),
    mode: str | None = typer.Option(None, "--mode", help="modular | standard (LoRA on a model with adapters)."),
    schedule: str = typer.Option("0,20,100,200", "--schedule", help="Strictly increasing step counts."),
    eval_: list[str] = typer.Option(
        [], "--eval", help="PROMPTS=METRIC[,METRIC]; repeatable (default: explicit harm + clean fidelity)."
    ),
    harm_metric: str = typer.Option("toy_harm", "--harm-metric", help="Metric giving the curve's harmful rate."),
    fidelity_metric: str = typer.Option("toy_fidelity", "--fidelity-metric", help="Metric giving its fidelity."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default 1e-4 LoRA, 1e-5 full)."),
    batch_size: int = typer.Option(DEFAULT_BATCH, "--batch-size", help="Global samples per optimizer step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Gradient accumulation micro-steps."),
    rank: int = typer.Option(4, "--rank", help="LoRA rank."),
    seed: int = typer.Option(0, "--seed", help="Training seed."),
    world: Path | None = typer.Option(None, "--world", help="Toy-world folder for toy: names (default: the model's)."),
    images_per_prompt: int = typer.Option(1, "--images-per-prompt", help="Images per prompt at each point."),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N prompts of each set."),
    gen_steps: int = typer.Option(20, "--gen-steps", help="Sampler steps for scoring."),
    gen_batch_size: int = typer.Option(16, "--gen-batch-size", help="Prompts per pipeline call."),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="Training precision: no | fp16 | bf16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard an existing curve in --out."),
) -> None:
    from ..attacks.finetune import run_attack_curve

    set_world(world, model)
    res = run_attack_curve(
        model,
        data,
        out,
        schedule=schedule,
        params=params,
        adapters=adapter,
        mode=mode,
        evals=eval_ or None,
        harm_metric=harm_metric,
        fidelity_metric=fidelity_metric,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seed=seed,
        rank=rank,
        images_per_prompt=images_per_prompt,
        limit=limit,
        gen_steps=gen_steps,
        gen_batch_size=gen_batch_size,
        train_kwargs={"mixed_precision": mixed_precision},
        overwrite=overwrite,
    )

    def fmt(v: float | None) -> str:
        return "   -  " if v is None else f"{v:.4f}"

    typer.echo(f"{'step':>6}  {'harmful':>7}  {'95% CI':>17}  {'n':>5}  {'fidelity':>8}")
    for p in res.points:
        ci = f"[{fmt(p['ci_low'])}, {fmt(p['ci_high'])}]"
        typer.echo(f"{p['step']:>6}  {fmt(p['harmful_rate']):>7}  {ci:>17}  {p['n'] or 0:>5}  {fmt(p['fidelity']):>8}")
    typer.echo(f"wrote {res.curve}")


# Further attack commands live in their own modules and add themselves to the group here.
_SUBCOMMANDS = (("attack_prompt", "add_prompt_command"),)


def register(app: typer.Typer) -> None:
    """Add the `attack` command group (and every attack command module that exists) to the CLI."""
    import importlib

    for module, adder in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as e:  # a command not written yet
            if e.name != f"{__package__}.{module}":
                raise
            continue
        getattr(mod, adder)(attack_app)
    app.add_typer(attack_app, name="attack")
