"""`conceptlock reproduce`: run bundled (or your own) experiment TOMLs end to end and write the HTML report.

The command only parses and prints; planning, running and reporting live in `conceptlock.experiments`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)

EXAMPLE = "conceptlock reproduce paper-a paper-b --profile quick --out runs/reproduce-quick --jobs 2"
HELP = (
    "Run the papers' protocols end to end (world, alignment, attacks, evaluations) and write report.html/report.md.\n\n"
    "EXPERIMENT is a bundled name (paper-a, paper-b; GPU recipes paper-a-sd15, paper-b-sd14, paper-b-sdxl) or a path "
    "to an experiment TOML. Finished stages are skipped, so an interrupted run resumes where it stopped.\n\n"
    f"Example:\n\n  {EXAMPLE}\n\n"
    "Validate a GPU recipe offline, loading nothing:\n\n"
    "  conceptlock reproduce paper-b-sd14 --dry-run"
)


def _parse_inputs(items: list[str]) -> dict[str, str]:
    from ..errors import ConceptlockError

    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConceptlockError(f"--input {it!r}: expected NAME=PATH, e.g. --input i2p=data/i2p.csv")
        out[name.strip()] = path.strip()
    return out


def _print_plan(plans: list) -> None:
    for p in plans:
        exp = p.experiment
        t = Table(title=f"{exp.name} ({exp.profile}): {len(p.stages)} stages -> {p.out}", show_lines=False)
        for col in ("stage", "kind", "needs", "done"):
            t.add_column(col)
        for s in p.stages:
            t.add_row(
                s.id,
                s.kind,
                ", ".join(s.deps) if len(s.deps) <= 3 else f"{len(s.deps)} stages",
                "yes" if s.kind != "report" and s.is_done() else "",
            )
        console.print(t)
        if exp.excluded:
            console.print(f"left out by profile {exp.profile}: {', '.join(exp.excluded)}")
        for w in p.warnings:
            console.print(f"[yellow]warning[/yellow]: {w}")


def _print_claims(out: Path, plans: list) -> None:
    for p in plans:
        f = p.out / "summary.json"
        if not f.is_file():
            continue
        claims = json.loads(f.read_text()).get("claims") or []
        if not claims:
            continue
        t = Table(title=f"{p.experiment.name}: claims (details in the report)")
        for col in ("claim", "verdict", "what this run shows"):
            t.add_column(col)
        for c in claims:
            t.add_row(c["id"], c["verdict"], c["shows"])
        console.print(t)


def register(app: typer.Typer) -> None:
    """Add the `reproduce` command to the CLI."""

    @app.command("reproduce", help=HELP)
    def reproduce_cmd(
        experiments: Annotated[
            list[str] | None, typer.Argument(help="bundled experiment names or TOML paths [default: paper-a paper-b]")
        ] = None,
        profile: Annotated[
            str,
            typer.Option(
                help="quick (CI-sized plumbing check, ~4 min), full (the measurement, ~20 min with --jobs 2) or "
                "complete (every row of the files at their larger budgets; paper-b alone: 43 min with --jobs 2)"
            ),
        ] = "full",
        out: Annotated[Path | None, typer.Option(help="output folder [default: runs/reproduce-PROFILE]")] = None,
        world: Annotated[
            Path | None,
            typer.Option(help="toy world folder to use or build [default: $CONCEPTLOCK_HOME/worlds/PROFILE]"),
        ] = None,
        input: Annotated[
            list[str] | None, typer.Option("--input", help="NAME=PATH for an experiment's \\[inputs]; repeatable")
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="validate configs and print the plan; load no weights")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
        jobs: Annotated[
            int,
            typer.Option(
                help="stages run at once, each in its own one-thread process (2 on a 2-core CPU: ~1.6x faster)",
                min=1,
            ),
        ] = 1,
    ) -> None:
        import time

        from ..experiments.runner import run_experiment

        names = experiments or ["paper-a", "paper-b"]
        out_dir = out or Path("runs") / f"reproduce-{profile}"
        t0 = time.time()
        plans = run_experiment(
            names,
            profile=profile,
            out=out_dir,
            world=world,
            inputs=_parse_inputs(input or []),
            dry_run=dry_run,
            progress=not quiet,
            jobs=jobs,
        )
        if dry_run:
            _print_plan(plans)
            n = sum(len(p.stages) for p in plans)
            typer.echo(f"dry run OK: {len(plans)} experiment(s), {n} stages, nothing loaded")
            return
        _print_claims(out_dir, plans)
        typer.echo(f"wrote {out_dir / 'report.html'} and {out_dir / 'report.md'} ({time.time() - t0:.0f} s)")
