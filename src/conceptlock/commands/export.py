"""`conceptlock export`: a pipeline folder as one original-layout `.safetensors` checkpoint (A1111, ComfyUI,
`from_single_file`). The command only parses; `conceptlock.single_file` does the work and says why it exists."""

from __future__ import annotations

from pathlib import Path

import typer

EXAMPLE = "conceptlock export --model runs/modular-fused --out release/model.safetensors"


def register(app: typer.Typer) -> None:
    """Add the `export` command to the CLI."""

    @app.command(
        "export",
        help="Write an SD 1.x/2.x pipeline (a diffusers folder, e.g. a fused `compose --fuse` output) as one "
        "single-file checkpoint in the original Stable Diffusion layout, which `conceptlock --model FILE "
        "--config FOLDER`, diffusers' from_single_file, A1111 and ComfyUI load.\n\n"
        f"Example:\n\n  {EXAMPLE}",
        no_args_is_help=True,
    )
    def export_cmd(
        model: Path = typer.Option(..., "--model", help="Pipeline folder to export."),
        out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    ) -> None:
        from ..pipelines import load_pipeline
        from ..single_file import export_single_file

        path = export_single_file(load_pipeline(model), out, overwrite=overwrite)
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
