"""The `conceptlock` command line: a thin typer app. Each command parses, calls one function, prints.

Command groups live in `conceptlock.commands.<name>` modules, each exposing `register(app)`, so
the CLI stays a table of contents and each command's logic is importable and testable alone.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

app = typer.Typer(
    name="conceptlock",
    help="Keep the safety alignment of text-to-image diffusion models through fine-tuning, and measure it.\n\n"
    "Example: conceptlock world build --profile quick",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global_options(
    model_config: str = typer.Option(
        None,
        "--model-config",
        help="For a single-file --model (.safetensors): the pipeline folder or hub id whose configs it follows "
        "(diffusers needs them; offline it cannot fetch them). Example: conceptlock --model-config "
        "runs/base evaluate --model release/model.safetensors ...",
    ),
) -> None:
    """Options for every command."""
    if model_config:
        from .pipelines import MODEL_CONFIG_ENV

        os.environ[MODEL_CONFIG_ENV] = model_config


_COMMAND_MODULES = ("world", "align", "finetune", "evaluate", "compose", "attack", "reproduce", "export")

for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"conceptlock.commands.{_name}")
    except ModuleNotFoundError as e:  # a command group not written yet
        if e.name != f"conceptlock.commands.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:  # pragma: no cover - console entry
    try:
        app()
    except ValueError as e:  # ConceptlockError and friends: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
