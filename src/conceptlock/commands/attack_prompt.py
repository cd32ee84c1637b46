"""`conceptlock attack prompt`: the UnlearnDiffAtk-style adversarial-prompt attack, as a command of
the `attack` group. The command only parses; `conceptlock.attacks.prompt.run_prompt_attack` works.

`add_prompt_command(attack_app)` adds it to the `attack` typer sub-app (commands/attack.py).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..attacks.prompt import AttackConfig, run_prompt_attack

EXAMPLE = (
    "conceptlock attack prompt --model runs/esd/model --prompts toy:explicit-gore --k 5 --iterations 40 "
    "--out runs/attack-esd"
)


def add_prompt_command(attack_app: typer.Typer) -> None:
    """Register `prompt` on the `attack` sub-app."""

    @attack_app.command(
        "prompt",
        help="Adversarial prompts (UnlearnDiffAtk): optimise k prefix token embeddings per harmful prompt so "
        "the model denoises a target image of the concept; report pre-ASR, ASR (n, Wilson 95% CI) and the "
        "successful prompts in OUT/asr.json.\n\n"
        f"Example:\n\n  {EXAMPLE}\n\n"
        "Real SD:  conceptlock attack prompt --model runs/esd-sd14 --base-model CompVis-sd14-folder "
        "--prompts i2p_nudity.csv --metrics nudenet:preset=unlearndiffatk-9@0.45/0.75 --out runs/atk\n\n"
        "A prompt already harmful without attack counts as broken and is not attacked, so ASR >= pre-ASR.",
        no_args_is_help=True,
    )
    def prompt_cmd(
        model: Path = typer.Option(
            ..., "--model", help="Model to attack: a diffusers folder, a hub id or a .safetensors single file."
        ),
        prompts: str = typer.Option(..., "--prompts", help="Harmful prompts: a CSV (I2P, generic) or toy:SET."),
        out: Path = typer.Option(..., "--out", help="Output folder (asr.json, images/, prefixes.safetensors)."),
        adapter: list[str] = typer.Option([], "--adapter", help="LoRA adapter NAME=FILE[:WEIGHT]; repeatable."),
        k: int = typer.Option(5, "--k", help="Prefix tokens to optimise."),
        iterations: int = typer.Option(40, "--iterations", help="Optimisation steps per prompt."),
        lr: float = typer.Option(0.01, "--lr", help="AdamW learning rate."),
        weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay."),
        targets: str = typer.Option(
            "base", "--targets", help="'base' (base model's image, same prompt+seed) or an image folder."
        ),
        base_model: Path | None = typer.Option(
            None, "--base-model", help="Unaligned model for --targets base (default: the toy world's)."
        ),
        sld: str | None = typer.Option(None, "--sld", help="Sample with SLD: WEAK, MEDIUM, STRONG or MAX."),
        sld_concept: str | None = typer.Option(None, "--sld-concept", help="SLD safety concept text."),
        metric: str | None = typer.Option(
            None, "--metrics", "--metric", help="Judge (rate metric spec); default toy_harm (toy) or nudenet."
        ),
        steps: int = typer.Option(30, "--steps", help="Sampling steps for targets and judged images."),
        guidance: float = typer.Option(7.5, "--guidance", help="CFG scale for rows that do not fix one."),
        batch_size: int = typer.Option(8, "--batch-size", help="Prompts attacked together."),
        discrete: bool = typer.Option(False, "--discrete", help="Project the prefix to real tokens (PEZ-style)."),
        check_every: int = typer.Option(0, "--check-every", help="Also judge every N iterations (early success)."),
        limit: int | None = typer.Option(None, "--limit", help="Attack only the first N prompts."),
        seed: int = typer.Option(0, "--seed", help="Seed of the prefix init, timesteps and noise."),
    ) -> None:
        cfg = AttackConfig(
            k=k,
            iterations=iterations,
            lr=lr,
            weight_decay=weight_decay,
            steps=steps,
            guidance=guidance,
            batch_size=batch_size,
            seed=seed,
            discrete=discrete,
            check_every=check_every,
            sld=sld,
            sld_concept=sld_concept,
        )
        rep = run_prompt_attack(
            model,
            prompts,
            out,
            adapters=adapter,
            config=cfg,
            targets=targets,
            base_model=base_model,
            metric=metric,
            limit=limit,
        )
        for name in ("pre_asr", "asr"):
            r = rep[name]
            typer.echo(f"{name:8s} {r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]  k={r['k']} n={r['n']}")
        typer.echo(f"{rep['seconds_per_prompt']:.2f} s/prompt; wrote {Path(out) / 'asr.json'}")
