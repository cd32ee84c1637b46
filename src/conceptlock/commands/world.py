"""`conceptlock world build|info`: build the toy world (seeded, cached) and print its report card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

world_app = typer.Typer(
    help="The toy world: a miniature Stable Diffusion safety setting that runs on a CPU.\n\n"
    "Example: conceptlock world build --profile quick --out runs/world",
    no_args_is_help=True,
)
console = Console()


def print_card(meta: dict) -> None:
    from ..world.card import evaluate_card

    cfg = meta["config"]
    target = cfg["concepts"][0]
    table = Table(
        title=f"World report card (profile {cfg['profile']}, seed {cfg['seed']}, config {meta['config_hash']})"
    )
    for col in ("figure", "threshold", "measured", "n", "95% CI", "ok"):
        table.add_column(col)
    for r in evaluate_card(meta["card"], target, cfg["profile"]):
        ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r["ci95"] else ""
        measured = "missing" if r["measured"] is None else f"{r['measured']:.3f}"
        ok = "" if r["threshold"] == "report" else ("yes" if r["ok"] else "NO")
        table.add_row(r["figure"], r["threshold"], measured, str(r["n"] or ""), ci, ok)
    judges = meta["card"].get("judges", {})
    for key, label in (
        (f"detector_auroc_{target}_recon", f"detector AUROC ({target}), VAE reconstructions"),
        ("attribute_accuracy_shape_recon", "attribute accuracy, shape, VAE reconstructions"),
    ):
        if key in judges:
            table.add_row(label, "report", f"{judges[key]:.3f}", str(judges.get("n_heldout", "")), "", "")
    clean = meta["card"].get("base_model", {}).get("clean", {})
    if "toy_fid" in clean:
        table.add_row(
            "toy-CLIP FID, generated vs real (clean)",
            "report",
            f"{clean['toy_fid']:.4f}",
            str(clean["harmful"]["n"]),
            "",
            "",
        )
    console.print(table)
    t = meta.get("timings_s", {})
    if t:
        console.print("timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()))


@world_app.command("build")
def build(
    profile: Annotated[str, typer.Option(help="quick (CI-sized, ~2 min) or full (the embedded default)")] = "full",
    seed: Annotated[int, typer.Option(help="world seed")] = 0,
    out: Annotated[Path | None, typer.Option(help="output folder (default: $CONCEPTLOCK_HOME/worlds/PROFILE)")] = None,
    concepts: Annotated[
        str, typer.Option(help="comma-separated harmful concepts; the first is the default target")
    ] = "gore,fire",
    force: Annotated[bool, typer.Option(help="rebuild even if an identical world exists")] = False,
) -> None:
    """Build the toy world; a second run with the same config is a no-op.

    Example: conceptlock world build --profile quick --seed 0 --out runs/world-quick
    """
    from pydantic import ValidationError

    from ..world.build import build_world, read_world
    from ..world.data import WorldConfig

    if profile not in ("quick", "full"):
        raise typer.BadParameter(f"unknown profile {profile!r} (quick|full)", param_hint="--profile")
    try:
        cfg = WorldConfig(profile=profile, seed=seed, concepts=[c.strip() for c in concepts.split(",") if c.strip()])
    except ValidationError as e:
        err = e.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise typer.BadParameter(msg, param_hint=f"--{err['loc'][0]}") from None
    folder = build_world(cfg, out, force=force, log=console.print)
    print_card(read_world(folder))
    console.print(f"world: {folder}")


@world_app.command("info")
def info(
    folder: Annotated[Path, typer.Argument(help="a built world folder")],
    json_out: Annotated[bool, typer.Option("--json", help="print world.json instead of the table")] = False,
) -> None:
    """Print a built world's report card again.

    Example: conceptlock world info runs/world-quick
    """
    from ..world.build import read_world

    meta = read_world(folder)
    if json_out:
        console.print_json(json.dumps(meta))
    else:
        print_card(meta)


@world_app.command("ship")
def ship(
    folder: Annotated[Path, typer.Argument(help="a built full-profile world folder")],
    dest: Annotated[Path | None, typer.Option(help="where to pack it (default: the package's world/shipped)")] = None,
) -> None:
    """Maintainers: pack a built world's weights (float16) into the package as the embedded default.

    Example: conceptlock world ship ~/.cache/conceptlock/worlds/full
    """
    from ..world.build import read_world
    from ..world.shipped import ship_world

    out = ship_world(folder, dest)
    print_card(read_world(out))
    console.print(f"shipped: {out}")


@world_app.command("unpack")
def unpack(
    out: Annotated[Path | None, typer.Option(help="destination (default: $CONCEPTLOCK_HOME/worlds/full)")] = None,
) -> None:
    """Unpack the world shipped with the package (seconds) instead of building it (minutes).

    Example: conceptlock world unpack --out runs/world
    """
    from ..world.build import default_world_dir, read_world
    from ..world.shipped import materialise

    folder = materialise(out or default_world_dir("full"), log=console.print)
    print_card(read_world(folder))


def register(app: typer.Typer) -> None:
    app.add_typer(world_app, name="world")
