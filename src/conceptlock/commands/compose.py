"""`conceptlock compose`: Modular LoRA at inference, W0 + sum_a w_a dW_a, as a composed (unfused) or fused folder.

The command only parses; `conceptlock.compose.run_compose` does the work (its module doc describes the artefacts).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..compose import run_compose

EXAMPLE = (
    "conceptlock compose --base runs/base --adapter safety=runs/esd/safety.safetensors:1.0 "
    "--adapter task=runs/task/task.safetensors:1.0 --out runs/modular"
)


def register(app: typer.Typer) -> None:
    """Add the `compose` command to the CLI."""

    @app.command(
        "compose",
        help="Compose named LoRA adapters on a base pipeline (Modular LoRA): write the base plus the adapter files "
        "and conceptlock_adapters.json (unfused, for evaluation), or with --fuse a plain fused pipeline folder "
        "(deployment only; safe fusing refuses NaN).\n\n"
        f"Example:\n\n  {EXAMPLE}\n\n"
        "Weights may be negative (model arithmetic): --adapter safety=FILE:-1 gives W0 - dW_safe. "
        "Composition protects a service that controls inference; it does not protect released weights.",
        no_args_is_help=True,
    )
    def compose_cmd(
        base: Path = typer.Option(..., "--base", help="Base pipeline folder (W0)."),
        adapter: list[str] = typer.Option(..., "--adapter", help="NAME=FILE[:WEIGHT]; repeatable; weight default 1."),
        out: Path = typer.Option(..., "--out", help="Output pipeline folder."),
        fuse: bool = typer.Option(False, "--fuse", help="Merge the adapters into the weights (deployment only)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    ) -> None:
        res = run_compose(base, adapter, out, fuse=fuse, overwrite=overwrite)
        what = ", ".join(f"{r.name}={r.weight:g}" for r in res.adapters)
        typer.echo(f"{'fused' if res.fused else 'composed'} {what} on {base}: {res.out}")
